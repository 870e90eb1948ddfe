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
