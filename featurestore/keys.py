"""Cache keys: what a computed feature table depends on, reduced to one SHA-256.

A key covers, each part length-prefixed so no two different part lists can encode to the same bytes: the key
format version, the symbol, the data's first and last instant (UTC nanoseconds), a canonical hash of the config
(dict key order does not matter, types do: ``1``, ``1.0``, ``True`` and ``"1"`` differ), the compute function's
qualified name and version (a hash of its source unless ``version=`` is given), and the fingerprint of the raw
data, which covers the schema too: the same instants in New York time and in UTC are different data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import hashlib
import inspect
import math
import struct
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from featurestore.errors import bad_value
from featurestore.fingerprint import HASH_METHODS, Concatenated, HashMethod, fingerprint_table

if TYPE_CHECKING:
    import pandas as pd

# Bump when the meaning or encoding of any key part changes: every key changes with it.
KEY_FORMAT_VERSION = "featurestore-key-v1"
# Columns taken as the time index of a table, in this order, before any other timestamp or date column.
TIME_COLUMNS = ("ts", "timestamp", "time", "datetime", "date")

Raw: TypeAlias = "pd.DataFrame | pa.Table"


def is_dataframe(value: object) -> bool:
    """Whether ``value`` is a pandas DataFrame, asked without importing pandas.

    A DataFrame exists only once something imported pandas; a caller that works in Arrow alone (refresher's
    no-op refresh, say) never pays pandas' import for the question.
    """
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(value, pandas.DataFrame)


def to_arrow(data: Raw) -> pa.Table:
    """The Arrow table of a DataFrame (its DatetimeIndex kept as a column) or the table itself."""
    if isinstance(data, pa.Table):
        return data
    if is_dataframe(data):
        import pandas as pd

        return pa.Table.from_pandas(data, preserve_index=isinstance(data.index, pd.DatetimeIndex))
    raise bad_value("raw", type(data).__name__, "must be a pandas DataFrame or a pyarrow Table")


def time_range(table: pa.Table) -> tuple[int, int] | None:
    """First and last instant of the table's time column as UTC epoch nanoseconds, None if it has none.

    Naive timestamps are read as UTC; dates as midnight UTC. An all-null or empty time column gives None.
    """
    column = _time_column(table)
    if column is None or table.num_rows == 0:
        return None
    bounds = pc.min_max(column)
    low, high = bounds["min"].value, bounds["max"].value
    if low is None or high is None:
        return None
    # Scale in Python integers: a cast to timestamp[ns] would overflow for instants past 2262.
    # Arrow stores tz-aware timestamps as UTC instants already, so .value is UTC for aware and naive alike.
    scale = _nanos_per_value(column.type)
    return int(low) * scale, int(high) * scale


_NANOS_PER_UNIT = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}


def _nanos_per_value(kind: pa.DataType) -> int:
    """Nanoseconds per stored unit of a time column's type: a timestamp's unit, a date32's day, a date64's ms."""
    if pa.types.is_date32(kind):
        return 86_400 * 10**9
    if pa.types.is_date64(kind):
        return 10**6
    return _NANOS_PER_UNIT[str(kind.unit)] if pa.types.is_timestamp(kind) else 0


def time_ranges(
    tables: Sequence[pa.Table], *, concatenated: Concatenated | None = None
) -> list[tuple[int, int] | None]:
    """``time_range`` of each of ``tables``, the same values, with the work per batch where it can be.

    Consecutive tables of one schema whose time column has no nulls (a batch of daily bars) have that column
    concatenated once and reduced per table by numpy (taken from ``concatenated`` when it holds that run made
    already: a put's content hashes made it); anything else is done table by table.
    """
    out: list[tuple[int, int] | None] = []
    start = 0
    while start < len(tables):
        schema = tables[start].schema
        end = start + 1
        while end < len(tables) and tables[end].schema.equals(schema):
            end += 1
        run = tables[start:end]
        out.extend(_run_ranges(run, concatenated) if len(run) > 1 else [time_range(run[0])])
        start = end
    return out


def _run_ranges(
    tables: Sequence[pa.Table], concatenated: Concatenated | None
) -> list[tuple[int, int] | None]:
    """``time_ranges`` of tables of one schema."""
    name = _time_name(tables[0].schema)
    if name is None:
        return [None] * len(tables)
    kind = tables[0].schema.field(name).type
    scale, raw = _nanos_per_value(kind), pa.int32() if pa.types.is_date32(kind) else pa.int64()
    made = concatenated.cached(tables) if concatenated is not None else None
    if made is not None:
        whole = made.column(name).combine_chunks()  # one chunk already: no copy
    else:
        whole = pa.chunked_array(
            [chunk for table in tables for chunk in table[name].chunks], kind
        ).combine_chunks()
    if whole.null_count:
        return [time_range(table) for table in tables]
    values = whole.view(raw).to_numpy()
    rows = [table.num_rows for table in tables]
    starts = np.cumsum([0, *rows[:-1]])
    filled = [i for i, n in enumerate(rows) if n]
    out: list[tuple[int, int] | None] = [None] * len(tables)
    if filled:
        lows = np.minimum.reduceat(values, starts[filled]).tolist()
        highs = np.maximum.reduceat(values, starts[filled]).tolist()
        for i, low, high in zip(filled, lows, highs, strict=True):
            out[i] = (int(low) * scale, int(high) * scale)
    return out


def _time_column(table: pa.Table) -> pa.ChunkedArray | None:
    name = _time_name(table.schema)
    return None if name is None else table[name]


def _time_name(schema: pa.Schema) -> str | None:
    temporal: list[str] = [
        field.name for field in schema if pa.types.is_timestamp(field.type) or pa.types.is_date(field.type)
    ]
    for name in TIME_COLUMNS:
        if name in temporal:
            return name
    index = [name for name in temporal if name.startswith("__index_level_")]
    for name in index + temporal:
        return name
    return None


def config_hash(config: Any) -> str:
    """SHA-256 of a canonical, typed encoding of a config: dict key order does not matter, types do."""
    return hashlib.sha256(_canonical(config, "config")).hexdigest()


def _canonical(value: Any, where: str) -> bytes:
    def tagged(tag: bytes, body: bytes) -> bytes:
        return tag + struct.pack(">Q", len(body)) + body

    if value is None:
        return tagged(b"N", b"")
    if isinstance(value, bool | np.bool_):
        return tagged(b"B", b"1" if value else b"0")
    if isinstance(value, int | np.integer):
        return tagged(b"I", str(int(value)).encode())
    if isinstance(value, float | np.floating):
        number = float(value)
        return tagged(b"F", b"nan" if math.isnan(number) else number.hex().encode())
    if isinstance(value, str):
        return tagged(b"S", value.encode())
    if isinstance(value, bytes):
        return tagged(b"Y", value)
    if isinstance(value, decimal.Decimal):
        return tagged(b"D", str(value).encode())
    if isinstance(value, dt.datetime | dt.date | dt.time | dt.timedelta):
        return tagged(b"T", (type(value).__name__ + ":" + str(value)).encode())
    if isinstance(value, PurePath):
        return tagged(b"P", str(value).encode())
    if isinstance(value, enum.Enum):
        return tagged(b"E", f"{type(value).__qualname__}.{value.name}".encode())
    if isinstance(value, Mapping):
        items = sorted(
            _canonical(k, f"{where} key") + _canonical(v, f"{where}[{k!r}]") for k, v in value.items()
        )
        return tagged(b"M", b"".join(items))
    if isinstance(value, list | tuple):
        return tagged(b"L", b"".join(_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)))
    if isinstance(value, set | frozenset):
        return tagged(b"U", b"".join(sorted(_canonical(v, f"{where} item") for v in value)))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return tagged(b"C", type(value).__qualname__.encode() + _canonical(fields, where))
    raise bad_value(where, value, f"unsupported config type {type(value).__name__} (use plain data)")


def function_identity(func: Callable[..., Any], version: str | None = None) -> tuple[str, str]:
    """(qualified name, version) of a compute function; the version is a hash of its source unless given."""
    target = inspect.unwrap(func)
    bound = b""
    if isinstance(target, functools.partial):
        # Bound arguments are part of what is computed: hashed like config.
        bound = _canonical([list(target.args), dict(target.keywords)], "compute_func arguments")
        target = inspect.unwrap(target.func)
    if not callable(target) or not hasattr(target, "__qualname__"):
        # A callable instance: its class names and versions it (state belongs in config or version=).
        target = type(target)
    name = f"{getattr(target, '__module__', '?')}.{target.__qualname__}"
    if version is not None:
        return name, f"v:{version}" + (":" + hashlib.sha256(bound).hexdigest() if bound else "")
    try:
        source = inspect.getsource(target).encode() + bound
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        if code is None:
            raise bad_value(
                "compute_func", name, "source unavailable: pass version= to name its version"
            ) from None
        # No source file (defined in a REPL or exec): the bytecode and constants stand in for it.
        source = code.co_code + repr(code.co_consts).encode() + bound
    return name, "src:" + hashlib.sha256(source).hexdigest()


@dataclasses.dataclass(frozen=True)
class FeatureKey:
    """A computed-features key and the parts it was made of (kept for the manifest and for debugging)."""

    key: str
    symbol: str
    start_ns: int | None
    end_ns: int | None
    config_hash: str
    func_name: str
    func_version: str
    data_fingerprint: str


def feature_key(
    symbol: str,
    raw: Raw,
    config: Any,
    compute_func: Callable[..., Any],
    *,
    version: str | None = None,
    hash_method: HashMethod = "xxh3",
) -> FeatureKey:
    """The key under which ``compute_func(raw, config)`` for ``symbol`` is cached."""
    if not isinstance(symbol, str) or not symbol:
        raise bad_value("symbol", symbol, "must be a non-empty string")
    if hash_method not in HASH_METHODS:
        raise bad_value("hash_method", hash_method, f"unknown (choose one of {', '.join(HASH_METHODS)})")
    table = to_arrow(raw)
    bounds = time_range(table)
    if bounds is None and _time_column(table) is None:
        raise bad_value("raw", f"columns {table.column_names}", "no DatetimeIndex, timestamp or date column")
    start_ns, end_ns = bounds if bounds is not None else (None, None)
    name, func_version = function_identity(compute_func, version)
    cfg = config_hash(config)
    fingerprint = fingerprint_table(table, hash_method)
    parts = [KEY_FORMAT_VERSION, symbol, str(start_ns), str(end_ns), cfg, name, func_version, fingerprint]
    digest = hashlib.sha256()
    for part in parts:
        encoded = part.encode()
        digest.update(struct.pack(">Q", len(encoded)))
        digest.update(encoded)
    return FeatureKey(digest.hexdigest(), symbol, start_ns, end_ns, cfg, name, func_version, fingerprint)


__all__ = [
    "KEY_FORMAT_VERSION",
    "TIME_COLUMNS",
    "FeatureKey",
    "Raw",
    "config_hash",
    "feature_key",
    "fingerprint_table",
    "function_identity",
    "time_range",
    "time_ranges",
    "to_arrow",
]
