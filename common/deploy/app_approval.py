"""Which app a site runs: a pin by the app's hash, approved by the site, signed by the coordinator.

A Flower run carries its code: the FAB (Flower App Bundle) that ``flwr run`` builds from the
coordinator's checkout, and every SuperNode runs the ClientApp inside it. Flower's own guard
(``flower-supernode --trusted-entities``) accepts a FAB only when the SuperLink attaches
``valid_license`` verification data, which only Flower's hosted platform supplies: with the
open-source SuperLink it refuses every app, approved or not. So privfed pins by hash instead:

* the coordinator builds the FAB (deterministically: Flower fixes its zip timestamps) and
  signs its SHA-256 with its Ed25519 key (``privfed app sign``);
* each site checks that signature against the coordinator's public key it already holds
  (``server-key``), and, when it has reviewed the same source itself, that its own build
  of that source gives the same hash; then it adds the hash to its site config's
  ``approved-apps`` (``privfed site approve``);
* at run time the site's own SuperExec (client.supervisor) hashes the FAB it actually
  received and starts the ClientApp only when that hash is approved. Anything else (an
  unsigned app, an altered one, a different version) is refused before its code is
  unpacked, let alone imported.

The signature proves the app is the one the coordinator means to run; the site's approval
is the site's own decision, which the coordinator cannot make for it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from common.deploy.signing import Ed25519PrivateKey, sign, verify
from common.errors import PrivfedError

APPROVED_APPS = "approved-apps"
_HASH = re.compile(r"[0-9a-f]{64}")


class AppApprovalError(PrivfedError):
    """An app hash, signature or approval that does not check out; the message names which."""


def approval_claim(fab_hash: str) -> dict[str, str]:
    """What the coordinator signs: the FAB's SHA-256, tagged so no other signature can stand in."""
    return {"kind": "privfed-app", "fab-hash": fab_hash}


def _app_files(root: Path) -> dict[str, Path]:
    """Flower's ``collect_files`` without descending into ignored folders.

    Flower walks every file under the app folder (a checkout's ``.venv`` alone is ~45,000
    files, ~7 s) and drops the ignored ones afterwards. Pruning a folder that .gitignore or
    Flower's publish rules exclude as a whole drops exactly the files Flower would drop, and
    Flower's own filter still runs on the rest (``build_fab_from_files``), so the FAB is the
    same bytes; tests/unit/test_app_approval.py checks it against ``build_fab_from_disk``.
    """
    import os

    from flwr.cli.utils import APP_PUBLISH_EXCLUDE_PATTERNS, build_pathspec, load_gitignore_patterns

    ignore = root / ".gitignore"
    patterns = ignore.read_text(errors="replace").splitlines() if ignore.is_file() else []
    if any(p.strip().startswith("!") for p in patterns):
        # A negation can re-include a file inside an ignored folder, which Flower (filtering
        # file by file) keeps: no pruning then, Flower's own walk.
        from flwr.cli.utils import collect_files

        return collect_files(root)
    specs = [
        build_pathspec(tuple(load_gitignore_patterns(ignore.read_bytes() if ignore.is_file() else b""))),
        build_pathspec(APP_PUBLISH_EXCLUDE_PATTERNS),
    ]
    resolved = root.resolve()
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not any(s.match_file(f"{prefix}{d}/") for s in specs)]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.resolve().is_relative_to(resolved):
                continue  # as Flower's collect_files
            files[f"{prefix}{name}"] = path
    return files


def build_fab(app_dir: str | Path) -> bytes:
    """The FAB ``flwr run APP_DIR`` submits, byte for byte (Flower's own builder, deterministic)."""
    from flwr.cli.build import build_fab_from_files

    folder = Path(app_dir).expanduser()
    if not (folder / "pyproject.toml").is_file():
        raise AppApprovalError(f"app folder '{folder}': no pyproject.toml (pass the privfed checkout)")
    return build_fab_from_files(_app_files(folder))[0]


def fab_hash_of(content: bytes) -> str:
    """A FAB's identity: the SHA-256 of its bytes, as Flower computes it."""
    return hashlib.sha256(content).hexdigest()


def check_hash(value: str, what: str = "fab hash") -> str:
    value = value.strip().lower()
    if not _HASH.fullmatch(value):
        raise AppApprovalError(f"{what}: must be a SHA-256 as 64 hex digits")
    return value


def sign_app(key: Ed25519PrivateKey, fab_hash: str) -> str:
    """The coordinator's signature (128 hex) over :func:`approval_claim`."""
    return sign(key, approval_claim(check_hash(fab_hash)))


def check_signature(server_key: str, fab_hash: str, signature: str) -> None:
    """Refuse a signature that is not the coordinator's over this hash."""
    if not verify(server_key, approval_claim(check_hash(fab_hash)), signature.strip().lower()):
        raise AppApprovalError(
            "--signature: not the coordinator's signature of this app hash (check server-key, the hash and the "
            "signature `privfed app sign` printed)"
        )


def parse_approved(text: str) -> tuple[str, ...]:
    """The site config's ``approved-apps``: comma-separated hashes, each checked."""
    return tuple(check_hash(h, APPROVED_APPS) for h in text.split(",") if h.strip())


def add_approved(text: str, fab_hash: str) -> str:
    """``approved-apps`` with ``fab_hash`` added (once; order kept)."""
    current = list(parse_approved(text))
    h = check_hash(fab_hash)
    if h not in current:
        current.append(h)
    return ",".join(current)
