"""Keys and fingerprints: what must change the key, what must not."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import functools
import hashlib
import importlib.util
import inspect
import math
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import FeatureStoreError, config_hash, feature_key, fingerprint_table
from featurestore.keys import (
    KEY_FORMAT_VERSION,
    TIME_COLUMNS,
    function_identity,
    time_range,
    time_ranges,
    to_arrow,
)
from tests.featurestore.conftest import make_bars


def features(raw: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    return raw.rolling(config["window"]).mean()


def other_features(raw: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    return raw.rolling(config["window"]).sum()


def key(symbol: str = "AAPL", raw: Any = None, config: Any = None, func: Any = features, **kw: Any) -> str:
    raw = make_bars() if raw is None else raw
    config = {"window": 5, "fields": ["close"]} if config is None else config
    return feature_key(symbol, raw, config, func, **kw).key


def test_config_key_order_does_not_matter() -> None:
    a = {"window": 5, "nested": {"x": 1, "y": [1, 2]}, "name": "m"}
    b = {"name": "m", "nested": {"y": [1, 2], "x": 1}, "window": 5}
    assert config_hash(a) == config_hash(b)
    assert key(config=a) == key(config=b)


def test_config_types_and_values_matter() -> None:
    hashes = {config_hash({"w": v}) for v in (1, 1.0, True, "1", None, [1], (2,))}
    assert len(hashes) == 7
    assert config_hash({"w": 5}) != config_hash({"w": 6})
    assert config_hash([1, 2]) != config_hash([2, 1])


def test_unsupported_config_type_names_the_field() -> None:
    with pytest.raises(FeatureStoreError, match=r"config\['f'\]"):
        config_hash({"f": object()})


def test_every_key_part_changes_the_key() -> None:
    bars = make_bars()
    base = key(raw=bars)
    assert key(raw=bars) == base
    assert key(symbol="MSFT", raw=bars) != base
    assert key(raw=bars.iloc[:-1]) != base  # range
    assert key(raw=bars, config={"window": 6, "fields": ["close"]}) != base
    assert key(raw=bars, func=other_features) != base
    assert key(raw=bars, version="2") != key(raw=bars, version="3")


def test_one_value_anywhere_changes_the_key() -> None:
    bars = make_bars(2000)
    base = key(raw=bars)
    for row in (0, 999, 1999):
        changed = bars.copy()
        changed.iat[row, 0] = bars["close"].to_numpy()[row] + 1e-9
        assert key(raw=changed) != base
    volume = bars.copy()
    volume.iat[1000, 1] = bars["volume"].to_numpy()[1000] + 1
    assert key(raw=volume) != base


def test_time_zone_changes_the_key_but_not_the_range() -> None:
    utc = make_bars(tz="UTC")
    new_york = make_bars(tz="America/New_York")
    assert (utc.index == new_york.index).all()  # the very same instants
    assert time_range(to_arrow(utc)) == time_range(to_arrow(new_york))
    assert key(raw=utc) != key(raw=new_york)


def test_function_source_changes_the_key(tmp_path: Path) -> None:
    def load(body: str) -> Any:
        path = tmp_path / f"mod_{abs(hash(body))}.py"
        path.write_text(f"def compute(raw, config):\n    return {body}\n")
        spec = importlib.util.spec_from_file_location("fs_test_compute", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fs_test_compute"] = module
        spec.loader.exec_module(module)
        return module.compute

    first, second = load("raw * 2"), load("raw * 3")
    assert first.__qualname__ == second.__qualname__ and first.__module__ == second.__module__
    assert key(func=first) != key(func=second)
    # An explicit version replaces the source hash: the author says the two are the same computation.
    assert key(func=first, version="v1") == key(func=second, version="v1")


def test_dataframe_time_column_and_arrow_table_inputs() -> None:
    bars = make_bars()
    column = bars.reset_index(names="ts")
    table = pa.Table.from_pandas(column, preserve_index=False)
    assert key(raw=column) == key(raw=table)
    assert time_range(table) == (bars.index[0].value, bars.index[-1].value)


def test_raw_without_time_index_is_rejected() -> None:
    with pytest.raises(FeatureStoreError) as info:
        key(raw=pd.DataFrame({"close": [1.0, 2.0]}))
    assert str(info.value) == "raw=\"columns ['close']\": no DatetimeIndex, timestamp or date column"


def test_fingerprint_ignores_layout() -> None:
    table = pa.Table.from_pandas(make_bars(1000).reset_index(names="ts"), preserve_index=False)
    table = table.append_column("name", pa.array([None if i % 7 == 0 else f"s{i}" for i in range(1000)]))
    base = fingerprint_table(table)
    rechunked = pa.concat_tables([table.slice(0, 333), table.slice(333, 1), table.slice(334)])
    sliced = pa.concat_tables([table, table]).slice(1000)
    assert fingerprint_table(rechunked) == base
    assert fingerprint_table(sliced) == base
    assert fingerprint_table(table.combine_chunks()) == base


def test_fingerprint_ignores_bytes_under_nulls_but_not_null_positions() -> None:
    validity = pa.py_buffer(bytes([0b101]))
    one = pa.Array.from_buffers(pa.int64(), 3, [validity, pa.py_buffer(np.array([1, 99, 3]).tobytes())])
    two = pa.Array.from_buffers(pa.int64(), 3, [validity, pa.py_buffer(np.array([1, 7, 3]).tobytes())])
    assert fingerprint_table(pa.table({"x": one})) == fingerprint_table(pa.table({"x": two}))
    assert fingerprint_table(pa.table({"x": one})) != fingerprint_table(pa.table({"x": [1, 0, 3]}))
    assert fingerprint_table(pa.table({"x": [None, 1]})) != fingerprint_table(pa.table({"x": [1, None]}))


def test_fingerprint_covers_schema() -> None:
    table = pa.table({"a": [1, 2], "b": ["x", "yz"]})
    base = fingerprint_table(table)
    assert fingerprint_table(table.rename_columns(["a", "c"])) != base
    assert fingerprint_table(table.cast(pa.schema([("a", pa.int32()), ("b", pa.string())]))) != base
    assert fingerprint_table(pa.table({"a": [1, 2], "b": ["xy", "z"]})) != base


def test_footer_method_is_opt_in_and_blind_to_the_middle() -> None:
    table = pa.table({"x": np.arange(10_000, dtype=np.float64)})
    values = np.arange(10_000, dtype=np.float64)
    values[5_000] = -1
    changed = pa.table({"x": values})
    assert fingerprint_table(table).startswith("xxh3:")
    assert fingerprint_table(table) != fingerprint_table(changed)
    # Documented as unsafe: it misses a change in the middle. This test pins that it stays opt-in.
    assert fingerprint_table(table, "footer") == fingerprint_table(changed, "footer")
    with pytest.raises(FeatureStoreError, match="hash_method="):
        fingerprint_table(table, "md5")  # type: ignore[arg-type]


# --- Pinned formats: a change must be deliberate (bump KEY_FORMAT_VERSION and update the pins together) ----


class Side(enum.Enum):
    BUY = 1
    SELL = 2


class OtherSide(enum.Enum):
    BUY = 1


@dataclasses.dataclass(frozen=True)
class Window:
    size: int
    centered: bool


@dataclasses.dataclass(frozen=True)
class Span:
    size: int
    centered: bool


# One value of every type the canonical encoding knows, so a change to any branch moves the pinned hash.
EVERY_TYPE: dict[str, Any] = {
    "none": None,
    "flag": True,
    "off": False,
    "int": 7,
    "float": 0.1,
    "nan": math.nan,
    "text": "close",
    "bytes": b"\x00\x01",
    "decimal": decimal.Decimal("1.50"),
    "when": dt.datetime(2025, 1, 2, 3, 4, 5),
    "day": dt.date(2025, 1, 2),
    "clock": dt.time(9, 30),
    "span": dt.timedelta(minutes=5),
    "stamp": pd.Timestamp("2025-01-02 03:04:05", tz="UTC"),
    "path": PurePosixPath("a/b.csv"),
    "side": Side.BUY,
    "nested": {"list": [1, "a"], "tuple": (2.5,)},
    "set": {3, 1, 2},
    "window": Window(5, False),
}


def test_config_hash_is_pinned() -> None:
    assert KEY_FORMAT_VERSION == "featurestore-key-v1"
    assert config_hash(EVERY_TYPE) == "781f2096cd1171842881bd6fca647afd5fa636f5035b279889a984a6fb7b1eaf"
    # The documented layout of the smallest configs: a one-byte tag, an 8-byte big-endian length, the body.
    assert config_hash(None) == hashlib.sha256(b"N" + bytes(8)).hexdigest()
    assert config_hash("ab") == hashlib.sha256(b"S" + (2).to_bytes(8, "big") + b"ab").hexdigest()


def test_feature_key_is_pinned() -> None:
    raw = pa.table(
        {
            "ts": pa.array([0, 60_000_000_000], pa.timestamp("ns", tz="UTC")),
            "close": pa.array([1.5, 2.5]),
        }
    )
    got = feature_key("AAPL", raw, {"window": 5}, features, version="1")
    assert got.key == "8443617b9f38be95ae503f60700c999231c739b8f974e84ad3b85ebf4ca229d0"
    assert (got.symbol, got.start_ns, got.end_ns) == ("AAPL", 0, 60_000_000_000)
    assert got.config_hash == config_hash({"window": 5})
    assert got.func_name == "tests.featurestore.test_keys.features" and got.func_version == "v:1"
    assert got.data_fingerprint == fingerprint_table(raw)
    parts = [KEY_FORMAT_VERSION, "AAPL", "0", "60000000000", got.config_hash, got.func_name, "v:1"]
    manual = hashlib.sha256()
    for part in [*parts, got.data_fingerprint]:
        manual.update(len(part.encode()).to_bytes(8, "big") + part.encode())
    assert got.key == manual.hexdigest()


# --- The config encoding: every type changes the key, equal values never do --------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (True, False),
        (0, 1),
        (0.1, 0.2),
        (0.0, -0.0),
        (math.inf, -math.inf),
        ("a", "b"),
        ("a", b"a"),
        (b"a", b"b"),
        (decimal.Decimal("1.5"), decimal.Decimal("2.5")),
        (decimal.Decimal("1"), 1),
        (dt.date(2025, 1, 1), dt.date(2025, 1, 2)),
        (dt.date(2025, 1, 1), dt.datetime(2025, 1, 1)),
        (dt.datetime(2025, 1, 1), pd.Timestamp("2025-01-01")),
        (dt.time(9, 30), dt.time(9, 31)),
        (dt.timedelta(1), dt.timedelta(2)),
        (PurePosixPath("a"), PurePosixPath("b")),
        (PurePosixPath("a"), "a"),
        (Side.BUY, Side.SELL),
        (Side.BUY, OtherSide.BUY),
        (Side.BUY, "Side.BUY"),
        ({"a": 1}, {"b": 1}),
        ({"a": 1}, {"a": 2}),
        ({"a": 1}, {"a": 1, "b": 1}),
        ([1], [1, 1]),
        ([1, 2], {1, 2}),
        ({1, 2}, {1, 3}),
        ({"a": 1}, [["a", 1]]),
        (Window(5, False), Window(6, False)),
        (Window(5, False), Span(5, False)),
        (Window(5, False), {"size": 5, "centered": False}),
        (None, ""),
        (None, []),
        ([], {}),
        (["aS", "b"], ["a", "Sb"]),
    ],
)
def test_each_config_type_changes_the_key(one: Any, other: Any) -> None:
    assert config_hash(one) != config_hash(other)
    assert config_hash({"w": one}) != config_hash({"w": other})


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (np.bool_(True), True),
        (np.int64(5), 5),
        (np.float32(0.5), 0.5),
        (math.nan, float("nan")),
        (math.nan, -math.nan),  # every NaN is one value
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({3, 1, 2}, frozenset({2, 3, 1})),
        ([1, 2], (1, 2)),
        (PurePosixPath("a/b"), PurePosixPath("a") / "b"),
        (Window(5, False), Window(5, False)),
    ],
)
def test_equal_configs_share_a_key(one: Any, other: Any) -> None:
    assert config_hash(one) == config_hash(other)


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8,
)


def _typed(value: Any) -> Any:
    """``value`` with each scalar tagged by its type, the identity config_hash promises to respect."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    # -0.0 == 0.0 in Python, yet the encoding tells them apart (a sign can matter to a computation).
    return (type(value).__name__, repr(value))


@settings(max_examples=60, deadline=None)
@given(json_like, json_like)
def test_config_hash_equal_exactly_when_configs_are_equal(one: Any, other: Any) -> None:
    assert (config_hash(one) == config_hash(other)) == (_typed(one) == _typed(other))


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"f": [1, object()]}, r"config\['f'\]\[1\]="),
        ({object(): 1}, r"config key="),
        ({"s": frozenset({object()})}, r"config\['s'\] item="),
        ({"d": {"e": object()}}, r"config\['d'\]\['e'\]="),
    ],
)
def test_unsupported_config_value_names_its_place(config: Any, where: str) -> None:
    with pytest.raises(FeatureStoreError) as info:
        config_hash(config)
    value = r"<object object at 0x[0-9a-f]+>"
    assert re.fullmatch(
        where + value + r": unsupported config type object \(use plain data\)", str(info.value)
    )


@dataclasses.dataclass
class Holder:
    item: Any


def test_unsupported_values_inside_dataclasses_and_partials_name_their_place() -> None:
    with pytest.raises(FeatureStoreError) as info:
        config_hash({"h": Holder(1j)})
    assert str(info.value) == "config['h']['item']=1j: unsupported config type complex (use plain data)"
    assert info.value.fields == {"field": "config['h']['item']", "value": 1j}
    with pytest.raises(FeatureStoreError) as bound:
        function_identity(functools.partial(_windowed, window=2j))
    assert str(bound.value) == (
        "compute_func arguments[1]['window']=2j: unsupported config type complex (use plain data)"
    )


# --- The compute function's identity -------------------------------------------------------------------------


def _windowed(raw: pd.DataFrame, config: Any, window: int = 1) -> pd.DataFrame:
    return raw.rolling(window).mean()


def test_partial_arguments_are_part_of_the_function() -> None:
    five, twenty = functools.partial(_windowed, window=5), functools.partial(_windowed, window=20)
    assert key(func=five) != key(func=twenty)
    assert key(func=five) == key(func=functools.partial(_windowed, window=5))
    assert key(func=functools.partial(_windowed, 1)) != key(func=functools.partial(_windowed, 2))
    assert key(func=five) != key(func=_windowed)
    # With an explicit version the bound arguments still count, and no bound arguments adds nothing.
    assert key(func=five, version="1") != key(func=twenty, version="1")
    assert key(func=five, version="1") == key(func=functools.partial(_windowed, window=5), version="1")
    name, version = function_identity(five, "1")
    assert name == "tests.featurestore.test_keys._windowed"
    bound = config_hash([[], {"window": 5}])
    assert version == f"v:1:{bound}"
    assert function_identity(_windowed, "1") == (name, "v:1")


def test_function_version_hashes_its_source() -> None:
    name, version = function_identity(features)
    source = inspect.getsource(features).encode()
    assert (name, version) == (
        "tests.featurestore.test_keys.features",
        "src:" + hashlib.sha256(source).hexdigest(),
    )


def test_wrapped_functions_are_identified_by_what_they_wrap() -> None:
    @functools.wraps(features)
    def wrapper(raw: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
        return features(raw, config)

    assert function_identity(wrapper) == function_identity(features)


class Scaler:
    def __call__(self, raw: pd.DataFrame, config: Any) -> pd.DataFrame:
        return raw * 2


def test_callable_instances_are_named_and_versioned_by_their_class() -> None:
    name, version = function_identity(Scaler())
    assert name == "tests.featurestore.test_keys.Scaler"
    assert version == "src:" + hashlib.sha256(inspect.getsource(Scaler).encode()).hexdigest()


def test_functions_without_source_use_their_bytecode() -> None:
    namespace: dict[str, Any] = {}
    exec("def compute(raw, config):\n    return raw * 2\n", namespace)  # no file: no source
    exec("def other(raw, config):\n    return raw * 3\n", namespace)
    compute, other = namespace["compute"], namespace["other"]
    name, version = function_identity(compute)
    code = compute.__code__
    expected = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()
    assert version == f"src:{expected}" and name.endswith(".compute")
    assert function_identity(other)[1] != version
    bound = function_identity(functools.partial(compute, 1))[1]
    assert bound != version and bound.startswith("src:")


def test_function_without_source_or_bytecode_needs_a_version() -> None:
    with pytest.raises(FeatureStoreError) as info:
        function_identity(len)
    assert (
        str(info.value)
        == "compute_func='builtins.len': source unavailable: pass version= to name its version"
    )
    assert function_identity(len, "7") == ("builtins.len", "v:7")


# --- The key's own arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize("symbol", ["", None, 5])
def test_symbol_must_be_a_non_empty_string(symbol: Any) -> None:
    with pytest.raises(FeatureStoreError) as info:
        key(symbol=symbol)
    assert str(info.value) == f"symbol={symbol!r}: must be a non-empty string"


def test_unknown_hash_method_is_rejected_with_the_choices() -> None:
    with pytest.raises(FeatureStoreError) as info:
        key(hash_method="md5")
    assert str(info.value) == "hash_method='md5': unknown (choose one of xxh3, footer)"


def test_hash_method_is_part_of_the_key() -> None:
    got = feature_key("AAPL", make_bars(), {"window": 5}, features, hash_method="footer")
    assert got.data_fingerprint.startswith("footer:") and got.key != key()


def test_raw_of_another_type_is_rejected() -> None:
    with pytest.raises(FeatureStoreError) as info:
        to_arrow([1, 2])  # type: ignore[arg-type]
    assert str(info.value) == "raw='list': must be a pandas DataFrame or a pyarrow Table"


def test_a_time_column_of_nulls_keys_without_a_range() -> None:
    raw = pa.table({"ts": pa.array([None, None], pa.timestamp("ns")), "x": [1, 2]})
    got = feature_key("AAPL", raw, {}, features, version="1")
    assert (got.start_ns, got.end_ns) == (None, None)
    assert got.key != feature_key("AAPL", raw.slice(1), {}, features, version="1").key


# --- The time column and its range ---------------------------------------------------------------------------


def test_to_arrow_keeps_a_datetime_index_and_drops_a_range_index() -> None:
    bars = make_bars(3)
    assert to_arrow(bars).column_names == ["close", "volume", "__index_level_0__"]
    assert to_arrow(bars.reset_index(drop=True)).column_names == ["close", "volume"]
    # Any other index is not data: a string or integer index is dropped, not turned into a column.
    labelled = bars.reset_index(drop=True).set_axis(pd.Index([f"r{i}" for i in range(3)]))
    assert to_arrow(labelled).column_names == ["close", "volume"]
    table = pa.table({"x": [1]})
    assert to_arrow(table) is table


@pytest.mark.parametrize(
    ("kind", "value", "nanos"),
    [
        (pa.timestamp("s"), 3, 3 * 10**9),
        (pa.timestamp("ms"), 3, 3 * 10**6),
        (pa.timestamp("us"), 3, 3 * 10**3),
        (pa.timestamp("ns"), 3, 3),
        (pa.timestamp("s", tz="Asia/Tokyo"), 3, 3 * 10**9),
        (pa.date32(), 2, 2 * 86_400 * 10**9),
        (pa.date64(), 86_400_000, 86_400 * 10**9),
        # Past 2262 a cast to timestamp[ns] would overflow; Python integers do not.
        (pa.timestamp("s"), 40_000_000_000, 40_000_000_000 * 10**9),
    ],
)
def test_time_range_in_utc_nanoseconds(kind: pa.DataType, value: int, nanos: int) -> None:
    storage = pa.int32() if kind == pa.date32() else pa.int64()
    when = pa.array([value, 0, None], storage).view(kind)
    table = pa.table({"when": when, "x": [1, 2, 3]})
    assert time_range(table) == (0, nanos)


def test_time_range_is_none_without_rows_or_values() -> None:
    assert time_range(pa.table({"x": [1]})) is None
    assert time_range(pa.table({"ts": pa.array([], pa.timestamp("ns"))})) is None
    assert time_range(pa.table({"ts": pa.array([None], pa.timestamp("ns"))})) is None


def test_time_column_preference() -> None:
    def stamps(value: int) -> pa.Array:
        return pa.array([value], pa.timestamp("s"))

    # A named time column first, in TIME_COLUMNS order, then the pandas index, then any temporal column.
    table = pa.table({"other": stamps(1), "__index_level_0__": stamps(2), "date": stamps(3), "ts": stamps(4)})
    assert time_range(table) == (4 * 10**9, 4 * 10**9)
    assert time_range(table.drop_columns(["ts"])) == (3 * 10**9, 3 * 10**9)
    assert time_range(table.drop_columns(["ts", "date"])) == (2 * 10**9, 2 * 10**9)
    assert time_range(table.select(["other"])) == (10**9, 10**9)
    assert TIME_COLUMNS == ("ts", "timestamp", "time", "datetime", "date")
    assert time_range(pa.table({"x": [1], "time": stamps(5), "timestamp": stamps(6)})) == (
        6 * 10**9,
        6 * 10**9,
    )


def test_time_ranges_of_a_batch_are_each_tables_time_range() -> None:
    def bars(first: int, rows: int, kind: pa.DataType | None = None) -> pa.Table:
        kind = kind or pa.timestamp("us", tz="UTC")
        ts = pa.array(np.arange(first, first + rows, dtype=np.int64) * 86_400_000_000).cast(kind)
        return pa.table({"ts": ts, "close": np.arange(rows, dtype=np.float64)})

    days = pa.table({"date": pa.array([dt.date(2024, 1, 2), dt.date(2023, 5, 1)], pa.date32()), "x": [1, 2]})
    with_null = pa.table({"ts": pa.array([None, 5], pa.timestamp("s")), "close": [1.0, 2.0]})
    tables = [
        bars(3, 21),
        bars(0, 0),
        bars(50, 1),
        bars(7, 5).slice(2),
        pa.concat_tables([bars(1, 2), bars(9, 3)]),
    ]
    tables += [
        days,
        days.slice(1),
        pa.table({"x": [1]}),
        pa.table({"x": [2]}),
        with_null,
        with_null.slice(0, 1),
    ]
    tables += [bars(2, 4, pa.timestamp("ns")), bars(4, 2, pa.timestamp("ns"))]
    assert time_ranges(tables) == [time_range(t) for t in tables]
