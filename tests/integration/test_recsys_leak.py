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
from tests.conftest import assert_no_new_simulation_processes

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
            # The sites run in this process, so what is scanned below holds their console and
            # logs too: stricter than under Ray, whose workers' output the server never sees.
            "backend=in-process",
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
    assert_no_new_simulation_processes()


# ----------------------------------------------------------- corrupt files (issue 20, finding 3)
def _corrupt_site_reasons(tmp_path, scenario: str, overrides: list[str], key: bytes | None) -> list[str]:
    """The error text a site with a corrupt data file sends, as the coordinator receives it:
    the deployed form (flwr-clientapp: ``str(type(ex)) + ":<'" + str(ex) + "'>"``) and the
    simulation's (the actor's exception with the traceback Ray ships)."""
    import time
    import traceback

    from flwr.app import Context, Message, Metadata, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.clientapp.client_app import ClientAppException
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitins_to_recorddict
    from flwr.simulation.ray_transport.ray_actor import VirtualClientEngineActor

    from client.app import build_client_app
    from simulations.launcher import resolve
    from tests.site_keys import site_keys

    cfg = resolve(scenario, ["num-sites=2", "dp.enabled=false", *overrides])
    ins = FitIns(ndarrays_to_parameters([np.zeros(3, np.float32)]), {"server-round": 1, "run-id": "r"})
    meta = Metadata(1, "m1", 0, 1, "", "1", time.time(), 600.0, MessageType.TRAIN)
    msg = Message(content=fitins_to_recorddict(ins, keep_input=True), metadata=meta)

    def ctx() -> Context:
        node = {"partition-id": 0, "declared-size": 500}
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})

    app = build_client_app(cfg.to_flat(), key=key, state_dir=str(tmp_path / "state"), **site_keys())
    with pytest.raises(Exception) as deployed:
        app(msg, ctx())
    with pytest.raises(ClientAppException) as simulated:
        VirtualClientEngineActor().run(lambda: app, msg, "0", ctx())
    return [
        str(type(deployed.value)) + ":<'" + str(deployed.value) + "'>",
        "".join(traceback.format_exception(simulated.value)),
    ]


def _corrupt_ratings(tmp_path, tag: str, bad_row: str | None = None, bad_user: str | None = None):
    """A valid ratings file (and users file) of 30 users, with one bad row or user line planted."""
    ratings = ["user,item,rating"] + [f"u{u},i{u % 7},{1 + u % 5}" for u in range(30)]
    users = ["user,gender,age,zip"] + [f"u{u},F,{20 + u},10001" for u in range(30)]
    if bad_row is not None:
        ratings.insert(12, bad_row)  # file line 13
    if bad_user is not None:
        users.insert(4, bad_user)  # file line 5
    folder = tmp_path / f"site-{tag}-data"
    folder.mkdir()
    (folder / "ratings.csv").write_text("\n".join(ratings) + "\n")
    (folder / "users.csv").write_text("\n".join(users) + "\n")
    return folder


@pytest.mark.parametrize(
    "case, expected, needles",
    [
        ("name-in-age", "(users file, line 5, column age)", ["Jane Doe", "Jane"]),
        ("bad-rating", "(ratings file, line 13, column rating)", ["98.7654"]),
        ("raw-id-in-bad-row", "(ratings file, line 13, column rating)", ["RAWID-"]),
        ("raw-id-in-short-row", "(ratings file, line 13)", ["RAWID-"]),
    ],
)
def test_a_corrupt_ratings_file_reaches_the_server_as_code_role_and_line_only(tmp_path, case, expected, needles):
    tag = secrets.token_hex(4)
    raw = f"RAWID-{tag}-77"
    rows = {
        "name-in-age": (None, "u99,F,Jane Doe,10001"),
        "bad-rating": (f"u5,i3,98.7654{tag}", None),
        "raw-id-in-bad-row": (f"{raw},i3,five", None),
        "raw-id-in-short-row": (f"{raw},i3", None),
    }[case]
    folder = _corrupt_ratings(tmp_path, tag, *rows)
    overrides = [
        "data.source=csv",
        f"data.path={folder / 'ratings.csv'}",
        f"data.users-path={folder / 'users.csv'}",
        "data.partition=iid",
        "recsys.num-buckets=512",
    ]
    key = load_key(write_key(tmp_path / "fed.key"))
    code = "E-DATA-FORMAT" if case == "raw-id-in-short-row" else "E-DATA-PARSE"
    for reason in _corrupt_site_reasons(tmp_path, "recsys-synthetic", overrides, key):
        assert f"site failed: DataError [{code}] {expected}" in reason, reason[-400:]
        for needle in [*needles, raw, tag, str(tmp_path), folder.name, "ratings.csv", "users.csv"]:
            assert needle not in reason, f"{needle!r} reached the server"


def test_a_truncated_image_archive_reaches_the_server_as_code_and_role_only(tmp_path):
    folder = tmp_path / f"site-{secrets.token_hex(4)}-images"
    folder.mkdir()
    good = folder / "good.npz"
    np.savez(good, x=np.random.default_rng(0).random((40, 64)).astype(np.float32), y=np.zeros(40, np.int64))
    truncated = folder / "images.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    overrides = [
        "data.source=npz",
        f"data.path={truncated}",
        "data.partition=iid",
        "vae.hidden-dim=16",
        "vae.latent-dim=2",
    ]
    for reason in _corrupt_site_reasons(tmp_path, "vae-digits", overrides, None):
        assert "site failed: DataError [E-DATA-FORMAT] (image archive)" in reason, reason[-400:]
        for needle in [str(tmp_path), folder.name, "images.npz", "BadZipFile"]:
            assert needle not in reason, f"{needle!r} reached the server"
