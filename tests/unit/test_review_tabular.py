"""Hostile review of issue 22 (the DP tabular generator): each test is one attack on a claim,
and fails on the code as reviewed. Records are generated here (tests.unit.test_tabular_data)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.common import Code, EvaluateRes, Status

from common.data.tabular import load_table
from common.data.tabular_schema import load_schema
from common.errors import DataError
from common.tasks import get_task
from tests.conftest import make_cfg, make_registry, make_strategy, sign_reply, site_key
from tests.unit.test_tabular_data import SCHEMA, generated_rows, write_table

KEY = b"f" * 32


def make_task(tmp_path, n=600, persons=0, key=KEY, schema=None, **flat):  # noqa: ANN001, ANN201
    """tests.unit.test_tabular_task.make_task, on the real metrics module (no stub)."""
    data, schema_path = write_table(tmp_path, generated_rows(n, seed=3, persons=persons), schema=schema)
    cfg = make_cfg(
        **{
            "task": "tabular",
            "num-sites": 2,
            "data.source": "csv",
            "data.path": str(data),
            "data.partition": "iid",
            "tabular.schema": str(schema_path),
            "tabular.eval-samples": 400,
            "train.batch-size": 64,
            "dp.secure-rng": False,
            **flat,
        }
    )
    return get_task("tabular")(cfg, key)


# ------------------------------------------------------------------ (4) metrics.dp sensitivity


def test_vae_loss_sum_moves_by_more_than_its_bound_when_one_validation_row_is_removed(tmp_path):
    """Claim: under metrics.dp one row moves ``loss_sum`` by at most ``metric_bounds()['loss_sum']``.

    With ``tabular.model = "vae"`` the site's per-row loss draws the reparameterisation noise
    from ONE fixed-seed generator for the whole batch (``_losses``: seed 1234, ``torch.randn(N, d)``),
    so row i's noise is the i-th draw: removing row 0 hands every other row a different eps and
    changes every other row's clipped loss. The seed is fixed and public, so the noise is not
    randomness the adversary lacks: the released sum is a deterministic function whose
    sensitivity is up to N x B, not B, and the Gaussian noise calibrated to B does not cover it.
    """
    task = make_task(
        tmp_path,
        n=3000,
        **{"tabular.model": "vae", "data.partition": "site", "metrics.dp": True, "metrics.loss-bound": 400.0},
    )
    bound = task.metric_bounds().bounds["loss_sum"]
    torch.manual_seed(0)
    net = task.build_model()
    # A model whose per-row loss depends on z (a server may send any weights; a trained decoder
    # depends on z too, less steeply). Rows cost ~60-370 nats here, inside the bound.
    with torch.no_grad():
        for p in net.decoder.parameters():
            p.mul_(8.0)
    val = task.site_data(0)[1]
    full = task.dp_evaluate(net, val)["loss_sum"]
    minus_first = task.dp_evaluate(net, val.subset(np.arange(1, len(val))))["loss_sum"]
    assert abs(full - minus_first) <= bound + 1e-6, (full, minus_first, bound)


# ------------------------------------------------------------------ (5) a malicious site vs the server


def test_a_string_in_a_tabular_sum_crashes_the_servers_aggregate_evaluate(tmp_path):
    """Claim: a malicious site cannot crash the server through the tabular sums.

    The reply shape check lets a metric be a short string; ``TabularTask.combine_metrics``
    adds every sum key with ``sum(m.get(k, 0.0) ...)``, so one registered, correctly signed
    site whose ``cm.tp`` is ``"1"`` raises TypeError inside ``aggregate_evaluate`` (not inside
    the per-reply try), and Flower's ``evaluate_round`` does not catch it: the server dies.
    """
    task = make_task(tmp_path, **{"data.partition": "site"})
    reg = make_registry({"a": 100, "b": 100, "m": 100})
    s = make_strategy(tmp_path, [np.zeros(3, np.float32)], registry=reg, task=task)
    keys = task.sum_keys()

    def reply(site: str, node: int, value):  # noqa: ANN001, ANN202
        metrics = {"site_id": site, **dict.fromkeys(keys, 1.0), "neg_elbo": 1.0, "cm.tp": value}
        sign_reply(metrics, site_key(site), s.run_id, 1, "evaluate")
        return SimpleNamespace(node_id=node), EvaluateRes(Status(Code.OK, ""), 1.0, 1, metrics)

    results = [reply("a", 1, 3.0), reply("b", 2, 3.0), reply("m", 9, "1")]
    s.aggregate_evaluate(1, results, [])  # must not raise
    assert "tstr.lr.accuracy" in s.records[1].test


def _dp_strategy(tmp_path, task):  # noqa: ANN001, ANN202
    """The server's strategy for a deployed tabular run under metrics.dp (as server.app builds it)."""
    from common.pipeline import build_pipeline
    from server.ledger import Ledger
    from server.strategy import DeltaFedAvg
    from tests.conftest import server_key

    reg = make_registry({"a": 100, "b": 100, "m": 100})
    return DeltaFedAvg(
        task.cfg,
        task,
        Ledger(tmp_path / "ledger.sqlite", run_id="t"),
        build_pipeline(task.cfg, task),
        initial_arrays=[np.zeros(3, np.float32)],
        run_id="",
        registry=reg,
        server_key=server_key(),
    )


def test_a_huge_finite_loss_sum_crashes_the_servers_metrics_dp_error_bars(tmp_path):
    """Claim: a malicious site cannot crash the server through the tabular sums (huge values).

    Under metrics.dp the server attaches error bars (``DeltaFedAvg._error_bars`` ->
    ``common.metrics.error_bars.propagate`` over ``TabularTask.combine_sums``). A correctly
    signed reply whose ``loss_sum`` is a finite 1e200 (no reply check bounds a noisy sum)
    makes d neg_elbo / d n = -loss_sum / n^2 ~ 1e195, and ``(slope * s) ** 2`` raises
    OverflowError (Python floats raise on ``**``), uncaught in ``aggregate_evaluate``.
    """
    task = make_task(tmp_path, **{"data.partition": "site", "metrics.dp": True})
    s = _dp_strategy(tmp_path, task)
    bounds = task.metric_bounds()

    def reply(site: str, node: int, loss_sum: float):  # noqa: ANN202
        metrics = {
            "site_id": site,
            **dict.fromkeys(bounds.keys, 10.0),
            "n": 100.0,
            "loss_sum": loss_sum,
            "metrics_noise_multiplier": 1.0,
            "metrics_l2_sensitivity": bounds.l2_sensitivity,
            "metrics_delta": 1e-5,
            "metrics_rng": "os",
        }
        sign_reply(metrics, site_key(site), s.run_id, 1, "evaluate")
        return SimpleNamespace(node_id=node), EvaluateRes(Status(Code.OK, ""), 1.0, 1, metrics)

    s.ledger.start_round(1)
    results = [reply("a", 1, 2000.0), reply("b", 2, 2000.0), reply("m", 9, 1e200)]
    s.aggregate_evaluate(1, results, [])  # must not raise
    assert "n" in s.records[1].test


# ------------------------------------------------------------------ (1) the model's shape comes from the rows


def test_an_unedited_schema_draft_is_refused_as_a_run_schema(tmp_path):
    """Claim: category lists and bins come from the declared (public) schema only.

    ``privfed schema propose`` writes the private file's own category lists and observed
    ranges (``bins = [min, max]`` of the private column) into a draft; the only safeguard is
    a comment ("REPLACE by the public declaration"), which TOML parsing discards. The draft
    loads as a run schema unchanged, so the model's shape, its category vocabularies and the
    synthetic rows' range (decoded inside [private min, private max]) come from the rows,
    outside DP. (It even proposes the wrong positive class, ``distinct[-1]``.)
    """
    from common.data.tabular_schema import propose_schema

    data, _ = write_table(tmp_path, generated_rows(300))
    draft = tmp_path / "draft.toml"
    draft.write_text(propose_schema(data, "income", ("sex",)))
    with pytest.raises(DataError):
        load_schema(draft)


# ------------------------------------------------------------------ (3) one line, naming file, column, line


def test_a_header_name_with_a_newline_gives_a_one_line_error(tmp_path):
    """Claim: every bad input gets ONE line. A quoted header field may hold a newline; the
    extra-column error quotes the header name into the message as it is, so it spans lines."""
    rows = generated_rows(60)
    for r in rows:
        r["bad\ncolumn"] = "x"
    data, schema = write_table(
        tmp_path, rows, header=["id", "name", "age", "score", "job", "sex", "region", "income", "bad\ncolumn"]
    )
    with pytest.raises(DataError) as err:
        load_table(data, load_schema(schema), KEY)
    assert "\n" not in str(err.value)


def test_a_utf8_csv_with_a_byte_order_mark_is_read(tmp_path):
    """Claim: CSV loading with one-line errors that say what is wrong. A UTF-8 CSV saved by
    Excel ("CSV UTF-8") starts with a byte-order mark; the loader opens it as plain utf-8, so
    the first header becomes '\\ufeffid' and the file is refused with a wrong diagnosis
    ("column id: declared in the schema but missing from the header")."""
    data, schema = write_table(tmp_path, generated_rows(60))
    data.write_bytes(b"\xef\xbb\xbf" + data.read_bytes())
    table = load_table(data, load_schema(schema), KEY)
    assert len(table) == 60


# ------------------------------------------------------------------ (4) a public schema whose keys collide


def test_two_sensitive_attributes_whose_keys_collide_are_refused(tmp_path):
    """Claim: the sums' schema is fixed, public and one key per (attribute, group, cell).

    Metric keys use the attribute's slug, and only the groups' slugs are checked for
    uniqueness: sensitive columns ``sex`` and ``Sex`` both write ``cm.sex.*`` / ``fair.sex.*``.
    ``sum_keys()`` then lists keys twice and the second attribute's counts silently overwrite
    the first's, so the fairness report by sex is another column's."""
    schema = SCHEMA.format(person="") + '\n[columns.Sex]\nrole = "sensitive"\ncategories = ["F", "M"]\n'
    rows = generated_rows(60)
    for r in rows:
        r["Sex"] = "M" if r["sex"] == "F" else "F"
    header = ["id", "name", "age", "score", "job", "sex", "region", "income", "Sex"]
    _, path = write_table(tmp_path, rows, schema=schema, header=header)
    with pytest.raises(DataError):
        load_schema(path)


def test_the_schema_check_and_the_metrics_agree_on_group_slugs(tmp_path):
    """The schema's slug turns a name with no [a-z0-9] into "group", the metrics' slug into "x":
    groups ["x", "+"] pass ``load_schema`` and the loader, then every evaluation raises
    ConfigError (TableSpec) after the run has trained and spent budget on them."""
    from common.data.tabular import Layout
    from common.tasks.tabular.evaluation import table_spec

    schema = SCHEMA.format(person="").replace('categories = ["F", "M"]', 'categories = ["x", "+"]')
    _, path = write_table(tmp_path, generated_rows(10), schema=schema)
    try:
        s = load_schema(path)
    except DataError:
        return  # refused up front, naming the column: fine
    table_spec(Layout(s))  # must not raise once the schema was accepted


# ------------------------------------------------------------------ (5)/(6) the report


def test_a_declared_category_with_dollar_signs_does_not_break_the_marginals_plot(tmp_path):
    """Claim: schema names cannot break the report. Category labels and column names go into
    matplotlib text unescaped, where '$...$' is mathtext: a declared category such as
    ``$\\frac$`` (or any unbalanced TeX) raises ValueError at savefig and the report fails."""
    from common.metrics.tabular_plots import plot_marginals

    table = {"income $\\frac$": {"kind": "categorical", "labels": ["<=$50K", "$\\frac$"], "real": [0.5, 0.5],
                                 "synth": [0.4, 0.6]}}  # fmt: skip
    assert plot_marginals(table, tmp_path / "m.png") is not None


def test_some_run_code_writes_the_marginals_the_report_draws():
    """Issue 22, item 5: the report draws "per-column marginals, real against synthetic". The
    report reads ``tabular-marginals.json`` (``read_marginals``), but nothing outside the tests
    calls ``write_marginals``: no run ever writes the file, so the plot is never drawn."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    callers = [
        p
        for folder in ("server", "common", "client", "simulations")
        for p in (root / folder).rglob("*.py")
        if "write_marginals(" in p.read_text() and p.name != "tabular_plots.py"
    ]
    assert callers, "no run code calls write_marginals"


# ------------------------------------------------------------------ (7) file modes


def test_saved_synthetic_rows_are_written_private(tmp_path):
    """Claim (7): files holding row-level values are 0600 whatever the umask. ``save_samples``
    uses ``DataFrame.to_csv`` and ``mkdir`` with the process umask (0644 / 0755 here), unlike
    the run's other files (``write_text_atomically``)."""
    import os

    task = make_task(tmp_path)
    old = os.umask(0o022)
    try:
        out = task.save_samples(task.build_model(), tmp_path / "samples" / "round-001.png")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o600


def test_every_declared_group_gives_sum_keys_the_protocol_accepts(tmp_path):
    """Claim (4)/(5): the sums' schema is fixed and public, and the server combines what the
    sites send. The schema bounds neither a group name's length nor the number of groups, but
    the reply check (``metrics_shape_problem``) refuses any reply with a key over 64 characters
    (or over 512 keys). One long declared group (a code-book label such as the one below) makes
    ``cm.sex.<group>.tp`` 70+ characters: every site's evaluate reply is refused, as a whole,
    every round, and the deployment's metrics vanish; the schema should have been refused."""
    from common.protocol import metrics_shape_problem

    long_group = "Not-stated-or-inadequately-described-in-the-source-record-x"
    schema = SCHEMA.format(person="").replace('categories = ["F", "M"]', f'categories = ["F", "M", "{long_group}"]')
    with pytest.raises(DataError) as err:  # refused up front, naming the column
        make_task(tmp_path, schema=schema, **{"data.partition": "site", "metrics.dp": True})
    assert "columns.sex" in str(err.value) and long_group not in str(err.value)
    task = make_task(tmp_path, **{"data.partition": "site", "metrics.dp": True})  # an accepted schema's keys pass
    reply = {"site_id": "a", **dict.fromkeys(task.sum_keys(), 1.0)}
    assert metrics_shape_problem(reply, 1000) == ""


def test_schema_propose_on_an_empty_csv_gives_one_line(tmp_path):
    """Claim (3) for the operator tool: ``propose_schema`` indexes ``rows[0]`` unguarded, so an
    empty file raises IndexError (a traceback from ``privfed schema propose``), not a one-line
    DataError naming the file."""
    from common.data.tabular_schema import propose_schema

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError):
        propose_schema(empty, "income", ("sex",))


def test_a_site_does_not_send_the_exact_counts_of_a_group_under_min_group_size(tmp_path):
    """docs/FAIRNESS.md: "Groups under tabular.min-group-size (10) real rows are suppressed".

    Only the server's combined output suppresses them. Without metrics.dp and SecAgg+ (exact
    metrics, which a site may allow), each site's reply carries ``cm.<attr>.<group>.{tp,fp,tn,fn}``
    for every declared group whatever its size, and the server keeps every site's reply in
    ``metrics.jsonl`` (``site_val``): a group of ONE validation row at a site gives away that
    person's label and the classifier's decision on them (here: the only woman's). The
    recommender withholds groups under k at the site ("exact: groups of >= k only")."""
    task = make_task(tmp_path, **{"data.partition": "site", "tabular.min-group-size": 10})
    net = task.build_model()
    val = task.site_data(0)[1]
    sex = val.x[:, task.layout.slots()["sex"]].long()
    women = torch.nonzero(sex == 0).flatten()
    keep = torch.cat([torch.nonzero(sex == 1).flatten(), women[:1]]).numpy()
    out = task.evaluate(net, val.subset(np.sort(keep)))
    small = sum(out.get(f"cm.sex.f.{c}", 0.0) for c in ("tp", "fp", "tn", "fn"))
    assert small == 0.0 or small >= 10, f"a site sends the exact counts of a group of {small:g} row(s)"
