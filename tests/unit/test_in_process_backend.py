"""``backend = "in-process"`` (simulations/in_process.py): the key, and Flower left as it was.

A whole run on it is tests/integration/test_end_to_end.py::test_seeded_runs_repeat_exactly,
which also checks that it gives the Ray run's numbers."""

from __future__ import annotations

import pytest
from flwr.server.superlink.fleet.vce.backend import raybackend

from common.config import RunConfig
from common.errors import ConfigError, PrivfedError
from simulations.in_process import sites_in_process


def test_the_key_takes_ray_or_in_process_and_names_itself_otherwise():
    assert RunConfig.from_flat({}).federation.backend == "ray"
    assert RunConfig.from_flat({"backend": "in-process"}).federation.backend == "in-process"
    with pytest.raises(ConfigError) as exc:
        RunConfig.from_flat({"backend": "threads"})
    assert "'backend'" in str(exc.value) and "\n" not in str(exc.value)


def test_flowers_backend_is_swapped_for_the_run_only_even_when_it_fails():
    ray = raybackend.RayBackend
    with sites_in_process():
        assert raybackend.RayBackend is not ray and raybackend.RayBackend.__name__ == "InProcessBackend"
    assert raybackend.RayBackend is ray
    with pytest.raises(RuntimeError), sites_in_process():
        raise RuntimeError("the run failed")
    assert raybackend.RayBackend is ray


def test_a_flower_without_the_ray_backend_is_refused(monkeypatch):
    monkeypatch.delattr(raybackend, "RayBackend")
    with pytest.raises(PrivfedError, match="in-process"), sites_in_process():
        pass
