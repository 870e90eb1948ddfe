"""Text a site or a data file chose comes out inert in every output (issue 20, finding 5).

A failure string, a metric name or a site id goes into summary.md tables, the audit's CSV
export and the console. There it must not forge a table row, run as a spreadsheet formula
or drive the terminal, and it must not be lost either: the same text is still there,
escaped. Plus the label bug of finding 7: with central-eval off, the "test" numbers are the
sites' pooled validation and must be labelled so.
"""

from __future__ import annotations

import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from markdown_it import MarkdownIt
from rich.console import Console

from common.textsafe import console_text, csv_cell, md_cell
from server.ledger import Ledger
from server.recorder import RunRecorder
from server.report import POOLED_VALIDATION, eval_source, write_summary
from simulations.cli import main as cli
from tests.conftest import make_cfg, tamper
from tests.unit.test_audit import _run_dir

FORMULA = '=HYPERLINK("http://x")'
FORGED = "a|b\n| forged row |"
MARKUP = "[bold red]x[/]"
HTML = "<img src=x onerror=alert(1)> [l](http://x) `c` **b**"
HOSTILE = (FORMULA, FORGED, MARKUP, HTML)


def shown(text: str) -> str:
    """What a reader sees of ``text`` once made inert: controls as visible escapes."""
    return text.replace("\n", "\\n").replace("\x1b", "\\x1b")


class _Tables(HTMLParser):
    """The rendered page's tables as lists of rows of cell text, and every tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.tags: set[str] = set()
        self.items: list[str] = []
        self._cell: list[str] | None = None
        self._item: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "li":
            self._item = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "li" and self._item is not None:
            self.items.append("".join(self._item))
            self._item = None

    def handle_data(self, data):
        for buf in (self._cell, self._item):
            if buf is not None:
                buf.append(data)


def render(markdown: str) -> _Tables:
    page = MarkdownIt("commonmark").enable("table").enable("strikethrough").render(markdown)
    parsed = _Tables()
    parsed.feed(page)
    return parsed


# ----------------------------------------------------------------- the helpers


@pytest.mark.parametrize("text", [*HOSTILE, "plain site-0", "tstr_accuracy", "a\\|b", "\x1b[2J\r\u2028"])
def test_a_markdown_cell_renders_as_exactly_its_text(text):
    table = render(f"| h |\n|---|\n| {md_cell(text)} |\n")
    assert table.tables == [[["h"], [shown(text).replace("\r", "\\r").replace("\u2028", "\\u2028")]]]
    assert table.tags == {"table", "thead", "tbody", "tr", "th", "td"}  # no link, image, code, emphasis


@pytest.mark.parametrize("text", [FORMULA, "+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)", "\tx", "\rx"])
def test_a_csv_cell_that_would_run_as_a_formula_gets_an_apostrophe(text):
    assert csv_cell(text) == "'" + text


@pytest.mark.parametrize("value", ["site-0", "rdp", "", 1.5, -0.25, 3, None, True])
def test_a_csv_cell_that_cannot_run_is_unchanged(value):
    assert csv_cell(value) == value


def test_console_text_is_shown_not_obeyed():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="truecolor", width=400, highlight=False)
    hostile = MARKUP + "\x1b[2J\x1b]0;owned\x07" + FORGED
    console.print(f"[red]error:[/] {console_text(hostile)}")
    out = buf.getvalue()
    assert MARKUP in out and shown(FORGED) in out and "\\x1b[2J" in out and "\\x1b]0;owned\\x07" in out
    assert "\x1b[2J" not in out and "\x1b]0;" not in out and "\x07" not in out
    assert out.count("\n") == 1  # the value forged no line


# ----------------------------------------------------------------- summary.md


def _hostile_run(tmp_path: Path, source: str = "server-held split") -> Path:
    """A run dir whose metric names, site id and stop reason are hostile text."""
    run = _run_dir(tmp_path, rounds=2)
    tamper(
        run / "ledger.sqlite",
        f"UPDATE ledger SET site_id = '{FORMULA.replace(chr(39), chr(39) * 2)}' WHERE site_id = 'site-1'",
    )
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    with (run / "metrics.jsonl").open("w") as fh:
        for m in lines:
            m.update(
                primary_metric="loss",
                test={"loss": 0.5, **{h: float(i) for i, h in enumerate(HOSTILE)}},
                test_source=source,
                site_val={"site-0": {"loss": 0.6}},
            )
            fh.write(json.dumps(m) + "\n")
    return run


def _summary(run: Path, stop_reason: str = "") -> tuple[str, _Tables]:
    with Ledger(run / "ledger.sqlite") as ledger:
        write_summary(run, ledger, "loss", "scen|ario\n# heading", stop_reason=stop_reason)
    text = (run / "summary.md").read_text()
    return text, render(text)


def test_hostile_text_in_summary_md_is_inert_and_kept(tmp_path):
    run = _hostile_run(tmp_path)
    text, page = _summary(run, stop_reason=f"FAILED: {FORGED} {MARKUP} {HTML}")
    metrics = page.tables[0]
    assert metrics[0] == ["metric", "value"]
    assert [row[0] for row in metrics[1:]] == ["loss", *(shown(h) for h in HOSTILE)]  # one row each, no more
    sites = page.tables[1]
    assert [row[0] for row in sites[1:]] == [FORMULA, "site-0"]  # sorted; the hostile id kept as text
    assert page.tags <= {"h1", "h2", "h3", "p", "ul", "li", "table", "thead", "tbody", "tr", "th", "td", "img"}
    assert page.tags.isdisjoint({"a", "code", "strong", "em", "script"})
    assert sum(1 for line in text.splitlines() if line.startswith("# ")) == 1  # the scenario forged no heading
    stop = next(i for i in page.items if i.startswith("rounds completed"))
    assert stop == f"rounds completed: 2 (FAILED: {shown(FORGED)} {MARKUP} {HTML})"
    # The only <img> elements are the report's own plots, not the site's.
    assert "onerror" not in text.replace("&lt;img src=x onerror", "")


# ----------------------------------------------------------------- CSV audit export


def test_the_csv_audit_export_guards_every_formula_and_loses_nothing(tmp_path, capsys):
    run = _run_dir(tmp_path, rounds=2)
    q = lambda s: s.replace("'", "''")  # noqa: E731 (SQL quoting for the tamper)
    tamper(
        run / "ledger.sqlite",
        f"UPDATE ledger SET site_id = '{q(FORMULA)}' WHERE site_id = 'site-1'",
        f"UPDATE ledger SET status = '{q(FORGED)}' WHERE round = 1",
        "UPDATE ledger SET mechanism = '@SUM(1+1)' WHERE round = 2",
    )
    capsys.readouterr()
    assert cli(["audit", str(run), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4  # the newline in a status forged no row
    assert {r["site_id"] for r in rows} == {"site-0", "'" + FORMULA}
    assert {r["status"] for r in rows} == {FORGED, "trained"}  # quoted by csv, starts with 'a': no formula
    assert {r["mechanism"] for r in rows if r["round"] == "2"} == {"'@SUM(1+1)"}
    for r in rows:
        for value in r.values():
            assert not value.startswith(("=", "+", "@", "\t", "\r")), value
        float(r["eps_total"]), float(r["budget_left"])  # numbers stay numbers


# ----------------------------------------------------------------- console


def test_the_audit_table_shows_hostile_units_as_text(tmp_path, capsys):
    run = _run_dir(tmp_path, rounds=1)
    tamper(run / "ledger.sqlite", f"UPDATE ledger SET unit = '{MARKUP}\x1b[2J'")
    capsys.readouterr()
    assert cli(["audit", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"one {MARKUP}\\x1b[2J" in out and "\x1b[2J" not in out


def _round_line(test_source: str, primary: str = "loss") -> str:
    fake = SimpleNamespace(
        cfg=make_cfg(**{"dp.enabled": False}), task=SimpleNamespace(primary_metric=primary, privacy_unit="image")
    )
    line = {
        "sites_trained": ["a"],
        "sites_sampled": 1,
        "rejected": {},
        "sites_budget_exhausted": [],
        "test": {primary: 0.5},
        "test_source": test_source,
        "site_val": {},
        "delta": {},
        "eps_max": 0.0,
        "failures": [],
        "seconds": 1.0,
    }
    buf = io.StringIO()
    Console(file=buf, width=400, highlight=False).print(RunRecorder._progress_line(fake, 1, line))
    return buf.getvalue()


def test_the_round_line_shows_a_hostile_metric_name_and_source_as_text():
    out = _round_line(source := f"{MARKUP} {FORGED}", primary=MARKUP)
    assert f"test {MARKUP} 0.500 ({shown(source)})" in out and out.count("\n") == 1


# ----------------------------------------------------------------- finding 7: the label


def _task(held: bool) -> SimpleNamespace:
    return SimpleNamespace(
        server_test_data=lambda: object() if held else None,
        test_description="server-held split" if held else "held-out ratings at the sites",
    )


@pytest.mark.parametrize(
    ("central", "metrics_dp", "held", "expected"),
    [
        (True, True, True, "server-held split"),
        (False, True, True, f"{POOLED_VALIDATION}, noisy: metrics.dp"),
        (False, False, True, f"{POOLED_VALIDATION}, exact"),
        (True, False, False, "held-out ratings at the sites, exact"),
        (False, True, False, "held-out ratings at the sites, noisy: metrics.dp"),
    ],
)
def test_the_test_metrics_say_where_they_come_from(central, metrics_dp, held, expected):
    cfg = make_cfg(**{"central-eval": central, "metrics.dp": metrics_dp})
    assert eval_source(cfg, _task(held)) == expected


def test_without_central_eval_nothing_says_server_held_split(tmp_path):
    """central-eval=false: the round line and summary.md said "test … (server-held split)",
    but the numbers were the sites' pooled (noisy) validation metrics."""
    from tests.unit.test_gan import gan_task

    task = gan_task(**{"central-eval": False, "metrics.dp": True})
    recorder = RunRecorder(task.cfg, task, tmp_path / "rec")
    recorder.ledger.close()
    source = recorder.test_source
    assert source == f"{POOLED_VALIDATION}, noisy: metrics.dp"

    line = _round_line(source)
    assert "pooled site validation loss 0.500 (noisy: metrics.dp)" in line
    assert "server-held" not in line and "test loss" not in line

    run = _hostile_run(tmp_path, source=source)
    text, _ = _summary(run)
    assert "## Final metrics: pooled site validation, noisy: metrics.dp" in text
    assert "server-held split" not in text and "Final test metrics" not in text
    assert "- final pooled site validation loss: 0.5000" in text


def test_with_central_eval_the_summary_still_says_test(tmp_path):
    run = _hostile_run(tmp_path)
    text, _ = _summary(run)
    assert "## Final test metrics (server-held split)" in text and "- final test loss: 0.5000" in text
    assert "test loss 0.500 (server-held split)" in _round_line("server-held split")
