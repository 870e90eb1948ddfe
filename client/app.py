"""The Flower ClientApp run at each partner site.

Per round a site: checks its own epsilon budget against its own accounting history
(kept in the node's state, not taken from the server), trains locally with DP-SGD,
and sends back

* the *update* (local - global weights, a delta), and
* its accountant inputs (n, q, sigma, C, steps, delta, accountant) so the server can
  write the ledger. Raw data, labels and per-example values never leave the site.

The site keeps its own accounting history in the node's ``context.state``, which lives
as long as the SuperNode's run (a restart loses it; the server's ledger-based budget check
remains).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.client import Client, ClientApp, NumPyClient

from client.mods import InjectedDropout, make_fault_mod, secure_mod
from common.accounting import RoundPlan, epsilon
from common.config import RunConfig
from common.central_dp import CENTRAL_SITE_ID, clip_update, secure_clip_norm
from common.dp import plan_round
from common.errors import PrivfedError
from common.keys import KEY_ENV, key_from_env, load_key
from common.protocol import Status, fit_metrics
from common.site import apply_site_overrides
from common.runtime import cached_task, config_from, resolve_device, round_seed
from common.tasks.base import get_state, set_state
from common.training import run_local_round

STATE_KEY = "privfed.accounting"
# Model state that never leaves the site (e.g. user embeddings), kept between rounds.
LOCAL_STATE_KEY = "privfed.local-model"


class SiteClient(NumPyClient):
    def __init__(
        self, cfg: RunConfig, site_index: int, site_id: str, context: Context, key: bytes | None = None
    ) -> None:
        self.cfg, self.site_index, self.site_id, self.ctx = cfg, site_index, site_id, context
        self.task = cached_task(cfg, key)
        self.train_data, self.val_data = self.task.site_data(site_index)
        self.device = resolve_device(cfg.federation.device)

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
        rec = self.ctx.state.array_records.get(LOCAL_STATE_KEY)
        if rec is not None:
            model.load_state_dict(rec.to_torch_state_dict(), strict=False)
        set_state(model, keys, parameters)
        return model, keys

    def _keep_local(self, model: Any, keys: list[str]) -> None:
        shared = set(keys)
        local = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in shared}
        if local:
            self.ctx.state.array_records[LOCAL_STATE_KEY] = ArrayRecord(torch_state_dict=local)

    # ------------------------------------------------------------ accounting state
    def _history(self) -> list[tuple[float, float, int]]:
        rec = self.ctx.state.config_records.get(STATE_KEY)
        if rec is None:
            return []
        return list(zip(rec["sigma"], rec["q"], rec["steps"]))  # type: ignore[arg-type]

    def _remember(self, plan: RoundPlan, steps: int) -> None:
        hist = self._history() + [(plan.noise_multiplier, plan.sample_rate, steps)]
        self.ctx.state.config_records[STATE_KEY] = ConfigRecord(
            {"sigma": [h[0] for h in hist], "q": [h[1] for h in hist], "steps": [h[2] for h in hist]}
        )

    # ------------------------------------------------------------------- Flower
    def fit(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        server_round = int(config.get("server-round", 0))
        plan = plan_round(self.cfg, len(self.train_data))
        budget = self.cfg.dp.epsilon_budget
        model, keys = self._model(parameters)

        spent = epsilon(self._history(), plan.delta, plan.accountant)
        if self.cfg.dp.enabled:
            projected = epsilon(self._history() + [plan.mechanism], plan.delta, plan.accountant)
            if projected > budget:
                # Say so, send a zero update with zero weight: nothing of the data leaves.
                zeros = [np.zeros_like(p) for p in parameters]
                metrics = fit_metrics(
                    self.site_id, self.task.unit_of_privacy, plan, 0, budget, Status.BUDGET_EXHAUSTED,
                    eps_spent=spent, note=f"next round would reach eps={projected:.3g} > budget {budget:g}",
                )
                # Under SecAgg+ a zero update still takes part, so the sum stays recoverable.
                return zeros, 1 if self.cfg.secagg.enabled else 0, metrics

        faults, seed0 = self.cfg.faults, self.cfg.federation.seed
        if faults.drops(seed0, self.site_index, server_round, "train"):
            raise InjectedDropout(f"injected dropout: site {self.site_index} leaves round {server_round} before training")
        t0 = time.perf_counter()
        seed = round_seed(self.cfg, self.site_index, server_round)
        outcome = run_local_round(self.task, model, self.train_data, plan, self.device, seed)
        self._remember(plan, outcome.steps_taken)
        self._keep_local(model, keys)
        local = get_state(model, keys)
        update = self._prepare_update([(a - b).astype(b.dtype, copy=False) for a, b in zip(local, parameters)])
        if faults.drops(seed0, self.site_index, server_round, "upload"):
            # After the site's own accounting: it spent privacy, the server never hears of it.
            raise InjectedDropout(f"injected dropout: site {self.site_index} trained in round {server_round}, its reply is lost")
        # Under DP the training loss stays at the site: it is computed from the private
        # examples without noise, so sending it would fall outside the epsilon we claim.
        private_extras = {} if self.cfg.dp.enabled or self.cfg.central_dp.enabled else outcome.metrics
        metrics = fit_metrics(
            self.site_id, self.task.unit_of_privacy, plan, outcome.steps_taken, budget, Status.TRAINED,
            eps_spent=epsilon(self._history(), plan.delta, plan.accountant),
            train_seconds=time.perf_counter() - t0,
            **private_extras,
        )
        return update, self._weight(len(self.train_data)), metrics

    def _weight(self, n: int) -> int:
        # Under SecAgg+ Flower's mod scales the update by num_examples / max_weight before
        # quantizing; 1/1 keeps the full precision, and the server weighs sites equally.
        return 1 if self.cfg.secagg.enabled else n

    def _prepare_update(self, update: list[np.ndarray]) -> list[np.ndarray]:
        """Clip for central DP; check what SecAgg+ cannot check once the update is masked."""
        cdp, sa = self.cfg.central_dp, self.cfg.secagg
        if cdp.enabled:
            update = clip_update(update, secure_clip_norm(cdp.clip_norm, sa, update))
        if sa.enabled:
            # Once masked, a bad update cannot be told apart from the others: the site
            # refuses to send it, and the protocol treats the site as dropped out.
            if not all(np.isfinite(a).all() for a in update):
                raise PrivfedError("update contains NaN or Inf: not sent to secure aggregation")
            peak = max((float(np.abs(a).max()) for a in update if a.size), default=0.0)
            if peak > sa.clipping_range:
                raise PrivfedError(
                    f"update has a coordinate of size {peak:.3g} > secagg.clipping-range={sa.clipping_range:g}; "
                    "SecAgg+ would clip it silently: raise the range or lower the learning rate"
                )
        return update

    def evaluate(self, parameters: list[np.ndarray], config: Mapping[str, Any]):
        model, _ = self._model(parameters)
        metrics = self.task.evaluate(model.to(self.device), self.val_data)
        # A task may compute its primary metric only centrally (the GAN's FID); Flower still
        # wants a loss, and the server ignores a NaN one.
        loss = float(metrics.get(self.task.primary_metric, float("nan")))
        return loss, len(self.val_data), {"site_id": self.site_id, **metrics}


def site_identity(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[int, str]:
    """(partition index, pseudonymous site id) from the SuperNode's node config."""
    if "partition-id" not in node_config:
        raise PrivfedError("this SuperNode has no 'partition-id' in its node config: start it with --node-config 'partition-id=<i>'")
    index = node_config["partition-id"]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < cfg.federation.num_sites:
        raise PrivfedError(f"partition-id={index!r} must be an integer in [0, num-sites={cfg.federation.num_sites})")
    # Deployment: the operator names the site pseudonymously; simulation: site-<i>.
    site_id = str(node_config.get("site-id", f"site-{index}"))
    if site_id == CENTRAL_SITE_ID:
        raise PrivfedError(f"site-id {CENTRAL_SITE_ID!r} is reserved for the ledger's client-level DP rows; pick another")
    return index, site_id


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


def build_client_app(defaults: Mapping[str, Any] | None = None, key: bytes | None = None) -> ClientApp:
    """A ClientApp whose config is ``defaults`` overlaid by Flower's run_config.

    ``key`` is the federation key the simulation launcher hands its virtual sites; a
    deployed site reads its own (:func:`site_key`).
    """
    base = dict(defaults or {})

    def client_fn(context: Context) -> Client:
        # The run's config, then this site's own settings (data, device, a stricter budget).
        cfg = apply_site_overrides(config_from(base, context.run_config), context.node_config)
        site_index, site_id = site_identity(cfg, context.node_config)
        site_secret = site_key(cfg, context.node_config, key)
        return SiteClient(cfg, site_index, site_id, context, site_secret).to_client()

    return ClientApp(client_fn=client_fn, mods=[make_fault_mod(base), secure_mod])


app = build_client_app()
