"""Tabular data: the schema, the CSV loader's checks (one line: file, column, line; never a value),
identifiers, the person key, the encoding, the partitions and the keyed split. Records are generated here."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.tabular import (
    Layout,
    by_column,
    decode_numeric,
    encode_numeric,
    federate_table,
    load_table,
    site_split,
)
from common.data.tabular_schema import load_schema, propose_schema, slug
from common.errors import DataError

# Distinctive values: an error message must never contain them.
SECRET_NAME = "Zebulon-Quartermaine"
SECRET_JOB = "Xylophonist-Unlisted"

SCHEMA = """
[columns.id]
role = "identifier"

[columns.name]
role = "identifier"
{person}
[columns.age]
role = "numeric"
bins = [18, 30, 45, 65, 90]
integer = true

[columns.score]
role = "numeric"
bins = [0.0, 0.5, 1.0]
not-identifier = true

[columns.job]
role = "categorical"
categories = ["clerk", "nurse", "driver", "teacher"]

[columns.sex]
role = "sensitive"
categories = ["F", "M"]

[columns.region]
role = "categorical"
categories = ["north", "south", "east", "west", "centre"]

[columns.income]
role = "label"
categories = ["low", "high"]
positive = "high"
"""

PERSON = """
[columns.pid]
role = "person-key"
"""

HEADER = ["id", "name", "age", "score", "job", "sex", "region", "income"]


def generated_rows(n: int, seed: int = 0, persons: int = 0) -> list[dict[str, str]]:
    """Rows whose label depends on age, job and sex (so a classifier has something to learn)."""
    rng = np.random.default_rng(seed)
    jobs, regions = ["clerk", "nurse", "driver", "teacher"], ["north", "south", "east", "west", "centre"]
    rows = []
    for i in range(n):
        age = int(rng.integers(18, 91))
        job = jobs[int(rng.integers(0, 4))]
        sex = "M" if rng.random() < 0.6 else "F"
        logit = -2.0 + 0.05 * (age - 40) + (1.0 if job == "teacher" else 0.0) + (0.8 if sex == "M" else 0.0)
        high = rng.random() < 1 / (1 + np.exp(-logit))
        row = {
            "id": f"R{100000 + i}",
            "name": f"person {i}",
            "age": str(age),
            "score": f"{rng.random():.6f}",
            "job": job,
            "sex": sex,
            "region": regions[int(rng.integers(0, 5))],
            "income": "high" if high else "low",
        }
        if persons:
            row["pid"] = f"P{int(rng.integers(0, persons))}"
        rows.append(row)
    return rows


def write_table(
    folder: Path,
    rows: list[dict[str, str]],
    schema: str | None = None,
    header: list[str] | None = None,
    name: str = "table.csv",
) -> tuple[Path, Path]:
    """A CSV and its schema file in ``folder``; returns (csv path, schema path)."""
    person = "pid" in rows[0] if rows else False
    header = header or (HEADER + (["pid"] if person else []))
    data = folder / name
    with data.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow([r.get(h, "") for h in header])
    schema_path = folder / f"{name}.schema.toml"
    schema_path.write_text(schema if schema is not None else SCHEMA.format(person=PERSON if person else ""))
    return data, schema_path


def load(folder: Path, rows: list[dict[str, str]], key: bytes | None = None, **kw):  # noqa: ANN201
    data, schema = write_table(folder, rows, **kw)
    return load_table(data, load_schema(schema), key)


def assert_one_line(exc: DataError, *, column: str | None, line: int | None, secrets: tuple[str, ...] = ()) -> None:
    text = str(exc)
    assert "\n" not in text
    assert exc.column == column
    assert exc.line == line
    if column:
        assert f"column {column}" in exc.public_location()
    if line:
        assert f"line {line}" in exc.public_location()
    for s in (SECRET_NAME, SECRET_JOB, *secrets):
        assert s not in text and s not in exc.public_location()


# ------------------------------------------------------------------ good input


def test_load_encodes_every_row_and_drops_identifiers(tmp_path):
    rows = generated_rows(300)
    rows[5]["name"] = SECRET_NAME
    table = load(tmp_path, rows)
    assert len(table) == 300 and table.person is None
    layout = table.layout
    # Only the modelled columns are encoded: no slot for id or name.
    assert set(layout.slots()) == {"age", "score", "job", "region", "sex"}
    assert table.x.shape == (300, layout.width) and layout.width == 2 + 2 + 1 + 1 + 1
    assert table.y.tolist() == [int(r["income"] == "high") for r in rows]
    # Decoding gives back the exact values.
    slots = layout.slots()
    ages = decode_numeric(
        layout.schema.column("age"), table.x[:, slots["age"]].numpy(), table.x[:, slots["age"] + 1].numpy()
    )
    assert ages.tolist() == [float(r["age"]) for r in rows]


def test_numeric_encoding_is_exact_and_the_top_edge_is_in_the_last_bin(tmp_path):
    col = load_schema(write_table(tmp_path, generated_rows(1))[1]).column("age")
    for v in (18.0, 29.0, 30.0, 44.5, 89.0, 90.0):
        k, u = encode_numeric(col, v)
        assert 0 <= k < len(col.bins) - 1 and 0.0 <= u <= 1.0
        assert float(decode_numeric(col, np.array([k]), np.array([u]))[0]) == pytest.approx(round(v))
    assert encode_numeric(col, 90.0) == (3, 1.0)


def test_person_key_is_pseudonymised_with_the_federation_key(tmp_path):
    rows = generated_rows(200, persons=40)
    key_a, key_b = b"a" * 32, b"b" * 32
    ta = load(tmp_path, rows, key_a)
    tb = load(tmp_path, rows, key_b)
    assert ta.person is not None and tb.person is not None
    # The same person gets the same index; raw ids never appear in the pseudonyms.
    pid = [r["pid"] for r in rows]
    for i in range(len(rows)):
        for j in range(i + 1, min(i + 30, len(rows))):
            assert (pid[i] == pid[j]) == bool(ta.person[i] == ta.person[j])
    assert len(ta.person_digest) == len(set(pid))
    assert all(p.encode() not in d for d in ta.person_digest for p in set(pid))
    assert set(ta.person_digest).isdisjoint(tb.person_digest)  # another key, other pseudonyms
    # Without the key (the server) the person key is not read at all.
    assert load(tmp_path, rows, None).person is None


def test_site_data_carries_local_person_indices_and_keeps_a_person_on_one_side(tmp_path):
    rows = generated_rows(400, persons=60)
    table = load(tmp_path, rows, b"k" * 32)
    train, val = site_split(table, np.arange(len(table)), 0.3, 10, b"s" * 32, "site 0")
    assert train.person is not None and val.person is not None
    assert int(train.person.max()) + 1 == len(torch.unique(train.person))
    # A person's rows are all on one side of the split.
    assert table.person is not None
    pos = {int(table.person[i]) for i in range(len(table))}
    assert len(pos) == len(table.person_digest)
    n_train, n_val = len(torch.unique(train.person)), len(torch.unique(val.person))
    assert n_train + n_val == len(table.person_digest)


def test_keyed_split_moves_no_other_record_when_one_is_removed(tmp_path):
    rows = generated_rows(300)
    table = load(tmp_path, rows)
    key = b"s" * 32
    tr, va = site_split(table, np.arange(300), 0.2, 10, key, "site 0")
    smaller = load(tmp_path, rows[:150] + rows[151:])
    tr2, va2 = site_split(smaller, np.arange(299), 0.2, 10, key, "site 0")

    def as_set(d):  # noqa: ANN001, ANN202
        return {tuple(r) + (int(y),) for r, y in zip(d.x.tolist(), d.y.tolist())}

    removed = as_set(table.data(np.array([150])))
    assert as_set(tr2) == as_set(tr) - removed and as_set(va2) == as_set(va) - removed


def test_partition_by_column_follows_the_declared_categories(tmp_path):
    table = load(tmp_path, generated_rows(500))
    parts = by_column(table, "region", 3, np.arange(500))
    slot = table.layout.slots()["region"]
    for s, part in enumerate(parts):
        assert len(part) > 0
        assert set((table.x[part, slot].long() % 3).tolist()) == {s}
    assert sorted(np.concatenate(parts).tolist()) == list(range(500))


def test_federate_dirichlet_and_column_give_disjoint_sites_and_a_test_split(tmp_path):
    table = load(tmp_path, generated_rows(800))
    for partition, column in (("dirichlet", ""), ("column", "region"), ("column:job", "")):
        split = federate_table(table, partition, column, 3, 7, 0.2, 0.15, 1.0, 10, None)
        total = len(split.test) + sum(len(t) + len(v) for t, v in split.sites)
        assert total == 800 and len(split.test) == 160


def test_shipped_adult_schema_loads():
    schema = load_schema(Path("common/tasks/tabular/adult_schema.toml"))
    assert schema.label.name == "Salary" and schema.label.positive == ">50K"
    assert [c.name for c in schema.sensitive] == ["sex", "race"]
    assert schema.column("fnlwgt").role == "keep"
    assert Layout(schema).cells() == 2 * 5 * 2
    assert slug("Amer-Indian-Eskimo") == "amer-indian-eskimo"


def test_propose_schema_marks_unique_columns_as_identifiers(tmp_path):
    data, _ = write_table(tmp_path, generated_rows(100))
    text = propose_schema(data, "income", ("sex",))
    assert '[columns.id]\nrole = "identifier"' in text
    assert '[columns.sex]\nrole = "sensitive"' in text
    assert '[columns.income]\nrole = "label"' in text


# ------------------------------------------------------------------ bad input: one line each


def test_missing_column(tmp_path):
    header = [h for h in HEADER if h != "job"]
    with pytest.raises(DataError) as exc:
        load(tmp_path, generated_rows(50), header=header)
    assert_one_line(exc.value, column="job", line=1)
    assert exc.value.code == DataError.FORMAT


def test_extra_column(tmp_path):
    rows = [{**r, "notes": "same"} for r in generated_rows(50)]
    with pytest.raises(DataError) as exc:
        load(tmp_path, rows, header=HEADER + ["notes"])
    assert_one_line(exc.value, column="notes", line=1)
    assert "not declared" in str(exc.value)


def test_value_of_the_wrong_type(tmp_path):
    rows = generated_rows(50)
    rows[9]["age"] = SECRET_NAME  # line 11: the header is line 1
    with pytest.raises(DataError) as exc:
        load(tmp_path, rows)
    assert_one_line(exc.value, column="age", line=11)
    assert exc.value.code == DataError.PARSE and "not a number" in str(exc.value)


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [
        ("job", SECRET_JOB, "not one of the declared categories"),
        ("age", "17", "outside the declared range"),
        ("age", "33.5", "not an integer"),
        ("score", "nan", "not a finite number"),
        ("income", "medium", "not one of the declared categories"),
    ],
)
def test_values_outside_the_declared_domain(tmp_path, column, value, why):
    rows = generated_rows(50)
    rows[2][column] = value
    with pytest.raises(DataError) as exc:
        load(tmp_path, rows)
    assert_one_line(exc.value, column=column, line=4, secrets=(value,) if len(value) > 4 else ())
    assert why in str(exc.value)


def test_wrong_field_count_names_the_line(tmp_path):
    data, schema = write_table(tmp_path, generated_rows(20))
    text = data.read_text().splitlines()
    text[6] += ",extra"
    data.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError) as exc:
        load_table(data, load_schema(schema), None)
    assert_one_line(exc.value, column=None, line=7)


def test_sensitive_attribute_with_a_single_group(tmp_path):
    # Declared with one group: the schema is refused.
    single = SCHEMA.format(person="").replace('categories = ["F", "M"]', 'categories = ["F"]')
    with pytest.raises(DataError) as exc:
        load(tmp_path, generated_rows(50), schema=single)
    assert_one_line(exc.value, column="sex", line=None)
    assert exc.value.role == "schema file" and "single" not in str(exc.value) and "1 group" in str(exc.value)
    # Declared with two, but the file holds one: the data is refused.
    rows = [{**r, "sex": "F"} for r in generated_rows(50)]
    with pytest.raises(DataError) as exc:
        load(tmp_path, rows)
    assert_one_line(exc.value, column="sex", line=None)
    assert "single group" in str(exc.value)


def test_undeclared_probable_identifier(tmp_path):
    rows = [{**r, "mrn": f"{SECRET_NAME}-{i}"} for i, r in enumerate(generated_rows(60))]
    with pytest.raises(DataError) as exc:
        load(tmp_path, rows, header=HEADER + ["mrn"])
    assert_one_line(exc.value, column="mrn", line=None)
    assert "probable identifier" in str(exc.value)


def test_declared_column_with_unique_values_needs_review(tmp_path):
    # score is continuous (unique per row): refused without not-identifier = true, loaded with it.
    unreviewed = SCHEMA.format(person="").replace("not-identifier = true\n", "")
    with pytest.raises(DataError) as exc:
        load(tmp_path, generated_rows(60), schema=unreviewed)
    assert_one_line(exc.value, column="score", line=None)
    assert len(load(tmp_path, generated_rows(60))) == 60


def test_empty_site(tmp_path):
    rows = [{**r, "region": "north" if i % 2 else "south"} for i, r in enumerate(generated_rows(200))]
    table = load(tmp_path, rows)
    # north = 0, south = 1: with 3 sites, site 2 (east, and nothing else) gets no row.
    with pytest.raises(DataError) as exc:
        by_column(table, "region", 3, np.arange(200))
    assert_one_line(exc.value, column="region", line=None)
    assert "site 2 gets no row" in str(exc.value)
    # A file with a header and no rows is refused too.
    with pytest.raises(DataError) as exc:
        load(tmp_path, [], header=HEADER)
    assert exc.value.code == DataError.MISSING


def test_label_with_one_class(tmp_path):
    rows = [{**r, "income": "low"} for r in generated_rows(50)]
    with pytest.raises(DataError) as exc:
        load(tmp_path, rows)
    assert_one_line(exc.value, column="income", line=None)
    assert "single class" in str(exc.value)


@pytest.mark.parametrize(
    ("old", "new", "column"),
    [
        ('role = "label"', 'role = "labels"', "income"),
        ("bins = [18, 30, 45, 65, 90]", "bins = [18, 45, 30, 90]", "age"),
        ('categories = ["low", "high"]', 'categories = ["low", "high", "mid"]', "income"),
        ('positive = "high"', 'positive = "top"', "income"),
        ('categories = ["clerk", "nurse", "driver", "teacher"]', 'categories = ["clerk", "clerk"]', "job"),
    ],
)
def test_bad_schema_names_the_column(tmp_path, old, new, column):
    text = SCHEMA.format(person="")
    assert old in text
    with pytest.raises(DataError) as exc:
        load(tmp_path, generated_rows(30), schema=text.replace(old, new))
    assert_one_line(exc.value, column=column, line=None)
    assert exc.value.role == "schema file"
