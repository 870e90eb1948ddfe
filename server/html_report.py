"""`privfed report RUN_DIR`: one self-contained HTML file for a privacy officer.

Everything is embedded (plots and sample grids as base64 PNG, inline CSS); the page
loads nothing from the network. Plots are drawn fresh from the ledger and
metrics.jsonl, so the report reflects what is on disk now.
"""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.deploy.fileio import write_text_atomically
from common.errors import DataError, PrivfedError
from common.plots import line_plot
from common.privacy.accounting import NO_DP
from common.privacy.metrics_dp import MECHANISM as METRICS_MECHANISM
from server.eps_crosscheck import cross_check
from server.html_report_tabular import tabular_section
from server.ledger_audit import open_ledger, verify_run
from server.membership_inference import violates_bound
from server.report import _plot_eps, _plot_utility, eval_kind, person_worst_case, read_metrics, worst_case_line

CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.ok{color:#060}.bad{color:#b00;font-weight:bold}
img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:.9em}
"""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    ledger = open_ledger(run_dir)
    try:
        rows = ledger.rows()
        verification = verify_run(run_dir, ledger)
    finally:
        ledger.close()
    if not rows:
        raise PrivfedError(f"run dir '{run_dir}': the ledger is empty (no round completed)")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    audit = _read_json(run_dir / "privacy-audit.json")
    config = (run_dir / "config.toml").read_text() if (run_dir / "config.toml").exists() else ""
    primary = _primary_metric(metrics)

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _plot_eps(t / "eps.png", rows)
        if primary:
            source = next((str(m["test_source"]) for m in reversed(metrics) if m.get("test_source")), "")
            _plot_utility(t / "utility.png", metrics, primary, eval_kind(source))
            _plot_site_disparity(t / "fairness.png", metrics, primary)
        images = {p.stem: _b64(p) for p in t.glob("*.png")}
    samples = sorted((run_dir / "samples").glob("*.png")) if (run_dir / "samples").is_dir() else []

    last: dict[str, Any] = {}
    latest: dict[str, float] = {}  # every row's cumulative ε, metrics releases included
    for r in rows:
        latest[r.site_id] = r.eps_total
        if r.mechanism != METRICS_MECHANISM:
            last[r.site_id] = r
    last = {site: replace(r, eps_total=latest[site]) for site, r in last.items()}
    private = [r for r in last.values() if r.accountant != NO_DP]
    # Forged rows can hold inputs no accountant accepts; they already failed verification.
    checks = cross_check(rows) if verification.ok else []
    parts = [f"<h1>privfed privacy report: {html.escape(run_dir.name)}</h1>"]
    if private:
        r0 = private[0]
        user = r0.unit == "user"
        parts.append(
            f"<p><b>Claim:</b> {'user' if user else 'sample'}-level DP-SGD at each site; "
            f"unit of privacy: one {html.escape(r0.unit)} of a site's "
            f"training split{' (all of their records; add/remove one person)' if user else ''}; ε per site is "
            "cumulative over the rounds it trained, from the Opacus "
            f"<b>{html.escape(r0.accountant.upper())}</b> accountant, at δ ≤ {max(r.delta for r in private):.3g}. "
            + (
                "Joint DP: each user's own table row stays at the site and is not covered. Not site-level privacy.</p>"
                if user
                else "Not user-level or site-level privacy.</p>"
            )
        )
        declared = _max_sites_per_person(config)
        worst = person_worst_case(private, declared)
        if worst is not None:
            parts.append(f"<p><b>{html.escape(worst_case_line(worst, declared))}</b></p>")
    else:
        parts.append("<p><b>Non-private run:</b> no DP guarantee (ε = ∞).</p>")
    status = "ok" if verification.ok else "bad"
    where = f"seq {verification.first_bad_seq}" if verification.first_bad_seq is not None else "ledger end"
    verdict = "verified" if verification.ok else f"FAILED at {where}: {verification.reason}"
    parts.append(
        f"<p>Ledger: {len(rows)} rows, hash chain and recomputed ε "
        f'<span class="{status}">{html.escape(verdict)}</span>.</p>'
    )

    releases = [r for r in rows if r.mechanism == METRICS_MECHANISM]
    if releases:
        parts.append(
            f"<p><b>Private metrics:</b> {len(releases)} noisy release(s) of the sites' evaluation statistics "
            f"({METRICS_MECHANISM}, σ = {releases[0].noise_multiplier:g}, unit: {html.escape(releases[0].unit)}), "
            "each its own ledger row, composed into the site's ε below.</p>"
        )
    else:
        parts.append("<p><b>Metrics not private:</b> the sites' evaluation statistics were sent without noise.</p>")
    parts += _test_table(metrics)
    parts.append("<h2>Privacy spent per site</h2>")
    parts.append(
        _table(
            ["site", "unit", "n̂ (declared)", "q", "σ", "C", "steps", "δ", "accountant", "ε", "budget", "budget left"],
            [
                [
                    s,
                    r.unit,
                    r.dataset_size,
                    f"{r.sample_rate:.4f}",
                    f"{r.noise_multiplier:.4f}",
                    f"{r.max_grad_norm:g}",
                    sum(x.steps for x in rows if x.site_id == s and x.mechanism != METRICS_MECHANISM),
                    f"{r.delta:.1e}",
                    r.accountant,
                    _f(r.eps_total),
                    _f(r.eps_budget),
                    "–" if r.accountant == NO_DP else _f(r.eps_budget - r.eps_total),
                ]
                for s, r in sorted(last.items())
            ],
        )
    )
    if "eps" in images:
        parts.append(_img(images["eps"], "cumulative epsilon per site with the budget line"))
    if checks:
        parts.append("<h2>Independent cross-check</h2>")
        parts.append(
            '<p class="note">ε recomputed from the recorded inputs with Google\'s dp-accounting PLD accountant. '
            "A recorded ε may be above it (RDP is a looser bound), never below it by more than 5 %.</p>"
        )
        parts.append(
            _table(
                ["site", "ε recorded", "ε independent", "method", "recorded − independent", "ok"],
                [
                    [
                        c.site_id,
                        f"{c.eps_recorded:.4f}",
                        f"{c.eps_independent:.4f}",
                        c.method,
                        f"{-c.shortfall:+.2%}",
                        '<span class="ok">yes</span>' if c.ok else '<span class="bad">NO</span>',
                    ]
                    for c in checks
                ],
                raw_last=True,
            )
        )
    mia = (audit or {}).get("membership_inference")
    mia_keys = ("mia_auc", "mia_advantage", "mia_advantage_bound", "mia_eps", "mia_delta")
    if mia and not (isinstance(mia, dict) and all(isinstance(mia.get(k), (int, float)) for k in mia_keys)):
        raise DataError(run_dir / "privacy-audit.json", "membership_inference lacks numeric " + ", ".join(mia_keys))
    if mia:
        parts.append("<h2>Membership inference (loss threshold)</h2>")
        parts.append(
            _table(
                ["AUC", "advantage", "chance level (95%)", "DP bound on advantage", "ε", "δ"],
                [
                    [
                        f"{mia['mia_auc']:.3f}",
                        f"{mia['mia_advantage']:.3f}",
                        f"{mia.get('mia_chance_advantage', float('nan')):.3f}",
                        "none (non-private)" if math.isinf(mia["mia_eps"]) else f"{mia['mia_advantage_bound']:.3f}",
                        _f(mia["mia_eps"]),
                        f"{mia['mia_delta']:.3g}",
                    ]
                ],
            )
        )
        parts.append(
            '<p class="note">Members: the sites\' training examples; non-members: the server-held test split. '
            "(ε, δ)-DP bounds any attack's TPR − FPR by (e^ε − 1 + 2δ)/(e^ε + 1); only an advantage above "
            "bound + chance level is evidence against the claim.</p>"
        )
        if not math.isinf(mia["mia_eps"]) and violates_bound(mia):
            parts.append('<p class="bad">The measured advantage exceeds the DP bound beyond sampling error.</p>')
    if primary:
        parts.append(f"<h2>Utility per round ({html.escape(primary)}, lower is better)</h2>")
        if "utility" in images:
            parts.append(_img(images["utility"], "utility per round"))
        if "fairness" in images:
            parts.append("<h2>Site disparity per round</h2>")
            parts.append(_img(images["fairness"], "best, mean and worst site validation metric per round"))
    parts += tabular_section(run_dir, metrics)  # [] for every task but the tabular one
    if samples:
        parts.append("<h2>Samples</h2>")
        for p in [s for s in samples if s.stem == "final"] or samples[-1:]:
            parts.append(_img(_b64(p), f"samples: {p.stem}"))
    if config:
        parts.append("<h2>Configuration</h2><pre>" + html.escape(config) + "</pre>")

    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>privfed report "
        f"{html.escape(run_dir.name)}</title><style>{CSS}</style></head><body>" + "\n".join(parts) + "</body></html>"
    )
    out = out or run_dir / "report.html"
    if out.is_dir():
        out = out / "report.html"
    if not out.parent.is_dir():
        raise PrivfedError(f"report --out '{out}': folder {out.parent} does not exist")
    try:
        write_text_atomically(out, page)
    except OSError as exc:
        raise PrivfedError(f"report --out '{out}': cannot write ({exc.strerror})") from None
    return out


def _plot_site_disparity(path: Path, metrics: list[dict[str, Any]], primary: str) -> None:
    rounds, best, mean, worst = [], [], [], []
    for m in metrics:
        vals = [v[primary] for v in m.get("site_val", {}).values() if primary in v]
        if vals:
            rounds.append(m["round"])
            best.append(min(vals))
            mean.append(sum(vals) / len(vals))
            worst.append(max(vals))
    if rounds:
        line_plot(
            {"worst site": (rounds, worst), "mean": (rounds, mean), "best site": (rounds, best)},
            path,
            title=f"Site validation {primary}: worst, mean, best",
            xlabel="round",
            ylabel=primary,
        )


def _test_table(metrics: list[dict[str, Any]]) -> list[str]:
    """The last round's test metrics, with their noise std (metrics.dp) as error bars."""
    last = next((m for m in reversed(metrics) if m.get("test")), None)
    if last is None:
        return []
    std = last.get("test_std", {})
    rows = [
        [k, _f(v), f"± {_f(std[k])}" if k in std else "–"] for k, v in last["test"].items() if "." not in k or k in std
    ]
    # What the numbers are (server.report.eval_source); runs from before it was recorded: a test split.
    source = str(last.get("test_source", ""))
    title = "Final test metrics" if eval_kind(source) == "test" else "Final metrics"
    if source:
        title += f" ({html.escape(source)})"
    return [f"<h2>{title}</h2>", _table(["metric", "value", "± noise std"], rows)]


def _primary_metric(metrics: list[dict[str, Any]]) -> str:
    for m in metrics:
        if m.get("primary_metric"):
            return str(m["primary_metric"])
        for v in m.get("site_val", {}).values():
            if v:
                return next(iter(v))
        if m.get("test"):
            return next(iter(m["test"]))
    return ""


def _max_sites_per_person(config: str) -> int:
    """The run's declared max-sites-per-person (0: undeclared or unreadable)."""
    try:
        value = tomllib.loads(config).get("max-sites-per-person", 0)
    except tomllib.TOMLDecodeError:
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(path, f"not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(path, "not a JSON object")
    return obj


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _img(b64: str, alt: str) -> str:
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"></p>'


def _f(v: float) -> str:
    return "∞" if isinstance(v, float) and math.isinf(v) else f"{v:.4f}"


def _table(header: list[str], rows: list[list[Any]], raw_last: bool = False) -> str:
    head = "".join(f'<th class="{"l" if i == 0 else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            text = str(v) if (raw_last and i == len(row) - 1) else html.escape(str(v))
            cells.append(f'<td class="{"l" if i == 0 else ""}">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
