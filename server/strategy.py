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
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_trimmed_avg
from flwr.supercore import log

from common.config import MIN_SECURE_SITES
from common.errors import PrivfedError
from common.privacy.accounting import NO_DP, RoundPlan
from common.privacy.client_level import update_norm
from common.privacy.secagg_stats import SecureStats
from common.protocol import MalformedReport, SiteReport, Status, parse_fit_metrics, parse_history
from server.client_level_dp import CentralRelease
from server.fair_aggregation import qffl_step, site_losses
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
    ledger_rows: list[LedgerRow] = field(default_factory=list)
    released: bool = False  # the central-DP mechanism ran this round
    secagg_seconds: dict[str, float] = field(default_factory=dict)  # per SecAgg+ stage
    replies: int = 0  # replies and failures Flower handed over (the rest never answered)
    caught_up: list[str] = field(default_factory=list)  # "site@round" rows ledgered late


@dataclass
class Staged:
    """A round's validated sum of updates, waiting for end_fit."""

    sites: list[str]
    total: list[np.ndarray]  # weighted sum of the sites' updates
    divisor: float  # sum of the weights (non-central runs)


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
        secure_stats: SecureStats | None = None,
        combine_sums: Callable[[dict[str, float]], dict[str, float]] | None = None,
        combine_eval: Any = None,
        uniform: bool = False,
        secure: bool = False,
        central: CentralRelease | None = None,
        poisson_rng: random.Random | Callable[[int], random.Random] | None = None,
        aggregation: str = "fedavg",
        trim_fraction: float = 0.2,
        byzantine_sites: int = 1,
        max_update_norm: float = 0.0,
        norm_outlier_factor: float = 0.0,
        qffl_q: float = 1.0,
        qffl_lipschitz: float = 0.01,
        last_round: int = 0,
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
        # Under SecAgg+: the codec of the evaluation sums appended to every masked update,
        # and the task's step from their sum over sites to the federation metrics.
        self.secure_stats = secure_stats
        self.combine_sums = combine_sums
        self.records: dict[int, RoundRecord] = {}
        self.exhausted_sites: set[str] = set()
        self.uniform = uniform  # weigh sites equally, not by example count
        self.secure = secure  # replies carry a SecAgg+ sum, not individual updates
        self.central = central  # client-level DP release, or None
        self.central_exhausted = False
        self.poisson_rng = poisson_rng  # set: Poisson site sampling (central DP)
        self.on_sample: Callable[[int], None] | None = None  # told each round's sample size
        self.staged: dict[int, Staged] = {}
        self.aggregation = aggregation  # fedavg, a Byzantine-robust rule of Flower's, or q-fedavg
        self.trim_fraction = trim_fraction
        self.byzantine_sites = byzantine_sites
        self.max_update_norm = max_update_norm  # absolute L2 bound on an update (0: none)
        self.norm_outlier_factor = norm_outlier_factor  # x the round's median norm (0: off)
        self.qffl_q = qffl_q  # q-fedavg: fairness exponent (0: FedAvg)
        self.qffl_lipschitz = qffl_lipschitz  # q-fedavg: L, the inverse step size
        self.last_round = last_round  # evaluated on every site, whatever fraction_evaluate

    def record(self, rnd: int) -> RoundRecord:
        return self.records.setdefault(rnd, RoundRecord(rnd))

    # ---------------------------------------------------------------- fit
    def configure_fit(self, server_round, parameters, client_manager):
        rec = self.record(server_round)
        if self.central is not None and not self.central.can_release(self.ledger):
            self.central_exhausted = True
            return []
        if self.poisson_rng is not None:
            # Poisson sampling: each site independently with probability fraction-fit,
            # the sampling the central-DP accountant assumes (Flower samples a fixed count).
            clients = client_manager.all()
            q = self.fraction_fit
            rng = self.poisson_rng(server_round) if callable(self.poisson_rng) else self.poisson_rng
            chosen = [clients[cid] for cid in sorted(clients) if rng.random() < q]
            config = self.on_fit_config_fn(server_round) if self.on_fit_config_fn else {}
            instructions = [(c, FitIns(parameters, config)) for c in chosen]
        else:
            instructions = super().configure_fit(server_round, parameters, client_manager)
        if self.secure and 0 < len(instructions) < MIN_SECURE_SITES:
            rec.failures.append(
                f"only {len(instructions)} site(s) sampled; a secure round needs at least {MIN_SECURE_SITES}"
            )
            instructions = []
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
        rec.failures += [_describe_failure(f) for f in failures]
        rec.replies = len(results) + len(failures)
        spends, reports = self._reports(server_round, results)
        if self.secure:
            staged, why = self._stage_secure(results, reports, rec)
        else:
            staged, why = self._stage_plain(reports, rec)
        used = set(staged.sites) if staged is not None else set()
        spends = [_settle(s, s.site_id in used, rec.rejected.get(s.site_id, "")) for s in spends]
        if why:
            rec.failures.append(why)
        # The ledger is written before the model changes: privacy spent is recorded
        # whether or not the update is used.
        rec.ledger_rows += self.ledger.record_round(server_round, spends)
        for site, reason in rec.rejected.items():
            log(WARNING, "round %s: rejected update from %s: %s", server_round, site, reason)
        if staged is not None:
            rec.used = sorted(used)
            self.staged[server_round] = staged
        return None, {}

    def secure_round_lost(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[BaseException], reason: str
    ) -> None:
        """A SecAgg+ round halted after sites trained: ledger their spend, use nothing."""
        rec = self.record(server_round)
        rec.failures += [_describe_failure(f) for f in failures] + [reason]
        spends, _ = self._reports(server_round, results)
        lost = [
            dataclasses.replace(s, used=False, status="lost") if s.status == Status.TRAINED.value else s for s in spends
        ]
        rec.ledger_rows += self.ledger.record_round(server_round, lost)
        log(WARNING, "round %s: %s", server_round, reason)

    def _reports(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[list[SiteSpend], dict[str, tuple[SiteReport, FitRes]]]:
        """Parse every reply's accountant inputs: one spend per site that replied."""
        rec = self.record(server_round)
        spends: list[SiteSpend] = []
        reports: dict[str, tuple[SiteReport, FitRes]] = {}
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
                spends.append(_spend(dataclasses.replace(report, site_id=dup), False, rec.rejected[dup]))
                continue
            reports[report.site_id] = (report, res)
            self._catch_up(
                server_round, report.site_id, report.unit, report.plan, report.eps_budget, report.history, rec
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
            spends.append(_spend(report, report.status is Status.TRAINED and not reason, reason))
        return spends, reports

    def _catch_up(
        self,
        server_round: int,
        site: str,
        unit: str,
        plan: RoundPlan,
        eps_budget: float,
        history: tuple[tuple[int, float, float, int], ...],
        rec: RoundRecord,
    ) -> None:
        """Ledger the rounds this site says it trained but whose replies never arrived.

        Written at once, before this round's budget check, so that check sees them. The
        site's word can only add spend to its own rows (never remove any), so trusting it
        errs on the side of overstating epsilon.
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
            rows.append((rnd, SiteSpend(site, unit, spent, steps, eps_budget, False, "lost")))
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
        )
        self._catch_up(server_round + 1, site, last.unit, plan, last.eps_budget, history, rec)

    def _stage_plain(self, reports, rec: RoundRecord) -> tuple[Staged | None, str]:
        usable: dict[str, tuple[list[np.ndarray], int]] = {}
        for site, (report, res) in sorted(reports.items()):
            if report.status is not Status.TRAINED or site in rec.rejected:
                continue
            try:
                arrays = parameters_to_ndarrays(res.parameters)
            except Exception as exc:  # undecodable bytes: the site's problem, not the round's
                reason = f"update cannot be decoded ({type(exc).__name__}: {exc})"[:300]
            else:
                reason = self.check_update(arrays, res.num_examples, report)
            if reason:
                rec.rejected[site] = reason
            else:
                usable[site] = (arrays, 1 if self.uniform else res.num_examples)
        self._reject_outliers(usable, rec)
        if len(usable) < self.min_fit_sites:
            return (
                None,
                f"{len(usable)} usable update(s), below min-fit-sites={self.min_fit_sites}" if rec.trained else "",
            )
        # Sum in site order, not arrival order, so a seeded run repeats bit for bit.
        sites = sorted(usable)
        if self.aggregation == "q-fedavg":
            return self._stage_qffl(sites, usable, rec.round)
        if self.aggregation != "fedavg":
            return self._stage_robust(sites, usable)
        return self._weighted_sum(sites, usable), ""

    def _weighted_sum(self, sites: list[str], usable: dict[str, tuple[list[np.ndarray], int]]) -> Staged:
        """FedAvg: the sites' updates times their weights, summed (divided in end_fit)."""
        total = [
            np.sum([usable[s][0][i] * usable[s][1] for s in sites], axis=0) for i in range(len(self.global_arrays))
        ]
        return Staged(sites, total, float(sum(usable[s][1] for s in sites)))

    def _reject_outliers(self, usable: dict[str, tuple[list[np.ndarray], int]], rec: RoundRecord) -> None:
        """Drop updates whose norm is far beyond the rest of the round (a diverged or hostile site).

        The median is robust to a minority of such updates; with fewer than 3 there is
        no majority to compare with, and only the absolute bound applies. (Under central
        DP the clip-norm check in :meth:`check_update` is the bound instead.)
        """
        if self.norm_outlier_factor <= 0 or self.central is not None or len(usable) < 3:
            return
        norms = {site: update_norm(arrays) for site, (arrays, _) in usable.items()}
        median = float(np.median(list(norms.values())))
        for site, norm in sorted(norms.items()):
            if median > 0 and norm > self.norm_outlier_factor * median:
                rec.rejected[site] = (
                    f"update norm {norm:.4g} is {norm / median:.0f}x the round's median {median:.4g} "
                    f"(norm-outlier-factor={self.norm_outlier_factor:g})"
                )
                del usable[site]

    def _stage_robust(
        self, sites: list[str], usable: dict[str, tuple[list[np.ndarray], int]]
    ) -> tuple[Staged | None, str]:
        """Flower's Byzantine-robust rules, applied to the updates (the staged 'sum' is their result)."""
        results = [(usable[s][0], usable[s][1]) for s in sites]
        if self.aggregation == "trimmed-mean":
            step = aggregate_trimmed_avg(results, self.trim_fraction)
        else:
            f = self.byzantine_sites
            if len(results) < 2 * f + 3:
                return (
                    None,
                    f"{self.aggregation} needs at least {2 * f + 3} updates for byzantine-sites={f}, got {len(results)}",
                )
            step = aggregate_krum(results, f, len(results) - f if self.aggregation == "multi-krum" else 0)
        step = [np.asarray(a, dtype=g.dtype) for a, g in zip(step, self.global_arrays)]
        return Staged(sites, step, 1.0), ""

    def _stage_qffl(
        self, sites: list[str], usable: dict[str, tuple[list[np.ndarray], int]], rnd: int
    ) -> tuple[Staged | None, str]:
        """q-FedAvg (server.fair_aggregation), with each site's loss F_k from its last evaluate reply.

        Under DP a site never sends a fresh training loss, so F_k is its validation value of
        the primary metric on the model it trained from (the previous round's evaluation),
        or its latest earlier one. A site that never reported a finite positive value gets
        the mean of the others'; with none known (round 1) the round is the run's FedAvg.
        """
        known = site_losses(sites, {r: rec.site_val for r, rec in self.records.items()}, rnd, self.primary_metric)
        if not known:
            return self._weighted_sum(sites, usable), ""
        fill = sum(known.values()) / len(known)
        step = qffl_step(
            [usable[s][0] for s in sites],
            [known.get(s, fill) for s in sites],
            self.qffl_q,
            self.qffl_lipschitz,
            [usable[s][1] for s in sites],
        )
        step = [np.asarray(a, dtype=g.dtype) for a, g in zip(step, self.global_arrays)]
        return Staged(sites, step, 1.0), ""

    def _stage_secure(self, results, reports, rec: RoundRecord) -> tuple[Staged | None, str]:
        """Under SecAgg+ every reply carries the same unmasked mean over all replying sites."""
        if not results:
            return None, ""
        mean = parameters_to_ndarrays(results[0][1].parameters)
        if self.secure_stats is not None:
            # Split the evaluation sums off first: they are valid even when the update sum is not.
            mean = self._record_secure_test(mean, len(results), sorted(reports), rec)
        bad = sorted(rec.rejected)
        if bad:
            # A masked update cannot be taken out of the sum: the whole sum is unusable.
            return None, f"secure sum discarded: it contains the update of {', '.join(bad)}, which was rejected"
        trained = sorted(s for s, (r, _) in reports.items() if r.status is Status.TRAINED)
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
        if [a.shape for a in mean] != [g.shape for g in self.global_arrays]:
            return None, "secure sum discarded: its arrays do not match the model's shapes"
        # mean over every replying site (zero updates of out-of-budget sites included) -> sum
        total = [(m.astype(np.float64) * len(results)).astype(g.dtype) for m, g in zip(mean, self.global_arrays)]
        return Staged(trained, total, float(len(trained))), ""

    def _record_secure_test(
        self, mean: list[np.ndarray], count: int, sites: list[str], rec: RoundRecord
    ) -> list[np.ndarray]:
        """Take the evaluation sums off the unmasked mean and record the metrics they give.

        Each site evaluated the global model it received, before training, so the metrics
        are those of the previous round's model. Returns the model's arrays.
        """
        assert self.secure_stats is not None
        if len(mean) != len(self.global_arrays) + 1:
            rec.failures.append("secure sum carries no evaluation statistics; no test metrics this round")
            return mean
        try:
            sums = self.secure_stats.unpack(mean[-1] * count)  # mean over replying sites -> sum
        except PrivfedError as exc:
            rec.failures.append(f"secure evaluation statistics discarded: {exc}")
            return mean[:-1]
        if self.central_eval is None and self.combine_sums is not None:
            rec.test = self.combine_sums(sums)
            rec.test_model_round, rec.test_sites = rec.round - 1, sites
        return mean[:-1]

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
        if self.central is not None and rec.released and not self.central_exhausted:
            total = staged.total if staged is not None else [np.zeros_like(g) for g in self.global_arrays]
            step, row = self.central.release(server_round, total, self.ledger, empty=staged is None)
            rec.ledger_rows.append(row)
        elif staged is not None:
            step = [t / staged.divisor for t in staged.total]
        else:
            return None
        new_global = [(g + d).astype(g.dtype, copy=False) for g, d in zip(self.global_arrays, step)]
        if not all(np.isfinite(a).all() for a in new_global):
            # Finite updates can still overflow when summed; keep the last good model.
            log(WARNING, "round %s: aggregate is not finite; the global model is unchanged", server_round)
            rec.failures.append("aggregate overflowed (not finite); model unchanged")
            return None
        self.global_arrays = new_global
        rec.aggregated = staged is not None
        return self.global_arrays

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

    def check_update(self, arrays: list[np.ndarray], num_examples: int, report: SiteReport) -> str:
        """Why an update's arrays cannot be aggregated, or '' if they can."""
        if len(arrays) != len(self.global_arrays):
            return f"expected {len(self.global_arrays)} arrays, got {len(arrays)}"
        for i, (a, g) in enumerate(zip(arrays, self.global_arrays)):
            if a.shape != g.shape or a.dtype != g.dtype:
                return f"array {i} has dtype/shape {a.dtype}{list(a.shape)}, expected {g.dtype}{list(g.shape)}"
            if not np.isfinite(a).all():
                return f"array {i} contains NaN or Inf"
        if num_examples != report.plan.dataset_size:
            return f"num_examples={num_examples} but dataset_size={report.plan.dataset_size}"
        if self.central is not None or self.max_update_norm > 0:
            norm = update_norm(arrays)
            if self.central is not None and norm > self.central.clip_norm * (1 + 1e-4):
                return f"update norm {norm:.4g} exceeds central-dp.clip-norm={self.central.clip_norm:g}"
            if self.max_update_norm > 0 and norm > self.max_update_norm:
                return f"update norm {norm:.4g} exceeds max-update-norm={self.max_update_norm:g}"
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
        if server_round == self.last_round and self.fraction_evaluate < 1.0:
            # The final model's site-level fairness should cover every site, once.
            return [
                (
                    c,
                    EvaluateIns(
                        parameters, self.on_evaluate_config_fn(server_round) if self.on_evaluate_config_fn else {}
                    ),
                )
                for _, c in sorted(client_manager.all().items())
            ]
        return super().configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ):
        rec = self.record(server_round)
        for _, res in results:
            self._catch_up_from_evaluation(server_round, dict(res.metrics), rec)
            site = res.metrics.get("site_id")
            if isinstance(site, str):
                rec.site_val[site] = {
                    k: float(v)
                    for k, v in res.metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                }
        # Under SecAgg+ with secure sums the replies hold no sums: the round's test metrics
        # came from the masked vector (:meth:`_record_secure_test`), not from here.
        if self.central_eval is None and self.combine_eval is not None and results and self.secure_stats is None:
            rec.test = self.combine_eval([(res.num_examples, dict(res.metrics)) for _, res in results])
        losses = [(res.num_examples, res.loss) for _, res in results if math.isfinite(res.loss)]
        if not losses:
            return None, {}
        total = sum(n for n, _ in losses)
        return sum(n * v for n, v in losses) / max(total, 1), {}

    # -------------------------------------------------------------- stop
    def should_stop(self) -> bool:
        """True once every site's budget (or the central budget) cannot cover another round."""
        return self.central_exhausted or len(self.exhausted_sites) >= self.num_sites


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


def _settle(s: SiteSpend, used: bool, rejected: str) -> SiteSpend:
    """A trained site's final status once the round's sum is known."""
    if not s.used or used:
        return s
    return dataclasses.replace(s, used=False, status="rejected" if rejected else "not_aggregated")


def _describe_failure(f: tuple[ClientProxy, FitRes] | BaseException) -> str:
    if isinstance(f, BaseException):
        return str(f).splitlines()[0][:300] if str(f) else type(f).__name__
    proxy, res = f
    return f"node-{proxy.node_id}: {res.status.message}"
