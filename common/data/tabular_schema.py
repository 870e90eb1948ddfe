"""The schema of a tabular data file: each column's role and its declared, public domain.

A schema is a TOML file with one ``[columns.<name>]`` table per CSV column, in any order::

    [table]
    delimiter = ","                  # the CSV delimiter (spaces after it are ignored)

    [columns.age]
    role = "numeric"
    bins = [17, 25, 35, 45, 55, 65, 90]   # public bin edges: first = min, last = max
    integer = true

    [columns.sex]
    role = "sensitive"
    categories = ["Female", "Male"]

    [columns.income]
    role = "label"
    categories = ["<=50K", ">50K"]
    positive = ">50K"

    [columns.name]
    role = "identifier"                # dropped at load, never leaves the site

Roles: ``numeric``, ``categorical``, ``label`` (exactly one, two categories), ``sensitive``
(one or more, at least two declared groups each), ``person-key`` (at most one; HMAC'd with
the federation key, used only to group a person's rows for user-level DP), ``identifier``
(dropped at load) and ``keep`` (reviewed, held at the site, never modelled nor released).
``not-identifier = true`` on a modelled column says an operator reviewed it: its values may
be nearly unique per row (a continuous measurement) without it being an identifier.

**Privacy.** Everything the model and the metrics need about a column (the category list,
the numeric range and bin edges, hence the normalisation) comes from this file, written
from public documentation, never from the rows: computing them from the private data at
run time would release them outside DP. :func:`propose_schema` reads a file to *propose*
a schema for an operator to review; it is an operator tool, never called inside a run.
"""

from __future__ import annotations

import csv
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import DataError

SCHEMA_FILE = "schema file"
ROLES = ("numeric", "categorical", "label", "sensitive", "person-key", "identifier", "keep")
# Roles whose columns the generator models and releases (as synthetic values).
MODELLED = ("numeric", "categorical", "label", "sensitive")
# A column whose share of distinct values among the rows reaches this is a probable identifier.
IDENTIFIER_SHARE = 0.9
# ... judged only on at least this many rows (a handful of rows is unique by chance).
IDENTIFIER_MIN_ROWS = 20
_COLUMN_KEYS = {"role", "categories", "bins", "integer", "positive", "not-identifier"}
_SLUG = re.compile(r"[^a-z0-9]+")


def slug(name: str) -> str:
    """A group name as it appears inside metric keys: lowercase ``[a-z0-9-]`` (``Amer-Indian-Eskimo``
    -> ``amer-indian-eskimo``)."""
    return _SLUG.sub("-", name.lower()).strip("-") or "group"


@dataclass(frozen=True)
class Column:
    """One declared column. ``categories`` for categorical, label and sensitive columns;
    ``bins`` (ascending edges, first = min, last = max) for numeric ones."""

    name: str
    role: str
    categories: tuple[str, ...] = ()
    bins: tuple[float, ...] = ()
    integer: bool = False
    positive: str = ""
    not_identifier: bool = False

    @property
    def modelled(self) -> bool:
        return self.role in MODELLED

    @property
    def size(self) -> int:
        """Number of classes of the column's softmax head: categories, or numeric bins."""
        return len(self.bins) - 1 if self.role == "numeric" else len(self.categories)


@dataclass(frozen=True)
class Schema:
    """A parsed schema: the columns in declaration order, and the file it came from."""

    path: str
    columns: tuple[Column, ...]
    delimiter: str = ","

    def by_role(self, *roles: str) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.role in roles)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def label(self) -> Column:
        return self.by_role("label")[0]

    @property
    def sensitive(self) -> tuple[Column, ...]:
        return self.by_role("sensitive")

    @property
    def features(self) -> tuple[Column, ...]:
        """Modelled columns other than the label and the sensitive ones (the conditioning)."""
        return self.by_role("numeric", "categorical")

    @property
    def person_key(self) -> Column | None:
        keys = self.by_role("person-key")
        return keys[0] if keys else None


def _fail(path: Path, column: str | None, message: str) -> DataError:
    return DataError(path, message, role=SCHEMA_FILE, column=column)


def _column(path: Path, name: str, spec: Any) -> Column:
    if not isinstance(spec, dict):
        raise _fail(path, name, f"columns.{name} must be a table")
    unknown = sorted(set(spec) - _COLUMN_KEYS)
    if unknown:
        raise _fail(
            path, name, f"columns.{name}: unknown key {unknown[0]!r} (known: {', '.join(sorted(_COLUMN_KEYS))})"
        )
    role = spec.get("role")
    if role not in ROLES:
        raise _fail(path, name, f"columns.{name}.role must be one of {', '.join(ROLES)}")
    cats = spec.get("categories", [])
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise _fail(path, name, f"columns.{name}.categories must be a list of strings")
    cats = [c.strip() for c in cats]
    if len(set(cats)) != len(cats):
        raise _fail(path, name, f"columns.{name}.categories has a repeated entry")
    bins = spec.get("bins", [])
    if not isinstance(bins, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bins):
        raise _fail(path, name, f"columns.{name}.bins must be a list of numbers")
    col = Column(
        name=name,
        role=role,
        categories=tuple(cats),
        bins=tuple(float(b) for b in bins),
        integer=bool(spec.get("integer", False)),
        positive=str(spec.get("positive", "")).strip(),
        not_identifier=bool(spec.get("not-identifier", False)),
    )
    if role == "numeric":
        if cats:
            raise _fail(path, name, f"columns.{name}: a numeric column has bins, not categories")
        if len(bins) < 2 or any(not math.isfinite(b) for b in col.bins):
            raise _fail(path, name, f"columns.{name}.bins needs >= 2 finite edges (first = min, last = max)")
        if any(a >= b for a, b in zip(col.bins, col.bins[1:])):
            raise _fail(path, name, f"columns.{name}.bins must be strictly ascending")
    elif role in ("categorical", "label", "sensitive"):
        if bins:
            raise _fail(path, name, f"columns.{name}: a {role} column has categories, not bins")
        if role == "sensitive" and len(cats) < 2:
            raise _fail(path, name, f"sensitive attribute {name} declares {len(cats)} group(s); it needs >= 2")
        if role == "label" and len(cats) != 2:
            raise _fail(path, name, f"label {name} must declare exactly 2 categories (a binary label), has {len(cats)}")
        if len(cats) < 1:
            raise _fail(path, name, f"columns.{name}.categories must list the column's categories")
        if role == "label" and col.positive not in cats:
            raise _fail(path, name, f"columns.{name}.positive must be one of its declared categories")
        if role == "sensitive" and len({slug(c) for c in cats}) != len(cats):
            raise _fail(path, name, f"columns.{name}: two groups have the same slug (lowercase, [a-z0-9-])")
    return col


def load_schema(path: str | Path) -> Schema:
    """Parse and check a schema file; one-line DataError (role "schema file", the column) on any problem."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "not found", role=SCHEMA_FILE, code=DataError.MISSING)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DataError(p, f"not a readable TOML file ({type(exc).__name__})", role=SCHEMA_FILE) from None
    table = doc.get("table", {})
    if isinstance(table, dict) and table.get("draft", False) is not False:
        raise _fail(
            p,
            None,
            "is a draft from `privfed schema propose` (table.draft): its lists and ranges came from the private "
            "file; replace them by the public declaration, then delete the draft line",
        )
    delimiter = table.get("delimiter", ",") if isinstance(table, dict) else None
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise _fail(p, None, "table.delimiter must be one character")
    cols = doc.get("columns")
    if not isinstance(cols, dict) or not cols:
        raise _fail(p, None, "needs a [columns.<name>] table per CSV column")
    columns = tuple(_column(p, str(name).strip(), spec) for name, spec in cols.items())
    schema = Schema(str(p), columns, delimiter)
    if len(schema.by_role("label")) != 1:
        raise _fail(p, None, f'needs exactly one column with role = "label", has {len(schema.by_role("label"))}')
    if not schema.sensitive:
        raise _fail(p, None, 'needs at least one column with role = "sensitive"')
    if len(schema.by_role("person-key")) > 1:
        raise _fail(p, schema.by_role("person-key")[1].name, "declares more than one person-key column")
    _check_metric_keys(p, schema)
    return schema


def _check_metric_keys(p: Path, schema: Schema) -> None:
    """The evaluation sums' keys (``cm.<attr>.<group>.<cell>``, ``fair.<attr>...``) are made from
    the sensitive columns' and groups' slugs: two attributes with one slug would overwrite each
    other's counts, and a key the protocol refuses (over 64 characters, or too many keys) would
    make every site's evaluate reply refused, every round. Refused here, naming the column."""
    from common.protocol import MAX_METRIC_KEYS, METRIC_KEY_RE

    seen: dict[str, str] = {}
    keys = 4 + 2 * 20  # the overall confusion cells and the score histogram
    for col in schema.sensitive:
        attr = slug(col.name)
        if attr in seen:
            raise _fail(p, col.name, f"columns.{col.name} names the same metric key as sensitive column {seen[attr]}")
        seen[attr] = col.name
        for g in col.categories:
            key = f"cm.{attr}.{slug(g)}.tp"
            if not METRIC_KEY_RE.fullmatch(key) or not METRIC_KEY_RE.fullmatch(f"fair.{attr}.{slug(g)}.selection_rate"):
                raise _fail(
                    p, col.name, f"columns.{col.name} has a group name too long for a metric key (keep it short)"
                )
        keys += 4 * len(col.categories)
    if keys + 16 > MAX_METRIC_KEYS:  # 16: the reply's own fields (site id, history, signature, release)
        raise _fail(p, None, f"declares too many sensitive groups: their sums exceed {MAX_METRIC_KEYS} reply metrics")


# ---------------------------------------------------------------- operator tool


def propose_schema(csv_path: str | Path, label: str, sensitive: tuple[str, ...], delimiter: str = ",") -> str:
    """A *proposed* schema (TOML text) for an operator to review and edit; never used inside a run.

    It reads the private file, so its output (category lists, observed ranges) is not public:
    the operator replaces what it found by the public declaration (documentation, code books,
    standard ranges) before the schema is used. Columns whose values are nearly unique are
    proposed as ``identifier``.
    """
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh, delimiter=delimiter, skipinitialspace=True))
    if not rows:
        raise DataError(csv_path, "is empty: no header line", role="table file", code=DataError.MISSING)
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    out = [
        "# PROPOSED from the data: review it, and replace every list and range by the public declaration.",
        "# A run refuses this file until the draft line below is deleted.",
        "[table]",
        "draft = true",
        "",
    ]
    for j, name in enumerate(header):
        values = [r[j].strip() for r in body if j < len(r)]
        distinct = sorted(set(values))
        numbers = [_number(v) for v in values]
        out.append(f"[columns.{_toml_key(name)}]")
        if len(values) >= IDENTIFIER_MIN_ROWS and len(distinct) >= IDENTIFIER_SHARE * len(values):
            out.append('role = "identifier"  # nearly unique per row')
        elif all(x is not None for x in numbers) and len(distinct) > 20 and name != label:
            lo, hi = min(x for x in numbers if x is not None), max(x for x in numbers if x is not None)
            out.append('role = "numeric"')
            out.append(f"bins = [{lo:g}, {hi:g}]  # REPLACE by public edges")
        else:
            role = "label" if name == label else "sensitive" if name in sensitive else "categorical"
            out.append(f'role = "{role}"')
            out.append("categories = [" + ", ".join(_toml_str(v) for v in distinct) + "]  # REPLACE by the public list")
            if role == "label":
                out.append(f"positive = {_toml_str(distinct[-1] if distinct else '')}  # CHECK")
        out.append("")
    return "\n".join(out)


def _number(v: str) -> float | None:
    try:
        x = float(v)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_key(s: str) -> str:
    return s if re.fullmatch(r"[A-Za-z0-9_-]+", s) else _toml_str(s)
