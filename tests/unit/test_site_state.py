"""A site's state file stays under its own state-dir, whatever run id the coordinator sends."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client.state import state_path
from common.errors import PrivfedError


@pytest.mark.parametrize("run_id", ["..", ".", "...", "../..", "a/../../b", "/etc", "..\\..", "run/../../x"])
def test_a_hostile_run_id_never_names_a_file_outside_state_dir(tmp_path, run_id):
    root = (tmp_path / "state").resolve()
    try:
        path = state_path(root, run_id, "site-0")
    except PrivfedError as exc:
        assert "run-id" in str(exc) and "\n" not in str(exc)
        assert run_id not in str(exc).replace("'.' or '..'", "")  # the value is not echoed back
        return
    assert path.resolve().is_relative_to(root)
    assert path.parent.parent == root  # exactly <state-dir>/<run-id>/<site-id>.pt


@given(run_id=st.text(max_size=40), site_id=st.text(max_size=40))
def test_any_run_and_site_id_stays_inside_state_dir(tmp_path_factory, run_id, site_id):
    root = tmp_path_factory.getbasetemp().resolve() / "state"
    try:
        path = state_path(root, run_id, site_id)
    except PrivfedError:
        return
    assert path.resolve().is_relative_to(root)
    assert path.parent.parent == root
