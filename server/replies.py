"""What the server makes of the sites' replies: parsing, budget checks, catch-up rows, the ledger.

:class:`ReplyLedger` is the part of the strategy that writes privacy spend: every reply's
accountant inputs are ledgered, whether or not its update is used, before the model
changes. A site's word can only add spend to its own rows (never remove any).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.common import FitRes
from flwr.server.client_proxy import ClientProxy
from flwr.supercore import log

from common.privacy.accounting import NO_DP, RoundPlan
from common.privacy.metrics_dp import MECHANISM as METRICS_MECHANISM
from common.privacy.metrics_dp import UNIT as METRICS_UNIT
from common.protocol import (
    MalformedReport,
    MetricsSpend,
    SiteReport,
    Status,
    parse_fit_metrics,
    parse_history,
    parse_metrics_spend,
)
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
    # Under SecAgg+ ``test`` comes from the secure sum of the sites' evaluation statistics,
    # sent in this round's fit: it describes the model of the round before (None otherwise).
    test_model_round: int | None = None
    test_sites: list[str] = field(default_factory=list)  # whose statistics are in that sum
    site_val: dict[str, dict[str, float]] = field(default_factory=dict)
    # metrics.dp: the noise std of each test metric, propagated from the sums' noise.
    test_std: dict[str, float] = field(default_factory=dict)
    ledger_rows: list[LedgerRow] = field(default_factory=list)
    released: bool = False  # the central-DP mechanism ran this round
    secagg_seconds: dict[str, float] = field(default_factory=dict)  # per SecAgg+ stage
    replies: int = 0  # replies and failures Flower handed over (the rest never answered)
    caught_up: list[str] = field(default_factory=list)  # "site@round" rows ledgered late


Reports = dict[str, tuple[SiteReport, FitRes]]


class ReplyLedger:
    """Parses replies and ledgers their spend; mixed into the strategy (which sets these attributes)."""

    ledger: Ledger
    accountant: str  # the run's; a DP run refuses non-private updates
    records: dict[int, RoundRecord]
    exhausted_sites: set[str]

    def record(self, rnd: int) -> RoundRecord:
        return self.records.setdefault(rnd, RoundRecord(rnd))

    def secure_round_lost(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[BaseException], reason: str
    ) -> None:
        """A SecAgg+ round halted after sites trained: ledger their spend, use nothing."""
        rec = self.record(server_round)
        rec.failures += [describe_failure(f) for f in failures] + [reason]
        spends, _ = self._reports(server_round, results)
        lost = [
            dataclasses.replace(s, used=False, status="lost") if s.status == Status.TRAINED.value else s for s in spends
        ]
        rec.ledger_rows += self.ledger.record_round(server_round, lost)
        log(WARNING, "round %s: %s", server_round, reason)

    def _reports(self, server_round: int, results: list[tuple[ClientProxy, FitRes]]) -> tuple[list[SiteSpend], Reports]:
        """Parse every reply's accountant inputs: one spend per site that replied."""
        rec = self.record(server_round)
        spends: list[SiteSpend] = []
        reports: Reports = {}
        for proxy, res in results:
            try:
                report = parse_fit_metrics(res.metrics)
            except MalformedReport as exc:
                # Without valid accountant inputs there is nothing to ledger; the update is dropped.
                rec.rejected[f"node-{proxy.node_id}"] = str(exc)
                continue
            if report.site_id in reports:
                # Two nodes claim one site (a deployment error). The second one trained too,
                # so its spend is ledgered under a distinct id; its update is not used.
                dup = f"{report.site_id}@node-{proxy.node_id}"
                rec.rejected[dup] = f"second reply for site_id {report.site_id!r} this round"
                spends.append(spend(dataclasses.replace(report, site_id=dup), False, rec.rejected[dup]))
                continue
            reports[report.site_id] = (report, res)
            self._catch_up(
                server_round,
                report.site_id,
                report.unit,
                report.plan,
                report.eps_budget,
                report.history,
                rec,
                report.rng,
            )
            reason = ""
            if report.status is Status.TRAINED:
                rec.trained.append(report.site_id)
                if "train_loss" in report.extra:
                    rec.train_loss[report.site_id] = report.extra["train_loss"]
                reason = self.check_report(report)
            elif report.status is Status.BUDGET_EXHAUSTED:
                rec.exhausted.append(report.site_id)
                self.exhausted_sites.add(report.site_id)
            if reason:
                rec.rejected[report.site_id] = reason
            spends.append(spend(report, report.status is Status.TRAINED and not reason, reason))
            if report.metrics is not None:  # its noisy evaluation sums, in the masked vector
                spends.append(metrics_spend(report.site_id, report.metrics, report.eps_budget, report.plan.accountant))
        return spends, reports

    def ledger_evaluation_release(self, server_round: int, metrics: dict[str, Any], rec: RoundRecord) -> None:
        """An evaluate reply's noisy statistics (metrics.dp): its own ledger row, as the site declares it."""
        site = metrics.get("site_id")
        try:
            release = parse_metrics_spend(metrics)
        except MalformedReport as exc:
            rec.failures.append(f"{site}: evaluate reply: {exc}")
            return
        if release is None or not isinstance(site, str) or self.ledger is None:
            return
        budget = metrics.get("eps_budget")
        budget = float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else float("inf")
        rec.ledger_rows += self.ledger.record_round(
            server_round, [metrics_spend(site, release, budget, self.accountant)]
        )

    def _catch_up(
        self,
        server_round: int,
        site: str,
        unit: str,
        plan: RoundPlan,
        eps_budget: float,
        history: tuple[tuple[int, float, float, int], ...],
        rec: RoundRecord,
        rng: str,
    ) -> None:
        """Ledger the rounds this site says it trained but whose replies never arrived.

        Written at once, before this round's budget check, so that check sees them. The
        site's word can only add spend to its own rows (never remove any), so trusting it
        errs on the side of overstating epsilon. ``rng`` is the kind the site reports now:
        a site's RNG is fixed for a run (``dp.secure-rng`` and its own refusal of seeded
        noise), so its earlier rounds used the same.
        """
        known = self.ledger.rounds(site)
        # In a fit reply the history ends before server_round; in an evaluate reply it may
        # include it (then server_round + 1 is passed, so nothing is skipped).
        missing = [h for h in history if h[0] not in known and h[0] != server_round]
        if not missing:
            return
        rows = []
        for rnd, sigma, q, steps in sorted(set(missing)):
            spent = dataclasses.replace(plan, noise_multiplier=sigma, sample_rate=q, steps=steps)
            rows.append((rnd, SiteSpend(site, unit, spent, steps, eps_budget, False, "lost", rng)))
            rec.caught_up.append(f"{site}@{rnd}")
        rec.ledger_rows += self.ledger.record_round(server_round, [], catch_up=rows)
        log(
            WARNING,
            "round %s: %s reported %d earlier round(s) whose replies were lost; ledgered now",
            server_round,
            site,
            len(rows),
        )

    def _catch_up_from_evaluation(self, server_round: int, metrics: dict[str, Any], rec: RoundRecord) -> None:
        """Evaluate replies carry the site's history too, so a fit reply lost in the last
        round is still ledgered. The other accountant inputs come from the site's last row."""
        site, raw = metrics.get("site_id"), metrics.get("history")
        if not isinstance(site, str) or raw is None or self.ledger is None:
            return
        last = self.ledger.last_row(site)
        if last is None:
            return  # never heard from in a fit reply: its next fit reply carries everything
        try:
            history = parse_history(raw, last.accountant)
        except MalformedReport as exc:
            rec.failures.append(f"{site}: evaluate reply: {exc}")
            return
        plan = RoundPlan(
            last.dataset_size,
            last.sample_rate,
            last.steps,
            last.noise_multiplier,
            last.max_grad_norm,
            last.delta,
            last.accountant,
            last.neighbouring,
        )
        self._catch_up(server_round + 1, site, last.unit, plan, last.eps_budget, history, rec, last.rng)

    def check_report(self, report: SiteReport) -> str:
        """Why a site's reported round cannot be used (accountant and budget), or ''."""
        plan = report.plan
        if self.accountant != NO_DP:
            if plan.accountant != self.accountant:
                return f"accountant {plan.accountant!r} in a run accounted with {self.accountant!r}"
            mech = (plan.noise_multiplier, plan.sample_rate, report.steps_taken)
            total = self.ledger.projected_total(report.site_id, mech, plan.delta, plan.accountant)
            if total > report.eps_budget:
                return f"update would take the site to eps={total:.4g}, over its budget {report.eps_budget:g}"
        return ""


def spend(report: SiteReport, used: bool, reason: str) -> SiteSpend:
    status = report.status.value if not reason else "rejected"
    return SiteSpend(
        site_id=report.site_id,
        unit=report.unit,
        plan=report.plan,
        steps_taken=report.steps_taken,
        eps_budget=report.eps_budget,
        used=used,
        status=status,
        rng=report.rng,
    )


def metrics_spend(site: str, release: MetricsSpend, budget: float, accountant: str) -> SiteSpend:
    """The ledger row of one noisy metrics release: (z, q = 1, 1 step); ``max_grad_norm``
    holds its L2 sensitivity (in units of the per-key bounds) and ``dataset_size`` 0 (q = 1
    needs no size, and the validation count is not sent)."""
    plan = RoundPlan(0, 1.0, 1, release.noise_multiplier, release.l2_sensitivity, release.delta, accountant)
    return SiteSpend(site, METRICS_UNIT, plan, 1, budget, True, "released", release.rng, mechanism=METRICS_MECHANISM)


def settle(s: SiteSpend, used: bool, rejected: str) -> SiteSpend:
    """A trained site's final status once the round's sum is known (metrics rows keep theirs)."""
    if s.mechanism == METRICS_MECHANISM or not s.used or used:
        return s
    return dataclasses.replace(s, used=False, status="rejected" if rejected else "not_aggregated")


def describe_failure(f: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(f, BaseException):
        return str(f).splitlines()[0][:300] if str(f) else type(f).__name__
    proxy, res = f
    return f"node-{proxy.node_id}: {res.status.message}"
