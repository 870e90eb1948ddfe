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
import re
import tempfile
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.deploy.fileio import write_text_atomically
from common.deploy.registry import Registry
from common.errors import DataError, PrivfedError
from common.identifiers import CENTRAL_SITE_ID
from common.metrics.quality_plots import METRIC_LABELS, quality_figure
from common.plots import line_plot, save_figure
from common.privacy.accounting import NO_DP
from common.privacy.metrics_dp import MECHANISM as METRICS_MECHANISM
from server.eps_crosscheck import cross_check
from server.html_report_tabular import tabular_section
from server.ledger_audit import open_ledger, verify_against_keys, verify_run
from server.membership_inference import violates_bound
from server.report import (
    _plot_eps,
    _plot_utility,
    eval_kind,
    fairness_cell,
    not_run_line,
    person_worst_case,
    served_words,
    worst_case_line,
)
from server.run_dir import REGISTRY_FILE
from server.run_facts import (
    FAIRNESS_COLUMNS,
    config_annotations,
    fairness_rounds,
    not_run_reasons,
    read_config,
    resolved_settings,
    seeded_caveat,
)
from server.run_files import read_metrics

CSS = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.ok{color:#060}.bad{color:#b00;font-weight:bold}
img{max-width:100%;border:1px solid #eee}.note{color:#555;font-size:.9em}
.claim{border-left:4px solid #36c;padding:.1em 1em;background:#f7f9ff}
.warn{border-left:4px solid #c80;padding:.4em 1em;background:#fff8e8}
.skip{color:#555;font-style:italic}pre{font-size:.85em;background:#fafafa;padding:.6em;white-space:pre-wrap}
.cmt{color:#777}.ann{color:#a50;font-weight:bold}
"""


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    ledger = open_ledger(run_dir)
    try:
        rows = ledger.rows()
        verification = verify_run(run_dir, ledger)
        keys = _keys_verdict(run_dir, ledger, rows) if verification.ok else ""
    finally:
        ledger.close()
    if not rows:
        raise PrivfedError(f"run dir '{run_dir}': the ledger is empty (no round completed)")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    audit = _read_json(run_dir / "privacy-audit.json")
    cfg = read_config(run_dir)
    config = cfg.text
    primary = _primary_metric(metrics)
    source = next((str(m["test_source"]) for m in reversed(metrics) if m.get("test_source")), "")
    tabular = tabular_section(run_dir, metrics)  # [] for every task but the tabular one
    # The tabular section draws its own utility and fidelity per round.
    quality_names = [] if tabular else [k for k in METRIC_LABELS if any(k in (m.get("test") or {}) for m in metrics)]

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _plot_eps(t / "eps.png", rows)
        if primary:
            _plot_utility(t / "utility.png", metrics, primary, eval_kind(source))
            _plot_site_disparity(t / "fairness.png", metrics, primary)
        quality = quality_figure(metrics, quality_names, source) if quality_names else None
        if quality is not None:
            save_figure(quality, t / "quality.png")
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
    mia = (audit or {}).get("membership_inference")
    mia_keys = ("mia_auc", "mia_advantage", "mia_advantage_bound", "mia_eps", "mia_delta")
    if mia and not (isinstance(mia, dict) and all(isinstance(mia.get(k), (int, float)) for k in mia_keys)):
        raise DataError(run_dir / "privacy-audit.json", "membership_inference lacks numeric " + ", ".join(mia_keys))
    skipped = not_run_reasons(
        cfg,
        metrics,
        rows,
        primary=primary,
        mia=mia,
        audit_written=audit is not None,
        ledger_ok=verification.ok,
        has_samples=bool(samples),
        quality_names=quality_names,
        has_quality=quality is not None,
    )

    parts = [f"<h1>privfed privacy report: {html.escape(run_dir.name)}</h1>"]
    completed = sum(1 for m in metrics if not m.get("interrupted"))
    if cfg.flat:
        parts.append(
            f'<p class="note">Scenario {html.escape(str(cfg.get("scenario", "?")))}, task '
            f"{html.escape(str(cfg.get('task', '?')))}, {html.escape(str(cfg.get('num-sites', '?')))} sites; "
            f"{completed} of {html.escape(str(cfg.get('rounds', '?')))} planned rounds recorded.</p>"
        )
    if private:
        r0 = private[0]
        user = r0.unit == "user"
        parts.append(
            '<div class="claim">'
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
        caveat = seeded_caveat(rows, cfg)
        if caveat:
            parts.append(_caveat_html(caveat))
        parts.append("</div>")
        declared = _max_sites_per_person(config)
        worst = person_worst_case(private, declared)
        if worst is not None:
            parts.append(f"<p><b>{html.escape(worst_case_line(worst, declared))}</b></p>")
    else:
        parts.append("<p><b>Non-private run:</b> no DP guarantee (ε = ∞).</p>")
        caveat = seeded_caveat(rows, cfg)
        if caveat and any(r.site_id == CENTRAL_SITE_ID for r in rows):
            parts.append(_caveat_html(caveat))
    status = "ok" if verification.ok else "bad"
    where = f"seq {verification.first_bad_seq}" if verification.first_bad_seq is not None else "ledger end"
    verdict = "verified" if verification.ok else f"FAILED at {where}: {verification.reason}"
    parts.append(
        f"<p>Ledger: {len(rows)} rows, hash chain and recomputed ε "
        f'<span class="{status}">{html.escape(verdict)}</span>.'
        + (f" Against the registry's keys: {keys}" if keys else "")
        + "</p>"
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
    settings = resolved_settings(cfg, rows)
    if settings:
        parts.append("<h2>Settings as the run used them</h2>")
        parts.append(
            '<p class="note">What the config\'s "auto" and default values resolved to: σ and δ as the ledger '
            "records them, the rule that derived them, and the data read. The Configuration section at the end "
            "lists every key as written.</p>"
        )
        parts.append(
            _table(["setting", "value used", "from"], [[x.name, x.value, x.origin] for x in settings], text=True)
        )
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
    parts.append("<h2>Independent cross-check</h2>")
    if checks:
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
    else:
        parts.append(_not_run(skipped.get("cross-check", "no site's ε could be recomputed")))
    parts.append("<h2>Membership inference (loss threshold)</h2>")
    if mia:
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
    else:
        parts.append(_not_run(skipped.get("membership inference", "no result was recorded")))
    if primary:
        parts.append(f"<h2>Utility per round ({html.escape(primary)}, lower is better)</h2>")
        if "utility" in images:
            parts.append(_img(images["utility"], "utility per round"))
        parts += _fairness_section(metrics, primary, images.get("fairness"), skipped.get("site fairness", ""))
    if not tabular:
        parts.append("<h2>Further test metrics per round</h2>")
        if "quality" in images:
            parts.append(
                '<p class="note">One metric per axis: they have different units and ranges. Each axis says what '
                "it measures and which way is better.</p>"
            )
            parts.append(_img(images["quality"], "further test metrics per round, one per axis"))
        else:
            parts.append(
                _not_run(skipped.get("further test metrics", "this run recorded none of the metrics it describes"))
            )
    parts += tabular
    parts.append("<h2>Samples</h2>")
    if samples:
        for p in [s for s in samples if s.stem == "final"] or samples[-1:]:
            what = f"from {served_words(cfg)}" if p.stem == "final" else f"({p.stem})"
            parts.append(f'<p class="note">Generated {html.escape(what)}.</p>')
            parts.append(_img(_b64(p), f"samples: {p.stem}"))
    else:
        parts.append(_not_run(skipped.get("samples", "none were drawn")))
    if config:
        parts.append("<h2>Configuration</h2>")
        parts.append(
            '<p class="note">config.toml as the run wrote it. Highlighted notes say what a value meant in this '
            "run where it is not the value used (see Settings as the run used them).</p>"
        )
        parts.append(_config_html(config, config_annotations(cfg, rows)))
    else:
        parts.append("<h2>Configuration</h2>" + _not_run("the run dir has no config.toml"))

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


def _caveat_html(caveat: str) -> str:
    head, _, rest = caveat.partition(": ")
    return f'<p class="warn"><b>{html.escape(head)}:</b> {html.escape(rest)}</p>'


def _not_run(reason: str) -> str:
    return f'<p class="skip">{html.escape(not_run_line(reason))}</p>'


def _keys_verdict(run_dir: Path, ledger: Any, rows: list[Any]) -> str:
    """HTML: the ledger checked against the run dir's registry.toml (each row's site key, the
    server's signed heads), or why that check did not run."""
    path = run_dir / REGISTRY_FILE
    if not path.is_file():
        return _not_run_inline(f"the run dir has no {REGISTRY_FILE} (the sites' and server's public keys)")
    try:
        registry = Registry.load(path)
    except PrivfedError as exc:
        return _not_run_inline(f"{REGISTRY_FILE} cannot be read ({exc})")
    check = verify_against_keys(ledger, registry, rows)
    if check.ok:
        return "<span class=\"ok\">every row signed by its site's registered key, every head by the server's</span>."
    return f'<span class="bad">FAILED at seq {check.first_bad_seq}: {html.escape(str(check.reason))}</span>.'


def _not_run_inline(reason: str) -> str:
    return f'<span class="skip">{html.escape(not_run_line(reason))}</span>'


def _fairness_section(metrics: list[dict[str, Any]], primary: str, image: str | None, reason: str) -> list[str]:
    """Site disparity per round: the best/mean/worst picture and the numbers behind it."""
    parts = [f"<h2>Site fairness per round ({html.escape(primary)} on site validation, lower is better)</h2>"]
    rounds = fairness_rounds(metrics, primary)
    if not rounds:
        return [*parts, _not_run(reason or f"no site reported {primary}")]
    if image:
        parts.append(_img(image, "best, mean and worst site validation metric per round"))
    parts.append(
        '<p class="note">Each round, over the sites that evaluated: gap = worst − best; Jain\'s index = '
        "(Σx)² / (n Σx²), 1 when every site has the same value, 1/n at the most uneven.</p>"
    )
    parts.append(
        _table(
            ["round", *(h for _, h in FAIRNESS_COLUMNS)],
            [[rnd, *(fairness_cell(f, k) for k, _ in FAIRNESS_COLUMNS)] for rnd, f in rounds],
        )
    )
    return parts


def _config_html(text: str, notes: dict[str, str]) -> str:
    """config.toml as written, each key whose value meant something else followed by a note."""
    out, section = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        header = re.fullmatch(r"\[([A-Za-z0-9_.-]+)\]", stripped)
        if header:
            section = header.group(1)
        key = re.match(r"([A-Za-z0-9_-]+)\s*=", stripped)
        full = (f"{section}.{key.group(1)}" if section else key.group(1)) if key else ""
        shown = html.escape(line)
        if stripped.startswith("#"):
            shown = f'<span class="cmt">{shown}</span>'
        if full in notes:
            shown += f'   <span class="ann">← {html.escape(notes[full])}</span>'
        out.append(shown)
    return "<pre>" + "\n".join(out) + "</pre>"


def _plot_site_disparity(path: Path, metrics: list[dict[str, Any]], primary: str) -> None:
    rounds, best, mean, worst = [], [], [], []
    for rnd, fair in fairness_rounds(metrics, primary):
        rounds.append(rnd)
        best.append(fair["best"])
        mean.append(fair["mean"])
        worst.append(fair["worst"])
    if rounds:
        line_plot(
            {"worst site": (rounds, worst), "mean": (rounds, mean), "best site": (rounds, best)},
            path,
            title=f"Site validation {primary} per round: worst, mean, best site (lower is better)",
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


def _table(header: list[str], rows: list[list[Any]], raw_last: bool = False, text: bool = False) -> str:
    """An HTML table: numbers right-aligned but the first column; every column left-aligned with ``text``."""
    head = "".join(f'<th class="{"l" if i == 0 or text else ""}">{html.escape(h)}</th>' for i, h in enumerate(header))
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            shown = str(v) if (raw_last and i == len(row) - 1) else html.escape(str(v))
            cells.append(f'<td class="{"l" if i == 0 or text else ""}">{shown}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
