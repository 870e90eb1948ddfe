"""Issue 20, finding 3: what a site's failure tells the coordinator is a code, the file's role
and a line or column; never a field value or a local path (those stay in the site's log)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from client.mods import failure_text
from common.data.arrays import load_npz_images
from common.data.ratings import load_movielens, load_ratings_csv
from common.deploy.keys import Pseudonymizer
from common.errors import ERROR_CODES, ConfigError, DataError, PrivfedError, error_code
from common.pipeline.stages.faults import InjectedDropout

KEY = b"k" * 32
RANGE = (1.0, 5.0)


def test_every_class_a_site_raises_has_its_code():
    from client.app import InjectedCrash, ReceiptContradiction, ReceiptRefused, RoundReplayed
    from common.deploy.keys import KeyFileError
    from common.deploy.site_config import PolicyRefusal

    cases = {
        ConfigError("dp.delta", "x"): "E-CONFIG",
        PolicyRefusal("dp.delta", "x"): "E-POLICY",
        DataError("/p", "x"): "E-DATA-FORMAT",
        DataError("/p", "x", code=DataError.PARSE): "E-DATA-PARSE",
        DataError("/p", "x", code=DataError.MISSING): "E-DATA-MISSING",
        KeyFileError("/p", "x"): "E-KEY",
        ReceiptRefused("x"): "E-RECEIPT",
        ReceiptContradiction("x"): "E-RECEIPT",
        RoundReplayed("x"): "E-REPLAY",
        InjectedDropout("x"): "E-FAULT",
        InjectedCrash("x"): "E-FAULT",
        PrivfedError("x"): "E-SITE",
        ValueError("x"): "E-INTERNAL",
    }
    for exc, code in cases.items():
        assert error_code(exc) == code, type(exc).__name__
        assert code in ERROR_CODES
    assert error_code(OSError(2, "x")) == "E-INTERNAL"  # a foreign exception's own `code` is not trusted


def test_a_data_error_may_only_carry_a_data_code():
    with pytest.raises(ValueError):
        DataError("/p", "x", code="E-CONFIG")


def test_the_reason_is_built_from_the_public_fields_only(tmp_path):
    secret = tmp_path / "hospital-7" / "users.csv"
    exc = DataError(secret, "line 2: age 'Jane Doe'", role="users file", line=2, column="age", code=DataError.PARSE)
    assert str(secret) in str(exc)  # the site's own log keeps the path
    assert failure_text(exc) == "site failed: DataError [E-DATA-PARSE] (users file, line 2, column age)"
    # A role or column that is not a plain short name is dropped, not sent.
    odd = DataError(secret, "x", role=str(secret), line=True, column="Jane Doe's age, 41")  # type: ignore[arg-type]
    assert failure_text(odd) == "site failed: DataError [E-DATA-FORMAT] (data file)"
    assert (
        failure_text(ConfigError("dp.delta", "is 0.3")) == "site failed: ConfigError [E-CONFIG] (config key 'dp.delta')"
    )
    assert failure_text(KeyError("user-17")) == "site failed: KeyError [E-INTERNAL]"


def _csv(path, text):
    path.write_text(text)
    return path


def _fails(load) -> DataError:
    with pytest.raises(DataError) as info:
        load()
    return info.value


# (what the file holds, the role, line, column, code, the value that must not leave)
RATINGS_CASES = [
    ("user,item,rating\nLEAK-u1,i1,4\nLEAK-u2,i2,4.5x\n", 3, "rating", "E-DATA-PARSE", "4.5x"),
    ("user,item,rating\nLEAK-u1,i1,4\nLEAK-u2,i2,70\n", 3, "rating", "E-DATA-PARSE", "70"),
    ("user,item,rating\nLEAK-u1,i1,4\nLEAK-u2,,4\n", 3, "item", "E-DATA-PARSE", "LEAK-u2"),
    ("user,item\nLEAK-u1,i1\n", 1, "rating", "E-DATA-FORMAT", "LEAK-u1"),
    ("user,item,rating\nLEAK-u1,i1\n", 2, None, "E-DATA-FORMAT", "LEAK-u1"),
]


@pytest.mark.parametrize("text, line, column, code, value", RATINGS_CASES)
def test_a_corrupt_ratings_file_names_role_line_and_column(tmp_path, text, line, column, code, value):
    p = _csv(tmp_path / "ratings.csv", text)
    exc = _fails(lambda: load_ratings_csv(p, Pseudonymizer(KEY), 64, RANGE))
    assert (exc.role, exc.line, exc.column, error_code(exc)) == ("ratings file", line, column, code)
    sent = failure_text(exc)
    assert sent.startswith(f"site failed: DataError [{code}] (ratings file, line {line}")
    assert value not in sent and str(tmp_path) not in sent and "ratings.csv" not in sent
    assert value not in str(exc).replace(str(p), "")  # not even in the site's log


def test_a_users_file_with_a_name_in_the_age_column(tmp_path):
    p = _csv(tmp_path / "ratings.csv", "user,item,rating\nu1,i1,4\n")
    u = _csv(tmp_path / "users.csv", "user,gender,age\nu1,F,Jane Doe\n")
    exc = _fails(lambda: load_ratings_csv(p, Pseudonymizer(KEY), 64, RANGE, u))
    assert failure_text(exc) == "site failed: DataError [E-DATA-PARSE] (users file, line 2, column age)"
    assert "Jane" not in str(exc) and str(u) in str(exc)


@pytest.mark.parametrize("which", ["missing", "empty"])
def test_a_missing_or_empty_file_is_e_data_missing(tmp_path, which):
    p = tmp_path / "ratings.csv"
    if which == "empty":
        p.write_text("")
    exc = _fails(lambda: load_ratings_csv(p, Pseudonymizer(KEY), 64, RANGE))
    assert failure_text(exc) == "site failed: DataError [E-DATA-MISSING] (ratings file)"


def test_movielens_files_have_their_roles(tmp_path):
    exc = _fails(lambda: load_movielens(tmp_path / "nope", Pseudonymizer(KEY), 64, RANGE))
    assert failure_text(exc) == "site failed: DataError [E-DATA-MISSING] (MovieLens folder)"
    (tmp_path / "u.data").write_text("1\t2\t3\t4\n")
    (tmp_path / "u.user").write_text("1|200|F|other|12345\n")
    exc = _fails(lambda: load_movielens(tmp_path, Pseudonymizer(KEY), 64, RANGE))
    assert failure_text(exc) == "site failed: DataError [E-DATA-PARSE] (users file, line 1, column age)"
    assert "200" not in str(exc).replace(str(tmp_path), "")
    (tmp_path / "u.user").write_bytes(b"1|30|F|other|\xff\xfe\n")
    exc = _fails(lambda: load_movielens(tmp_path, Pseudonymizer(KEY), 64, RANGE))
    assert failure_text(exc) == "site failed: DataError [E-DATA-FORMAT] (users file)"


def test_a_corrupt_image_archive_names_its_role_and_array(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.default_rng(0).random((20, 4)).astype(np.float32), y=np.zeros(20, np.int64))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    exc = _fails(lambda: load_npz_images(truncated))
    assert failure_text(exc) == "site failed: DataError [E-DATA-FORMAT] (image archive)"
    loud = tmp_path / "loud.npz"
    np.savez(loud, x=np.full((3, 2), 37.25, np.float32))
    exc = _fails(lambda: load_npz_images(loud))
    assert failure_text(exc) == "site failed: DataError [E-DATA-PARSE] (image archive, column x)"
    assert "37.25" not in str(exc)  # the data is not echoed, even locally
    labels = tmp_path / "labels.npz"
    with zipfile.ZipFile(labels, "w") as z:
        z.writestr("x.npy", good.read_bytes()[:0])
    exc = _fails(lambda: load_npz_images(labels))
    assert error_code(exc).startswith("E-DATA-") and str(tmp_path) not in failure_text(exc)
