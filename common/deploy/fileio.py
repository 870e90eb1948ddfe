"""Writing files that must survive a crash, or stay private, safely.

Secret files are created with their final mode, never through a symlink, never replacing
an existing file unless asked to. Every atomic replace fsyncs the file, then its folder.
Private folders (run directories, a site's state) are 0700 and private files 0600 whatever
the process umask: the mode is set with chmod after the create, not left to the umask.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def write_text_atomically(path: Path, text: str, mode: int = PRIVATE_FILE) -> None:
    """:func:`write_atomically` for UTF-8 text (config.toml, summary.md, a registry copy)."""
    data = text.encode("utf-8")
    write_atomically(path, lambda fh: fh.write(data), mode)


def make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents as 0700 folders, whatever the umask.

    ``os.mkdir`` with mode 0700 is never wider than 0700 under any umask, and the chmod
    after it makes it exactly 0700 (a umask such as 0o277 would otherwise leave it
    unusable). Folders that already exist are left as they are, but for ``path`` itself,
    which is made 0700 too: a run directory or a site's state folder is this program's
    own, and the ledger, keys and state inside it are no one else's business.
    """
    path = Path(path)
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_DIR)
        except FileExistsError:  # a racing creator: still ours to lock down below
            pass
        os.chmod(folder, PRIVATE_DIR)
        fsync_dir(folder.parent)  # the new folder's entry survives a crash, like the files in it
    if path.is_dir() and not missing:
        os.chmod(path, PRIVATE_DIR)


def create_private_file(path: Path) -> None:
    """Make sure ``path`` exists with mode 0600 before another library opens it (SQLite,
    ``open(.., "a")``), which would create it with 0666 minus the umask. SQLite gives its
    journal files the database file's mode, so they are 0600 too. Never follows a symlink."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable: POSIX persists a directory entry only
    when the directory itself is fsync'ed, so without this a power loss right after an
    atomic replace can bring back the old file (for a site's state: a history without its
    last round, which would under-count its epsilon)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, path: Path) -> None:
    """``os.replace(tmp, path)``, then fsync the folder so the new entry survives a crash."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_atomically(path: Path, write: Callable[[IO[bytes]], object], mode: int = PRIVATE_FILE) -> None:
    """Replace ``path`` all at once: ``write`` fills a fresh temp file in the same folder,
    which is fsync'ed and renamed over ``path``, and the folder is fsync'ed. A crash at
    any point leaves the old file or the new one, never a torn one.

    The temp file's name is unique (:func:`tempfile.mkstemp`), so two writers of the same
    path never write into one file; the last rename wins, whole. The file gets ``mode``
    (default 0600) exactly, whatever the umask."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_new_file(path: Path, data: bytes, mode: int, force: bool = False) -> None:
    """Write ``data`` to ``path`` atomically with ``mode``.

    The content goes to a fresh, randomly named temp file opened with O_EXCL|O_NOFOLLOW
    (so a planted file or symlink cannot be reused), is fsync'ed, and is then linked into
    place: ``os.link`` fails if ``path`` exists, so without ``force`` nothing is ever
    overwritten, even by a racing writer. With ``force`` the rename replaces it.
    Raises FileExistsError when ``path`` exists and not ``force``.
    """
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            replace_durably(tmp, path)
        else:
            os.link(tmp, path)
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
