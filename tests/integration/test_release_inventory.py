"""The release inventory (common/privacy/release.py), enforced on the messages sites really send.

Where the messages are captured: as the ServerApp pulls them from Flower's in-memory grid
(``InMemoryGrid.pull_messages``), i.e. after every client mod (Flower's ``secaggplus_mod``
included), after Flower turned a failing ClientApp into an error reply and after the
SuperLink stamped the metadata. A client mod, even the outermost one, sees neither the
error reply (Flower builds it from the exception outside the ClientApp) nor the
metadata the link adds; the server's view is the closest to the wire a simulation has.

The runs use Flower's own simulation engine, ServerApp and ClientApp, with one part
replaced: the Ray backend, by ``backend=in-process`` (simulations/in_process.py), which runs each
ClientApp call through the same actor code in this process and round-trips every reply through
Flower's wire format (``message_to_proto``). Starting Ray and its workers costs more than the runs
themselves; what Ray adds to a message (its traceback in an error reason) is checked on
its own in test_a_data_value_in_an_exception_does_not_leave_the_site.

Each task runs twice, as briefly as every message kind allows: plain (2 sites, 1 round,
no DP, so the training metrics are sent too; site 0 drops out before training, so an
error reply is sent) and under SecAgg+ (3 sites, the minimum, 1 round, DP-SGD: setup,
share-keys, masked-vector and unmask replies, evaluate replies).
"""

from __future__ import annotations

import traceback

import pytest
import ray
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common.deploy.keys import write_key
from common.privacy.release import Kind, classify, message_fields, unlisted
from simulations.launcher import resolve, simulate
from tests.site_keys import site_keys

pytestmark = pytest.mark.slow

QUIET = ["sample-every=0", "audit.mia=false", "central-eval=false"]
TASKS = {
    "vae": ("vae-digits", ["vae.hidden-dim=16", "vae.latent-dim=2"]),
    "gan": ("gan-digits", ["gan.features=256", "gan.hidden-dim=32", "gan.eval-samples=200"]),
    "recsys": (
        "recsys-synthetic",
        ["recsys.synthetic-users=200", "recsys.synthetic-items=80", "recsys.num-buckets=512", "train.batch-size=128"],
    ),
    # Records generated in the test (below): data.path and tabular.schema are added there.
    "tabular": ("tabular-adult", ["data.source=csv", "data.partition=iid", "tabular.eval-samples=300"]),
}
PLAIN = ["num-sites=2", "rounds=1", "dp.enabled=false", 'faults.dropout-sites="0"', "faults.dropout-stage=train"]
SECURE = ["num-sites=3", "rounds=1", "secagg.enabled=true", "dp.target-epsilon=0.0", "dp.noise-multiplier=1.0"]
# DP-SGD with private metrics (metrics.dp, the deployment default): the noisy evaluation release.
PRIVATE = ["num-sites=2", "rounds=1", "dp.target-epsilon=0.0", "dp.noise-multiplier=1.0", "metrics.dp=true"]
# What the injected dropout's exception says; it must stay at the site.
DROPOUT_MESSAGE = "leaves round 1 before training"


def _capture(monkeypatch) -> tuple[set[str], list[str]]:
    """The field names of every message the ServerApp pulls, and every error reason, read as
    they are pulled: Flower's legacy conversion empties a reply's arrays once it reads them."""
    fields: set[str] = set()
    reasons: list[str] = []
    original = InMemoryGrid.pull_messages

    def recording_pull(self, message_ids):
        msgs = list(original(self, message_ids))
        for m in msgs:
            fields.update(message_fields(m))
            if m.has_error():
                reasons.append(m.error.reason)
        return msgs

    monkeypatch.setattr(InMemoryGrid, "pull_messages", recording_pull)  # the ServerApp runs in-process
    return fields, reasons


@pytest.mark.parametrize("mode", ["plain", "secagg", "private"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_field_a_site_sends_is_in_the_inventory(tmp_path, monkeypatch, task, mode):
    if mode == "private" and task == "gan":
        pytest.skip("the GAN's metrics.dp schema is empty unless gan.class-target = real: nothing new to capture")
    scenario, extra = TASKS[task]
    secure = mode == "secagg"
    key_file = str(write_key(tmp_path / "fed.key")) if task in ("recsys", "tabular") else None
    chosen = {"plain": PLAIN, "secagg": SECURE, "private": PRIVATE}[mode]
    overrides = extra + QUIET + chosen + [f"run-dir={tmp_path / 'run'}", "backend=in-process"]
    if task == "tabular":
        from tests.unit.test_tabular_data import generated_rows, write_table

        data, schema = write_table(tmp_path, generated_rows(900, seed=5))
        overrides += [f"data.path={data}", f"tabular.schema={schema}", "train.batch-size=128"]
    fields, reasons = _capture(monkeypatch)
    simulate(scenario, overrides, key_file=key_file)

    bad = unlisted(fields)
    assert not bad, f"{task} ({mode}) sends fields not in the release inventory: {bad}"

    # The run sent every message kind it is here for (the check above is not vacuous).
    kinds = {"config:fitres.metrics/site_id", "config:evaluateres.metrics/site_id", "metadata/created_at"}
    if secure:
        keys = ("pk1", "ctxts", "masked_params", "shares")
        kinds |= {f"config:secaggplus_configs/{k}" for k in keys}
    elif mode == "plain":
        kinds |= {"array:fitres.parameters/0", "config:fitres.metrics/rng", "error/reason"}
    elif task != "gan":  # private metrics: the evaluate reply carries the release (the GAN's schema is empty here)
        kinds |= {"config:evaluateres.metrics/metrics_noise_multiplier", "config:evaluateres.metrics/metrics_rng"}
    assert kinds <= fields, sorted(kinds - fields)

    # Error text: the fixed form, never the exception's own message.
    assert len(reasons) == (1 if mode == "plain" else 0)
    for reason in reasons:
        assert (
            "site failed: InjectedDropout [E-FAULT] (injected by [faults])" in reason and DROPOUT_MESSAGE not in reason
        )
    if secure and task in ("recsys", "tabular"):
        # The eval_sums stage's appended vector: every key of its schema is inventoried.
        from common.tasks import get_task

        schema = get_task(task)(resolve(scenario, overrides), None).sum_keys()
        assert schema and not unlisted(f"secure-sum/{k}" for k in schema)
    assert not ray.is_initialized()  # the runs never started Ray (InProcessBackend)


# ----------------------------------------------------------- in-process ClientApp
def _site_app(monkeypatch, train):
    """The real ClientApp (all its mods) of a no-DP VAE site, called in-process, and a fit message."""
    import time

    from flwr.app import Context, Message, Metadata, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict

    from client.app import build_client_app
    from common.tasks.vae.task import VAETask

    monkeypatch.setattr(VAETask, "train", train)
    cfg = resolve("vae-digits", TASKS["vae"][1] + ["num-sites=2", "dp.enabled=false"])
    task = VAETask(cfg)
    model = task.build_model()
    arrays = [v.detach().numpy() for v in model.state_dict().values()]
    ins = FitIns(ndarrays_to_parameters(arrays), {"server-round": 1})
    # An instruction as the SuperLink delivers it (the ServerApp's own constructor needs a run).
    meta = Metadata(1, "m1", 0, 1, "", "1", time.time(), 600.0, MessageType.TRAIN)
    msg = Message(content=fitins_to_recorddict(ins, keep_input=True), metadata=meta)
    ctx = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "declared-size": 500}, state=RecordDict(), run_config={}
    )
    return build_client_app(cfg.to_flat(), **site_keys()), msg, ctx


def test_a_site_that_adds_an_unlisted_metric_is_caught(monkeypatch):
    def train(self, model, session):
        for batch in session.batches():
            session.step(self.per_sample_loss(model, batch))
        return {"train_loss": 1.0, "rare_class_count": 1.0}  # a new statistic nobody decided on

    app, msg, ctx = _site_app(monkeypatch, train)
    reply = app(msg, ctx)
    fields = message_fields(reply)
    assert "config:fitres.metrics/train_loss" in fields
    assert unlisted(fields) == ["config:fitres.metrics/rare_class_count"]
    entry = classify("config:fitres.metrics/train_loss")
    assert entry is not None and entry.kind is Kind.COVERED


def test_a_data_value_in_an_exception_does_not_leave_the_site(monkeypatch):
    """Flower sends the ClientApp's exception text: in simulation with Ray's remote traceback
    (the cause's text included), in deployment ``str(type(ex)) + ":<'" + str(ex) + "'>"``."""
    from flwr.clientapp.client_app import ClientAppException
    from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

    planted = "4.718281828"

    def train(self, model, session):
        raise ValueError(f"rating {planted} outside [1, 5]")  # a site's data value in the message

    app, msg, ctx = _site_app(monkeypatch, train)
    with pytest.raises(Exception) as deployed:
        app(msg, ctx)
    # What flwr-clientapp (deployment) puts in the error reply.
    reason = str(type(deployed.value)) + ":<'" + str(deployed.value) + "'>"
    assert str(deployed.value) == "site failed: ValueError [E-INTERNAL]" and planted not in reason
    # What the simulation's actor raises, and the traceback Ray ships to the server with it.
    with pytest.raises(ClientAppException) as simulated:
        VirtualClientEngineActor().run(lambda: app, msg, "0", ctx)
    shipped = "".join(traceback.format_exception(simulated.value))
    assert "site failed: ValueError [E-INTERNAL]" in shipped and planted not in shipped
