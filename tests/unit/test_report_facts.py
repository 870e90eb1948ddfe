"""Issue 23, item 5: a report that does not contradict itself.

The resolved sigma, delta and data beside the config's literal keys; the seeded-noise
caveat beside the claim; the per-round fairness numbers beside the picture; a "not run,
because" line for every section that did not run; honest titles and one metric per axis.
Fake run dirs as tests/unit/test_report.py builds them: no simulation.
"""

from __future__ import annotations

import html
import json
import re
import tomllib
from pathlib import Path

import pytest
import tomli_w

from common.config.loading import RunConfig, flatten
from common.metrics.fairness import site_fairness
from common.metrics.quality_plots import METRIC_LABELS, quality_figure
from common.privacy.accounting import NO_DP, RoundPlan
from server.html_report import write_report
from server.ledger import Ledger, SiteSpend
from server.recorder import config_toml, resolved_keys
from server.resume import check_same_config, stored_config
from server.run_facts import read_config
from tests.conftest import make_cfg
from tests.unit.test_audit import _run_dir


def _text(page: str) -> str:
    """The page as a reader sees it: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def _section(page: str, heading: str) -> str:
    """The text of the <h2> section that starts with ``heading``, up to the next <h2>."""
    start = page.index(f"<h2>{heading}")
    end = page.find("<h2>", start + 4)
    return _text(page[start : end if end > 0 else None])


def _write_metrics(run: Path, lines: list[dict]) -> None:
    heads = [json.loads(x)["ledger_head"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "metrics.jsonl").open("w") as fh:
        for head, m in zip(heads, lines, strict=True):
            fh.write(json.dumps({"ledger_head": head, "aggregated": True, **m}) + "\n")


VAE_CFG = {
    "task": "vae",
    "rounds": 3,
    "num-sites": 2,
    "seed": 7,
    "dp.target-epsilon": 5.0,
    "dp.noise-multiplier": 1.0,
    "dp.delta": 0.0,
    "dp.secure-rng": False,
}


# ------------------------------------------------------------------ config.toml: resolved, and resumable


def test_config_toml_records_what_defaults_resolved_to_and_reads_back_as_the_same_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs.npz").write_bytes(b"")
    cfg = make_cfg(**{**VAE_CFG, "data.source": "npz", "data.path": "imgs.npz"})
    text = config_toml(cfg)
    # the key keeps the value the run was given (resume and dataset ids read it) ...
    assert tomllib.loads(text)["data"]["path"] == "imgs.npz"
    # ... and a comment says which file that was, and what "auto" meant
    assert f"# resolved data.path: {tmp_path / 'imgs.npz'}" in text
    assert "# resolved dp.delta: auto: min(1e-05, 1/(10 n))" in text
    assert "# resolved dp.noise-multiplier: not used: dp.target-epsilon = 5" in text
    # the validated config reads it back unchanged: resume accepts it
    back = RunConfig.from_flat(flatten(tomllib.loads(text)))
    assert back.to_flat() == cfg.to_flat()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(text)
    assert stored_config(run).to_flat() == cfg.to_flat()
    check_same_config(cfg, run)  # a Flower-native resume compares the keys: no difference


def test_a_config_toml_from_before_the_resolutions_still_resumes_and_reports(tmp_path):
    cfg = make_cfg(**VAE_CFG)  # digits, data.path = ""
    run = _run_dir(tmp_path, rng="seeded")
    (run / "config.toml").write_text(tomli_w.dumps(cfg.to_nested()))  # the old format: no comments
    assert stored_config(run).data.path == ""
    check_same_config(cfg, run)
    write_report(run)
    settings = _section((run / "report.html").read_text(), "Settings as the run used them")
    assert "scikit-learn's bundled copy of the digits" in settings  # known without the comment


@pytest.mark.parametrize(
    "source, expect",
    [
        ("digits", "no file: scikit-learn's bundled copy of the digits"),
        ("movielens", "ml-100k (the default for data.source = 'movielens')"),
    ],
)
def test_the_default_data_path_is_resolved(tmp_path, monkeypatch, source, expect):
    folder = tmp_path / "shared" / "data" / "ml-100k"
    folder.mkdir(parents=True)
    import common.tasks.recsys.data as recsys_data

    monkeypatch.setattr(recsys_data, "default_movielens_path", lambda: folder)
    extra = {} if source == "digits" else {"task": "recsys", "data.partition": "region"}
    got = resolved_keys(make_cfg(**{"data.source": source, **extra}))["data.path"]
    assert expect in got
    if source == "movielens":
        assert got.startswith(str(folder))


# ------------------------------------------------------------------ the report: resolved σ, δ, data


def test_the_report_shows_the_sigma_and_delta_used_and_annotates_the_config_keys_that_were_not(tmp_path):
    run = _run_dir(tmp_path)  # sigma 1.0 (site-0) and 2.0 (site-1), n-hat 200, delta 1e-5
    (run / "config.toml").write_text(config_toml(make_cfg(**VAE_CFG)))
    write_report(run)
    page = (run / "report.html").read_text()
    settings = _section(page, "Settings as the run used them")
    assert "1.0000 to 2.0000" in settings and "dp.target-epsilon = 5" in settings
    assert "dp.noise-multiplier = 1.0 is not used" in settings
    # delta: the value used, and that it was auto-derived, with the rule
    assert "1e-05" in settings and "auto (dp.delta = 0): δ = min(1e-05, 1/(10 n̂))" in settings
    assert "NOT follow" not in settings  # 1e-5 = min(1e-5, 1/2000) for n-hat = 200
    assert "scikit-learn's bundled copy of the digits" in settings and "resolved at the start of the run" in settings
    # the Configuration section never shows a literal that was not used without saying so
    config = _section(page, "Configuration")
    dp = config[config.index("[dp]") :]  # each key's first line after [dp]: the DP-SGD one

    def line(key: str, text: str) -> str:
        return next(ln for ln in text.splitlines() if ln.startswith(f"{key} = "))

    assert "← not used: σ per site was 1.0000 to 2.0000" in line("noise-multiplier", dp)
    assert "← auto: δ = 1e-05" in line("delta", dp)
    assert "← no file: scikit-learn's bundled copy of the digits" in line("path", config)


def test_the_report_flags_a_delta_that_does_not_follow_the_auto_rule(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    led = Ledger(run / "ledger.sqlite", run_id="run")
    # n-hat 20000: auto delta would be min(1e-5, 1/200000) = 5e-6, not 1e-5
    led.record_round(
        1,
        [SiteSpend("site-0", "image", RoundPlan(20000, 0.01, 5, 1.0, 1.0, 1e-5, "rdp"), 5, 9.0, True, "trained", "os")],
    )
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "ledger_head": led.head()}) + "\n")
    led.close()
    (run / "config.toml").write_text(config_toml(make_cfg(**VAE_CFG)))
    write_report(run)
    assert "does NOT follow this rule for site-0" in _section((run / "report.html").read_text(), "Settings")


# ------------------------------------------------------------------ the seeded-noise caveat


@pytest.mark.parametrize("rng", ["seeded", "os"])
def test_the_seeded_noise_caveat_sits_beside_the_claim(tmp_path, rng):
    run = _run_dir(tmp_path, rng=rng)
    (run / "config.toml").write_text(config_toml(make_cfg(**VAE_CFG)))
    write_report(run)
    page = (run / "report.html").read_text()
    claim = page[page.index('<div class="claim">') : page.index("</div>")]
    assert "<b>Claim:</b>" in claim
    if rng == "seeded":
        text = _text(claim)
        assert "Seeded noise: 6 of the ledger's 6 rows" in text and "federation.seed = 7" in text
        assert "whoever knows it can regenerate the noise and remove it" in text
    else:
        assert "Seeded" not in page and "SEEDED" not in page


# ------------------------------------------------------------------ fairness: the numbers beside the picture


def test_the_fairness_section_has_a_per_round_table_with_std_worst_jain_and_gap(tmp_path):
    run = _run_dir(tmp_path)
    vals = {
        1: {"site-0": 40.0, "site-1": 44.0},
        2: {"site-0": 38.0, "site-1": 39.0},
        3: {"site-0": 30.0, "site-1": 36.0},
    }
    lines = []
    for rnd, v in vals.items():
        line = {
            "round": rnd,
            "primary_metric": "neg_elbo",
            "test": {"neg_elbo": 1.0},
            "test_source": "server-held split",
        }
        line["site_val"] = {s: {"neg_elbo": x} for s, x in v.items()}
        if rnd != 2:  # round 2 as an older run wrote it: no site_fairness, computed by the report
            line["site_fairness"] = site_fairness(v)
        lines.append(line)
    _write_metrics(run, lines)
    write_report(run)
    page = (run / "report.html").read_text()
    section = _section(page, "Site fairness per round")
    assert section.count("data:image/png") == 0  # (the <img> is a tag: dropped by _text)
    start = page.index("<h2>Site fairness per round")
    assert "data:image/png;base64," in page[start : page.index("<h2>", start + 4)]
    for head in ("std", "worst", "gap (worst − best)", "Jain's index"):
        assert head in section
    for rnd, v in vals.items():
        f = site_fairness(v)
        row = next(ln for ln in page[start:].split("<tr>") if ln.startswith(f'<td class="l">{rnd}</td>'))
        cells = _text(row.replace("</td>", "|")).split("|")
        assert cells[:9] == [
            str(rnd),
            "2",
            f"{f['mean']:.4f}",
            f"{f['std']:.4f}",
            f"{f['best']:.4f}",
            f"{f['worst']:.4f}",
            f"{f['gap']:.4f}",
            f"{f['worst10_mean']:.4f}",
            f"{f['jain']:.6f}",
        ]


# ------------------------------------------------------------------ sections that did not run


def _gan_like_run(tmp_path):
    """A private run whose sites report no primary metric, with MIA off and no samples (the GAN's case)."""
    run = _run_dir(tmp_path)
    _write_metrics(
        run,
        [
            {
                "round": r,
                "primary_metric": "fid",
                "test": {"fid": 300.0 - r, "tstr": 0.2},
                "test_source": "server-held split",
                "site_val": {"site-0": {"d_loss": 2.0}, "site-1": {"d_loss": 2.1}},
                "site_fairness": {},
            }
            for r in (1, 2, 3)
        ],
    )
    (run / "config.toml").write_text(config_toml(make_cfg(task="gan", **{"audit.mia": False})))
    (run / "privacy-audit.json").write_text(json.dumps({"membership_inference": None, "cross_check": []}))
    return run


def test_every_section_that_did_not_run_says_why(tmp_path):
    run = _gan_like_run(tmp_path)
    write_report(run)
    page = (run / "report.html").read_text()
    assert "Not run, because audit.mia = false in this run's config." in _section(page, "Membership inference")
    fair = _section(page, "Site fairness per round")
    assert "Not run, because no site reported fid on its validation data in any round (the sites report d_loss)" in fair
    assert "Not run, because the gan task draws no sample images." in _section(page, "Samples")
    assert "dp-accounting PLD" in _section(page, "Independent cross-check")  # this one did run


def test_a_recommender_run_says_why_the_attack_could_not_run_anyway(tmp_path):
    run = _run_dir(tmp_path)
    where = "held-out ratings at the sites (keyed per rating, data.test-fraction), combined from their sums, exact"
    _write_metrics(
        run,
        [{"round": r, "primary_metric": "rmse", "test": {"rmse": 1.0}, "test_source": where} for r in (1, 2, 3)],
    )
    recsys = {"task": "recsys", "data.partition": "region", "data.source": "synthetic", "audit.mia": False}
    (run / "config.toml").write_text(config_toml(make_cfg(**recsys)))
    write_report(run)
    mia = _section((run / "report.html").read_text(), "Membership inference")
    assert "Not run, because audit.mia = false" in mia and "non-members are a server-held test split" in mia
    assert "held-out ratings at the sites" in mia


def test_a_non_private_run_says_why_there_is_no_cross_check(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    led = Ledger(run / "ledger.sqlite", run_id="run")
    plan = RoundPlan(200, 0.1, 10, 0.0, 0.0, 0.0, NO_DP)
    led.record_round(1, [SiteSpend("site-0", "image", plan, 10, float("inf"), True, "trained", "os")])
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "ledger_head": led.head()}) + "\n")
    led.close()
    write_report(run)
    page = (run / "report.html").read_text()
    assert "Not run, because the ledger has no DP-SGD row" in _section(page, "Independent cross-check")
    assert "Not run, because the run did not reach its end" in _section(page, "Membership inference")
    assert "Not run, because the run dir has no config.toml" in _section(page, "Configuration")


def test_summary_md_says_why_too(tmp_path):
    from server.report import write_summary

    run = _gan_like_run(tmp_path)
    (run / "privacy-audit.json").unlink()
    with Ledger(run / "ledger.sqlite", run_id="run") as ledger:
        write_summary(run, ledger, "fid", "gan-digits", plot_metrics=("tstr", "class_tv"))
    md = (run / "summary.md").read_text()
    assert "Not run, because audit.mia = false in this run's config." in md
    assert "Not run, because no site reported fid" in md
    assert "Not run, because the gan task draws no sample images." in md
    # sigma as set, but the ledger says otherwise for one site: the page says so
    assert "## Settings as the run used them" in md
    assert "dp.noise-multiplier = 1.0, but the ledger's σ differs from it for site-1" in md.replace("\\", "")


# ------------------------------------------------------------------ pictures: honest titles, one metric per axis


def _rounds(values: dict[str, list[float]]) -> list[dict]:
    n = len(next(iter(values.values())))
    return [{"round": r + 1, "test": {k: v[r] for k, v in values.items()}} for r in range(n)]


def test_the_vae_quality_picture_gives_each_metric_its_own_axis_and_name():
    metrics = _rounds({"class_tv": [0.93, 0.92, 0.90], "recon_disparity.ratio": [1.008, 1.012, 1.023]})
    fig = quality_figure(metrics, ("class_tv", "recon_disparity.ratio"), "server-held split")
    assert fig is not None
    axes = fig.axes
    assert len(axes) == 2 and all(len(ax.lines) == 1 for ax in axes)  # one metric per axis
    assert [list(ax.lines[0].get_ydata()) for ax in axes] == [[0.93, 0.92, 0.90], [1.008, 1.012, 1.023]]
    titles = [ax.get_title(loc="left").replace("\n", " ") for ax in axes]
    assert "total-variation distance" in titles[0] and "lower is better" in titles[0]
    assert "TV distance" in axes[0].get_ylabel()
    assert "worst class" in titles[1] and "closer to 1" in titles[1]
    assert "ratio" in axes[1].get_ylabel()
    assert "value" not in {ax.get_ylabel() for ax in axes}
    assert "server-held split" in fig.get_suptitle()


def test_the_recommender_quality_picture_names_where_it_was_measured_and_claims_no_samples():
    where = "held-out ratings at the sites (keyed per rating, data.test-fraction), combined from their sums, exact"
    names = ("unfairness.gender.value", "unfairness.gender.non_parity", "pop_lift", "coverage_site_mean")
    fig = quality_figure(_rounds(dict.fromkeys(names, [0.5, 0.4])), names, where)
    assert fig is not None
    title = fig.get_suptitle().replace("\n", " ")
    assert "held-out ratings at the sites" in title
    assert "Sample" not in title and "server" not in title  # it has neither
    assert [ax.get_ylabel() for ax in fig.axes] == [METRIC_LABELS[n].axis for n in names]


def test_every_tasks_plot_metrics_have_a_label():
    from common.tasks import get_task, task_names

    for name in task_names():
        missing = set(get_task(name).plot_metrics) - set(METRIC_LABELS)
        assert not missing, f"task {name}: no label for {sorted(missing)} in common.metrics.quality_plots"


def test_the_fairness_and_utility_pictures_say_which_way_is_better(tmp_path, monkeypatch):
    import server.html_report as report

    titles = []
    monkeypatch.setattr(report, "line_plot", lambda series, path, **kw: titles.append(kw["title"]))
    report._plot_site_disparity(tmp_path / "f.png", [{"round": 1, "site_val": {"a": {"m": 1.0}, "b": {"m": 2.0}}}], "m")
    assert titles == ["Site validation m per round: worst, mean, best site (lower is better)"]


def test_client_level_dp_states_its_sigma_and_auto_delta(tmp_path):
    from dataclasses import replace

    from common.identifiers import CENTRAL_SITE_ID
    from server.run_facts import resolved_settings

    run = _run_dir(tmp_path, rounds=1)
    with Ledger(run / "ledger.sqlite", run_id="run") as ledger:
        rows = ledger.rows()
    central = replace(rows[0], site_id=CENTRAL_SITE_ID, unit="site", noise_multiplier=0.7, delta=1e-5)
    flat = {**VAE_CFG, "num-sites": 5, "central-dp.enabled": True, "central-dp.target-epsilon": 4.0}
    (run / "config.toml").write_text(config_toml(make_cfg(**flat)))
    got = {s.name: s for s in resolved_settings(read_config(run), [*rows, central])}
    c = got["client-level DP (server)"]
    assert c.value == "σ 0.7000, δ 1e-05"
    assert (
        "derived from central-dp.target-epsilon = 4" in c.origin
        and "auto: min(1e-05, 1/(10 x 5 sites)) = 1e-05" in c.origin
    )


def test_read_config_of_a_run_without_one_is_empty(tmp_path):
    cfg = read_config(tmp_path)
    assert cfg.flat == {} and cfg.resolved == {} and cfg.text == ""
