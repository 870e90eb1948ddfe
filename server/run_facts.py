"""What a run directory says about how the run actually ran, for summary.md and report.html.

A config key can mean something other than its literal value: ``dp.noise-multiplier`` is
not used when ``dp.target-epsilon`` > 0, ``dp.delta = 0`` means "auto", ``data.path = ""``
means a default. The ledger holds the sigma and delta each site used; config.toml's
``# resolved`` comments (:func:`server.recorder.config_toml`) hold what the data keys
resolved to. This module puts them side by side, so that no page shows a config value
beside a table that contradicts it, and says why each section that did not run did not.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import flatten
from common.config.limits import AUTO_DELTA_CAP, auto_delta
from common.identifiers import CENTRAL_SITE_ID
from common.metrics.fairness import site_fairness
from common.privacy.accounting import NO_DP
from common.privacy.metrics_dp import MECHANISM as METRICS_MECHANISM
from common.seeds import RNG_SEEDED
from server.ledger import LedgerRow

# config.toml's comment lines that say what a key resolved to at the start of the run:
# "# resolved KEY: TEXT" (written by server.recorder.config_toml).
RESOLVED_PREFIX = "# resolved "

# The statistics of common.metrics.fairness.site_fairness the per-round table shows, with headings.
FAIRNESS_COLUMNS = (
    ("sites", "sites"),
    ("mean", "mean"),
    ("std", "std"),
    ("best", "best"),
    ("worst", "worst"),
    ("gap", "gap (worst − best)"),
    ("worst10_mean", "mean of worst 10%"),
    ("jain", "Jain's index"),
)


@dataclass(frozen=True)
class RunConfigFile:
    """config.toml as text, as flat keys, and its ``# resolved`` lines (key -> text)."""

    text: str
    flat: dict[str, Any]
    resolved: dict[str, str]

    def get(self, key: str, default: Any = None) -> Any:
        return self.flat.get(key, default)


def read_config(run_dir: Path) -> RunConfigFile:
    """The run's config.toml; empty (no keys) when missing or not valid TOML: the report
    then shows what the ledger says, and says the config is not there."""
    path = Path(run_dir) / "config.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return RunConfigFile("", {}, {})
    try:
        flat = flatten(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        flat = {}
    resolved = {}
    for line in text.splitlines():
        if line.startswith(RESOLVED_PREFIX):
            key, sep, note = line[len(RESOLVED_PREFIX) :].partition(": ")
            if sep:
                resolved[key.strip()] = note.strip()
    return RunConfigFile(text, flat, resolved)


# ------------------------------------------------------------------ resolved settings


def no_file_data(source: str, seed: Any) -> str | None:
    """What a data source that reads no file reads instead (None: it reads a file)."""
    if source == "digits":
        return "no file: scikit-learn's bundled copy of the digits (sklearn.datasets.load_digits)"
    if source == "synthetic":
        return f"no file: ratings generated from seed = {seed}"
    return None


@dataclass(frozen=True)
class Setting:
    """One line of the "resolved settings" table: the value the run used, and where it came from."""

    name: str
    value: str
    origin: str


def dp_rows(rows: Sequence[LedgerRow]) -> list[LedgerRow]:
    """The sites' DP-SGD rows (not metrics releases, not the server's client-level rows)."""
    return [
        r for r in rows if r.site_id != CENTRAL_SITE_ID and r.mechanism != METRICS_MECHANISM and r.accountant != NO_DP
    ]


def _span(values: Sequence[float], fmt: str = ".4g") -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}} to {hi:{fmt}}"


def resolved_settings(cfg: RunConfigFile, rows: Sequence[LedgerRow]) -> list[Setting]:
    """The privacy-relevant settings as the run used them: sigma and delta from the ledger,
    the rule that derived them, the data read, the noise's randomness."""
    out: list[Setting] = []
    private = dp_rows(rows)
    per_site = "every site" if len({r.site_id for r in private}) > 1 else "the site"
    if private:
        sigmas = [r.noise_multiplier for r in private]
        target = float(cfg.get("dp.target-epsilon", 0.0) or 0.0)
        if target > 0:
            origin = (
                f"derived per site: dp.target-epsilon = {target:g}, spent exactly over the "
                f"{cfg.get('rounds', '?')} planned rounds at the site's q and steps (q and steps from its "
                f"declared size n̂); dp.noise-multiplier = {cfg.get('dp.noise-multiplier', '?')} is not used"
            )
        elif cfg.flat:
            configured_sigma = cfg.get("dp.noise-multiplier")
            off = sorted({r.site_id for r in private if r.noise_multiplier != configured_sigma})
            origin = f"dp.noise-multiplier = {configured_sigma}, " + (
                f"but the ledger's σ differs from it for {', '.join(off)}" if off else f"the same at {per_site}"
            )
        else:
            origin = "from the ledger (no config.toml)"
        out.append(
            Setting(
                "σ (noise multiplier, DP-SGD)", _span(sigmas, ".4f") + " (per site: see Privacy spent per site)", origin
            )
        )
        deltas = [r.delta for r in private]
        configured = cfg.get("dp.delta")
        if configured == 0 or configured == 0.0:
            off = sorted({r.site_id for r in private if abs(r.delta - auto_delta(r.dataset_size)) > 1e-15})
            origin = f"auto (dp.delta = 0): δ = min({AUTO_DELTA_CAP:g}, 1/(10 n̂)) for each site's declared size n̂" + (
                f"; the ledger's δ does NOT follow this rule for {', '.join(off)}" if off else ""
            )
        elif configured is not None:
            origin = f"dp.delta = {configured:g}, as set"
        else:
            origin = "from the ledger (no config.toml)"
        out.append(Setting("δ (DP-SGD)", _span(deltas, ".3g"), origin))
        out.append(
            Setting("clipping norm C", _span([r.max_grad_norm for r in private], "g"), "dp.max-grad-norm (sensitivity)")
        )
        out.append(
            Setting(
                "accountant",
                ", ".join(sorted({r.accountant.upper() for r in private})),
                f"dp.accountant; neighbours: {', '.join(sorted({r.neighbouring for r in private}))} one "
                f"{private[0].unit}",
            )
        )
    elif rows:
        out.append(Setting("DP-SGD", "off (ε = ∞)", "dp.enabled = false" if cfg.flat else "the ledger has no DP row"))
    central = [r for r in rows if r.site_id == CENTRAL_SITE_ID and r.accountant != NO_DP]
    if central:
        sigma, delta = _span([r.noise_multiplier for r in central], ".4f"), _span([r.delta for r in central], ".3g")
        target = cfg.get("central-dp.target-epsilon", 0) or 0
        how_sigma = (
            f"σ derived from central-dp.target-epsilon = {target:g} (central-dp.noise-multiplier not used)"
            if target
            else "σ = central-dp.noise-multiplier"
        )
        how_delta = "δ " + cfg.resolved.get("central-dp.delta", f"= central-dp.delta = {cfg.get('central-dp.delta')}")
        out.append(
            Setting(
                "client-level DP (server)",
                f"σ {sigma}, δ {delta}",
                f"{how_sigma}; {how_delta}" if cfg.flat else "from the ledger's all-sites rows",
            )
        )
    releases = [r for r in rows if r.mechanism == METRICS_MECHANISM]
    if releases:
        out.append(
            Setting(
                "private metrics",
                f"σ {_span([r.noise_multiplier for r in releases], 'g')}, {len(releases)} release(s)",
                "metrics.dp = true, metrics.noise-multiplier",
            )
        )
    seeded = sum(r.rng == RNG_SEEDED for r in rows)
    if rows:
        out.append(
            Setting(
                "noise randomness",
                f"SEEDED ({seeded} of {len(rows)} ledger rows)" if seeded else "OS entropy",
                "dp.secure-rng = false (set by the simulation launcher): see the caveat above"
                if seeded
                else "dp.secure-rng = true",
            )
        )
    if cfg.flat:
        source, path = cfg.get("data.source", "?"), cfg.get("data.path", "")
        read = cfg.resolved.get("data.path")
        how = "resolved at the start of the run"
        if read is None:  # a config.toml from before the recorder wrote its resolutions
            read = None if path else no_file_data(str(source), cfg.get("seed"))
            how = "from the data source" if read else "not recorded by this run's config.toml"
            read = read or (path or f'the default file of data.source = "{source}", looked up at run time')
        out.append(
            Setting(
                "data read",
                read,
                f'data.source = "{source}", data.path = "{path}" ({how}); a deployed site reads only the files '
                "its own site config names",
            )
        )
        if "data.users-path" in cfg.resolved:
            out.append(Setting("user attributes read", cfg.resolved["data.users-path"], "data.users-path"))
        if "tabular.schema" in cfg.resolved:
            out.append(Setting("table schema read", cfg.resolved["tabular.schema"], "tabular.schema"))
    return out


def config_annotations(cfg: RunConfigFile, rows: Sequence[LedgerRow]) -> dict[str, str]:
    """Config key -> a note on what its literal value meant in this run (for the report's
    Configuration section): the keys that were not used, or resolved to something else."""
    notes = dict(cfg.resolved)
    private = dp_rows(rows)
    if private and "dp.noise-multiplier" in notes:
        notes["dp.noise-multiplier"] = (
            f"not used: σ per site was {_span([r.noise_multiplier for r in private], '.4f')}, "
            f"derived from dp.target-epsilon = {cfg.get('dp.target-epsilon')}"
        )
    if private and "dp.delta" in notes:
        notes["dp.delta"] = (
            f"auto: δ = {_span([r.delta for r in private], '.3g')}, min({AUTO_DELTA_CAP:g}, 1/(10 n̂)) per site"
        )
    # A config.toml from before the recorder wrote its resolutions: the same notes, from the ledger.
    if cfg.get("dp.delta") == 0 and "dp.delta" not in notes and private:
        notes["dp.delta"] = (
            f"auto: δ = {_span([r.delta for r in private], '.3g')}, min({AUTO_DELTA_CAP:g}, 1/(10 n̂)) per site"
        )
    if cfg.get("dp.target-epsilon", 0) and "dp.noise-multiplier" not in notes and private:
        notes["dp.noise-multiplier"] = (
            f"not used: σ per site was {_span([r.noise_multiplier for r in private], '.4f')}, "
            f"derived from dp.target-epsilon = {cfg.get('dp.target-epsilon')}"
        )
    if cfg.get("data.path") == "" and "data.path" not in notes:
        notes["data.path"] = no_file_data(str(cfg.get("data.source")), cfg.get("seed")) or (
            f'the default file of data.source = "{cfg.get("data.source")}" (which one was not recorded)'
        )
    for section, key in (("central-dp", "central-dp.enabled"), ("secagg", "secagg.enabled"), ("metrics", "metrics.dp")):
        if cfg.get(key) is False:
            notes.setdefault(key, f"false: the other [{section}] keys are not used")
    return notes


# ------------------------------------------------------------------ seeded noise


def seeded_caveat(rows: Sequence[LedgerRow], cfg: RunConfigFile) -> str:
    """The caveat that goes beside the privacy claim when any noise was seeded; "" when none was."""
    seeded = sum(r.rng == RNG_SEEDED for r in rows)
    if not seeded:
        return ""
    seed = cfg.get("seed")
    return (
        f"Seeded noise: {seeded} of the ledger's {len(rows)} rows drew their noise and sampling from a seeded "
        f"generator (dp.secure-rng = false{f', federation.seed = {seed}' if seed is not None else ''}; "
        "the simulation launcher sets it for reproducible runs). The guarantee above then holds only "
        "against someone who does not know the seed: whoever knows it can regenerate the noise and remove it. "
        "dp.secure-rng = true, the default everywhere else, draws it from OS entropy."
    )


# ------------------------------------------------------------------ fairness per round


def fairness_rounds(metrics: Sequence[Mapping[str, Any]], primary: str) -> list[tuple[int, dict[str, float]]]:
    """(round, site fairness statistics of ``primary``) for every round some site reported it.

    The round's own ``site_fairness`` (server.recorder) when written; otherwise computed here
    from its ``site_val`` with the same function (runs from before the recorder wrote it).
    """
    out = []
    for m in metrics:
        fair = m.get("site_fairness")
        if not fair:
            vals = {s: v[primary] for s, v in (m.get("site_val") or {}).items() if primary in v}
            fair = site_fairness(vals)
        if fair:
            out.append((int(m["round"]), {k: float(v) for k, v in fair.items()}))
    return out


# ------------------------------------------------------------------ sections that did not run


def not_run_reasons(
    cfg: RunConfigFile,
    metrics: Sequence[Mapping[str, Any]],
    rows: Sequence[LedgerRow],
    *,
    primary: str,
    mia: Mapping[str, Any] | None,
    audit_written: bool,
    ledger_ok: bool,
    has_samples: bool,
    quality_names: Sequence[str] = (),
    has_quality: bool = True,
) -> dict[str, str]:
    """Section -> why it did not run, for every section of the report that did not.

    ``audit_written``: whether privacy-audit.json exists (written when the run ended);
    ``quality_names``: the test metrics the quality plot looks for, ``has_quality`` whether
    it found any. Each reason is one line that starts after "not run, because".
    """
    out: dict[str, str] = {}
    aggregated = any(m.get("aggregated") for m in metrics)
    source = next((str(m["test_source"]) for m in reversed(metrics) if m.get("test_source")), "")
    server_split = source.startswith("server-held split")

    if not dp_rows(rows):
        out["cross-check"] = "the ledger has no DP-SGD row (a non-private run: ε = ∞, nothing to recompute)"
    elif not ledger_ok:
        out["cross-check"] = "the ledger failed verification, so its recorded accountant inputs cannot be trusted"

    if not mia:
        if cfg.get("audit.mia") is False:
            why = "audit.mia = false in this run's config"
            if not server_split:
                why += (
                    "; nor could it run: the attack's non-members are a server-held test split, and this run's "
                    f"test data are {source or 'not recorded'}"
                )
            out["membership inference"] = why
        elif source and not server_split:
            out["membership inference"] = (
                "the attack's non-members are a server-held test split, and this run had none "
                f"(its test metrics: {source})"
            )
        elif not audit_written:
            out["membership inference"] = (
                "the run did not reach its end (no privacy-audit.json): the attack runs on the final model"
            )
        elif not aggregated:
            out["membership inference"] = "no round changed the model, so there was nothing to attack"
        else:
            out["membership inference"] = "the run ended in a failure: the attack runs on a completed run's model"

    if not fairness_rounds(metrics, primary):
        reported = sorted({k for m in metrics for v in (m.get("site_val") or {}).values() for k in v})
        if reported:
            shown = ", ".join(reported[:6]) + (", ..." if len(reported) > 6 else "")
            out["site fairness"] = (
                f"no site reported {primary} on its validation data in any round (the sites report {shown}), "
                f"so there is no per-site {primary} to compare"
            )
        else:
            out["site fairness"] = "no site sent validation metrics in any round"

    if quality_names and not has_quality:
        out["further test metrics"] = f"no round measured {', '.join(quality_names)}" + (
            "" if source else " (the run recorded no test metrics)"
        )

    if not has_samples:
        out["samples"] = (
            f"the {cfg.get('task', 'run')!s} task draws no sample images"
            if aggregated
            else "no round changed the model, so no final samples were drawn"
        )
    return out
