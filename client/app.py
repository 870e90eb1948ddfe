"""The Flower ClientApp run at each partner site.

Per round a site: checks its own epsilon budget against its own accounting history
(kept in the node's state, not taken from the server), trains locally with DP-SGD,
and sends back

* the *update* (local - global weights, a delta), and
* its accountant inputs (n-hat, q, sigma, C, steps, delta, accountant) so the server can
  write the ledger. Raw data, labels and per-example values never leave the site.

The site's real number of records never leaves it either. The plan, the update's
weight and the evaluation weight all use the site's *declared* public size n-hat
(``declared-size`` in its node config; in a simulation the launcher, or under a local
``flwr run`` the folder ``$PRIVFED_SIMULATION_IDS`` names, declares each virtual site's
training-split size), which is what makes the ledger's add/remove-one epsilon true.
No timing is sent: how long a round takes depends on n and on the sampled batch sizes.

The site keeps its own accounting history in the node's ``context.state``, which lives
as long as the SuperNode's run, and, with a ``state-dir``, also on its own disk
(:mod:`client.state`), so that it survives a restart or a resumed run. Each reply also
carries the rounds the site trained before, so the server can ledger a round whose
reply it never received. With a ``state-dir`` the budget check composes the dataset's
lifetime history (every run), so a new run id does not reset the budget.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast, overload

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.client import Client, ClientApp, NumPyClient

from client.mods import InjectedDropout, failure_mod, make_fault_mod, secure_mod
from client.state import Lifetime, LifetimeEntry, SiteState, load_state, save_state, state_path
from common.averaging import MovingAverage
from common.config import RunConfig
from common.config.schema import lr_factor
from common.deploy.fileio import make_private_dir, write_atomically
from common.deploy.keys import KEY_ENV, key_from_env, load_key
from common.deploy.receipts import RECEIPT, Receipt, ReceiptError, check_receipt, extends
from common.deploy.signing import (
    MASKED,
    SIGNATURE,
    Ed25519PrivateKey,
    load_signing_key,
    pem_signing_key,
    private_bytes,
    reply_claim,
    sign,
    update_digest,
)
from common.deploy.simulation_ids import ENV, SIMULATION_NODE_CONFIG, SimulatedSite, folder_from_env, load_for_site
from common.deploy.site_config import (
    SERVER_KEY,
    SIGNING_KEY,
    PolicyRefusal,
    SitePolicy,
    apply_site_overrides,
    check_allowed_task,
    check_node_config_keys,
    check_server_key,
    check_site_policy,
    dataset_identity,
    declared_size,
    refuse_exact_metrics,
    refuse_run_config_paths,
    refuse_seeded_noise,
)
from common.errors import ConfigError, PrivfedError
from common.faults import drops, event
from common.identifiers import CENTRAL_SITE_ID, run_id_problem, site_id_problem
from common.pipeline import SiteContext, SiteUpdate, build_pipeline
from common.privacy.accounting import LIFETIME_ACCOUNTANT, RoundPlan, epsilon
from common.privacy.metrics_dp import metrics_mechanism
from common.privacy.plan import NoiseKey, check_real_size, plan_round, remember_noise
from common.privacy.training import run_local_round
from common.protocol import Status, fit_metrics
from common.runtime import cached_task, config_from, resolve_device, round_seed
from common.seeds import METRICS_EVALUATE, METRICS_FIT, RNG_OS, RNG_SEEDED, metrics_noise_rng
from common.tasks.base import get_state, set_state

STATE_KEY = "privfed.accounting"
# (round, noise multiplier) of each metrics.dp release, charged to the same budget.
METRICS_STATE_KEY = "privfed.metrics-accounting"
# Model state that never leaves the site (e.g. user embeddings), kept between rounds.
LOCAL_STATE_KEY = "privfed.local-model"
# The moving average of the site-local part (federation.ema-decay), kept beside it in the same
# record under this prefix, so that a resumed run continues it; only ever used to evaluate. A
# colon cannot occur in a module's state-dict key, so no real parameter can carry the prefix.
LOCAL_AVERAGE_PREFIX = "average:"
# The DP-trained optimiser's per-parameter state (train.keep-optimizer-state), kept between
# rounds like the site-local model part; post-processing of the noised gradients, never sent.
OPTIMIZER_STATE_KEY = "privfed.optimizer-state"
# The newest ledger receipt the site holds (without a state-dir: only in the node state).
RECEIPT_STATE_KEY = "privfed.receipt"
# Site-local only (the SuperNode's own log): never in a reply.
_LOG = logging.getLogger("privfed.site")


class ReceiptRefused(PrivfedError):
    """The coordinator's ledger receipt does not verify against its key (server-key)."""

    public_reason = "the coordinator's ledger receipt does not verify"


class RoundReplayed(PrivfedError):
    """The coordinator asked this site to train a round it already trained in this run.

    Rounds only go forward (a resumed run takes a new number, server.ledger.start_round), so
    a repeated or earlier ``server-round`` is the coordinator's doing; training again under
    the same (run id, round) would record the spend under a key the lifetime history
    already holds. Refused: the site trains each round of a run at most once.
    """

    public_reason = "server-round is not after the last round this site trained in this run"


class ReceiptContradiction(PrivfedError):
    """The coordinator's ledger receipt does not extend the one the site kept: its history was rewritten."""

    public_reason = "the coordinator's ledger receipt contradicts an earlier one"


def instruction_run_id(config: Mapping[str, Any]) -> str:
    """The instruction's run id ('' when it has none), refused unless it matches the strict
    pattern (common.identifiers): it names folders under the site's state-dir."""
    run_id = config.get("run-id", "")
    if run_id == "":
        return ""
    problem = run_id_problem(run_id)
    if problem:
        raise ConfigError("run-id", problem)
    return cast(str, run_id)


def receipt_path(state_dir: str | Path, run_id: str, site_id: str) -> Path:
    """``<state-dir>/receipts/<run-id>/<site-id>.json`` (both ids checked against their patterns)."""
    if run_id_problem(run_id) or site_id_problem(site_id):
        raise PrivfedError("receipt path: the run id or site id does not match its pattern")
    return Path(state_dir) / "receipts" / run_id / f"{site_id}.json"


class SiteClient(NumPyClient):
    def __init__(
        self,
        cfg: RunConfig,
        site_index: int,
        site_id: str,
        context: Context,
        key: bytes | None = None,
        state_dir: str = "",
        dataset_id: str = "",
        *,
        declared: int,
        signing_key: Ed25519PrivateKey | None = None,
        server_key: str = "",
    ) -> None:
        """``declared`` is the site's public size n-hat (:func:`declared_size`).

        ``signing_key`` signs every fit and evaluate reply (contract: common.deploy.signing);
        ``server_key`` (64 hex) is the coordinator's public key the site checks receipts
        against. :func:`make_site` always gives both to a deployed site; a SiteClient built
        directly without them (unit tests) sends unsigned replies, which a server with a
        registry refuses, and does not check receipts.
        """
        self.cfg, self.site_index, self.site_id, self.ctx = cfg, site_index, site_id, context
        self.declared = declared
        self.signing_key, self.server_key = signing_key, server_key
        self.task = cached_task(cfg, key)
        self.train_data, self.val_data = self.task.site_data(site_index)
        self.device = resolve_device(cfg.federation.device)
        self.state_dir = state_dir
        self.state_file: Path | None = None
        self.run_id = ""
        # The dataset's history across runs (client.state.Lifetime); without a state-dir only
        # this run's rounds are known, and a restart or a new run forgets them.
        self.lifetime = Lifetime(state_dir, dataset_id or f"partition-{site_index}") if state_dir else None
        # What happens to the update before it leaves (clip, guard, evaluation sums, weight);
        # the server runs the same list in reverse.
        self.pipeline = build_pipeline(cfg, self.task)

    # ------------------------------------------------------------ durable state
    def _restore(self, config: Mapping[str, Any]) -> None:
        """Load this run's saved state into the node state (see client.state).

        Every time, not once: Flower drops the changes a ClientApp made to its node state
        when the app then fails (a crash or dropout after training), so after a failure
        the in-memory history would miss the round the site had just spent privacy on.
        The file was written before the failure and is the site's truth.
        """
        run_id = self.run_id = instruction_run_id(config)
        if not self.state_dir or not run_id:
            return
        self.state_file = state_path(self.state_dir, run_id, self.site_id)
        saved = load_state(self.state_file)
        if saved is None:
            return
        self._set_history(saved.history)
        self._set_metrics_history(saved.metrics)
        if saved.local:
            self.ctx.state.array_records[LOCAL_STATE_KEY] = ArrayRecord(torch_state_dict=saved.local)
        if saved.optimizer:
            self.ctx.state.array_records[OPTIMIZER_STATE_KEY] = ArrayRecord(torch_state_dict=saved.optimizer)

    def _persist(self, plan: RoundPlan, *, metrics_release: bool = False) -> None:
        """Write the site's state: first the lifetime history (what the budget checks), then
        this run's. A metrics release (metrics.dp) is a lifetime entry of its own, under the
        run id's metrics twin, so it never collides with the round's DP-SGD entry."""
        if self.lifetime is not None:
            if metrics_release:
                # Keyed by the release's position in the run, not its round: fit and evaluate may both release.
                releases = self._metrics_entries()
                z = releases[-1][1]
                entry = LifetimeEntry(
                    _metrics_run(self.run_id),
                    len(releases),
                    *metrics_mechanism(z),
                    plan.delta,
                    plan.accountant,
                    self.cfg.dp.unit,
                )
            else:
                r, sigma, q, steps = self._entries()[-1]
                entry = LifetimeEntry(self.run_id, r, sigma, q, steps, plan.delta, plan.accountant, self.cfg.dp.unit)
            self.lifetime.record(entry)
        if self.state_file is None:
            return
        local = self._kept_local()
        opt = self.ctx.state.array_records.get(OPTIMIZER_STATE_KEY)
        optimizer = opt.to_torch_state_dict() if opt is not None else {}
        save_state(self.state_file, SiteState(self._entries(), local, self._metrics_entries(), optimizer))

    # ------------------------------------------------------------ site-local model state
    def _model(self, parameters: list[np.ndarray]) -> tuple[Any, list[str]]:
        """The site's model: its own local part from the last round, the global shared part."""
        # Seeded like the rest of the site's randomness, so the site-local part (user
        # embeddings) starts the same in every repeat of a seeded run.
        seed = round_seed(self.cfg, self.site_index, 0)
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            model = self.task.build_model(self.site_index)
        keys = self.task.shared_keys(model)
        last = {k: v for k, v in self._kept_local().items() if not k.startswith(LOCAL_AVERAGE_PREFIX)}
        if last:
            model.load_state_dict(last, strict=False)
        set_state(model, keys, parameters)
        return model, keys

    def _kept_local(self) -> dict[str, torch.Tensor]:
        rec = self.ctx.state.array_records.get(LOCAL_STATE_KEY)
        return rec.to_torch_state_dict() if rec is not None else {}

    def _keep_local(self, model: Any, keys: list[str]) -> None:
        """Keep the site-local part of the model just trained and, under ``federation.ema-decay``,
        fold it into its moving average (:class:`common.averaging.MovingAverage`, the server's
        arithmetic for the served model)."""
        local = _local_part(model, keys)
        if not local:
            return
        kept = dict(local)
        names = sorted(local)
        before = self._local_average(local) if self.cfg.federation.ema_decay > 0 else {}
        average = MovingAverage(
            self.cfg.federation.ema_decay, [before[n].numpy() for n in names] if set(before) == set(names) else None
        )
        average.update([local[n].numpy() for n in names])
        started = average.started()
        if started is not None:
            kept.update({LOCAL_AVERAGE_PREFIX + n: torch.from_numpy(a) for n, a in zip(names, started)})
        self.ctx.state.array_records[LOCAL_STATE_KEY] = ArrayRecord(torch_state_dict=kept)

    def _evaluated_model(self, parameters: list[np.ndarray]) -> Any:
        """The model a site evaluates. Under ``federation.ema-decay`` the server sends its served
        average of the global models; the site completes it with the same average of its own
        site-local tables (the recommender's user tables), not their last round's values.

        Why: nothing else averages the site-local tables, and under DP-SGD their last values
        carry the last rounds' noise (recsys-movielens, docs/TASKS.md). Privacy: the local
        tables are trained by DP-SGD like the rest (or, under dp.unit = user, are the joint-DP
        person-local part), and their average is a fixed function of them: post-processing,
        computed and kept at the site, never sent."""
        model, keys = self._model(parameters)
        if self.cfg.federation.ema_decay > 0:
            average = self._local_average(_local_part(model, keys))
            if average:
                model.load_state_dict(average, strict=False)
        return model

    def _local_average(self, local: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The kept average of the site-local tables ``local`` (by their names), only where it
        fits them: the same name, shape and dtype, and finite. A damaged or foreign state file's
        other entries are dropped with one log line (the average then starts again), never
        loaded over a table, shared or local, and never a crash."""
        p = LOCAL_AVERAGE_PREFIX
        found = {k[len(p) :]: v for k, v in self._kept_local().items() if k.startswith(p)}
        fits = {
            n: v
            for n, v in found.items()
            if n in local and v.shape == local[n].shape and v.dtype == local[n].dtype and bool(torch.isfinite(v).all())
        }
        if len(fits) != len(found):
            _LOG.warning(
                "site-local average: %d kept table(s) do not fit the model (name, shape, dtype or non-finite "
                "values) and are dropped; the average starts again",
                len(found) - len(fits),
            )
            return {}
        return fits

    def _kept_optimizer_state(self) -> dict[str, torch.Tensor] | None:
        """The optimiser state the site kept from its last trained round (train.keep-optimizer-state)."""
        if not self.cfg.train.keep_optimizer_state:
            return None
        rec = self.ctx.state.array_records.get(OPTIMIZER_STATE_KEY)
        return rec.to_torch_state_dict() if rec is not None else None

    # ------------------------------------------------------------ accounting state
    def _entries(self) -> list[tuple[int, float, float, int]]:
        """(round, sigma, q, steps) for every round this site trained in this run."""
        rec = self.ctx.state.config_records.get(STATE_KEY)
        if rec is None:
            return []
        # The four columns _set_history writes (a ConfigRecord's values are typed as any record value).
        rounds, sigmas = cast(list[int], rec["round"]), cast(list[float], rec["sigma"])
        rates, steps = cast(list[float], rec["q"]), cast(list[int], rec["steps"])
        return list(zip(rounds, sigmas, rates, steps))

    def _history(self) -> list[tuple[float, float, int]]:
        return [(s, q, k) for _, s, q, k in self._entries()]

    def _lifetime(self) -> list[tuple[float, float, int]]:
        """Every round this site's dataset was trained on, in any run, this one included."""
        if self.lifetime is None:
            return self._history()
        this_run = [LifetimeEntry(self.run_id, r, s, q, k, 0.0, "") for r, s, q, k in self._entries()]
        this_run += [
            LifetimeEntry(_metrics_run(self.run_id), i, *metrics_mechanism(z), 0.0, "")
            for i, (_, z) in enumerate(self._metrics_entries(), start=1)
        ]
        return Lifetime.merged(self.lifetime.load(), this_run)

    def _check_lifetime_unit(self) -> None:
        """Refuse to train a dataset under another unit of privacy than its history's.

        An epsilon per record does not bound a person's loss (a person with m records is
        protected only at about m times it), nor does a person's epsilon give the per-record
        add/remove guarantee (removing one of a person's records replaces their clipped term:
        twice the sensitivity), so one dataset's lifetime budget composes one unit only.
        """
        if self.lifetime is None or not self.cfg.dp.enabled:
            return
        units = {e.unit for e in self.lifetime.load() if e.steps > 0}
        if units - {self.cfg.dp.unit}:
            raise PolicyRefusal(
                "dp.unit",
                "differs from the unit this site's dataset was trained under before (its lifetime history): "
                "epsilons of two units do not compose into one budget; keep the dataset's unit",
            )

    def _set_history(self, entries: list[tuple[int, float, float, int]]) -> None:
        self.ctx.state.config_records[STATE_KEY] = ConfigRecord(
            {
                "round": [int(e[0]) for e in entries],
                "sigma": [float(e[1]) for e in entries],
                "q": [float(e[2]) for e in entries],
                "steps": [int(e[3]) for e in entries],
            }
        )

    def _metrics_entries(self) -> list[tuple[int, float]]:
        """(round, noise multiplier) of every noisy metrics release this site made in this run."""
        rec = self.ctx.state.config_records.get(METRICS_STATE_KEY)
        if rec is None:
            return []
        return list(zip(cast(list[int], rec["round"]), cast(list[float], rec["z"])))

    def _set_metrics_history(self, entries: list[tuple[int, float]]) -> None:
        self.ctx.state.config_records[METRICS_STATE_KEY] = ConfigRecord(
            {"round": [int(r) for r, _ in entries], "z": [float(z) for _, z in entries]}
        )

    def _spend(self) -> list[tuple[float, float, int]]:
        """Everything this site released, for its budget: DP-SGD rounds and metrics releases,
        composed by one accountant (sequential composition; docs/PRIVACY.md, "Private metrics")."""
        return self._history() + [metrics_mechanism(z) for _, z in self._metrics_entries()]

    def _metrics_affordable(self, plan: RoundPlan) -> bool:
        """Whether one more metrics release stays within the budget (metrics.dp)."""
        more = [metrics_mechanism(self.cfg.metrics.noise_multiplier)]
        run = epsilon(self._spend() + more, plan.delta, plan.accountant)
        lifetime = epsilon(self._lifetime() + more, plan.delta, LIFETIME_ACCOUNTANT)
        return max(run, lifetime) <= self.cfg.dp.epsilon_budget

    def _history_json(self) -> str:
        """The rounds this site trained, as the reply's ``history`` (protocol.py)."""
        return json.dumps([[r, s, q, k] for r, s, q, k in self._entries() if k > 0])

    def _remember(self, server_round: int, plan: RoundPlan, steps: int) -> None:
        self._set_history(self._entries() + [(server_round, plan.noise_multiplier, plan.sample_rate, steps)])

    # ------------------------------------------------------------ receipts
    def _kept_receipt(self) -> Receipt | None:
        """The newest receipt this site accepted in this run (its disk, else its node state)."""
        path = self._receipt_file()
        if path is not None:
            if not path.is_file():
                return None
            text = path.read_text(encoding="utf-8")
        else:
            rec = self.ctx.state.config_records.get(RECEIPT_STATE_KEY)
            if rec is None:
                return None
            text = str(rec["text"])
        try:
            return check_receipt(text, self.server_key, self.site_id, self.run_id)
        except ReceiptError:  # the site's own copy: damaged, or kept under another server key
            raise PrivfedError(
                f"the kept ledger receipt{f' {path}' if path else ''} no longer verifies; move it aside only if you "
                "know why (it is this site's evidence of what the coordinator ledgered)"
            ) from None

    def _receipt_file(self) -> Path | None:
        return receipt_path(self.state_dir, self.run_id, self.site_id) if self.state_dir and self.run_id else None

    def _check_receipt(self, config: Mapping[str, Any]) -> None:
        """Contract point 4: verify the instruction's receipt, refuse one that does not extend the
        kept one (the coordinator rewrote what it showed this site), keep the newest."""
        text = config.get(RECEIPT, "")
        if text == "" or not self.server_key:  # no head signed yet; or a SiteClient without a server key
            return
        try:
            new = check_receipt(text, self.server_key, self.site_id, self.run_id)
        except ReceiptError as exc:
            _LOG.error("refusing the instruction: %s", exc)
            raise ReceiptRefused(str(exc)) from None
        kept = self._kept_receipt()
        if kept is not None:
            reason = extends(kept, new)
            if reason:
                _LOG.error("refusing the instruction: the ledger receipt does not extend the kept one: %s", reason)
                raise ReceiptContradiction(reason)
            if kept.text == new.text:
                return
        path = self._receipt_file()
        if path is None:
            self.ctx.state.config_records[RECEIPT_STATE_KEY] = ConfigRecord({"text": new.text})
            return
        make_private_dir(path.parent)  # 0700, whatever the umask (docs/DEPLOYMENT.md, file modes)
        data = new.text.encode()

        def write(fh: Any) -> None:
            fh.write(data)

        write_atomically(path, write)

    def _begin(self, config: Mapping[str, Any]) -> None:
        """Every instruction: the run id (strict), the site's durable state, the receipt."""
        self._restore(config)
        self._check_receipt(config)

    # ------------------------------------------------------------ signing
    def _signed(self, kind: str, config: Mapping[str, Any], arrays: list[np.ndarray], metrics: dict[str, Any]):
        """The reply's metrics with the site's signature added LAST (contract point 1)."""
        if self.signing_key is None:
            return metrics
        if kind == "evaluate":
            update = ""
        else:
            update = MASKED if self.cfg.secagg.enabled else update_digest(arrays)
        claim = reply_claim(self.run_id, int(config.get("server-round", 0)), kind, update, metrics)
        return {**metrics, SIGNATURE: sign(self.signing_key, claim)}

    # ------------------------------------------------------------------- Flower
    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        arrays, num_examples, metrics = self._fit(parameters, config)
        return arrays, num_examples, self._signed("fit", config, arrays, metrics)

    def _fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        server_round = int(config.get("server-round", 0))
        self._begin(config)
        trained = [r for r, *_ in self._entries()]
        if trained and server_round <= max(trained):
            raise RoundReplayed(f"server-round {server_round} after round {max(trained)} was trained")
        self._check_lifetime_unit()
        # n-hat only: the plan is sent and ledgered, and must not depend on the real n.
        plan = plan_round(self.cfg, self.declared)
        check_real_size(plan, self.task.unit_count(self.train_data))  # delta < 1/n for the real n; says no n
        budget = self.cfg.dp.epsilon_budget
        model, keys = self._model(parameters)
        private = self.cfg.metrics.dp
        evaluate = self.task.dp_evaluate if private else self.task.evaluate
        ctx = SiteContext(
            self.site_index,
            server_round,
            evaluate=lambda: evaluate(model.to(self.device), self.val_data),
            is_sum_key=self.task.is_sum_key,
            metrics_rng=self._metrics_rng(server_round, METRICS_FIT) if private else None,
            metrics_allowed=not private or self._metrics_affordable(plan),
        )
        self.pipeline.before_training(ctx)  # evaluation sums of the model just received (noised: metrics.dp)
        released = self._charge_release(server_round, ctx.release, plan)
        # The rounds this site trained before, for the server's ledger (a reply it never
        # received is ledgered when it learns of it here).
        before = self._history_json()

        seed = round_seed(self.cfg, self.site_index, server_round)
        rng = RNG_OS if seed is None else RNG_SEEDED  # what this round's noise and sampling use
        spent = epsilon(self._spend(), plan.delta, plan.accountant)
        if self.cfg.dp.enabled:
            projected = epsilon(self._spend() + [plan.mechanism], plan.delta, plan.accountant)
            # The budget bounds the dataset's whole life, not one run: the run id is the
            # coordinator's, so a per-run budget would reset with every new one.
            lifetime = epsilon(self._lifetime() + [plan.mechanism], plan.delta, LIFETIME_ACCOUNTANT)
            if max(projected, lifetime) > budget:
                # Say so, send a zero update with zero weight: nothing of the data leaves.
                zeros = [np.zeros_like(p) for p in parameters]
                metrics = fit_metrics(
                    self.site_id,
                    self.task.privacy_unit,
                    plan,
                    0,
                    budget,
                    Status.BUDGET_EXHAUSTED,
                    eps_spent=spent,
                    rng=rng,
                    note=f"next round would reach eps={projected:.3g} in this run, {lifetime:.3g} over this "
                    f"site's dataset's lifetime (every run), > budget {budget:g}",
                    history=before,
                )
                metrics.update(released)
                # Under SecAgg+ a zero update still takes part, so the sum stays recoverable;
                # its evaluation sums (validation data, not training data) still count.
                ctx.trained = False
                out = self.pipeline.site(SiteUpdate(zeros, 0), ctx)
                return out.payload(), out.num_examples, metrics

        faults, seed0 = self.cfg.faults, self.cfg.federation.seed
        if drops(faults, seed0, self.site_index, server_round, "train"):
            raise InjectedDropout(
                f"injected dropout: site {self.site_index} leaves round {server_round} before training"
            )
        if event(faults, seed0, self.site_index, server_round, "crash", faults.crash_rate):
            raise InjectedCrash(
                f"injected crash: site {self.site_index} failed in round {server_round} before training"
            )
        t0 = time.perf_counter()
        lr_scale = lr_factor(self.cfg.train.lr_schedule, server_round, self.cfg.federation.rounds)
        outcome = run_local_round(
            self.task, model, self.train_data, plan, self.device, seed, lr_scale, self._kept_optimizer_state()
        )
        self._remember(server_round, plan, outcome.steps_taken)
        self._keep_local(model, keys)
        if outcome.optimizer_state:  # train.keep-optimizer-state: site-local, never in the reply
            self.ctx.state.array_records[OPTIMIZER_STATE_KEY] = ArrayRecord(torch_state_dict=outcome.optimizer_state)
        elif OPTIMIZER_STATE_KEY in self.ctx.state.array_records:
            # Flag off, SGD (no state) or a non-finite state: keep none, so that no stale or
            # broken state is loaded in a later round (and the file holds none either).
            del self.ctx.state.array_records[OPTIMIZER_STATE_KEY]
        self._persist(plan)  # before anything leaves the site
        local = get_state(model, keys)
        delta = [(a - b).astype(b.dtype, copy=False) for a, b in zip(local, parameters)]
        # Clip (client-level DP), refuse what SecAgg+ could not check, injected upload faults,
        # evaluation sums, weight: see common/pipeline/build.py for the order and why.
        # Weighted by n-hat: the weight is sent (FedAvg), the real n is not.
        out = self.pipeline.site(SiteUpdate(delta, plan.dataset_size), ctx)
        # Under DP the training loss stays at the site: it is computed from the private
        # examples without noise, so sending it would fall outside the epsilon we claim.
        private_extras = {} if self.cfg.dp.enabled or self.cfg.central_dp.enabled else outcome.metrics
        metrics = fit_metrics(
            self.site_id,
            self.task.privacy_unit,
            plan,
            outcome.steps_taken,
            budget,
            Status.TRAINED,
            eps_spent=epsilon(self._spend(), plan.delta, plan.accountant),
            rng=rng,
            history=before,
        )
        metrics.update(released)  # the noisy metrics release of this reply (metrics.dp), if any
        # Timing reveals n and the sampled batch sizes: it stays in the site's own log.
        _LOG.debug("round %s: local training took %.2f s", server_round, time.perf_counter() - t0)
        # Added after, not as fit_metrics(**extras): fit_metrics's str keywords (note, history) keep
        # a dict[str, float] out of **; same dict, same key order, as fit_metrics's own merge.
        clash = sorted(set(private_extras) & set(metrics))
        if clash:  # a task's training metric must not overwrite the protocol's own fields
            raise PrivfedError(f"task training metric(s) {', '.join(clash)} clash with fit reply fields")
        metrics.update({k: float(v) for k, v in private_extras.items()})
        return out.payload(), out.num_examples, metrics

    def _metrics_rng(self, server_round: int, phase: int) -> np.random.Generator:
        seed = None if self.cfg.dp.secure_rng else self.cfg.federation.seed
        return metrics_noise_rng(seed, self.site_index, server_round, phase)

    def _charge_release(self, server_round: int, release: Any, plan: RoundPlan) -> dict[str, float]:
        """Record a noisy metrics release in the site's own history (on disk before it leaves);
        the reply fields that let the server ledger it ({} when nothing was released)."""
        if release is None or not release.values:
            # Nothing released (e.g. the GAN without gan.class-target): nothing to charge, and no
            # release fields, which the server would refuse (a release of sensitivity 0).
            return {}
        self._set_metrics_history(self._metrics_entries() + [(server_round, release.noise_multiplier)])
        self._persist(plan, metrics_release=True)
        rng = RNG_OS if self.cfg.dp.secure_rng else RNG_SEEDED  # as _metrics_rng draws it
        return {**release.reply_fields(), "metrics_delta": plan.delta, "metrics_rng": rng}

    def _private_evaluate(self, model: Any, server_round: int) -> tuple[float, int, dict[str, Any]]:
        """metrics.dp: the noisy release of the task's schema, or nothing (secure sums carry it, or no budget)."""
        plan = plan_round(self.cfg, self.declared)
        out: dict[str, Any] = {"site_id": self.site_id, "history": self._history_json()}
        if self.pipeline.get("eval_sums") is not None:
            return float("nan"), 1, out  # the (noisy) sums rode in the masked fit vector
        if not self._metrics_affordable(plan):
            return float("nan"), 1, out
        stage = self.pipeline.get("metrics_dp")
        values = self.task.dp_evaluate(model.to(self.device), self.val_data)
        noisy = stage.noise(values, self._metrics_rng(server_round, METRICS_EVALUATE))
        fields = self._charge_release(server_round, noisy, plan)
        # The site's own primary metric from its noisy sums: post-processing, no further cost.
        loss = float(self.task.combine_metrics([(1, noisy.values)]).get(self.task.primary_metric, float("nan")))
        # num_examples = 1: the exact validation count would undo the noise on the count.
        return loss, 1, {**out, **noisy.values, **fields, "eps_budget": self.cfg.dp.epsilon_budget}

    def evaluate(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        loss, num_examples, metrics = self._evaluate(parameters, config)
        return loss, num_examples, self._signed("evaluate", config, [], metrics)

    def _evaluate(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        self._begin(config)
        model = self._evaluated_model(parameters)
        if self.cfg.metrics.dp:
            return self._private_evaluate(model, int(config.get("server-round", 0)))
        metrics = self.task.evaluate(model.to(self.device), self.val_data)
        # A task may compute its primary metric only centrally (the GAN's FID); Flower still
        # wants a loss, and the server ignores a NaN one.
        loss = float(metrics.get(self.task.primary_metric, float("nan")))
        # The rounds this site trained, so a fit reply lost in the last round is still ledgered.
        history = self._history_json()
        if self.pipeline.get("eval_sums") is not None:
            # The sums go inside the masked fit vector; in the clear only the site's own
            # primary metric, which site-level fairness (and q-fedavg) needs per site.
            metrics = {k: v for k, v in metrics.items() if k == self.task.primary_metric}
        # The weight of this site's metrics in the server's mean: n-hat, not the real validation
        # size (every site splits off the same fraction, so the weights are in proportion).
        return loss, self.declared, {"site_id": self.site_id, **metrics, "history": history}


def _local_part(model: Any, shared_keys: list[str]) -> dict[str, torch.Tensor]:
    """The model's site-local state (every entry but the shared ones), detached, on the CPU."""
    shared = set(shared_keys)
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in shared}


def _metrics_run(run_id: str) -> str:
    """The lifetime file's run id for a run's metrics releases (keys are (run id, round))."""
    return f"{run_id}/metrics" if run_id else ""


class InjectedCrash(RuntimeError):
    """A crash the run's ``[faults]`` section asked for: the ClientApp fails with an error."""

    public_reason = "injected by [faults]"  # sent to the server (client.mods.failure_text)


def site_identity(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[int, str]:
    """(partition index, pseudonymous site id) from the SuperNode's node config."""
    if "partition-id" not in node_config:
        raise PrivfedError(
            "this SuperNode has no 'partition-id' in its node config: start it with --node-config 'partition-id=<i>'"
        )
    index = node_config["partition-id"]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < cfg.federation.num_sites:
        raise PrivfedError(f"partition-id={index!r} must be an integer in [0, num-sites={cfg.federation.num_sites})")
    # Deployment: the operator names the site pseudonymously; simulation: site-<i>.
    site_id = str(node_config.get("site-id", f"site-{index}"))
    if site_id == CENTRAL_SITE_ID:
        raise PrivfedError(
            f"site-id {CENTRAL_SITE_ID!r} is reserved for the ledger's client-level DP rows; pick another"
        )
    problem = site_id_problem(site_id)
    if problem:
        raise ConfigError("site-id", problem)
    return index, site_id


def signing_identity(
    node_config: Mapping[str, Any], site_index: int, signing_keys: Sequence[Ed25519PrivateKey] | None, server_key: str
) -> tuple[Ed25519PrivateKey, str]:
    """(the site's signing key, the coordinator's public key hex).

    A deployed site reads its own: node config ``signing-key`` (a PEM path) and ``server-key``
    (64 hex), and is refused without them. The simulation launcher hands its virtual sites
    theirs (``signing_keys[partition-id]``, ``server_key``); a site's own node config wins.
    """
    path = node_config.get(SIGNING_KEY, "")
    if isinstance(path, str) and path:
        signer = load_signing_key(path)
    elif signing_keys is not None and 0 <= site_index < len(signing_keys):
        signer = signing_keys[site_index]
    else:
        raise ConfigError(
            SIGNING_KEY,
            "missing from this site's node config: the site signs every reply with its Ed25519 key "
            "(`privfed site init` makes one; the coordinator registers its public key)",
        )
    given = node_config.get(SERVER_KEY, "")
    if given not in ("", None) or signing_keys is None:
        server_key = check_server_key(given)
    elif server_key:
        check_server_key(server_key)
    return signer, server_key


def in_simulation_engine() -> bool:
    """Whether this ClientApp runs inside Flower's simulation engine: in a Ray actor, the
    engine's only backend in flwr 1.41 (``ClientAppActor``).

    A SuperNode runs its ClientApp in a process of its own (``flwr-clientapp``, a site's
    ``privfed-clientapp``), which never starts Ray; the site's code decides that, not the
    coordinator's app or run config. Ray is looked up among the loaded modules only, never
    imported: asking an uninitialised Ray for its context would start a Ray instance.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # not in a worker after all: not the engine
        return False


def simulation_engine_site(node_config: Mapping[str, Any], num_sites: int, site_index: int) -> SimulatedSite | None:
    """The site's key, the coordinator's public key and the site's n-hat from the folder
    ``$PRIVFED_SIMULATION_IDS`` names, for a node of Flower's simulation engine under a local
    ``flwr run`` (Flower can hand such a node nothing but ``partition-id``); None otherwise.

    Why it cannot weaken a deployed site (common/deploy/simulation_ids.py has the whole
    argument): the variable is the machine operator's, never the run config's; and it is read
    only when the node config is exactly the one Flower's simulation engine makes (a deployed
    site's always carries its ``signing-key``, ``declared-size`` and ``server-key``) *and*
    this ClientApp runs in the engine's Ray actor (:func:`in_simulation_engine`). Every other
    node keeps the deployed rules: its own ``signing-key``, or a refusal without one
    (:func:`signing_identity`).
    """
    # The node and the process first: a deployed site ignores the variable whatever it holds
    # (reading it first would fail such a site on a malformed value, and tell the coordinator so).
    if set(node_config) != SIMULATION_NODE_CONFIG or not in_simulation_engine():
        return None
    folder = folder_from_env()
    return None if folder is None else load_for_site(folder, num_sites, site_index)


def site_key(cfg: RunConfig, node_config: Mapping[str, Any], given: bytes | None = None) -> bytes | None:
    """The federation key, for tasks that pseudonymise identifiers; None for the others.

    Looked up in the SuperNode's ``key-file`` node config, then the launcher's key
    (simulation), then ``$PRIVFED_KEY_FILE``. It is site-local: never in the run config.
    """
    from common.tasks import get_task

    if not get_task(cfg.task).needs_key:
        return None
    if node_config.get("key-file"):
        return load_key(str(node_config["key-file"]))
    key = given if given is not None else key_from_env()
    if key is None:
        raise PrivfedError(
            f"task {cfg.task!r} pseudonymises identifiers with the federation key, but this site has none: "
            f"start the SuperNode with --node-config 'key-file=\"PATH\"' or set {KEY_ENV} "
            "(create a key with `privfed keys new PATH` and give every site a copy)"
        )
    return key


def make_site(
    base: Mapping[str, Any],
    context: Context,
    key: bytes | None = None,
    state_dir: str | Path = "",
    declared_sizes: Sequence[int] | None = None,
    allow_seeded_noise: bool = False,
    signing_keys: Sequence[Ed25519PrivateKey] | None = None,
    server_public_key: str = "",
) -> SiteClient:
    """The site a SuperNode runs for one message (see :func:`build_client_app`): the run's
    config under this site's own rules.

    Refuses, before loading any data: a site without its signing key or the coordinator's
    key (deployment), or with no declared size n-hat (deployment); and, by the site's own
    policy (:class:`~common.deploy.site_config.PolicyRefusal`, bound to the site's key so the
    refusal can be signed once the instruction's run id and round are known): a task it does
    not allow, seeded noise or exact metrics unless the site (or the simulation launcher)
    allows them, and a plan outside its limits (sigma, delta, per-round epsilon, group size).

    A node of Flower's simulation engine under a local ``flwr run`` takes its key, the
    coordinator's key and its n-hat from ``$PRIVFED_SIMULATION_IDS`` (:func:`simulation_engine_site`).
    """
    node = context.node_config
    check_node_config_keys(node)  # a mistyped limit must not be silently ignored
    # The run's config, then this site's own settings (data, device, a stricter budget).
    cfg = apply_site_overrides(config_from(base, context.run_config), node)
    site_index, site_id = site_identity(cfg, node)
    simulated = declared_sizes[site_index] if declared_sizes is not None else None
    engine = simulation_engine_site(node, cfg.federation.num_sites, site_index) if signing_keys is None else None
    if engine is not None:  # a node of Flower's simulation engine under a local `flwr run`
        signer, server_key, simulated = engine.signing_key, engine.server_public_key, engine.declared_size
    else:
        signer, server_key = signing_identity(node, site_index, signing_keys, server_public_key)
    policy = SitePolicy.from_node_config(node)
    try:
        check_allowed_task(cfg, policy)  # first: nothing of an unwanted task is even sized
        # Which of the site's files are read is the site's choice, never the run config's.
        refuse_run_config_paths(context.run_config, virtual_site=allow_seeded_noise)
        # The run config is the coordinator's, so it alone cannot make a site's noise predictable.
        refuse_seeded_noise(cfg, node, virtual_site=allow_seeded_noise)
        # Likewise exact metrics: virtual sites may send them, a deployed site only by its own choice.
        refuse_exact_metrics(cfg, node, virtual_site=allow_seeded_noise)
        declared = declared_size(node, simulated)
        check_site_policy(cfg, policy, declared)  # the plan at n-hat: no data read
    except PolicyRefusal as exc:
        raise exc.bind(signer, site_id) from None
    site_secret = site_key(cfg, node, key)
    folder = str(node.get("state-dir", "") or state_dir)
    dataset = dataset_identity(cfg, node, site_index)
    site = SiteClient(
        cfg,
        site_index,
        site_id,
        context,
        site_secret,
        folder,
        dataset,
        declared=declared,
        signing_key=signer,
        server_key=server_key,
    )
    if engine is not None and site.task.unit_count(site.train_data) != declared:
        # n-hat must be the training split's size, as `privfed simulate` declares it (the
        # server checks this too, but cannot for a task it holds no federation key for).
        raise ConfigError(ENV, "registers this site with the size of another data split than this run's")
    return site


class RefusingSite(NumPyClient):
    """What a site that refused the run config by its policy answers every instruction with:
    the refusal, signed for the instruction's run id and round (contract point 5). No data
    is loaded; the run id is checked like any instruction's."""

    def __init__(self, refusal: PolicyRefusal) -> None:
        self.refusal = refusal

    def _refuse(self, config: Mapping[str, Any]) -> Any:
        run_id = instruction_run_id(config)
        raise self.refusal.sign_for(run_id, int(config.get("server-round", 0)))

    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]) -> Any:
        return self._refuse(config)

    def evaluate(self, parameters: list[np.ndarray], config: Mapping[str, Any]) -> Any:
        return self._refuse(config)


def build_client_app(
    defaults: Mapping[str, Any] | None = None,
    key: bytes | None = None,
    state_dir: str | Path = "",
    noise: Mapping[NoiseKey, float] | None = None,
    declared_sizes: Sequence[int] | None = None,
    allow_seeded_noise: bool = False,
    signing_keys: Sequence[Ed25519PrivateKey] | None = None,
    server_public_key: str = "",
) -> ClientApp:
    """A ClientApp whose config is ``defaults`` overlaid by Flower's run_config.

    ``key`` is the federation key the simulation launcher hands its virtual sites; a
    deployed site reads its own (:func:`site_key`). ``state_dir`` is where the virtual
    sites keep their durable state; a deployed site names its own (``state-dir``).
    ``noise`` is the launcher's searched noise multipliers (:func:`common.privacy.plan.known_noise`),
    so each Ray worker does not search them again.
    ``declared_sizes`` is the launcher's declaration of each virtual site's public size
    n-hat (its training-split size: the launcher made the partition, so it knows them); a
    deployed site declares its own (``declared-size``) and is refused without one.
    ``allow_seeded_noise``: the simulation launcher's virtual sites accept ``dp.secure-rng = false``;
    a deployed site (this module's ``app``) refuses it unless its node config says ``allow-seeded-noise = true``.
    ``signing_keys`` (indexed by partition id) and ``server_public_key`` (64 hex): the launcher's
    keys for its virtual sites; a deployed site reads its own (``signing-key``, ``server-key``).

    A run config the site's policy refuses is answered, per instruction, by a
    :class:`RefusingSite`: the refusal needs the instruction's run id and round to be signed,
    and Flower gives ``client_fn`` only the context, not the message.
    """
    base = dict(defaults or {})
    searched = dict(noise or {})
    # As PEM bytes: Ray pickles the app for its workers, and a key object cannot be pickled.
    pems = _PemKeys(signing_keys) if signing_keys is not None else None

    def client_fn(context: Context) -> Client:
        remember_noise(searched)
        try:
            site: NumPyClient = make_site(
                base, context, key, state_dir, declared_sizes, allow_seeded_noise, pems, server_public_key
            )
        except PolicyRefusal as refusal:
            site = RefusingSite(refusal)
        return site.to_client()

    # failure_mod outermost: whatever fails inside, its message stays at the site.
    return ClientApp(client_fn=client_fn, mods=[failure_mod, make_fault_mod(base), secure_mod])


class _PemKeys(Sequence[Ed25519PrivateKey]):
    """The launcher's site keys, held as PEM bytes (picklable) and loaded one at a time."""

    def __init__(self, keys: Sequence[Ed25519PrivateKey]) -> None:
        self._pems = [private_bytes(k) for k in keys]

    def __len__(self) -> int:
        return len(self._pems)

    @overload
    def __getitem__(self, i: int) -> Ed25519PrivateKey: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Ed25519PrivateKey]: ...
    def __getitem__(self, i: int | slice) -> Ed25519PrivateKey | Sequence[Ed25519PrivateKey]:
        if isinstance(i, slice):
            return [pem_signing_key(p) for p in self._pems[i]]
        return pem_signing_key(self._pems[i])


app = build_client_app()
