"""Writing secret files safely: created with their final mode, never through a symlink,
never replacing an existing file unless asked to."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


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


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace ``path`` all at once: ``write`` fills a fresh temp file in the same folder,
    which is fsync'ed and renamed over ``path``, and the folder is fsync'ed. A crash at
    any point leaves the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")
    try:
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
