"""FedAvg over site *updates* (deltas), with the ledger and per-round records.

Sites send ``local - global``; the new global is ``global + sum_k w_k d_k / sum_k w_k``,
which equals FedAvg over weights but keeps the values small and centred, as SecAgg+'s
fixed clipping range needs. What happens to an update on its way (clip, guard, evaluation
sums, weighting, masking; and in reverse: unmask, split, check, noise, divide) is the
update pipeline (common.pipeline.build), shared with the sites; replies and the ledger are
in :mod:`server.replies`, the rules in :mod:`server.aggregation`, sampling in
:mod:`server.sampling`.

This is a ``flwr.server.strategy.FedAvg`` so that it runs under Flower's workflow API,
where SecAgg+ is a drop-in fit workflow (see :mod:`server.app`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.supercore import log

from common.config import MIN_SECURE_SITES, RunConfig
from common.deploy.receipts import RECEIPT
from common.deploy.registry import Registry
from common.deploy.signing import Ed25519PrivateKey
from common.errors import ConfigError, PrivfedError
from common.metrics.error_bars import propagate
from common.pipeline import Aggregate, Pipeline, ServerContext, build_pipeline
from common.privacy.accounting import NO_DP
from common.protocol import Status
from server.aggregation import RoundInputs, Staged, Usable, get_aggregation
from server.averaging import ServedModel
from server.client_level_dp import CentralRelease
from server.ledger import Ledger
from server.replies import ReplyLedger, Reports, RoundRecord, describe_failure, settle
from server.sampling import RngSource, poisson_sample, sampling_rng, secure_minimum

__all__ = ["DeltaFedAvg", "RoundRecord", "Staged"]


class DeltaFedAvg(ReplyLedger, FedAvg):
    def __init__(
        self,
        cfg: RunConfig,
        task: Any,
        ledger: Ledger | None,
        pipeline: Pipeline,
        *,
        initial_arrays: list[np.ndarray],
        served_arrays: list[np.ndarray] | None = None,
        central_eval: Callable[[int, list[np.ndarray]], dict[str, float]] | None = None,
        run_id: str = "",
        registry: Registry,
        server_key: Ed25519PrivateKey,
    ) -> None:
        """``task`` may be None (tests): then the primary metric is "loss" and sites' metrics are not combined.

        ``served_arrays``: a resumed run's average of the global models (federation.ema-decay).
        ``central_eval``: (round, arrays) -> metrics on a server-held test split, or None.
        ``run_id`` names the sites' durable state (client.state), so a resumed run finds it;
        it is part of every claim a site signs.
        ``registry``: the federation's sites, their keys and declared sizes: a reply counts
        only once signed by the key of the site it names, and weighs that site's declared
        size. ``server_key`` signs the receipts the instructions carry. Both are required:
        there is no unsigned mode.
        """
        fed = cfg.federation
        super().__init__(
            initial_parameters=ndarrays_to_parameters(initial_arrays),
            fraction_fit=fed.fraction_fit,
            fraction_evaluate=fed.fraction_evaluate,
            min_fit_clients=1,
            min_evaluate_clients=1,
            # All sites are awaited once at the start (RoundLoop); after that a site that
            # drops out must not make Flower's sampler wait for it.
            min_available_clients=1,
            on_fit_config_fn=lambda rnd: round_config(rnd, run_id),
            on_evaluate_config_fn=lambda rnd: round_config(rnd, run_id),
            fit_metrics_aggregation_fn=lambda _: {},
            evaluate_metrics_aggregation_fn=lambda _: {},
            accept_failures=True,
        )
        self.cfg = cfg
        # The pipeline decides where noise and weights are applied, the config whether the
        # server releases under client-level DP: a pipeline built from another config could
        # skip the noise while the ledger says "released". Both must come from one config.
        expected = build_pipeline(cfg, task).names
        if pipeline.names != expected:
            raise PrivfedError(
                f"update pipeline {pipeline.names} is not the one the run config builds ({expected}); "
                "build both from one config with common.pipeline.build_pipeline(cfg, task)"
            )
        self.pipeline = pipeline
        self.global_arrays = [a.copy() for a in initial_arrays]
        # What the server evaluates, samples and reports: the global model or its average.
        self.served = ServedModel(fed.ema_decay, served_arrays)
        self.ledger = ledger  # type: ignore[assignment]  # may be attached later, before the first round
        self.num_sites = fed.num_sites
        self.min_fit_sites = fed.min_fit_sites
        self.primary_metric = task.primary_metric if task is not None else "loss"
        self.accountant = cfg.dp.accountant if cfg.dp.enabled else NO_DP
        self.central_eval = central_eval
        # Without a server-held test split: callable([(n, site metrics)]) -> combined metrics.
        self.combine_eval = task.combine_metrics if task is not None else None
        # Under SecAgg+ with evaluation sums: the task's step from their sum to the federation metrics.
        self.combine_sums = task.combine_sums if task is not None else None
        self.records: dict[int, RoundRecord] = {}
        self.exhausted_sites: set[str] = set()
        self.secure = cfg.secagg.enabled  # replies carry a SecAgg+ sum, not individual updates
        self.central = CentralRelease.from_config(cfg) if cfg.central_dp.enabled else None
        self.central_exhausted = False
        if self.served.averaging and central_eval is None and self.secure_sums:
            # Under SecAgg+ the sites' evaluation sums ride on fit and measure the model they
            # train from: the averaged model would be reported without ever being evaluated.
            raise ConfigError(
                "ema-decay",
                "needs evaluation of the averaged model, but under secure aggregation the sites "
                "evaluate the model they train from; use 0 (off) or a task with a server-held test split",
            )
        # Set: Poisson site sampling (central DP).
        self.poisson_rng: RngSource | None = (lambda rnd: sampling_rng(cfg, rnd)) if self.central is not None else None
        self.on_sample: Callable[[int], None] | None = None  # told each round's sample size
        self.staged: dict[int, Staged] = {}
        self.aggregation = get_aggregation(fed.aggregation, cfg)
        self.last_round = fed.rounds  # evaluated on every site, whatever fraction_evaluate
        self.init_identity(registry, server_key, run_id)

    @property
    def secure_sums(self) -> bool:
        """Whether secure replies carry the sites' evaluation sums (then evaluate replies do not)."""
        return self.pipeline.get("eval_sums") is not None

    def _context(self, rnd: int, rec: RoundRecord) -> ServerContext:
        return ServerContext(rnd, self.global_arrays, rec.failures)

    # ---------------------------------------------------------------- fit
    def configure_fit(self, server_round, parameters, client_manager):
        rec = self.record(server_round)
        if self.central is not None and not self.central.can_release(self.ledger):
            self.central_exhausted = True
            return []
        if self.poisson_rng is not None:
            config = self.on_fit_config_fn(server_round) if self.on_fit_config_fn else {}
            instructions = poisson_sample(
                client_manager, server_round, self.fraction_fit, self.poisson_rng, parameters, config
            )
        else:
            instructions = super().configure_fit(server_round, parameters, client_manager)
        if self.secure:
            instructions = secure_minimum(instructions, rec.failures)
        self.note_sampled(server_round, [c.node_id for c, _ in instructions])
        instructions = self.with_receipts(instructions)
        rec.sampled = len(instructions)
        rec.released = self.central is not None  # the central mechanism runs whatever the sample
        if self.on_sample is not None:
            self.on_sample(len(instructions))
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Validate, ledger, and stage this round's sum; :meth:`end_fit` applies it.

        Returns no parameters: the new global is set in ``end_fit`` (after central noise,
        if any), which also runs for rounds in which Flower never calls this method.
        """
        rec = self.record(server_round)
        rec.failures += [describe_failure(f) for f in failures]
        rec.replies = len(results) + len(failures)
        spends, reports = self._reports(server_round, results)
        spends += self.refusals(server_round, failures, rec)
        if self.secure:
            staged, why = self._stage_secure(results, reports, rec)
        else:
            staged, why = self._stage_plain(reports, rec)
        used = set(staged.sites) if staged is not None else set()
        spends = [settle(s, s.site_id in used, rec.rejected.get(s.site_id, "")) for s in spends]
        if why:
            rec.failures.append(why)
        # The ledger is written before the model changes: privacy spent is recorded
        # whether or not the update is used.
        rows = self.write_round(server_round, spends, rec)
        rec.ledger_rows += rows
        ledgered = {r.site_id for r in rows}
        if staged is not None and not set(staged.sites) <= ledgered:
            # An update whose spend is not in the ledger must not change the model.
            rec.failures.append("round's sum discarded: a used update's spend could not be ledgered")
            staged = None
        for site, reason in rec.rejected.items():
            log(WARNING, "round %s: rejected update from %s: %s", server_round, site, reason)
        if staged is not None:
            rec.used = sorted(used)
            self.staged[server_round] = staged
        return None, {}

    def _stage_plain(self, reports: Reports, rec: RoundRecord) -> tuple[Staged | None, str]:
        ctx = self._context(rec.round, rec)
        ctx.central = self.central
        weighting = self.pipeline.get("weighting")
        usable: Usable = {}
        for site, reply in sorted(reports.items()):
            report, res, arrays = reply.report, reply.res, reply.arrays
            if report.status is not Status.TRAINED or site in rec.rejected or arrays is None:
                continue
            try:
                reason = self.pipeline.check(arrays, res.num_examples, report.plan.dataset_size, ctx)
            except Exception as exc:  # a check that fails on odd input: this update only
                reason = f"update could not be checked ({type(exc).__name__})"
            if reason:
                rec.rejected[site] = reason
            else:
                # The weight is the registry's declared size (the reply's equals it, or it was refused).
                usable[site] = (arrays, weighting.weight(self.registry.sites[site].declared_size))
        self.pipeline.check_round(usable, rec.rejected)
        if len(usable) < self.min_fit_sites:
            return (
                None,
                f"{len(usable)} usable update(s), below min-fit-sites={self.min_fit_sites}" if rec.trained else "",
            )
        # Sum in site order, not arrival order, so a seeded run repeats bit for bit.
        inputs = RoundInputs(
            rec.round, self.global_arrays, {r: x.site_val for r, x in self.records.items()}, self.primary_metric
        )
        return self.aggregation.aggregate(sorted(usable), usable, inputs)

    def _stage_secure(self, results, reports: Reports, rec: RoundRecord) -> tuple[Staged | None, str]:
        """Under SecAgg+ every reply carries the same unmasked mean over all replying sites."""
        if not results:
            return None, ""
        ctx = self._context(rec.round, rec)
        # The pipeline in reverse: mean x count = sum, then the evaluation sums split off
        # (they are valid even when the update sum is not).
        agg = self.pipeline.server(Aggregate(parameters_to_ndarrays(results[0][1].parameters), count=len(results)), ctx)
        if ctx.sums is not None and self.central_eval is None and self.combine_sums is not None:
            # Each site evaluated the global model it received, before training: the
            # metrics are those of the previous round's model.
            rec.test = self.combine_sums(ctx.sums)
            rec.test_model_round, rec.test_sites = rec.round - 1, sorted(reports)
            if ctx.sums_std:
                rec.test_std = propagate(self.combine_sums, ctx.sums, ctx.sums_std)
        bad = sorted(rec.rejected)
        if bad:
            # A masked update cannot be taken out of the sum: the whole sum is unusable.
            return None, f"secure sum discarded: it contains the update of {', '.join(bad)}, which was rejected"
        trained = sorted(s for s, reply in reports.items() if reply.report.status is Status.TRAINED)
        # Zero updates of out-of-budget sites do not hide anything: count only trained ones.
        need = max(self.min_fit_sites, MIN_SECURE_SITES)
        if len(trained) < need:
            return (
                None,
                f"{len(trained)} site(s) trained in a secure round, below {need}; the sum is not used"
                if trained
                else "",
            )
        # (Flower dequantizes to float64; the shapes must match, the dtype is cast below.)
        if [a.shape for a in agg.arrays] != [g.shape for g in self.global_arrays]:
            return None, "secure sum discarded: its arrays do not match the model's shapes"
        total = [t.astype(g.dtype) for t, g in zip(agg.arrays, self.global_arrays)]
        return Staged(trained, total, float(len(trained))), ""

    def end_fit(self, server_round: int) -> list[np.ndarray] | None:
        """Apply the round's staged sum (plus central noise) to the global model.

        Returns the new global arrays, or None when the model does not change.
        """
        rec = self.record(server_round)
        silent = rec.sampled - rec.replies
        if silent > 0 and not self.secure:
            # Flower hands over only what arrived before round-timeout (or at all).
            rec.failures.append(f"{silent} of {rec.sampled} sampled site(s) sent no reply (timed out or lost)")
        staged = self.staged.pop(server_round, None)
        ctx = self._context(server_round, rec)
        if self.central is not None and rec.released and not self.central_exhausted:
            total = staged.total if staged is not None else [np.zeros_like(g) for g in self.global_arrays]
            # The mechanism is ledgered before it runs, whatever the sample.
            rec.ledger_rows.append(self.central.ledger_row(server_round, self.ledger, empty=staged is None))
            ctx.central = self.central
            step = self.pipeline.release(Aggregate(total), ctx).arrays
        elif staged is not None:
            step = self.pipeline.release(Aggregate(staged.total, staged.divisor), ctx).arrays
        else:
            return None
        new_global = [(g + d).astype(g.dtype, copy=False) for g, d in zip(self.global_arrays, step)]
        if not all(np.isfinite(a).all() for a in new_global):
            # Finite updates can still overflow when summed; keep the last good model.
            log(WARNING, "round %s: aggregate is not finite; the global model is unchanged", server_round)
            rec.failures.append("aggregate overflowed (not finite); model unchanged")
            return None
        self.global_arrays = new_global
        self.served.update(new_global)
        rec.aggregated = staged is not None
        return self.global_arrays

    # ----------------------------------------------------------- evaluate
    def evaluate(self, server_round: int, parameters: Parameters):
        if self.central_eval is None:
            return None
        # Flower hands over the global model; the server evaluates the one it serves.
        arrays = self.served.arrays(parameters_to_ndarrays(parameters))
        metrics = self.central_eval(server_round, arrays)
        self.record(server_round).test = metrics
        return float(metrics[self.primary_metric]), metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        if self.should_stop():
            return []
        if self.served.averaging:  # the sites evaluate the served model, not the one they train from
            parameters = ndarrays_to_parameters(self.served.arrays(self.global_arrays))
        if server_round == self.last_round and self.fraction_evaluate < 1.0:
            # The final model's site-level fairness should cover every site, once.
            config = self.on_evaluate_config_fn(server_round) if self.on_evaluate_config_fn else {}
            return self.with_receipts(
                [(c, EvaluateIns(parameters, config)) for _, c in sorted(client_manager.all().items())]
            )
        return self.with_receipts(super().configure_evaluate(server_round, parameters, client_manager))

    def with_receipts(self, instructions):
        """Each instruction to a node bound to a site carries that site's receipt (its rows and
        the signed ledger head: contract point 4); each gets its own config dict."""
        out = []
        for client, ins in instructions:
            config = dict(ins.config)
            site = self.site_of(client.node_id)
            if site is not None:
                config[RECEIPT] = self.receipt(site)
            out.append((client, type(ins)(ins.parameters, config)))
        return out

    def receipt(self, site: str) -> str:
        """``Ledger.receipt(site, server_key)`` ('' before the ledger has signed a head)."""
        return self.ledger.receipt(site, self.server_key) if self.ledger is not None else ""

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ):
        rec = self.record(server_round)
        rec.failures += [describe_failure(f) for f in failures]
        self.write_round(server_round, self.refusals(server_round, failures, rec), rec)
        # Only what the site signed counts: its metrics. ``num_examples`` and ``loss`` ride
        # outside the signed claim, so the weight is the registry's declared size (1 under
        # metrics.dp, where the replies carry noisy sums, as the sites send) and the loss is
        # the signed primary metric.
        verified: list[tuple[float, dict[str, Any]]] = []
        seen: set[str] = set()
        for proxy, res in results:
            site = self.evaluate_reply(server_round, proxy, dict(res.metrics), rec)
            if not site or site in seen:  # refused, or a second reply for one site
                continue
            seen.add(site)
            weight = 1.0 if self.cfg.metrics.dp else float(self.registry.sites[site].declared_size)
            # Only finite numbers go on: a signed site may still send a string or 1e308 as a "sum".
            numbers = {
                k: float(v)
                for k, v in res.metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            }
            verified.append((weight, numbers))
            rec.site_val[site] = numbers
        # Under SecAgg+ with secure sums the replies hold no sums: the round's test metrics
        # came from the masked vector (:meth:`_stage_secure`), not from here.
        if self.central_eval is None and self.combine_eval is not None and verified and not self.secure_sums:
            try:
                rec.test = self.combine_eval(verified)
                rec.test_std = self._error_bars([m for _, m in verified])
            except (ArithmeticError, ValueError, TypeError) as exc:  # one site's values: lose the metrics, not the run
                rec.test, rec.test_std = {}, {}
                rec.failures.append(f"the sites' evaluation metrics could not be combined ({type(exc).__name__})")
        losses = [
            (w, float(m[self.primary_metric]))
            for w, m in verified
            if isinstance(m.get(self.primary_metric), (int, float)) and math.isfinite(m[self.primary_metric])
        ]
        if not losses:
            return None, {}
        total = sum(w for w, _ in losses)
        return sum(w * v for w, v in losses) / max(total, 1.0), {}

    def _error_bars(self, replies: list[dict[str, Any]]) -> dict[str, float]:
        """metrics.dp: each test metric's noise std, from the summed noisy sums of the replies that released."""
        stage = self.pipeline.get("metrics_dp")
        if stage is None or self.combine_sums is None:
            return {}
        released = [m for m in replies if "metrics_noise_multiplier" in m]
        if not released:
            return {}
        keys = stage.bounds.keys
        total = {k: sum(float(m.get(k, 0.0)) for m in released) for k in keys}
        var = {k: 0.0 for k in keys}
        for m in released:
            z = float(m["metrics_noise_multiplier"])
            for k in keys:
                var[k] += stage.bounds.std(k, z) ** 2
        return propagate(self.combine_sums, total, {k: math.sqrt(v) for k, v in var.items()})

    # -------------------------------------------------------------- stop
    def should_stop(self) -> bool:
        """True once every site's budget (or the central budget) cannot cover another round.

        Only registered sites count, and only from verified replies: made-up ids cannot stop a run.
        """
        registered = set(self.registry.sites)
        out = self.exhausted_sites & registered
        return self.central_exhausted or (bool(out) and len(out) >= min(self.num_sites, len(registered)))


def round_config(server_round: int, run_id: str) -> dict[str, Scalar]:
    """What every fit and evaluate instruction carries: the round, and the run id that names
    the sites' durable state (client.state), when the run has one (a strategy built in a
    unit test has none)."""
    config: dict[str, Scalar] = {"server-round": server_round}
    if run_id:
        config["run-id"] = run_id
    return config
