"""Property test: any value for any key is either accepted or refused with a ConfigError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import RunConfig
from common.errors import ConfigError

KEYS = list(RunConfig.from_flat({}).to_flat())
VALUES = st.one_of(
    st.integers(min_value=-10**6, max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS + ["bogus", "dp.bogus", "x.y.z"]), VALUES, max_size=4))
def test_config_never_fails_with_anything_but_a_one_line_config_error(flat):
    try:
        cfg = RunConfig.from_flat(flat)
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg and exc.key in msg
    else:
        assert RunConfig.from_flat(cfg.to_flat()) == cfg


DATA_KEYS = ["num-sites", "data.alpha", "data.test-fraction", "data.val-fraction", "data.min-site-size",
             "train.batch-size", "train.local-epochs", "dp.delta", "dp.target-epsilon", "rounds", "data.partition"]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(DATA_KEYS), st.one_of(
    st.integers(min_value=-5, max_value=400), st.floats(min_value=-1, max_value=50), st.sampled_from(["iid", "dirichlet"])
), max_size=3))
def test_preflight_fails_only_with_one_line_privfed_errors(flat):
    """Everything checked before a run starts (data split, delta vs 1/n, target epsilon)."""
    from common.errors import PrivfedError
    from common.preflight import preflight

    try:
        preflight(RunConfig.from_flat(flat))
    except PrivfedError as exc:
        assert "\n" not in str(exc)
