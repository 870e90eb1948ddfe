"""Run directories and a site's state folders are 0700, the files in them 0600, whatever
the process umask (issue 20, finding 4: run directories, ledger included, were 0644).

Every folder and file here is made through the code path that makes it in a run.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from client.state import Lifetime, LifetimeEntry, SiteState, save_state, state_path
from common.deploy.fileio import make_private_dir, write_atomically
from server.ledger import Ledger


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(params=[0o022, 0o002, 0o000], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_the_servers_run_dir_and_its_files(tmp_path, umask):
    from server.recorder import RunRecorder
    from tests.unit.test_gan import gan_task

    task = gan_task()
    run = tmp_path / "runs" / "20250101-000000-x"  # runs/ does not exist yet either
    recorder = RunRecorder(task.cfg, task, run)
    recorder.save_checkpoint(1)
    recorder.ledger.close()
    assert mode(run) == 0o700 and mode(run.parent) == 0o700
    for name in ("ledger.sqlite", "config.toml", "metrics.jsonl", "checkpoint.pt"):
        assert mode(run / name) == 0o600, name


def test_a_resumed_run_dir_from_before_is_locked_down(tmp_path, umask):
    from server.recorder import RunRecorder
    from tests.unit.test_gan import gan_task

    task = gan_task()
    run = tmp_path / "old-run"
    RunRecorder(task.cfg, task, run).ledger.close()
    os.chmod(run, 0o755)
    os.chmod(run / "ledger.sqlite", 0o644)
    os.chmod(run / "metrics.jsonl", 0o644)
    RunRecorder(task.cfg, task, run, resume=True).ledger.close()
    assert mode(run) == 0o700
    assert mode(run / "ledger.sqlite") == 0o600 and mode(run / "metrics.jsonl") == 0o600


def test_the_ledgers_journal_has_the_ledgers_mode(tmp_path, umask):
    """SQLite makes its rollback journal with the database file's mode: while a round is
    being committed, ledger.sqlite-journal holds the pages it changes."""
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path, run_id="run")
    ledger.conn.execute("BEGIN IMMEDIATE")
    ledger.conn.execute("INSERT INTO meta VALUES ('probe', 'x')")
    journal = path.with_name("ledger.sqlite-journal")
    assert journal.is_file() and mode(journal) == 0o600
    ledger.conn.rollback()
    ledger.close()
    assert mode(path) == 0o600


def test_a_stale_side_file_is_locked_down_when_the_ledger_opens(tmp_path, umask):
    path = tmp_path / "ledger.sqlite"
    Ledger(path, run_id="run").close()
    wal = path.with_name("ledger.sqlite-wal")
    wal.write_bytes(b"")
    os.chmod(wal, 0o644)
    Ledger(path, run_id="run").close()
    assert mode(wal) == 0o600


def test_the_simulations_run_dir_keys_and_registry(tmp_path, umask):
    from common.deploy.simulation_ids import simulation_identities

    run = tmp_path / "runs" / "sim"
    ids = simulation_identities(run, [100, 120])
    assert mode(run) == 0o700 and mode(run / "keys") == 0o700
    assert mode(ids.server_key_path) == 0o600
    assert all(mode(run / "keys" / f"site-{i}.key") == 0o600 for i in range(2))
    assert mode(ids.registry_path) == 0o644  # public keys only


def test_a_sites_state_folders_and_files(tmp_path, umask):
    state_dir = tmp_path / "site-state"  # made by the site, not by its operator
    path = state_path(state_dir, "run-1", "site-0")
    save_state(path, SiteState([(1, 1.1, 0.05, 20)]))
    Lifetime(state_dir, "ds-1").record(LifetimeEntry("run-1", 1, 1.1, 0.05, 20, 1e-5, "rdp"))
    assert mode(state_dir) == 0o700 and mode(path.parent) == 0o700 and mode(state_dir / "datasets") == 0o700
    assert mode(path) == 0o600 and mode(state_dir / "datasets" / "ds-1.json") == 0o600


def test_a_receipt_written_like_the_client_writes_it_is_private(tmp_path, umask):
    """client/app.py keeps its receipts with write_atomically: 0600 whatever the umask."""
    folder = tmp_path / "state" / "receipts" / "run-1"
    make_private_dir(folder)
    receipt = folder / "site-0.json"
    write_atomically(receipt, lambda fh: fh.write(b"{}"))
    assert mode(receipt) == 0o600 and mode(folder) == 0o700 and mode(tmp_path / "state") == 0o700


def test_an_operators_existing_parent_folder_is_left_alone(tmp_path, umask):
    parent = tmp_path / "srv"
    parent.mkdir()
    os.chmod(parent, 0o755)
    make_private_dir(parent / "state")
    assert mode(parent) == 0o755 and mode(parent / "state") == 0o700
