"""Property test: any value for any key is either accepted or refused with a ConfigError."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.config import RunConfig
from common.errors import ConfigError, PrivfedError

KEYS = list(RunConfig.from_flat({}).to_flat())
SCALARS = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
)
# Every type a TOML value can have (scenario files, `key=value` overrides): also dates,
# times, arrays and tables, which no key accepts.
VALUES = st.one_of(
    SCALARS,
    st.dates(),
    st.times(),
    st.datetimes(),
    st.lists(SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=4), SCALARS, max_size=2),
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


DATA_KEYS = [
    "num-sites",
    "data.alpha",
    "data.test-fraction",
    "data.val-fraction",
    "data.min-site-size",
    "train.batch-size",
    "train.local-epochs",
    "dp.delta",
    "dp.target-epsilon",
    "rounds",
    "data.partition",
]


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(DATA_KEYS),
        st.one_of(
            st.integers(min_value=-5, max_value=400),
            st.floats(min_value=-1, max_value=50),
            st.sampled_from(["iid", "dirichlet"]),
        ),
        max_size=3,
    )
)
def test_preflight_fails_only_with_one_line_privfed_errors(flat):
    """Everything checked before a run starts (data split, delta vs 1/n, target epsilon)."""
    from common.errors import PrivfedError
    from common.preflight import preflight

    try:
        preflight(RunConfig.from_flat(flat))
    except PrivfedError as exc:
        assert "\n" not in str(exc)


def _one_line(msg: str) -> bool:
    return len(msg.splitlines()) == 1


# `privfed simulate S key=value`: the value is read as a TOML literal, else taken as a bare word.
TOML_LITERALS = st.sampled_from(
    [
        "[1, 2]",
        "{a = 1}",
        "[]",
        "{}",
        "1979-05-27",
        "07:32:00",
        "1979-05-27T07:32:00Z",
        '"""a\nb"""',
        "'lit'",
        "0x1F",
        "0o17",
        "0b11",
        "1e400",
        "-inf",
        "+nan",
        "+1",
        "1_000",
        "true",
        "TRUE",
        "[",
        "{",
        '"open',
        "9" * 30,
        "1.",
        ".5",
        "1e",
        "",
        " ",
        "=",
        "a=b",
        "#",
        "1 # comment",
        '"\\u0000"',
        '"\\ud800"',
    ]
)
OVERRIDE_TEXT = st.one_of(
    st.tuples(
        st.sampled_from(KEYS + ["bogus", "dp.", ".", " rounds ", "dp..delta"]),
        st.one_of(TOML_LITERALS, st.text(max_size=10)),
    ).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.text(max_size=16),
)
LINE_BREAKS = {"\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


@settings(max_examples=150, deadline=None)
@given(st.lists(OVERRIDE_TEXT, min_size=1, max_size=3))
@example(["rounds=[1, 2]"])
@example(["seed=1979-05-27"])
@example(["dp.delta={a = 1}"])
@example(["a\nb=1"])
def test_override_text_is_accepted_or_refused_with_a_config_error(texts):
    """Anything typed after `privfed simulate S` resolves to a valid config or a ConfigError.

    An override's key is quoted verbatim, so a key with a line break gives a message with
    one; the CLI escapes it (tests/unit/test_data_fuzz.py checks what reaches stderr)."""
    from simulations.launcher import resolve

    try:
        cfg = resolve("vae-digits", texts)
    except ConfigError as exc:
        msg = str(exc)
        assert exc.key in msg
        if not any(c in LINE_BREAKS for t in texts for c in t):
            assert _one_line(msg), repr(msg)
    else:
        assert RunConfig.from_flat(cfg.to_flat()) == cfg


WIDE_INT = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # TOML's integer range
WIDE_KEYS = ["num-sites", "rounds", "seed", "train.batch-size", "data.min-site-size", "sample-every", "min-fit-sites"]


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(st.sampled_from(WIDE_KEYS), WIDE_INT, max_size=3),
    st.dictionaries(
        st.sampled_from(["train.local-epochs", "data.alpha", "dp.delta", "dp.noise-multiplier"]),
        st.one_of(st.floats(allow_nan=False), st.sampled_from([5e-324, 1e-300, 1e300, 1e-20, 0.1, 1000.0])),
        max_size=2,
    ),
)
@example({"rounds": 2**63 - 1}, {})
@example({"num-sites": 2**63 - 1}, {})
@example({"train.batch-size": 2**63 - 1}, {"train.local-epochs": 1e300})
def test_preflight_with_extreme_numbers_fails_only_with_one_line_privfed_errors(ints, floats):
    """Integers up to TOML's 64-bit limit and extreme floats: no overflow, no MemoryError."""
    from common.preflight import preflight

    try:
        cfg = RunConfig.from_flat({**ints, **floats})
    except ConfigError as exc:
        assert _one_line(str(exc))
        return
    try:
        preflight(cfg)
    except PrivfedError as exc:
        assert _one_line(str(exc)), repr(str(exc))


SCENARIO_TOML = st.one_of(
    st.binary(max_size=60),
    st.lists(
        st.tuples(
            st.sampled_from(["", "[federation]", "[dp]", "[data]", "[vae]", "[dp.deep]", "[bogus]", "[[federation]]"]),
            st.sampled_from(["extends", "description", "rounds", "federation", "dp", "noise-multiplier", "x"]),
            st.sampled_from(["1", '"vae-digits"', '"nope"', "[1]", "{a = 1}", "true", "1979-05-27", "", '"a\\nb"']),
        ),
        max_size=4,
    ).map(lambda lines: "\n".join(f"{table}\n{key} = {value}" for table, key, value in lines).encode()),
)


def _resolve_scenario_file(tmp_path, monkeypatch, raw: bytes):
    import simulations.launcher as launcher

    monkeypatch.setattr(launcher, "SCENARIO_DIR", tmp_path)
    (tmp_path / "vae-digits.toml").write_bytes(
        (launcher.Path(launcher.__file__).parent / "scenarios" / "vae-digits.toml").read_bytes()
    )
    (tmp_path / "fuzzed.toml").write_bytes(raw)
    return launcher.resolve("fuzzed")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SCENARIO_TOML)
@example(b'extends = "fuzzed"')
@example(b"extends = [1]")
@example(b"[dp]\ndeep = {a = 1}")
def test_a_scenario_file_resolves_or_fails_with_a_one_line_privfed_error(tmp_path, monkeypatch, raw):
    try:
        _resolve_scenario_file(tmp_path, monkeypatch, raw)
    except PrivfedError as exc:
        assert _one_line(str(exc)), repr(str(exc))


@pytest.mark.parametrize("raw", [b"federation = 1", b"\xff\xfe"], ids=["federation-not-a-table", "not-utf-8"])
def test_scenario_file_bugs_found_by_the_property_test(tmp_path, monkeypatch, raw):
    """Both used to escape `privfed simulate` as tracebacks (AttributeError, UnicodeDecodeError)."""
    with pytest.raises(PrivfedError) as info:
        _resolve_scenario_file(tmp_path, monkeypatch, raw)
    assert _one_line(str(info.value)) and "fuzzed.toml" in str(info.value)
