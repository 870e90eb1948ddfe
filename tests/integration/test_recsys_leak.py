"""End to end: a recommender federation, scanned for raw identifiers wherever the server looks."""

from __future__ import annotations

import json
import logging
import secrets

import numpy as np
import pytest
from flwr.common.serde import message_to_proto
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common.deploy.keys import load_key, write_key
from server.ledger import Ledger
from simulations.launcher import simulate
from tests.conftest import simulation_processes

pytestmark = pytest.mark.slow


def _planted_data(tmp_path, tag: str):
    rng = np.random.default_rng(0)
    users = [f"LEAKU-{tag}-{u:03d}" for u in range(60)]
    items = [f"LEAKI-{tag}-{i:03d}" for i in range(40)]
    lines = ["user,item,rating,timestamp"]
    for u in users:
        for i in rng.choice(len(items), size=15, replace=False):
            lines.append(f"{u},{items[i]},{int(rng.integers(1, 6))},{int(rng.integers(1e9, 2e9))}")
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    ulines = ["user,gender,age,zip"] + [f"{u},{'FM'[k % 2]},{20 + k % 50},{k % 10}{k:04d}" for k, u in enumerate(users)]
    (tmp_path / "users.csv").write_text("\n".join(ulines) + "\n")
    return users, items


def test_no_raw_identifier_or_key_reaches_the_server(tmp_path, monkeypatch, capsys, caplog):
    tag = secrets.token_hex(4)
    users, items = _planted_data(tmp_path, tag)
    key_file = write_key(tmp_path / "fed.key")
    key = load_key(key_file)

    received: list[bytes] = []  # every message the ServerApp pulls from the sites
    original = InMemoryGrid.pull_messages

    def recording_pull(self, message_ids):
        msgs = list(original(self, message_ids))
        received.extend(message_to_proto(m).SerializeToString() for m in msgs)
        return msgs

    monkeypatch.setattr(InMemoryGrid, "pull_messages", recording_pull)
    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    simulate(
        "recsys-synthetic",
        [
            "num-sites=2",
            "rounds=2",
            "data.source=csv",
            f"data.path={tmp_path / 'ratings.csv'}",
            f"data.users-path={tmp_path / 'users.csv'}",
            "data.partition=iid",
            "recsys.num-buckets=4096",
            "train.batch-size=64",
            "recsys.min-group-size=2",
            f"run-dir={run_dir}",
        ],
        key_file=str(key_file),
    )

    # The run worked: two rounds, both sites, held-out metrics, rating-level ledger.
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    assert all(0 < m["test"]["rmse"] < 4 and set(m["site_val"]) == {"site-0", "site-1"} for m in lines)
    rows = Ledger(run_dir / "ledger.sqlite").rows()
    assert len(rows) == 4 and {r.unit for r in rows} == {"rating"} and all(r.eps_total > 0 for r in rows)

    # Everything the server saw: messages, its console and logs, every file it wrote.
    assert len(received) >= 8  # 2 rounds x 2 sites x (fit + evaluate)
    out = capsys.readouterr()
    seen = received + [out.out.encode(), out.err.encode(), caplog.text.encode()]
    seen += [p.read_bytes() for p in run_dir.rglob("*") if p.is_file()]
    # (Exact zips are generalised at load time, but five digits also occur inside printed
    # floats, so they are not needles; the ids and the key are unambiguous.)
    needles = [u.encode() for u in users] + [i.encode() for i in items]
    needles += [f"LEAKU-{tag}".encode(), f"LEAKI-{tag}".encode(), key, key.hex().encode()]
    for blob in seen:
        for needle in needles:
            assert needle not in blob, f"{needle[:24]!r} reached the server"
    # and the scan is real: the planted ids are in the site's input
    assert f"LEAKU-{tag}-000".encode() in (tmp_path / "ratings.csv").read_bytes()
    assert simulation_processes() == []
