"""FedAvg over site *updates* (deltas), with the ledger and per-round records.

Sites send ``local - global``; the new global is ``global + sum_k n_k d_k / sum_k n_k``
(FedAvg weighted by example counts), which equals FedAvg over weights but keeps the
values small and centred, as SecAgg+'s fixed clipping range needs.

This is a ``flwr.server.strategy.FedAvg`` so that it runs under Flower's workflow API,
where SecAgg+ is a drop-in fit workflow (see :mod:`server.app`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate
from flwr.supercore import log

from common.accounting import NO_DP
from common.protocol import MalformedReport, SiteReport, Status, parse_fit_metrics
from server.ledger import Ledger, LedgerRow, SiteSpend


@dataclass
class RoundRecord:
    """Everything the server learned in one round; becomes one metrics.jsonl line."""

    round: int
    sampled: int = 0
    trained: list[str] = field(default_factory=list)
    used: list[str] = field(default_factory=list)
    exhausted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    aggregated: bool = False
    train_loss: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    site_val: dict[str, dict[str, float]] = field(default_factory=dict)
    ledger_rows: list[LedgerRow] = field(default_factory=list)


class DeltaFedAvg(FedAvg):
    def __init__(
        self,
        *,
        initial_arrays: list[np.ndarray],
        ledger: Ledger | None,
        num_sites: int,
        min_fit_sites: int,
        primary_metric: str,
        accountant: str = NO_DP,
        central_eval: Any = None,
        combine_eval: Any = None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(initial_parameters=ndarrays_to_parameters(initial_arrays), **fedavg_kwargs)
        self.global_arrays = [a.copy() for a in initial_arrays]
        self.ledger = ledger  # may be attached later, before the first round
        self.num_sites = num_sites
        self.min_fit_sites = min_fit_sites
        self.primary_metric = primary_metric
        self.accountant = accountant  # the run's; a DP run refuses non-private updates
        self.central_eval = central_eval  # callable(round, arrays) -> metrics dict, or None
        # Without a server-held test split: callable([(n, site metrics)]) -> combined metrics.
        self.combine_eval = combine_eval
        self.records: dict[int, RoundRecord] = {}
        self.exhausted_sites: set[str] = set()

    def record(self, rnd: int) -> RoundRecord:
        return self.records.setdefault(rnd, RoundRecord(rnd))

    # ---------------------------------------------------------------- fit
    def configure_fit(self, server_round, parameters, client_manager):
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.record(server_round).sampled = len(instructions)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        rec = self.record(server_round)
        rec.failures = [_describe_failure(f) for f in failures]
        spends: list[SiteSpend] = []
        usable: dict[str, tuple[list[np.ndarray], int]] = {}
        for proxy, res in results:
            try:
                report = parse_fit_metrics(res.metrics)
            except MalformedReport as exc:
                # Without valid accountant inputs there is nothing to ledger; the update is dropped.
                rec.rejected[f"node-{proxy.node_id}"] = str(exc)
                continue
            if any(sp.site_id == report.site_id for sp in spends):
                # Two nodes claim one site (a deployment error). The second one trained too,
                # so its spend is ledgered under a distinct id; its update is not used.
                dup = f"{report.site_id}@node-{proxy.node_id}"
                rec.rejected[dup] = f"second reply for site_id {report.site_id!r} this round"
                spends.append(_spend(dataclasses.replace(report, site_id=dup), False, rec.rejected[dup]))
                continue
            used, reason = False, ""
            if report.status is Status.TRAINED:
                rec.trained.append(report.site_id)
                if "train_loss" in report.extra:
                    rec.train_loss[report.site_id] = report.extra["train_loss"]
                try:
                    arrays = parameters_to_ndarrays(res.parameters)
                except Exception as exc:  # undecodable bytes: the site's problem, not the round's
                    arrays, reason = [], f"update cannot be decoded ({type(exc).__name__}: {exc})"[:300]
                else:
                    reason = self.check_update(arrays, res.num_examples, report)
                if reason:
                    rec.rejected[report.site_id] = reason
                else:
                    usable[report.site_id] = (arrays, res.num_examples)
                    used = True
            elif report.status is Status.BUDGET_EXHAUSTED:
                rec.exhausted.append(report.site_id)
                self.exhausted_sites.add(report.site_id)
            spends.append(_spend(report, used, reason))
        if len(usable) < self.min_fit_sites:
            spends = [_not_aggregated(s) for s in spends]
        # The ledger is written before the model changes: privacy spent is recorded
        # whether or not the update is used.
        rec.ledger_rows = self.ledger.record_round(server_round, spends)
        for site, reason in rec.rejected.items():
            log(WARNING, "round %s: rejected update from %s: %s", server_round, site, reason)
        if len(usable) < self.min_fit_sites:
            return None, {}
        rec.used = [s.site_id for s in spends if s.used]
        # Sum in site order, not arrival order, so a seeded run repeats bit for bit.
        avg = aggregate([usable[site] for site in sorted(usable)])
        new_global = [(g + d).astype(g.dtype, copy=False) for g, d in zip(self.global_arrays, avg)]
        if not all(np.isfinite(a).all() for a in new_global):
            # Finite updates can still overflow when summed; keep the last good model.
            log(WARNING, "round %s: aggregate is not finite; the global model is unchanged", server_round)
            rec.failures.append("aggregate overflowed (not finite); model unchanged")
            return None, {}
        self.global_arrays = new_global
        rec.aggregated = True
        return ndarrays_to_parameters(self.global_arrays), {"sites_used": len(usable)}

    def check_update(self, arrays: list[np.ndarray], num_examples: int, report: SiteReport) -> str:
        """Why an update cannot be aggregated, or '' if it can."""
        if len(arrays) != len(self.global_arrays):
            return f"expected {len(self.global_arrays)} arrays, got {len(arrays)}"
        for i, (a, g) in enumerate(zip(arrays, self.global_arrays)):
            if a.shape != g.shape or a.dtype != g.dtype:
                return f"array {i} has dtype/shape {a.dtype}{list(a.shape)}, expected {g.dtype}{list(g.shape)}"
            if not np.isfinite(a).all():
                return f"array {i} contains NaN or Inf"
        if num_examples != report.plan.dataset_size:
            return f"num_examples={num_examples} but dataset_size={report.plan.dataset_size}"
        plan = report.plan
        if self.accountant != NO_DP:
            if plan.accountant != self.accountant:
                return f"accountant {plan.accountant!r} in a run accounted with {self.accountant!r}"
            mech = (plan.noise_multiplier, plan.sample_rate, report.steps_taken)
            total = self.ledger.projected_total(report.site_id, mech, plan.delta, plan.accountant)
            if total > report.eps_budget:
                return f"update would take the site to eps={total:.4g}, over its budget {report.eps_budget:g}"
        return ""

    # ----------------------------------------------------------- evaluate
    def evaluate(self, server_round: int, parameters: Parameters):
        if self.central_eval is None:
            return None
        metrics = self.central_eval(server_round, parameters_to_ndarrays(parameters))
        self.record(server_round).test = metrics
        return float(metrics[self.primary_metric]), metrics

    def configure_evaluate(self, server_round, parameters, client_manager):
        if self.should_stop():
            return []
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ):
        rec = self.record(server_round)
        for _, res in results:
            site = res.metrics.get("site_id")
            if isinstance(site, str):
                rec.site_val[site] = {
                    k: float(v) for k, v in res.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
        if self.central_eval is None and self.combine_eval is not None and results:
            rec.test = self.combine_eval([(res.num_examples, dict(res.metrics)) for _, res in results])
        losses = [(res.num_examples, res.loss) for _, res in results if math.isfinite(res.loss)]
        if not losses:
            return None, {}
        total = sum(n for n, _ in losses)
        return sum(n * v for n, v in losses) / max(total, 1), {}

    # -------------------------------------------------------------- stop
    def should_stop(self) -> bool:
        """True once every site has said its budget cannot cover another round."""
        return len(self.exhausted_sites) >= self.num_sites


def _spend(report: SiteReport, used: bool, reason: str) -> SiteSpend:
    status = report.status.value if not reason else "rejected"
    return SiteSpend(
        site_id=report.site_id,
        unit=report.unit,
        plan=report.plan,
        steps_taken=report.steps_taken,
        eps_budget=report.eps_budget,
        used=used,
        status=status,
    )


def _not_aggregated(s: SiteSpend) -> SiteSpend:
    if not s.used:
        return s
    return SiteSpend(s.site_id, s.unit, s.plan, s.steps_taken, s.eps_budget, False, "not_aggregated")


def _describe_failure(f: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(f, BaseException):
        return str(f).splitlines()[0][:300] if str(f) else type(f).__name__
    proxy, res = f
    return f"node-{proxy.node_id}: {res.status.message}"
