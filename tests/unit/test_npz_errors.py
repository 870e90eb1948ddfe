"""Issue 23, item 7: a file that is not an .npz fails with one line naming the file and what
is wrong, never numpy's advice to load it "unsafely" (allow_pickle runs the file's code)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from common.data.arrays import load_npz_images
from common.errors import DataError

SECRET = "4242.125"  # a value in the files: no message may repeat it


def _object_npz(path):
    npy = io.BytesIO()
    np.save(npy, np.array([{"a": float(SECRET)}, None], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", npy.getvalue())


def _pickled_npz_via_savez(path):
    np.savez(path, x=np.array([[0.5, float(SECRET)]], dtype=object))


def _zip_of_csv(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.csv", f"a,b\n1,{SECRET}\n")


CASES = {
    "csv": (lambda p: p.write_text(f"a,b\n1,{SECRET}\n"), "is text (a CSV or the like), so not an .npz archive"),
    "object-npz": (_object_npz, "member 'x' holds Python objects (an object array)"),
    "object-savez": (_pickled_npz_via_savez, "member 'x' holds Python objects (an object array)"),
    "random-bytes": (lambda p: p.write_bytes(bytes(range(256)) * 4), "is not a zip file, so not an .npz archive"),
    "empty": (lambda p: p.write_bytes(b""), "is empty, not an .npz archive"),
    "zip-not-npz": (_zip_of_csv, "is a zip file with no .npy array in it, not an .npz archive"),
    "damaged-zip": (lambda p: p.write_bytes(b"PK\x03\x04" + b"\x01" * 60), "is a damaged zip file"),
    "npy": (lambda p: np.save(p.open("wb"), np.full((2, 2), float(SECRET))), "is a single .npy array"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_file_that_is_not_an_npz_fails_with_one_clear_line(tmp_path, case):
    write, expected = CASES[case]
    p = tmp_path / "images.npz"
    write(p)
    with pytest.raises(DataError) as info:
        load_npz_images(p)
    msg = str(info.value)
    assert expected in msg and str(p) in msg
    assert "\n" not in msg
    assert "pickle" not in msg.lower() and "unsafe" not in msg.lower()  # numpy's advice, never ours
    assert SECRET not in msg


def test_the_cli_names_the_file_and_never_suggests_unsafe_loading(tmp_path, capsys):
    """The newcomer's case: a CSV given as data.path of an npz source, through the CLI."""
    from simulations.cli import main

    csv = tmp_path / "digits.csv"
    csv.write_text(f"a,b\n1,{SECRET}\n")
    assert main(["simulate", "vae-digits", "data.source=npz", f"data.path={csv}", "rounds=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(csv) in err and "not an .npz archive" in err
    assert "pickle" not in err.lower() and SECRET not in err


def test_a_valid_npz_still_loads(tmp_path):
    p = tmp_path / "images.npz"
    np.savez(p, x=np.zeros((3, 2, 2), dtype=np.uint8), y=np.arange(3))
    data = load_npz_images(p)
    assert tuple(data.x.shape) == (3, 4) and data.y is not None and data.y.tolist() == [0, 1, 2]
