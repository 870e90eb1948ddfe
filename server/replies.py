"""What the server makes of the sites' replies: identity, parsing, budget checks, catch-up rows, the ledger.

:class:`ReplyLedger` is the part of the strategy that writes privacy spend: every reply's
accountant inputs are ledgered, whether or not its update is used, before the model
changes. A site's word can only add spend to its own rows (never remove any).

Trust no claim a party can forge (issue 19):

* **Identity.** A reply's ``site_id`` is believed only once the reply's signature verifies
  against that site's key in the federation registry, over a claim the server rebuilds
  from its own run id, round, message kind and digest of the arrays it received
  (:func:`common.deploy.signing.reply_claim`). Until then the reply is "node-<id>": a
  refused reply is ledgered nowhere under the id it claims. A node answers for one site
  per server process; a new node with a valid signature for a site takes that site over
  (a restarted SuperNode), with a warning.
* **Bounded work.** Sizes are checked before anything is decoded, parsed, hashed or
  verified: the number of metrics and their names, every string's length (the history by
  the rounds begun), the update's array count and byte sizes.
* **Isolation.** Each reply is processed on its own: whatever goes wrong with one
  (refused, or an exception nobody foresaw) refuses that reply with a reason, never the
  round or another site's rows.
* **Catch-up.** A history names only past rounds the server began and sampled that site
  in, each once, at most :data:`MAX_CATCH_UP` new ones per reply; so no catch-up row can
  collide with a row the round writes later.
* **Weights** are the registry's declared sizes; a reply that says otherwise is refused.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import EvaluateRes, FitRes, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy
from flwr.supercore import log

from common.config import RunConfig
from common.deploy.registry import Registry
from common.deploy.signing import (
    MASKED,
    SIGNATURE,
    Ed25519PrivateKey,
    canonical,
    parse_refusal,
    reply_claim,
    update_digest,
    verify,
)
from common.identifiers import site_id_problem
from common.privacy.accounting import NO_DP, RoundPlan
from common.privacy.metrics_dp import MECHANISM as METRICS_MECHANISM
from common.privacy.metrics_dp import metrics_unit
from common.protocol import (
    MalformedReport,
    MetricsSpend,
    SiteReport,
    Status,
    history_limit,
    metrics_shape_problem,
    parse_fit_metrics,
    parse_history,
    parse_metrics_spend,
)
from server.ledger import Ledger, LedgerRow, SiteSpend

# Bytes an .npy encoding adds to an array's data (its header; numpy pads it to 64 or 128).
NPY_OVERHEAD = 256
# New catch-up rows one reply may add: each costs an accountant composition, and an honest
# site loses few replies in a row. More: the oldest are ledgered now, the rest next round,
# and the update waits until its history is complete.
MAX_CATCH_UP = 16
REFUSAL = "refusal"  # the ledger mechanism of a site's signed policy refusal (nothing charged)
_CONFIG_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_TOKEN_RE = re.compile(r"signed-refusal:\S*")


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


@dataclass
class Reply:
    """A verified fit reply: its parsed metrics, the reply, and (plain rounds) its decoded update."""

    report: SiteReport
    res: FitRes
    arrays: list[np.ndarray] | None
    claim: str = ""  # canonical claim text the site signed
    signature: str = ""


Reports = dict[str, Reply]
# What Flower hands over as a failure: an exception, or a reply whose status is an error.
Failure = tuple[ClientProxy, FitRes] | tuple[ClientProxy, EvaluateRes] | BaseException


class Refused(Exception):
    """A reply that is looked at no further. The message is the reason (names fields, never
    a value the reply carried); ``who`` is the verified site, or '' (then "node-<id>")."""

    def __init__(self, reason: str, who: str = "") -> None:
        super().__init__(reason)
        self.who = who


class ReplyLedger:
    """Verifies and parses replies, ledgers their spend; mixed into the strategy (which sets these attributes)."""

    ledger: Ledger
    accountant: str  # the run's; a DP run refuses non-private updates
    records: dict[int, RoundRecord]
    exhausted_sites: set[str]
    cfg: RunConfig
    secure: bool
    global_arrays: list[np.ndarray]
    registry: Registry
    server_key: Ed25519PrivateKey
    run_id: str
    node_site: dict[int, str]  # the site each node answers for (this process)
    node_seen: dict[int, set[str]]  # every site a node was ever bound to
    sampled_nodes: dict[int, set[int]]  # round -> node ids the server asked to train
    refused_rounds: set[tuple[int, str]]  # (round, site) with a refusal row

    def init_identity(self, registry: Registry, server_key: Ed25519PrivateKey, run_id: str) -> None:
        if not isinstance(registry, Registry):
            raise TypeError("registry must be a common.deploy.registry.Registry")
        if not isinstance(server_key, Ed25519PrivateKey):
            raise TypeError("server_key must be an Ed25519 private key (common.deploy.signing)")
        self.registry = registry
        self.server_key = server_key
        self.run_id = run_id
        self.node_site = {}
        self.node_seen = {}
        self.sampled_nodes = {}
        self.refused_rounds = set()

    def record(self, rnd: int) -> RoundRecord:
        return self.records.setdefault(rnd, RoundRecord(rnd))

    # ------------------------------------------------------------ identity
    def note_sampled(self, rnd: int, node_ids: list[int]) -> None:
        """The nodes round ``rnd`` asked to train: a later catch-up may name only such rounds."""
        self.sampled_nodes.setdefault(rnd, set()).update(int(n) for n in node_ids)

    def site_of(self, node_id: int) -> str | None:
        return self.node_site.get(node_id)

    def _rounds_begun(self, server_round: int) -> int:
        """The highest round a history may name: begun by the server, and within the run's rounds."""
        begun = max(server_round, self.ledger.round_started(), max(self.sampled_nodes, default=0))
        return max(1, min(begun, self.cfg.federation.rounds))

    def _verify(self, rnd: int, kind: str, metrics: Any, digest: str) -> tuple[str, str, str]:
        """(site, claim text, signature) of a reply whose signature verifies; Refused otherwise."""
        site = metrics.get("site_id")
        why = site_id_problem(site)
        if why:
            raise Refused(f"site_id: {why}")
        reg = self.registry.site(site)
        if reg is None:
            raise Refused("site_id is not in the federation registry")
        sig = metrics.get(SIGNATURE)
        if not isinstance(sig, str):
            raise Refused(f"reply is not signed (no {SIGNATURE!r} metric)")
        claim = reply_claim(self.run_id, rnd, kind, digest, metrics)
        if not verify(reg.public_key, claim, sig):
            raise Refused(
                "signature does not verify against the registered key of the site the reply names "
                "(another key, run, round, message kind or update)"
            )
        return site, canonical(claim).decode(), sig

    def _bind(self, node_id: int, site: str) -> None:
        """Bind the node to the (verified) site; a node already bound to another site is refused."""
        bound = self.node_site.get(node_id)
        if bound == site:
            return
        if bound is not None:
            raise Refused("node already answers for another site in this run")
        for old in [n for n, s in self.node_site.items() if s == site]:
            del self.node_site[old]
            log(WARNING, "site %s now answers from node %s (was node %s)", site, node_id, old)
        self.node_site[node_id] = site
        self.node_seen.setdefault(node_id, set()).add(site)

    def _sampled(self, rnd: int, site: str) -> bool:
        """Whether round ``rnd`` asked this site to train (as far as this process knows).

        A round this process did not run (before a resume) is bounded by the ledger's
        ``round_started`` only. A sampled node never bound to any site might have been it.
        """
        nodes = self.sampled_nodes.get(rnd)
        if nodes is None:
            return True
        return any(not self.node_seen.get(n) or site in self.node_seen[n] for n in nodes)

    def _arrays(self, res: FitRes) -> list[np.ndarray]:
        """A plain reply's update, decoded only once its array count and byte sizes fit the model."""
        tensors = res.parameters.tensors
        model = self.global_arrays
        if len(tensors) != len(model):
            raise Refused(f"update: expected {len(model)} arrays, got {len(tensors)}")
        for i, (t, g) in enumerate(zip(tensors, model)):
            if not isinstance(t, bytes) or len(t) > g.nbytes + NPY_OVERHEAD:
                raise Refused(f"update: array {i} is larger than the model's {g.dtype}{list(g.shape)}")
        try:
            return parameters_to_ndarrays(res.parameters)
        except Exception as exc:  # undecodable bytes: the site's problem, not the round's
            raise Refused(f"update cannot be decoded ({type(exc).__name__})") from None

    # ------------------------------------------------------------------ fit
    def secure_round_lost(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[BaseException], reason: str
    ) -> None:
        """A SecAgg+ round halted after sites trained: ledger their spend, use nothing."""
        rec = self.record(server_round)
        rec.failures += [describe_failure(f) for f in failures] + [reason]
        spends, _ = self._reports(server_round, results)
        spends += self.refusals(server_round, failures, rec)
        lost = [
            dataclasses.replace(s, used=False, status="lost") if s.status == Status.TRAINED.value else s for s in spends
        ]
        rec.ledger_rows += self.write_round(server_round, lost, rec)
        log(WARNING, "round %s: %s", server_round, reason)

    def _reports(self, server_round: int, results: list[tuple[ClientProxy, FitRes]]) -> tuple[list[SiteSpend], Reports]:
        """Verify and parse every reply, each in isolation: one spend per site that replied."""
        rec = self.record(server_round)
        spends: list[SiteSpend] = []
        reports: Reports = {}
        for proxy, res in results:
            node = f"node-{proxy.node_id}"
            try:
                spends += self._fit_reply(server_round, proxy, res, rec, reports)
            except Refused as exc:
                rec.rejected[exc.who or node] = str(exc)
            except Exception as exc:  # unforeseen: this reply is refused, the round goes on
                log(WARNING, "round %s: reply of %s could not be processed", server_round, node, exc_info=exc)
                rec.rejected[node] = f"reply could not be processed ({type(exc).__name__})"
        return spends, reports

    def _fit_reply(
        self, server_round: int, proxy: ClientProxy, res: FitRes, rec: RoundRecord, reports: Reports
    ) -> list[SiteSpend]:
        """One fit reply: verified, parsed, its history caught up, its budget checked.

        Raises :class:`Refused`; touches ``rec`` and ``reports`` only once nothing can fail
        (the catch-up rows, the site's signed word, are ledgered at once).
        """
        m = res.metrics
        begun = self._rounds_begun(server_round)
        why = metrics_shape_problem(m, history_limit(begun))
        if why:
            raise Refused(why)
        arrays = None if self.secure else self._arrays(res)
        digest = MASKED if arrays is None else update_digest(arrays)
        site, claim, sig = self._verify(server_round, "fit", m, digest)
        try:
            report = parse_fit_metrics(m, max_round=begun)
        except MalformedReport as exc:
            raise Refused(str(exc), site) from None
        if site in reports:
            # Two nodes sign for one site (its key on two nodes: a deployment error). The
            # second one trained too, so its spend is ledgered under a distinct id; its
            # update is not used, and the first node keeps the site.
            dup = f"{site}@node-{proxy.node_id}"
            rec.rejected[dup] = "second reply for this site this round"
            return [spend(dataclasses.replace(report, site_id=dup), False, rec.rejected[dup], claim, sig)]
        self._bind(proxy.node_id, site)
        try:
            reason = self._catch_up(
                server_round,
                server_round,
                site,
                report.unit,
                report.plan,
                report.eps_budget,
                report.history,
                rec,
                report.rng,
                claim,
                sig,
            )
        except Refused as exc:
            raise Refused(str(exc), site) from None
        declared = self.registry.sites[site].declared_size
        if report.plan.dataset_size != declared:
            reason = "dataset_size differs from the registered declared size"
        if report.status is Status.TRAINED:
            reason = reason or self.check_report(report)
        out = [spend(report, report.status is Status.TRAINED and not reason, reason, claim, sig)]
        if report.metrics is not None:  # its noisy evaluation sums, in the masked vector
            out.append(
                metrics_spend(
                    site, report.metrics, report.eps_budget, report.plan.accountant, claim, sig, self.cfg.dp.unit
                )
            )
        # Nothing below can fail: commit this reply to the round.
        reports[site] = Reply(report, res, arrays, claim, sig)
        if report.status is Status.TRAINED:
            rec.trained.append(site)
            if "train_loss" in report.extra:
                rec.train_loss[site] = report.extra["train_loss"]
        elif report.status is Status.BUDGET_EXHAUSTED:
            rec.exhausted.append(site)
            self.exhausted_sites.add(site)
        if reason:
            rec.rejected[site] = reason
        return out

    def write_round(self, rnd: int, spends: list[SiteSpend], rec: RoundRecord) -> list[LedgerRow]:
        """Ledger the round's spends in one transaction; should that fail, each on its own,
        so that one spend the ledger refuses cannot take the others with it."""
        try:
            return self.ledger.record_round(rnd, spends)
        except Exception as exc:
            log(WARNING, "round %s: the round's rows could not be ledgered together; one by one", rnd, exc_info=exc)
        rows: list[LedgerRow] = []
        for s in spends:
            try:
                rows += self.ledger.record_round(rnd, [s])
            except Exception as exc:
                rec.failures.append(f"{s.site_id}: its row could not be ledgered ({type(exc).__name__})")
                rec.rejected.setdefault(s.site_id, "its spend could not be ledgered")
        return rows

    # ------------------------------------------------------------- refusals
    def refusals(self, server_round: int, failures: Sequence[Failure], rec: RoundRecord) -> list[SiteSpend]:
        """Signed policy refusals in the round's failures: one "refusal" row per site (nothing charged).

        A token counts only if its claim names this run and round and a registered site, and
        its signature verifies against that site's key; otherwise it is noted, not ledgered.
        """
        out: list[SiteSpend] = []
        for f in failures:
            try:
                found = parse_refusal(_raw_failure_text(f))
            except Exception:  # a hostile text: no refusal in it
                found = None
            if found is None:
                continue
            claim, sig = found
            site, key = claim.get("site_id"), claim.get("key")
            reg = self.registry.site(site) if isinstance(site, str) and not site_id_problem(site) else None
            ok = (
                reg is not None
                and claim.get("run_id") == self.run_id
                # An int, as the audit demands (2.0 == 2 and True == 1 would pass ==, then fail the audit).
                and type(claim.get("round")) is int
                and claim.get("round") == server_round
                and isinstance(key, str)
                and _CONFIG_KEY_RE.fullmatch(key) is not None
                and verify(reg.public_key, claim, sig)
            )
            if not ok:
                rec.failures.append("a refusal token that does not verify against the registry (not ledgered)")
                continue
            assert isinstance(site, str)  # reg is not None
            if (server_round, site) in self.refused_rounds:
                continue
            self.refused_rounds.add((server_round, site))
            out.append(self._refusal_spend(site, canonical(claim).decode(), sig))
            rec.failures.append(f"{site}: refused the run config by its own policy (config key '{key}')")
        return out

    def _refusal_spend(self, site: str, claim: str, sig: str) -> SiteSpend:
        last = self.ledger.last_row(site)
        if last is None:
            plan = RoundPlan(0, 1.0, 1, 0.0, 0.0, 0.0, self.accountant)
            unit, budget, rng = "none", float("inf"), "os"
        else:
            plan = _plan_of(last)
            unit, budget, rng = last.unit, last.eps_budget, last.rng
        return SiteSpend(
            site, unit, plan, 0, budget, False, "refused", rng, mechanism=REFUSAL, claim=claim, signature=sig
        )

    # ------------------------------------------------------------- evaluate
    def evaluate_reply(self, server_round: int, proxy: ClientProxy, metrics: dict[str, Any], rec: RoundRecord) -> str:
        """Verify an evaluate reply, ledger its catch-up and release: its site, or '' if refused."""
        node = f"node-{proxy.node_id}"
        site = ""
        try:
            why = metrics_shape_problem(metrics, history_limit(self._rounds_begun(server_round)))
            if why:
                raise Refused(why)
            site, claim, sig = self._verify(server_round, "evaluate", metrics, "")
            self._bind(proxy.node_id, site)
            self._catch_up_from_evaluation(server_round, site, metrics, rec, claim, sig)
            self.ledger_evaluation_release(server_round, metrics, rec, site, claim, sig)
        except Refused as exc:
            rec.failures.append(f"{exc.who or site or node}: evaluate reply refused: {exc}")
            return ""
        except Exception as exc:
            log(WARNING, "round %s: evaluate reply of %s could not be processed", server_round, node, exc_info=exc)
            rec.failures.append(f"{site or node}: evaluate reply could not be processed ({type(exc).__name__})")
            return ""
        return site

    def ledger_evaluation_release(
        self,
        server_round: int,
        metrics: dict[str, Any],
        rec: RoundRecord,
        site: str = "",
        claim: str = "",
        sig: str = "",
    ) -> None:
        """An evaluate reply's noisy statistics (metrics.dp): its own ledger row, as the (verified) site declares it."""
        site = site or str(metrics.get("site_id"))
        try:
            release = parse_metrics_spend(metrics)
        except MalformedReport as exc:
            rec.failures.append(f"{site}: evaluate reply: {exc}")
            return
        if release is None or self.ledger is None:
            return
        budget = metrics.get("eps_budget")
        budget = float(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else float("inf")
        row = metrics_spend(site, release, budget, self.accountant, claim, sig, self.cfg.dp.unit)
        rec.ledger_rows += self.write_round(server_round, [row], rec)

    def _catch_up(
        self,
        server_round: int,
        current: int,
        site: str,
        unit: str,
        plan: RoundPlan,
        eps_budget: float,
        history: tuple[tuple[int, float, float, int], ...],
        rec: RoundRecord,
        rng: str,
        claim: str = "",
        sig: str = "",
    ) -> str:
        """Ledger the rounds this site says it trained but whose replies never arrived.

        Only rounds before ``current`` that the server began and sampled this site in,
        not already ledgered (the history was parsed with one entry per round at most);
        a history naming any other round is refused whole. Written at once, before this
        round's budget check, so that check sees them; at most :data:`MAX_CATCH_UP` per
        reply (the oldest), and then the reason the update must wait is returned.

        The site's word can only add spend to its own rows (never remove any), so trusting
        it errs on the side of overstating epsilon. ``rng`` is the kind the site reports
        now: a site's RNG is fixed for a run, so its earlier rounds used the same.
        """
        known = self.ledger.rounds(site)
        begun = self._rounds_begun(server_round)
        missing = []
        for entry in history:
            rnd = entry[0]
            if rnd >= current or rnd > begun:
                raise Refused("history names the current or a later round")
            if rnd in known:
                continue
            if not self._sampled(rnd, site):
                raise Refused("history names a round in which the server did not sample this site")
            missing.append(entry)
        if not missing:
            return ""
        missing.sort()
        later = missing[MAX_CATCH_UP:]
        rows = []
        for rnd, sigma, q, steps in missing[:MAX_CATCH_UP]:
            spent = dataclasses.replace(plan, noise_multiplier=sigma, sample_rate=q, steps=steps)
            rows.append(
                (rnd, SiteSpend(site, unit, spent, steps, eps_budget, False, "lost", rng, claim=claim, signature=sig))
            )
        try:
            # ``current``: an evaluate reply's history may name this very round (its fit reply lost).
            written = self.ledger.record_round(current, [], catch_up=rows)
        except Exception as exc:
            raise Refused(f"its catch-up rows could not be ledgered ({type(exc).__name__})") from None
        rec.ledger_rows += written
        rec.caught_up += [f"{site}@{rnd}" for rnd, _ in rows]
        log(
            WARNING,
            "round %s: %s reported %d earlier round(s) whose replies were lost; ledgered now",
            server_round,
            site,
            len(rows),
        )
        if later:
            return f"history holds more than {MAX_CATCH_UP} unledgered rounds; the rest are ledgered in later rounds"
        return ""

    def _catch_up_from_evaluation(
        self, server_round: int, site: str, metrics: dict[str, Any], rec: RoundRecord, claim: str, sig: str
    ) -> None:
        """Evaluate replies carry the site's history too, so a fit reply lost in the last
        round is still ledgered. The other accountant inputs come from the site's last row."""
        raw = metrics.get("history")
        if raw is None or self.ledger is None:
            return
        last = self.ledger.last_row(site)
        if last is None:
            return  # never heard from in a fit reply: its next fit reply carries everything
        try:
            history = parse_history(raw, last.accountant, self._rounds_begun(server_round))
        except MalformedReport as exc:
            raise Refused(str(exc), site) from None
        # The history of an evaluate reply may include this round's fit.
        self._catch_up(
            server_round,
            server_round + 1,
            site,
            last.unit,
            _plan_of(last),
            last.eps_budget,
            history,
            rec,
            last.rng,
            claim,
            sig,
        )

    def check_report(self, report: SiteReport) -> str:
        """Why a site's reported round cannot be used (accountant and budget), or ''."""
        plan = report.plan
        if (report.unit == "user") != (self.cfg.dp.unit == "user"):
            # The ledger states the run's unit: a site may not claim a person's protection in a
            # record-level run, nor train per record in a user-level one.
            return f"unit {report.unit!r} in a run whose dp.unit is {self.cfg.dp.unit!r}"
        if self.accountant != NO_DP:
            if plan.accountant != self.accountant:
                return f"accountant {plan.accountant!r} in a run accounted with {self.accountant!r}"
            mech = (plan.noise_multiplier, plan.sample_rate, report.steps_taken)
            total = self.ledger.projected_total(report.site_id, mech, plan.delta, plan.accountant)
            if total > report.eps_budget:
                return f"update would take the site to eps={total:.4g}, over its budget {report.eps_budget:g}"
        return ""


def _plan_of(last: LedgerRow) -> RoundPlan:
    return RoundPlan(
        last.dataset_size,
        last.sample_rate,
        last.steps,
        last.noise_multiplier,
        last.max_grad_norm,
        last.delta,
        last.accountant,
        last.neighbouring,
    )


def spend(report: SiteReport, used: bool, reason: str, claim: str = "", sig: str = "") -> SiteSpend:
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
        claim=claim,
        signature=sig,
    )


def metrics_spend(
    site: str,
    release: MetricsSpend,
    budget: float,
    accountant: str,
    claim: str = "",
    sig: str = "",
    dp_unit: str = "record",
) -> SiteSpend:
    """The ledger row of one noisy metrics release: (z, q = 1, 1 step); ``max_grad_norm``
    holds its L2 sensitivity (in units of the per-key bounds) and ``dataset_size`` 0 (q = 1
    needs no size, and the validation count is not sent)."""
    plan = RoundPlan(0, 1.0, 1, release.noise_multiplier, release.l2_sensitivity, release.delta, accountant)
    return SiteSpend(
        site,
        metrics_unit(dp_unit),
        plan,
        1,
        budget,
        True,
        "released",
        release.rng,
        mechanism=METRICS_MECHANISM,
        claim=claim,
        signature=sig,
    )


def settle(s: SiteSpend, used: bool, rejected: str) -> SiteSpend:
    """A trained site's final status once the round's sum is known (metrics and refusal rows keep theirs)."""
    if s.mechanism in (METRICS_MECHANISM, REFUSAL) or not s.used or used:
        return s
    return dataclasses.replace(s, used=False, status="rejected" if rejected else "not_aggregated")


def _raw_failure_text(f: Failure) -> str:
    if isinstance(f, BaseException):
        return str(f)[:100_000]
    msg = f[1].status.message
    return msg[:100_000] if isinstance(msg, str) else ""


def describe_failure(f: Failure) -> str:
    """One bounded line for the round's failures: the first line of the failure text, printable
    ASCII only, at most 200 characters, a signed refusal token shortened to its name."""
    text = _TOKEN_RE.sub("[signed refusal]", _raw_failure_text(f)[:4096])
    line = text.splitlines()[0] if text.strip() else ""
    line = "".join(c for c in line if " " <= c <= "~")[:200]
    if isinstance(f, BaseException):
        return line or type(f).__name__
    return f"node-{f[0].node_id}: {line}"
