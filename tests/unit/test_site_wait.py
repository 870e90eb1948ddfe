"""The run's wait for its sites before round 1 (server/workflow.py, RoundLoop._wait_for_sites)."""

from __future__ import annotations

from types import SimpleNamespace

from server.workflow import RoundLoop


class _Sites:
    """A client manager whose 3 sites are all there after ``connect_after`` questions; ``wait_for`` must not be used:
    it wakes only when Flower's refresh thread registers a node, every 5 s (the bug: every
    run lost 5 s before round 1 with all its sites long connected)."""

    def __init__(self, connect_after: int | None) -> None:
        self.asked = 0
        self.connect_after = connect_after

    def num_available(self) -> int:
        self.asked += 1
        return 3 if self.connect_after is not None and self.asked > self.connect_after else 0

    def wait_for(self, *args, **kwargs):
        raise AssertionError("waited on Flower's 5 s refresh instead of asking the grid")


def _loop(seconds: float) -> RoundLoop:
    return RoundLoop(round_outcome=None, record_round=None, num_sites=3, site_wait_seconds=seconds)  # type: ignore[arg-type]


def test_the_run_asks_for_its_sites_until_they_are_all_there():
    sites = _Sites(connect_after=2)
    assert _loop(30.0)._wait_for_sites(SimpleNamespace(client_manager=sites))  # type: ignore[arg-type]
    assert sites.asked == 3  # asked again until every site was there, then no more


def test_missing_sites_end_the_wait_after_site_wait_seconds():
    sites = _Sites(connect_after=None)
    assert not _loop(0.3)._wait_for_sites(SimpleNamespace(client_manager=sites))  # type: ignore[arg-type]
    assert sites.asked >= 2
