"""Tabular site data: a CSV read against its declared schema, encoded, split across sites.

Load (:func:`load_table`): the header must hold exactly the schema's columns; identifier
columns are dropped as each line is read (their values are never stored); a person-key
column is replaced at once by its HMAC pseudonym under the federation key
(:class:`common.deploy.keys.Pseudonymizer`) and then by a local index; every other value
is checked against the schema's declared domain. A column (declared or not) whose values
are nearly unique per row is a probable identifier, and the load refuses it unless the
schema declares it (``identifier``, ``keep``, or ``not-identifier = true``). Every error is
one line naming the file, the column and the line, never a value (:class:`DataError`).

Encoding (public, from the schema only): a categorical value is its index in the declared
list; a numeric value v is its declared bin k (edges ``b_k <= v < b_{k+1}``, the last bin
closed) and its position ``u = (v - b_k) / (b_{k+1} - b_k)`` in [0, 1] inside the bin: the
mode-specific normalisation of TVAE with the modes fixed by the declaration instead of a
mixture fitted to the private rows. The encoding is exact (``v = b_k + u (b_{k+1} - b_k)``).

Split (simulation): a seeded server-held test split, then the rest across sites, by the
values of a declared categorical column (``data.partition = "column"`` with
``tabular.partition-column``; each declared category goes to site ``index mod sites``) or
by a Dirichlet split over the label; then each site's train/validation split keyed per
record (per person when there is a person key), as for images (:mod:`common.data.arrays`).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, hmac

from common.config.limits import SITE_PARTITION
from common.data.arrays import (
    VALIDATION_DOMAIN,
    ArrayData,
    dirichlet_partition,
    iid_partition,
    record_positions,
    require_split,
    split_indices,
    split_key,
)
from common.data.tabular_schema import IDENTIFIER_MIN_ROWS, IDENTIFIER_SHARE, Column, Schema, slug
from common.deploy.keys import Pseudonymizer
from common.errors import ConfigError, DataError

TABLE_FILE = "table file"
PERSON_DOMAIN = b"privfed/tabular-person-split/v1"


@dataclass(frozen=True)
class Layout:
    """Where each modelled column lives in an encoded row ``x`` (float32).

    Features first, in schema order (a categorical column: 1 slot, its index; a numeric
    column: 2 slots, its bin and its position in the bin), then the sensitive columns'
    indices. The label's index is ``y``.
    """

    schema: Schema

    @property
    def features(self) -> tuple[Column, ...]:
        return self.schema.features

    @property
    def sensitive(self) -> tuple[Column, ...]:
        return self.schema.sensitive

    def slots(self) -> dict[str, int]:
        """Column name -> its first slot in ``x``."""
        out, j = {}, 0
        for c in (*self.features, *self.sensitive):
            out[c.name] = j
            j += 2 if c.role == "numeric" else 1
        return out

    @property
    def width(self) -> int:
        return sum(2 if c.role == "numeric" else 1 for c in (*self.features, *self.sensitive))

    def cells(self) -> int:
        """Number of conditioning cells: label x every sensitive attribute."""
        n = 2
        for c in self.sensitive:
            n *= len(c.categories)
        return n

    def cell_of(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each row's cell index (label-major, then the sensitive columns in schema order)."""
        slots = self.slots()
        cell = y.long().clone()
        for c in self.sensitive:
            cell = cell * len(c.categories) + x[:, slots[c.name]].long()
        return cell

    def cell_parts(self, cell: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(label index, [sensitive indices]) of each cell index (inverse of :meth:`cell_of`)."""
        parts: list[torch.Tensor] = []
        rest = cell.long().clone()
        for c in reversed(self.sensitive):
            k = len(c.categories)
            parts.insert(0, rest % k)
            rest = torch.div(rest, k, rounding_mode="floor")
        return rest, parts


@dataclass(frozen=True)
class Table:
    """A loaded, encoded table: ``x`` (N, layout.width) float32, ``y`` (N,) int64 label index,
    ``person`` (N,) int64 local person index (or None), ``person_digest`` the persons' pseudonyms
    (only to split by person; never sent)."""

    path: str
    layout: Layout
    x: torch.Tensor
    y: torch.Tensor
    person: torch.Tensor | None = None
    person_digest: tuple[bytes, ...] = ()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def data(self, idx: np.ndarray | None = None) -> ArrayData:
        """The rows ``idx`` (all by default) as ArrayData, persons re-indexed 0..P-1 among them."""
        if idx is None:
            idx = np.arange(len(self))
        t = torch.as_tensor(idx, dtype=torch.long)
        person = None
        if self.person is not None:
            _, local = torch.unique(self.person[t], return_inverse=True)
            person = local.to(torch.int64)
        return ArrayData(self.x[t], self.y[t], person)


def encode_numeric(col: Column, v: float) -> tuple[int, float]:
    """(bin index, position in the bin) of a value inside the declared range."""
    edges = col.bins
    k = int(np.searchsorted(edges, v, side="right")) - 1
    k = min(max(k, 0), len(edges) - 2)  # the top edge belongs to the last bin
    lo, hi = edges[k], edges[k + 1]
    return k, (v - lo) / (hi - lo)


def decode_numeric(col: Column, k: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Values from bins and positions (the inverse of :func:`encode_numeric`); integers rounded."""
    edges = np.asarray(col.bins)
    k = np.clip(k.astype(np.int64), 0, len(edges) - 2)
    v = edges[k] + np.clip(u, 0.0, 1.0) * (edges[k + 1] - edges[k])
    return np.round(v) if col.integer else v


def _error(path: Path, line: int | None, column: str | None, message: str, code: str = DataError.PARSE) -> DataError:
    where = f"line {line}, " if line else ""
    # A header name is text from the file: escaped when it is not one printable line.
    shown = column if column is None or column.isprintable() else ascii(column)
    col = f"column {shown}: " if column else ""
    return DataError(path, f"{where}{col}{message}", role=TABLE_FILE, line=line, column=column, code=code)


def _probable_identifier(values: set[str], rows: int) -> bool:
    return rows >= IDENTIFIER_MIN_ROWS and len(values) >= IDENTIFIER_SHARE * rows


def load_table(path: str | Path, schema: Schema, key: bytes | None) -> Table:
    """Read, check and encode a CSV against ``schema`` (see the module docstring).

    ``key``: the federation key; needed only for a person-key column (without it, e.g. on
    the server, the person key is dropped like an identifier and ``person`` is None).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "not found", role=TABLE_FILE, code=DataError.MISSING)
    try:
        fh = open(p, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below, the reader is consumed inside
    except OSError as exc:
        raise DataError(p, f"cannot be read ({type(exc).__name__})", role=TABLE_FILE) from None
    layout = Layout(schema)
    declared = {c.name: c for c in schema.columns}
    pseudo = Pseudonymizer(key) if key is not None and schema.person_key is not None else None
    with fh:
        reader = csv.reader(fh, delimiter=schema.delimiter, skipinitialspace=True)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(p, "is empty", role=TABLE_FILE, code=DataError.MISSING) from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise _error(p, 1, None, f"header is not readable CSV ({type(exc).__name__})", DataError.FORMAT) from None
        for c in schema.columns:
            if c.name not in header:
                raise _error(p, 1, c.name, "declared in the schema but missing from the header", DataError.FORMAT)
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise _error(p, 1, dup, "appears twice in the header", DataError.FORMAT)
        extra = [h for h in header if h not in declared]
        # Distinct raw values per column, only to detect probable identifiers; dropped after the load.
        watch = [j for j, h in enumerate(header) if h in extra or _watched(declared[h])]
        distinct: dict[int, set[str]] = {j: set() for j in watch}
        at = {h: j for j, h in enumerate(header)}
        cols = [c for c in (*layout.features, *layout.sensitive)]
        slots = layout.slots()
        xs: list[list[float]] = []
        ys: list[int] = []
        persons: list[bytes] = []
        index = {c.name: {v: i for i, v in enumerate(c.categories)} for c in schema.columns if c.categories}
        label = schema.label
        line = 1
        try:
            for row in reader:
                line = reader.line_num
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # a blank line (e.g. the file's last)
                if len(row) != len(header):
                    raise _error(p, line, None, f"expected {len(header)} fields, got {len(row)}", DataError.FORMAT)
                for j in watch:
                    distinct[j].add(row[j])
                rec = [0.0] * layout.width
                for c in cols:
                    raw = row[at[c.name]].strip()
                    if c.role == "numeric":
                        k, u = encode_numeric(c, _numeric(p, line, c, raw))
                        rec[slots[c.name]], rec[slots[c.name] + 1] = float(k), u
                    else:
                        rec[slots[c.name]] = float(_category(p, line, c, raw, index[c.name]))
                xs.append(rec)
                ys.append(_category(p, line, label, row[at[label.name]].strip(), index[label.name]))
                if pseudo is not None and schema.person_key is not None:
                    raw = row[at[schema.person_key.name]].strip()
                    if not raw:
                        raise _error(p, line, schema.person_key.name, "the person key is empty")
                    persons.append(pseudo.user(raw))
        except (csv.Error, UnicodeDecodeError) as exc:
            raise _error(p, line, None, f"not readable CSV ({type(exc).__name__})", DataError.FORMAT) from None
    rows = len(xs)
    if rows == 0:
        raise DataError(p, "has a header but no rows", role=TABLE_FILE, code=DataError.MISSING)
    for j in watch:
        if _probable_identifier(distinct[j], rows):
            raise _error(
                p,
                None,
                header[j],
                f"values are nearly unique per row (>= {IDENTIFIER_SHARE:.0%} distinct): a probable identifier; "
                'declare it in the schema (role = "identifier" drops it, or not-identifier = true after review)',
                DataError.FORMAT,
            )
    if extra:
        raise _error(p, 1, extra[0], "is in the header but not declared in the schema", DataError.FORMAT)
    x = torch.tensor(xs, dtype=torch.float32)
    y = torch.tensor(ys, dtype=torch.int64)
    check_groups(p, layout, x, y)
    person: torch.Tensor | None = None
    digests: tuple[bytes, ...] = ()
    if persons:
        order = sorted(set(persons))  # pseudonym order: reveals nothing about the raw ids
        rank = {d: i for i, d in enumerate(order)}
        person = torch.tensor([rank[d] for d in persons], dtype=torch.int64)
        digests = tuple(order)
    return Table(str(p), layout, x, y, person, digests)


def _watched(col: Column) -> bool:
    """Columns the probable-identifier check covers: declared ones that are modelled and not reviewed."""
    return col.modelled and not col.not_identifier


def _numeric(path: Path, line: int, col: Column, raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise _error(path, line, col.name, "is not a number") from None
    if not np.isfinite(v):
        raise _error(path, line, col.name, "is not a finite number")
    if col.integer and v != int(v):
        raise _error(path, line, col.name, "is not an integer (the schema declares integer = true)")
    if not col.bins[0] <= v <= col.bins[-1]:
        raise _error(path, line, col.name, "is outside the declared range (the first and last bins)")
    return v


def _category(path: Path, line: int, col: Column, raw: str, index: dict[str, int]) -> int:
    i = index.get(raw)
    if i is None:
        raise _error(path, line, col.name, "is not one of the declared categories")
    return i


def check_groups(path: Path, layout: Layout, x: torch.Tensor, y: torch.Tensor) -> None:
    """A label with one class, or a sensitive attribute with one group present, is refused:
    neither the classifier nor the fairness metrics mean anything then."""
    if len(torch.unique(y)) < 2:
        raise _error(path, None, layout.schema.label.name, "the label has a single class in this file", DataError.PARSE)
    slots = layout.slots()
    for c in layout.sensitive:
        if len(torch.unique(x[:, slots[c.name]])) < 2:
            raise _error(path, None, c.name, "the sensitive attribute has a single group in this file", DataError.PARSE)


# ---------------------------------------------------------------- splitting


@dataclass(frozen=True)
class TabularSplit:
    """The server-held test split (empty at a deployed site) and (train, validation) per site."""

    test: ArrayData
    sites: tuple[tuple[ArrayData, ArrayData], ...]

    def site_sizes(self) -> list[int]:
        return [len(train) for train, _ in self.sites]


def partition_column(partition: str, column: str) -> str:
    """The partition column: ``tabular.partition-column``, or the NAME of ``data.partition = "column:NAME"``."""
    if partition.startswith("column:"):
        return partition.split(":", 1)[1]
    return column


def by_column(table: Table, name: str, num_sites: int, rows: np.ndarray) -> list[np.ndarray]:
    """Rows per site by a categorical column: the declared category i goes to site i mod num_sites
    (from the schema, so the assignment is public); a site that gets no row is refused."""
    schema = table.layout.schema
    try:
        col = schema.column(name)
    except KeyError:
        raise ConfigError("tabular.partition-column", "must name a column of the schema") from None
    if col.role not in ("categorical", "sensitive"):
        raise ConfigError("tabular.partition-column", f"must name a categorical column, {name} is {col.role}")
    codes = table.x[torch.as_tensor(rows, dtype=torch.long), table.layout.slots()[name]].long().numpy()
    parts = [rows[codes % num_sites == s] for s in range(num_sites)]
    for s, part in enumerate(parts):
        if len(part) == 0:
            raise DataError(
                table.path,
                f"column {name}: site {s} gets no row (its categories are absent); use fewer sites or another column",
                role=TABLE_FILE,
                column=name,
                code=DataError.MISSING,
            )
    return parts


def _person_positions(table: Table, rows: np.ndarray, key: bytes) -> np.ndarray:
    """Per row, a position in [0, 1) from its person's pseudonym alone: a person's rows stay together."""
    assert table.person is not None
    out = np.empty(len(rows), dtype=np.float64)
    cache: dict[int, float] = {}
    for i, r in enumerate(rows):
        pid = int(table.person[r])
        if pid not in cache:
            mac = hmac.HMAC(key, hashes.SHA256())
            mac.update(PERSON_DOMAIN + b"\x00" + table.person_digest[pid])
            cache[pid] = (int.from_bytes(mac.finalize()[:8], "big") >> 11) / 2.0**53
        out[i] = cache[pid]
    return out


def site_split(
    table: Table, rows: np.ndarray, val_fraction: float, min_size: int, key: bytes, who: str
) -> tuple[ArrayData, ArrayData]:
    """A site's (train, validation), keyed per record (per person with a person key): adding or
    removing one record (person) moves no other between the two."""
    if len(rows) == 0:
        raise DataError(table.path, f"{who} has no rows", role=TABLE_FILE, code=DataError.MISSING)
    if table.person is not None:
        pos = _person_positions(table, rows, key)
    else:
        pos = record_positions(table.data(rows), key, VALIDATION_DOMAIN)
    tr, va = rows[pos >= val_fraction], rows[pos < val_fraction]
    require_split(who, "rows", len(tr), len(va), min_size)
    return table.data(tr), table.data(va)


def federate_table(
    table: Table,
    partition: str,
    column: str,
    num_sites: int,
    seed: int,
    test_fraction: float,
    val_fraction: float,
    alpha: float,
    min_size: int,
    secret: bytes | None,
) -> TabularSplit:
    """Seeded test split, then the sites' partitions, then each site's keyed validation split."""
    key = split_key(seed, secret)
    everything = np.arange(len(table))
    if partition == SITE_PARTITION:  # a deployed site's own file: all of it is this site's
        own = site_split(table, everything, val_fraction, min_size, key, "this site's data")
        return TabularSplit(table.data(np.zeros(0, dtype=np.int64)), (own,) * num_sites)
    rest, test = split_indices(len(table), test_fraction, seed)
    if partition == "iid":
        parts = [rest[p] for p in iid_partition(len(rest), num_sites, seed)]
    elif partition == "dirichlet":
        min_part = int(np.ceil((min_size + 1) / (1 - val_fraction)))
        parts = [rest[p] for p in dirichlet_partition(table.y[rest].numpy(), num_sites, alpha, seed, min_part)]
    else:
        name = partition_column(partition, column)
        if not name:
            raise ConfigError("tabular.partition-column", 'is required with data.partition = "column"')
        parts = by_column(table, name, num_sites, rest)
    sites = tuple(site_split(table, part, val_fraction, min_size, key, f"site {i}") for i, part in enumerate(parts))
    return TabularSplit(table.data(test), sites)


@lru_cache(maxsize=4)
def cached_split(
    path: str,
    schema: Schema,
    key: bytes | None,
    partition: str,
    column: str,
    num_sites: int,
    seed: int,
    fractions: tuple[float, float, float],
    min_size: int,
) -> TabularSplit:
    """One load and split per process (simulated sites share a worker). ``fractions``: test, validation, alpha."""
    test_fraction, val_fraction, alpha = fractions
    table = load_table(path, schema, key)
    return federate_table(table, partition, column, num_sites, seed, test_fraction, val_fraction, alpha, min_size, key)


def group_names(col: Column) -> tuple[str, ...]:
    """The declared groups of a sensitive column as metric-key slugs."""
    return tuple(slug(c) for c in col.categories)


def default_adult_path(start: Sequence[Path] = ()) -> Path | None:
    """``shared/data/adult/adult.data`` in the working directory's or this file's ancestors."""
    bases = [*start, Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]
    for base in bases:
        p = base / "shared" / "data" / "adult" / "adult.data"
        if p.is_file():
            return p
    return None
