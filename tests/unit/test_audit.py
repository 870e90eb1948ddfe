"""`privfed audit`: what a privacy officer sees, exports and verifies."""

from __future__ import annotations

import csv
import io
import json

import pytest

from common.privacy.accounting import RoundPlan
from server.ledger import Ledger, SiteSpend
from simulations.cli import main as cli
from tests.conftest import tamper


def _run_dir(tmp_path, rounds=3, rng="os"):
    """A run dir as the server writes it: ledger + metrics.jsonl with each round's head hash."""
    run = tmp_path / "run"
    run.mkdir(parents=True)
    led = Ledger(run / "ledger.sqlite", run_id="run")
    with (run / "metrics.jsonl").open("w") as fh:
        for r in range(1, rounds + 1):
            spends = [
                SiteSpend(
                    site, "image", RoundPlan(200, 0.1, 10, sigma, 1.0, 1e-5, "rdp"), 10, 5.0, True, "trained", rng
                )
                for site, sigma in (("site-0", 1.0), ("site-1", 2.0))
            ]
            led.record_round(r, spends)
            fh.write(json.dumps({"round": r, "ledger_head": led.head()}) + "\n")
    led.close()
    return run


def test_json_export_has_every_round_and_site_with_budget_left(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert cli(["audit", str(run), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["round"], r["site_id"]) for r in rows] == [(r, s) for r in (1, 2, 3) for s in ("site-0", "site-1")]
    for r in rows:
        assert r["budget_left"] == pytest.approx(5.0 - r["eps_total"])
        assert r["unit"] == "image" and r["accountant"] == "rdp" and r["delta"] == 1e-5
    # more noise, less epsilon; cumulative epsilon grows
    last = {r["site_id"]: r for r in rows if r["round"] == 3}
    assert last["site-1"]["eps_total"] < last["site-0"]["eps_total"]
    assert rows[0]["eps_total"] < last["site-0"]["eps_total"]


def test_csv_export(tmp_path, capsys):
    run = _run_dir(tmp_path, rounds=1)
    assert cli(["audit", str(run), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 2 and {"eps_round", "eps_total", "delta", "unit", "accountant", "budget_left"} <= set(rows[0])
    assert [r["rng"] for r in rows] == ["os", "os"]


def test_the_audit_says_which_rows_had_seeded_noise(tmp_path, capsys):
    assert cli(["audit", str(_run_dir(tmp_path / "os", rounds=1))]) == 0
    assert "SEEDED" not in capsys.readouterr().out
    assert cli(["audit", str(_run_dir(tmp_path / "seeded", rounds=1, rng="seeded")), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "SEEDED noise in 2 of 2 rows (site-0, site-1)" in out and "federation.seed" in out


def test_table_states_unit_accountant_and_delta(tmp_path, capsys):
    run = _run_dir(tmp_path, rounds=1)
    assert cli(["audit", str(run)]) == 0
    out = capsys.readouterr().out
    assert "site-1" in out and "one image" in out and "rdp" in out and "1.0e-05" in out


def test_verify_passes_on_an_untouched_run(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 0
    assert "verified: 6 rows" in capsys.readouterr().err


def test_verify_names_the_first_edited_row(tmp_path, capsys):
    run = _run_dir(tmp_path)
    tamper(run / "ledger.sqlite", "UPDATE ledger SET eps_total = eps_total / 2 WHERE seq = 4")
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 1
    err = capsys.readouterr().err
    assert "FAILED at row seq 4" in err


def test_verify_catches_a_cut_tail(tmp_path, capsys):
    run = _run_dir(tmp_path)
    tamper(run / "ledger.sqlite", "DELETE FROM ledger WHERE seq >= 5")
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 1
    assert "FAILED at ledger end" in capsys.readouterr().err


def test_missing_run_dir_is_one_line_and_creates_nothing(tmp_path, capsys):
    assert cli(["audit", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    assert cli(["audit", str(tmp_path / "empty")]) == 2
    assert not (tmp_path / "empty" / "ledger.sqlite").exists()


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda run: (run / "metrics.jsonl").write_text('{"round": 1, "ledger_head": "x"}\n{"round": 2, "ledg'),
            "line 2 is not valid JSON",
        ),
        (lambda run: (run / "metrics.jsonl").write_text("[1, 2]\n"), "line 1 is not a JSON object"),
        (
            lambda run: (run / "ledger.sqlite").write_bytes(b"SQLite format 3\x00" + b"\x00" * 200),
            "not a readable privfed ledger",
        ),
    ],
)
def test_damaged_run_files_give_one_line_errors(tmp_path, capsys, damage, match):
    run = _run_dir(tmp_path)
    damage(run)
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and err.count("\n") == 0 and "Traceback" not in err


def test_verify_without_a_recorded_head_is_not_a_pass(tmp_path, capsys):
    run = _run_dir(tmp_path)
    (run / "metrics.jsonl").unlink()
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 1
    assert "no ledger head recorded" in capsys.readouterr().err


def test_report_into_a_missing_folder_is_one_line(tmp_path, capsys):
    run = _run_dir(tmp_path)
    assert cli(["report", str(run), "--out", str(tmp_path / "no" / "such" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_paths_with_brackets_are_not_markup(tmp_path, capsys):
    assert cli(["audit", str(tmp_path / "a[/]b" / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "a[/]b" in err and err.count("\n") == 0


def test_verify_names_a_forged_row_no_accountant_accepts(tmp_path, capsys):
    """Rewrite a row with an impossible accountant and re-hash everything: a named failure, no traceback."""
    from server.ledger import HASHED_FIELDS, Ledger, row_digest

    run = _run_dir(tmp_path)
    rows = Ledger(run / "ledger.sqlite").rows()
    prev, stmts = rows[0].prev_hash, []
    for row in rows:
        values = {k: getattr(row, k) for k in HASHED_FIELDS}
        if row.seq == 3:
            values["accountant"] = "bogus"
        new = row_digest(prev, values)
        stmts.append(
            f"UPDATE ledger SET accountant='{values['accountant']}', prev_hash='{prev}', "
            f"row_hash='{new}' WHERE seq={row.seq}"
        )
        prev = new
    tamper(run / "ledger.sqlite", *stmts)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lines[-1]["ledger_head"] = prev
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 1
    err = capsys.readouterr().err
    assert "FAILED at row seq 3" in err and "Traceback" not in err
    assert cli(["report", str(run)]) == 0
    assert "FAILED at seq 3" in (run / "report.html").read_text()


def test_report_out_may_be_a_directory(tmp_path):
    run = _run_dir(tmp_path)
    outdir = tmp_path / "reports"
    outdir.mkdir()
    assert cli(["report", str(run), "--out", str(outdir)]) == 0
    assert (outdir / "report.html").stat().st_size > 0


def test_every_exported_row_names_its_neighbouring_relation(tmp_path, capsys):
    run = _run_dir(tmp_path, rounds=1)
    assert cli(["audit", str(run), "--format", "json"]) == 0
    assert {r["neighbouring"] for r in json.loads(capsys.readouterr().out)} == {"add-remove"}
    assert cli(["audit", str(run)]) == 0
    assert "neighbouring: add-remove" in capsys.readouterr().out


def test_verify_refuses_a_row_whose_relation_no_accountant_computes(tmp_path, capsys):
    """A row claiming replace-one (re-hashed, head anchored): the audit names it, seq and relation."""
    from server.ledger import HASHED_FIELDS, Ledger, row_digest

    run = _run_dir(tmp_path, rounds=1)
    rows = Ledger(run / "ledger.sqlite").rows()
    prev, stmts = rows[0].prev_hash, []
    for row in rows:
        values = {k: getattr(row, k) for k in HASHED_FIELDS}
        if row.seq == 2:
            values["neighbouring"] = "replace-one"
        new = row_digest(prev, values)
        stmts.append(
            f"UPDATE ledger SET neighbouring='{values['neighbouring']}', prev_hash='{prev}', "
            f"row_hash='{new}' WHERE seq={row.seq}"
        )
        prev = new
    tamper(run / "ledger.sqlite", *stmts)
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "ledger_head": prev}) + "\n")
    assert cli(["audit", str(run), "--verify", "--format", "csv"]) == 1
    err = capsys.readouterr().err
    assert "FAILED at row seq 2" in err and "neighbouring" in err and "Traceback" not in err


# ----------------------------------------------------------------- issue 23: one line per site, the verdict last


def _table_lines(out: str, site: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("│") and f" {site} " in line]


def test_the_default_is_one_line_per_site_with_final_eps_rounds_and_budget_left(tmp_path, capsys):
    run = _run_dir(tmp_path, rounds=3)
    with Ledger(run / "ledger.sqlite") as led:
        last = {r.site_id: r for r in led.rows()}
    assert cli(["audit", str(run)]) == 0
    out = capsys.readouterr().out
    for site in ("site-0", "site-1"):
        (line,) = _table_lines(out, site)  # one line, not one per round
        cells = [c.strip() for c in line.strip("│").split("│")]
        r = last[site]
        assert cells == [site, f"{r.eps_total:.3f}", "1e-05", "image", "3", "5.000", f"{5.0 - r.eps_total:.3f}"]
    assert "budget left" in out and "σ" not in out  # the row view's columns are not shown
    assert "ledger: 6 rows over 3 round(s); --rows lists every row" in out


def test_rows_lists_every_row_as_before(tmp_path, capsys):
    run = _run_dir(tmp_path, rounds=3)
    assert cli(["audit", str(run), "--rows"]) == 0
    out = capsys.readouterr().out
    assert len(_table_lines(out, "site-0")) == 3 and len(_table_lines(out, "site-1")) == 3
    assert "σ" in out and "--rows lists" not in out


def test_machine_formats_list_every_row_whatever_rows_says(tmp_path, capsys):
    run = _run_dir(tmp_path, rounds=2)
    assert cli(["audit", str(run), "--format", "json"]) == 0
    plain = capsys.readouterr().out
    assert cli(["audit", str(run), "--format", "json", "--rows"]) == 0
    assert capsys.readouterr().out == plain and len(json.loads(plain)) == 4


def test_site_summary_counts_spending_rounds_and_reads_each_sites_own_budget(tmp_path):
    """A refusal or an out-of-budget round spends nothing; a metrics release composes into the
    site's total without adding a round or a unit; a site's own (lower) budget is its own;
    a non-private site has no budget left to speak of."""
    from common.privacy.accounting import NO_DP
    from common.privacy.metrics_dp import MECHANISM
    from server.ledger import REFUSAL
    from server.ledger_audit import site_summary

    def spend(site, steps=10, budget=5.0, mechanism="dp-sgd", unit="image", accountant="rdp", status="trained"):
        plan = RoundPlan(200, 0.1, 10, 1.0, 1.0, 1e-5, accountant)
        used = mechanism != REFUSAL and steps > 0
        return SiteSpend(site, unit, plan, steps, budget, used, status, "os", mechanism)

    led = Ledger(tmp_path / "ledger.sqlite", run_id="run")
    led.record_round(1, [spend("a"), spend("b", budget=2.0), spend("c", accountant=NO_DP)])
    led.record_round(1, [spend("a", mechanism=MECHANISM, unit="site")])
    led.record_round(
        2, [spend("a", steps=0, status="budget_exhausted"), spend("b", steps=0, budget=2.0, mechanism=REFUSAL)]
    )
    led.record_round(3, [spend("a"), spend("b", budget=2.0), spend("c", accountant=NO_DP)])
    rows = led.rows()
    led.close()
    by = {s["site_id"]: s for s in site_summary(rows)}
    assert list(by) == ["a", "b", "c"]
    last = {r.site_id: r for r in rows}
    assert by["a"]["rounds"] == 2 and by["a"]["unit"] == "image"  # rounds 1 and 3; round 2 spent nothing
    assert by["a"]["eps_total"] == last["a"].eps_total and by["a"]["delta"] == 1e-5
    assert by["a"]["budget_left"] == pytest.approx(5.0 - last["a"].eps_total)
    assert by["b"]["rounds"] == 2 and by["b"]["eps_budget"] == 2.0
    assert by["b"]["budget_left"] == pytest.approx(2.0 - last["b"].eps_total)
    assert by["c"]["budget_left"] is None and by["c"]["eps_budget"] is None


def test_verify_puts_the_verdict_last_on_stdout(tmp_path, capsys):
    """`privfed audit R --verify > audit.txt` keeps the verdict: it is stdout's last line."""
    run = _run_dir(tmp_path)
    assert cli(["audit", str(run), "--verify"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert (
        lines[-1].startswith("verdict: SELF-CONSISTENT ONLY for 6 rows")
        and "not verified against keys: no registry" in lines[-1]
    )
    assert "verified: 6 rows" in out and "cross-check site-1" in out and err == ""


def test_a_failed_verdict_is_last_on_stdout_and_also_on_stderr(tmp_path, capsys):
    run = _run_dir(tmp_path)
    tamper(run / "ledger.sqlite", "UPDATE ledger SET eps_total = eps_total / 2 WHERE seq = 4")
    assert cli(["audit", str(run), "--verify"]) == 1
    out, err = capsys.readouterr()
    last = out.strip().splitlines()[-1]
    assert last.startswith("verdict: verification FAILED at row seq 4")
    assert err.strip() == last  # stdout was not a terminal: whoever redirected it still sees the failure


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_machine_formats_keep_stdout_to_the_data_and_the_verdict_on_stderr(tmp_path, capsys, fmt):
    run = _run_dir(tmp_path)
    assert cli(["audit", str(run), "--verify", "--format", fmt]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out) if fmt == "json" else list(csv.DictReader(io.StringIO(out)))
    assert len(data) == 6
    assert err.strip().splitlines()[-1].startswith("verdict: SELF-CONSISTENT ONLY for 6 rows")


def test_audit_help_imports_nothing_heavy():
    """`privfed audit --help` builds its parser without the ledger, numpy, torch or Flower."""
    import subprocess
    import sys

    code = (
        "import argparse, sys\n"
        "import server.cli as c\n"
        "c.add_arguments('audit', argparse.ArgumentParser())\n"
        "heavy = ('torch', 'numpy', 'flwr', 'ray', 'opacus', 'cryptography', 'server.ledger', 'server.ledger_audit')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""
