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
    # The new run folder's entry first (its parent fsync'ed), then the file, then its folder.
    assert fsynced == ["dir", "file", "dir"]
    assert load_state(path).history == [(1, 1.1, 0.05, 20)]
    fsynced.clear()
    save_state(path, SiteState([(1, 1.1, 0.05, 20), (2, 1.1, 0.05, 20)]))
    assert fsynced == ["file", "dir"]


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


def test_the_eval_classifier_is_written_durably_under_a_unique_temp_name(tmp_path, fsynced, monkeypatch):
    """It was written with torch.save to a fixed "eval-classifier.pt.tmp", then renamed, with no
    fsync: two writers (two runs resumed at once, a retried ServerApp) wrote into one temp file,
    and a power loss could leave a torn or vanished classifier."""
    import torch

    from common.metrics import image_quality

    x, y = torch.randn(32, 8), torch.arange(32) % 3
    path = tmp_path / "eval-classifier.pt"
    temps: list[str] = []
    real_replace = os.replace

    def spy_replace(src, dst):
        temps.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(image_quality, "train_classifier", lambda x, y, k, seed=0: image_quality.EvalClassifier(8, k))
    image_quality.cached_classifier(path, x, y, 3)
    path.unlink()
    image_quality.cached_classifier(path, x, y, 3)
    assert fsynced == ["file", "dir", "file", "dir"]  # the temp file, then the folder after the rename
    assert len(temps) == 2 and temps[0] != temps[1]  # a fresh temp name per writer
    assert all(t.startswith(".eval-classifier-") and t.endswith(".tmp") for t in temps)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval-classifier.pt"]  # no temp left behind
    loaded = image_quality.cached_classifier(path, x, y, 3)
    assert isinstance(loaded, image_quality.EvalClassifier)


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    from common.deploy.fileio import write_atomically

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"old")

    def broken(fh) -> None:
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomically(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_repairing_metrics_truncates_in_place_and_fsyncs(tmp_path, fsynced):
    """A resume cut a torn last line by rewriting the whole file (write_bytes empties it
    first): a crash meanwhile lost every line, and with them each round's ledger head."""
    from server.resume import repair_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"round": 1}\n{"round": 2}\n{"rou')
    inode = path.stat().st_ino
    repair_metrics(path)
    assert path.read_bytes() == b'{"round": 1}\n{"round": 2}\n'
    assert path.stat().st_ino == inode and fsynced == ["file"]
