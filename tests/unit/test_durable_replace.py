"""Atomic replaces are durable: after the rename, the directory itself is fsync'ed.

Without it, a power loss just after a site saved its state can bring back the previous
file, a history without the round it just spent privacy on (issue 20, crash safety).
"""

from __future__ import annotations

import os
import stat

import pytest

from client.state import SiteState, load_state, save_state, state_path
from common.deploy.fileio import write_new_file


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """What each os.fsync call was given: 'dir' or 'file', in order."""
    calls: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_site_state_fsyncs_the_file_then_its_folder(tmp_path, fsynced):
    path = state_path(tmp_path, "run-1", "site-0")
    save_state(path, SiteState([(1, 1.1, 0.05, 20)]))
    assert fsynced == ["file", "dir"]
    assert load_state(path).history == [(1, 1.1, 0.05, 20)]


@pytest.mark.parametrize("force", [False, True])
def test_secret_files_fsync_their_folder_after_the_link_or_rename(tmp_path, fsynced, force):
    target = tmp_path / "key"
    if force:
        target.write_bytes(b"old")
    write_new_file(target, b"new", 0o600, force=force)
    assert fsynced == ["file", "dir"]
    assert target.read_bytes() == b"new"


def test_the_servers_checkpoint_fsyncs_its_folder(tmp_path, fsynced):
    from server.recorder import RunRecorder
    from tests.unit.test_gan import gan_task

    task = gan_task()
    recorder = RunRecorder(task.cfg, task, tmp_path / "run")
    fsynced.clear()  # the ledger's own fsyncs while the run dir is set up
    recorder.save_checkpoint(1)
    recorder.ledger.close()
    assert fsynced == ["file", "dir"]
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
