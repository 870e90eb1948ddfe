"""End-of-run summary: summary.md with the headline numbers and two plots.

Every epsilon shown states its delta, its accountant and its unit of privacy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.deploy.fileio import write_text_atomically
from common.identifiers import CENTRAL_SITE_ID
from common.metrics.quality_plots import quality_figure
from common.plots import line_plot, save_figure
from common.privacy.metrics_dp import MECHANISM as METRICS_MECHANISM
from common.privacy.metrics_dp import UNIT as METRICS_UNIT
from common.seeds import RNG_SEEDED
from common.textsafe import md_cell
from server.eps_crosscheck import TOLERANCE, cross_check
from server.ledger import Ledger, LedgerRow
from server.membership_inference import violates_bound
from server.run_facts import (
    FAIRNESS_COLUMNS,
    RunConfigFile,
    fairness_rounds,
    not_run_reasons,
    read_config,
    resolved_settings,
)
from server.run_files import read_metrics

if TYPE_CHECKING:
    from common.config import RunConfig
    from common.tasks import Task

# What a round's "test" numbers are when the server did not evaluate on its own split.
POOLED_VALIDATION = "pooled site validation"


def eval_source(cfg: RunConfig, task: Task) -> str:
    """What the "test" metrics of a round are, for the round line and summary.md.

    With ``federation.central-eval`` on and a server-held split, the server measured them
    (``task.test_description``). With it off, the sites' validation metrics are pooled
    instead (issue 20, finding 7: they were labelled "server-held split"); a task whose
    test data live at the sites (recsys) keeps its own description. Under ``metrics.dp``
    pooled numbers are noisy, and the label says so.
    """
    held = task.server_test_data() is not None
    # federation.ema-decay: the numbers are the averaged model's (server.averaging).
    decay = cfg.federation.ema_decay
    of = f"; model: average of the global models, ema-decay {decay:g}" if decay else ""
    if cfg.federation.central_eval and held:
        return task.test_description + of
    source = POOLED_VALIDATION if held else task.test_description
    return (f"{source}, noisy: metrics.dp" if cfg.metrics.dp else f"{source}, exact") + of


def served_words(config: Any) -> str:
    """What the final checks (samples, membership inference) ran on: the last global model, or
    under federation.ema-decay the average of the global models (server.averaging)."""
    decay = config.get("ema-decay", 0.0) if config is not None else 0.0
    if isinstance(decay, (int, float)) and decay > 0:
        return f"the average of the global models (ema-decay {decay:g})"
    return "the final global model"


def eval_kind(source: str) -> str:
    """The word the round line and headline put before the metric: "test", or what it is."""
    return POOLED_VALIDATION if source.startswith(POOLED_VALIDATION) else "test"


@dataclass(frozen=True)
class Summary:
    run_dir: Path
    rounds_completed: int
    final_test: dict[str, float]
    eps_by_site: dict[str, LedgerRow]  # last row of each site
    steps_by_site: dict[str, int]  # noisy steps over the whole run
    ledger_ok: bool
    ledger_rows: int
    stop_reason: str
    primary: str
    seeded_noise: bool
    mia: dict[str, float] | None = None
    cross_checks: tuple = ()
    central: LedgerRow | None = None  # last client-level (central DP) row, unit "site"
    central_rounds: int = 0
    central_extra_delta: float = 0.0  # config.all_or_nothing_probability
    # Verification against the registry's keys (server.ledger_audit.verify_against_keys):
    # "" not run, else its one-line verdict.
    keys_check: str = ""
    # metrics.dp: whether the sites' statistics were noised; their error bars; releases per site.
    metrics_private: bool = False
    final_test_std: dict[str, float] = field(default_factory=dict)
    metrics_releases: dict[str, int] = field(default_factory=dict)
    # What final_test is (:func:`eval_source`): a server-held split, or pooled site validation.
    test_source: str = "server-held split"
    # The unit of the metrics releases' ledger rows (common.privacy.metrics_dp.metrics_unit).
    metrics_unit: str = METRICS_UNIT
    # federation.max-sites-per-person (0: undeclared); read only when the unit is a person.
    max_sites_per_person: int = 0

    def person_worst_case(self) -> tuple[int, float, float] | None:
        """:func:`person_worst_case` of the sites' last rows."""
        return person_worst_case(self.eps_by_site.values(), self.max_sites_per_person)

    def headline(self) -> list[str]:
        primary = self.primary
        lines = [f"artifacts: {self.run_dir.resolve()}"]
        lines.append(
            f"rounds completed: {self.rounds_completed}{' (' + self.stop_reason + ')' if self.stop_reason else ''}"
        )
        if primary in self.final_test:
            # Group metrics (dotted keys) are in summary.md; the headline stays one line.
            extras = ", ".join(f"{k} {v:.4f}" for k, v in self.final_test.items() if k != primary and "." not in k)
            lines.append(
                f"final {eval_kind(self.test_source)} {primary}: {self.final_test[primary]:.4f}"
                + (f" ({extras})" if extras else "")
            )
        rows = list(self.eps_by_site.values())
        if rows:
            eps = [r.eps_total for r in rows]
            r0 = rows[0]
            if math.isinf(max(eps)):
                what = "no sample-level DP" if self.central is not None else "non-private run"
                lines.append(f"privacy: {what} (ε = ∞ per {r0.unit})")
            else:
                lines.append(
                    f"privacy: ε per site {min(eps):.3f} to {max(eps):.3f} at δ ≤ {max(r.delta for r in rows):.3g} "
                    f"({r0.accountant.upper()} accountant, unit of privacy: one {r0.unit}, "
                    f"{r0.neighbouring} neighbours, {'user' if r0.unit == 'user' else 'sample'}-level DP-SGD)"
                )
        worst = self.person_worst_case()
        if worst is not None and rows and not math.isinf(max(r.eps_total for r in rows)):
            lines.append(worst_case_line(worst, self.max_sites_per_person))
        c = self.central
        if c is not None:
            extra = (
                f" + {self.central_extra_delta:.2g} (rounds one site could make all-or-nothing)"
                if self.central_extra_delta
                else ""
            )
            lines.append(
                f"client-level DP: ε {c.eps_total:.3f} at δ = {c.delta:.3g}{extra} "
                f"(RDP accountant, unit of privacy: one site, {c.neighbouring} neighbours, "
                f"DP-FedAvg σ={c.noise_multiplier:.4g}, C={c.max_grad_norm:g}, Poisson q={c.sample_rate:g} of "
                f"{c.dataset_size} sites, {self.central_rounds} rounds; noise added by the server after aggregation)"
            )
        if self.metrics_private:
            n = sum(self.metrics_releases.values())
            lines.append(
                f"metrics: private (metrics.dp): {n} noisy release(s) ({METRICS_MECHANISM}, unit {self.metrics_unit}), "
                "each charged to its site's ledger and composed into the ε above; test metrics carry ± noise std"
            )
        else:
            lines.append("metrics: not private (metrics.dp = false): the sites' evaluation statistics are exact")
        private = (rows and not math.isinf(max(r.eps_total for r in rows))) or c is not None
        if self.seeded_noise and private:
            lines.append(
                "noise: seeded for reproducibility (dp.secure-rng=false, set by the simulation launcher; "
                "the ledger's rng column says seeded): private only against those who do not know the seed; "
                "dp.secure-rng=true (the default everywhere else) draws it from OS entropy"
            )
        lines.append(
            f"ledger: {self.ledger_rows} rows, hash chain and ε "
            f"{'verified' if self.ledger_ok else 'FAILED verification'}"
            + (f"; {self.keys_check}" if self.keys_check else "")
        )
        if self.cross_checks:
            worst = max(self.cross_checks, key=lambda c: c.shortfall)
            bad = [c.site_id for c in self.cross_checks if not c.ok]
            verdict = f"UNDER-STATED for {', '.join(bad)}" if bad else "not under-stated"
            lines.append(
                f"cross-check against {worst.method} for {len(self.cross_checks)} sites: recorded ε {verdict} "
                f"(recorded minus independent, closest site: {-worst.shortfall:+.2%})"
            )
        if self.mia:
            m = self.mia
            bound = (
                "no bound (non-private)"
                if math.isinf(m["mia_eps"])
                else (f"DP bound at ε={m['mia_eps']:.2f}, δ={m['mia_delta']:.3g}: {m['mia_advantage_bound']:.3f}")
            )
            verdict = " VIOLATES the claimed bound beyond sampling error" if violates_bound(m) else ""
            lines.append(
                f"membership inference (loss threshold, {int(m['mia_examples'])} examples): "
                f"AUC {m['mia_auc']:.3f}, advantage {m['mia_advantage']:.3f} "
                f"(chance level {m['mia_chance_advantage']:.3f}; {bound}){verdict}"
            )
        return lines


def person_worst_case(last_rows: Iterable[LedgerRow], max_sites_per_person: int) -> tuple[int, float, float] | None:
    """Under user-level DP: (k, epsilon, delta) for one person whose records sit at the k
    sites that spent the most, k = the declared max-sites-per-person (else every site).

    The sites' pseudonyms of a person agree (the federation key), so their releases are k
    mechanisms on one person's data: basic composition (sum of the k largest epsilons and of
    their deltas) bounds them whatever accountant each site used. ``last_rows``: each site's
    last row, with its cumulative epsilon. None unless the unit is user.
    """
    rows = [r for r in last_rows if r.unit == "user"]
    if not rows:
        return None
    k = min(max_sites_per_person or len(rows), len(rows))
    top = sorted(rows, key=lambda r: r.eps_total, reverse=True)[:k]
    return k, sum(r.eps_total for r in top), sum(r.delta for r in top)


def worst_case_line(worst: tuple[int, float, float], max_sites_per_person: int) -> str:
    """The report's one line on a person's federation-wide worst case."""
    k, eps_k, delta_k = worst
    declared = (
        f"declared max-sites-per-person = {max_sites_per_person}"
        if max_sites_per_person
        else "max-sites-per-person undeclared, so any person may be at every site"
    )
    return (
        f"per person, federation-wide: ε ≤ {eps_k:.3f} at δ ≤ {delta_k:.3g} for one person at the {k} "
        f"site(s) that spent most ({declared}; basic composition of their ε)"
    )


def _worst_json(s: Summary) -> dict[str, Any] | None:
    worst = s.person_worst_case()
    if worst is None:
        return None
    k, eps_k, delta_k = worst
    return {
        "unit": "user",
        "sites": k,
        "max_sites_per_person": s.max_sites_per_person or None,
        "epsilon": eps_k,
        "delta": delta_k,
        "composition": "basic (sum over the k sites that spent most)",
    }


def write_summary(
    run_dir: Path,
    ledger: Ledger,
    primary: str,
    scenario: str,
    stop_reason: str = "",
    seeded_noise: bool = True,
    mia: dict[str, float] | None = None,
    test_source: str = "server-held split",
    plot_metrics: tuple[str, ...] = (),
    central_extra_delta: float = 0.0,
    metrics_private: bool = False,
    keys_check: str = "",
    max_sites_per_person: int = 0,
) -> Summary:
    metrics = read_metrics(run_dir / "metrics.jsonl")
    rows = ledger.rows()
    check = ledger.verify(expected_head=metrics[-1].get("ledger_head") if metrics else None)
    last: dict[str, LedgerRow] = {}
    steps: dict[str, int] = {}
    central = [r for r in rows if r.site_id == CENTRAL_SITE_ID]
    latest: dict[str, float] = {}  # cumulative ε over every row of the site (metrics releases included)
    release_unit = METRICS_UNIT
    releases: dict[str, int] = {}
    for r in rows:
        if r.site_id == CENTRAL_SITE_ID:
            continue
        latest[r.site_id] = r.eps_total
        if r.mechanism == METRICS_MECHANISM:
            releases[r.site_id] = releases.get(r.site_id, 0) + 1
            release_unit = r.unit
            continue
        last[r.site_id] = r
        steps[r.site_id] = steps.get(r.site_id, 0) + r.steps
    # The table shows each site's DP-SGD inputs with its whole cumulative ε.
    last = {site: replace(r, eps_total=latest[site]) for site, r in last.items()}
    final: dict[str, Any] = next((m for m in reversed(metrics) if m.get("test")), {})
    # The recorder writes what the numbers are into each line (older runs: the caller's word).
    test_source = str(final.get("test_source") or test_source)
    summary = Summary(
        run_dir=run_dir,
        rounds_completed=sum(1 for m in metrics if not m.get("interrupted")),
        final_test=final.get("test", {}),
        final_test_std=final.get("test_std", {}),
        metrics_private=metrics_private,
        metrics_releases=releases,
        eps_by_site=last,
        steps_by_site=steps,
        ledger_ok=check.ok,
        ledger_rows=check.rows,
        stop_reason=stop_reason,
        primary=primary,
        # What the sites and the server actually used (the ledger's rng column), not only the config.
        seeded_noise=seeded_noise or any(r.rng == RNG_SEEDED for r in rows),
        mia=mia,
        cross_checks=tuple(cross_check(rows)),
        central=central[-1] if central else None,
        central_rounds=len(central),
        central_extra_delta=central_extra_delta,
        keys_check=keys_check,
        test_source=test_source,
        max_sites_per_person=max_sites_per_person,
        metrics_unit=release_unit,
    )
    write_text_atomically(
        run_dir / "privacy-audit.json",
        json.dumps(
            {
                "per_person_worst_case": _worst_json(summary),
                "membership_inference": mia,
                "cross_check": [
                    {**asdict(c), "shortfall": c.shortfall, "ok": c.ok, "tolerance": TOLERANCE}
                    for c in summary.cross_checks
                ],
            },
            indent=2,
            default=str,
        ),
    )
    _plot_eps(run_dir / "eps.png", [r for r in rows if r.site_id != CENTRAL_SITE_ID])
    if central:
        line_plot(
            {"all sites": ([r.round for r in central], [r.eps_total for r in central])},
            run_dir / "eps-site-level.png",
            title=f"Client-level ε (unit: one site, δ = {central[0].delta:.3g}, RDP)",
            xlabel="round",
            ylabel="ε",
            hlines={}
            if math.isinf(central[0].eps_budget)
            else {f"budget ε={central[0].eps_budget:g}": central[0].eps_budget},
        )
    _plot_utility(run_dir / "utility.png", metrics, primary, eval_kind(test_source))
    quality = quality_figure(metrics, plot_metrics, test_source) if plot_metrics else None
    if quality is not None:
        save_figure(quality, run_dir / "quality.png")
    config = read_config(run_dir)
    skipped = not_run_reasons(
        config,
        metrics,
        rows,
        primary=primary,
        mia=mia,
        audit_written=True,
        ledger_ok=check.ok,
        has_samples=(run_dir / "samples" / "final.png").exists(),
        quality_names=plot_metrics,
        has_quality=quality is not None,
    )
    write_text_atomically(
        run_dir / "summary.md",
        _markdown(summary, metrics, primary, scenario, run_dir, test_source, config, rows, skipped),
    )
    return summary


def _plot_eps(path: Path, rows: list[LedgerRow]) -> None:
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in rows:
        if math.isfinite(r.eps_total):
            xs, ys = series.setdefault(r.site_id, ([], []))
            xs.append(r.round)
            ys.append(r.eps_total)
    if not series:
        return
    budget = rows[-1].eps_budget
    line_plot(
        series,
        path,
        title=(
            f"Cumulative ε per site (δ ≤ {max(r.delta for r in rows):.3g}, "
            f"{rows[0].accountant.upper()}, per {rows[0].unit})"
        ),
        xlabel="round",
        ylabel="ε",
        hlines={f"budget ε={budget:g}": budget},
    )


def _plot_utility(path: Path, metrics: list[dict[str, Any]], primary: str, kind: str = "test") -> None:
    xs = [_test_round(m) for m in metrics if primary in m.get("test", {})]
    if not xs:
        return
    series = {kind: (xs, [m["test"][primary] for m in metrics if primary in m.get("test", {})])}
    val = [(m["round"], [v[primary] for v in m.get("site_val", {}).values() if primary in v]) for m in metrics]
    val = [(r, sum(v) / len(v)) for r, v in val if v]
    if val:
        series["site validation (mean)"] = ([r for r, _ in val], [v for _, v in val])
    worst = [(m["round"], m["site_fairness"]["worst"]) for m in metrics if m.get("site_fairness")]
    if worst:
        series["site validation (worst site)"] = ([r for r, _ in worst], [v for _, v in worst])
    line_plot(series, path, title=f"Utility: {primary} (lower is better)", xlabel="round", ylabel=primary)


def _test_round(m: dict[str, Any]) -> int:
    """The round whose model a line's test metrics describe (the round before, under SecAgg+)."""
    return int(m.get("test_model_round", m["round"]))


def not_run_line(reason: str) -> str:
    """The one line a section that did not run shows instead of its content."""
    return f"Not run, because {reason}."


def _markdown(
    s: Summary,
    metrics: list[dict[str, Any]],
    primary: str,
    scenario: str,
    run_dir: Path,
    test_source: str,
    config: RunConfigFile | None = None,
    rows: list[LedgerRow] | None = None,
    skipped: dict[str, str] | None = None,
) -> str:
    # Every value a site, a data file or a config chose goes through md_cell (common.textsafe):
    # a failure string or metric name must not add rows, links or HTML to this page.
    skipped = skipped or {}
    out = [f"# privfed run {md_cell(run_dir.name)} (scenario {md_cell(scenario)})", ""]
    out += [f"- {md_cell(line)}" for line in s.headline()[1:]]
    unit = next(iter(s.eps_by_site.values())).unit if s.eps_by_site else "training example"
    last: dict[str, Any] = next((m for m in reversed(metrics) if m.get("test")), {})
    if "test_model_round" in last:
        test_source += (
            f"; model of round {last['test_model_round']}: under SecAgg+ sites send these sums with the next "
            "round's update, so the final model's are not measured"
        )
    if eval_kind(s.test_source) == "test":
        out += ["", f"## Final test metrics ({md_cell(test_source)})", ""]
    else:
        out += [
            "",
            f"## Final metrics: {md_cell(test_source)}",
            "",
            "No server-held test split was evaluated (federation.central-eval = false): these are the sites' "
            "validation metrics, pooled by the server.",
            "",
        ]
    if s.final_test_std:
        out += [
            "metrics.dp: each site noised its sums before they left; ± is the noise std propagated to the",
            "metric (delta method, first order; larger where the noise is not small against the sum).",
            "",
            "| metric | value | ± noise std |",
            "|---|---|---|",
        ]
        out += [
            f"| {md_cell(k)} | {v:.4f} | {s.final_test_std[k]:.4f} |"
            if k in s.final_test_std
            else f"| {md_cell(k)} | {v:.4f} | – |"
            for k, v in s.final_test.items()
        ]
    else:
        out += ["| metric | value |", "|---|---|"]
        out += [f"| {md_cell(k)} | {v:.4f} |" for k, v in s.final_test.items()]
    out += [
        "",
        "## Privacy spent per site",
        "",
        f"Sample-level DP-SGD: the unit of privacy is one {md_cell(unit)} at a site. "
        "ε is cumulative over the rounds the site trained, from the named Opacus accountant, "
        f"at the δ shown, for neighbouring datasets that differ by one added or removed {md_cell(unit)}"
        + (" (all of that person's records)" if unit == "user" else "")
        + ". "
        "n̂ is the size each site declared before the run (in a simulation the launcher declares each "
        "site's training-split size: it made the partition, so it knows them); q, steps, δ, σ and the "
        "update's weight derive from n̂, and the real size never leaves the site. "
        + (
            "Joint DP: each user's own table row stays at the site and is not covered (docs/PRIVACY.md). "
            if unit == "user"
            else "It says nothing about user-level or site-level privacy. "
        )
        + "",
        "",
        "| site | unit | n̂ (declared) | q | σ | C | steps (total) | δ | accountant | ε | budget |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for site, r in sorted(s.eps_by_site.items()):
        out.append(
            f"| {md_cell(site)} | {md_cell(r.unit)} | {r.dataset_size} | {r.sample_rate:.4f} | "
            f"{r.noise_multiplier:.4f} | {r.max_grad_norm:g} | {s.steps_by_site[site]} | {r.delta:.1e} | "
            f"{md_cell(r.accountant)} | "
            f"{r.eps_total:.4f} | {r.eps_budget:g} |"
        )
    settings = resolved_settings(config, rows or []) if config is not None else []
    if settings:
        out += [
            "",
            "## Settings as the run used them",
            "",
            "What the config's \"auto\" and default values resolved to (σ and δ: the ledger's, as in the table above).",
            "",
            "| setting | value used | from |",
            "|---|---|---|",
        ]
        out += [f"| {md_cell(x.name)} | {md_cell(x.value)} | {md_cell(x.origin)} |" for x in settings]
    out += ["", f"## Site-level fairness of {md_cell(primary)} per round (site validation, lower is better)", ""]
    fair_rows = fairness_rounds(metrics, primary)
    if fair_rows:
        out += [
            "Jain's index is (Σx)² / (n Σx²) of the sites' values: 1 when every site has the same.",
            "",
            "| round | " + " | ".join(h for _, h in FAIRNESS_COLUMNS) + " |",
            "|---" * (len(FAIRNESS_COLUMNS) + 1) + "|",
        ]
        out += [
            f"| {rnd} | " + " | ".join(fairness_cell(f, k) for k, _ in FAIRNESS_COLUMNS) + " |" for rnd, f in fair_rows
        ]
    else:
        out.append(md_cell(not_run_line(skipped.get("site fairness", "no site reported it"))))
    if "cross-check" in skipped and not s.cross_checks:
        out += ["", "### Independent cross-check", "", md_cell(not_run_line(skipped["cross-check"]))]
    if s.cross_checks:
        out += [
            "",
            "### Independent cross-check (Google's dp-accounting PLD, from the ledger's recorded inputs)",
            "",
            "A recorded ε may exceed the independent value (RDP is a looser bound) "
            f"but not fall below it by more than {TOLERANCE:.0%}.",
            "",
            "| site | accountant | ε recorded | ε independent | method | recorded − independent | ok |",
            "|---|---|---|---|---|---|---|",
        ]
        out += [
            f"| {md_cell(c.site_id)} | {md_cell(c.accountant)} | {c.eps_recorded:.4f} | {c.eps_independent:.4f} | "
            f"{md_cell(c.method)} | "
            f"{-c.shortfall:+.2%} | {'yes' if c.ok else '**NO**'} |"
            for c in s.cross_checks
        ]
    if not s.mia and "membership inference" in skipped:
        out += [
            "",
            "## Empirical privacy check: membership inference",
            "",
            md_cell(not_run_line(skipped["membership inference"])),
        ]
    if s.mia:
        m = s.mia
        out += [
            "",
            "## Empirical privacy check: membership inference",
            "",
            "Loss-threshold attack on the final global model: members are the sites' training examples,",
            "non-members the server-held test split (equal numbers). (ε, δ)-DP bounds any attack's",
            "advantage TPR − FPR by (e^ε − 1 + 2δ)/(e^ε + 1); staying under it is necessary, not sufficient.",
            "",
            "| AUC | advantage | chance level (95%) | DP bound | ε | δ | examples |",
            "|---|---|---|---|---|---|---|",
            f"| {m['mia_auc']:.3f} | {m['mia_advantage']:.3f} | {m['mia_chance_advantage']:.3f} | "
            f"{m['mia_advantage_bound']:.3f} | {m['mia_eps']:.3f} | {m['mia_delta']:.3g} | {int(m['mia_examples'])} |",
        ]
    if s.central is not None:
        c = s.central
        out += [
            "",
            "## Client-level privacy (central DP, unit of privacy: one site)",
            "",
            "DP-FedAvg: each site's update clipped to norm C, Gaussian noise σC added to the sum by the server, "
            "sites sampled by Poisson sampling with rate q; one RDP composition step per round, one ledger row "
            f"per round under `{CENTRAL_SITE_ID}`.",
            "",
            "| sites | q | σ | C | rounds | δ | accountant | ε | budget |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {c.dataset_size} | {c.sample_rate:g} | {c.noise_multiplier:.4f} | {c.max_grad_norm:g} | "
            f"{s.central_rounds} | "
            f"{c.delta:.1e} | {md_cell(c.accountant)} | {c.eps_total:.4f} | {c.eps_budget:g} |",
        ]
    out += ["", "![epsilon per site](eps.png)", "", "![utility](utility.png)", ""]
    if (run_dir / "eps-site-level.png").exists():
        out += ["![client-level epsilon](eps-site-level.png)", ""]
    if (run_dir / "quality.png").exists():
        out += ["![further test metrics per round, one per axis](quality.png)", ""]
    elif "further test metrics" in skipped:
        out += ["## Further test metrics", "", md_cell(not_run_line(skipped["further test metrics"])), ""]
    out += [f"## Samples from {served_words(config)}", ""]
    if (run_dir / "samples" / "final.png").exists():
        out += ["![samples](samples/final.png)", ""]
    else:
        out += [md_cell(not_run_line(skipped.get("samples", "none were drawn"))), ""]
    return "\n".join(out)


def fairness_cell(fair: dict[str, float], key: str) -> str:
    """One cell of the per-round fairness table: the site count as an integer, the rest to 4 places."""
    if key not in fair:
        return "–"
    if key == "sites":
        return str(int(fair[key]))
    # Jain's index of similar losses sits just below 1: four places would show 1.0000 for every round.
    return f"{fair[key]:.6f}" if key == "jain" else f"{fair[key]:.4f}"
