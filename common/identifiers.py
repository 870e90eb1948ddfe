"""The names that cross the trust boundary: site ids and run ids, each with one strict pattern.

A site id lands in the ledger, metrics.jsonl, file names and log lines; a run id names a
folder under every site's ``state-dir``. Both come from a party the other side does not
trust (a reply, the coordinator's run config), so each is checked against one pattern
here, on both sides, and refused otherwise. The patterns exclude path separators, dots
only names (``.``, ``..``), spaces, quotes and control characters, and bound the length.
"""

from __future__ import annotations

import re

# The ledger's pseudo-site for central-DP rows (common.privacy.client_level re-exports it); here,
# not there, so that reading an id does not import the accountants.
CENTRAL_SITE_ID = "all-sites"

SITE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Ids the ledger uses for itself: the client-level DP row, and the names it gives replies
# it cannot attribute (node-<id>).
RESERVED_SITE_IDS = (CENTRAL_SITE_ID,)
RESERVED_PREFIXES = ("node-",)


def site_id_problem(site_id: object) -> str:
    """Why ``site_id`` cannot name a site, or ''. Never repeats the value."""
    if not isinstance(site_id, str) or not SITE_ID_RE.fullmatch(site_id):
        return "a site id must be 1-64 letters, digits, '_' or '-', starting with a letter or digit"
    if site_id in RESERVED_SITE_IDS or site_id.startswith(RESERVED_PREFIXES):
        return f"site ids {', '.join(RESERVED_SITE_IDS)} and node-* are reserved for the ledger"
    return ""


def run_id_problem(run_id: object) -> str:
    """Why ``run_id`` cannot name a run (a folder under a site's state-dir), or ''."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id) or ".." in run_id:
        return "a run id must be 1-128 letters, digits, '_', '-' or '.', start with a letter or digit, and hold no '..'"
    return ""
