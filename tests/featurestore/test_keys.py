"""Keys and fingerprints: what must change the key, what must not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from featurestore import FeatureStoreError, config_hash, feature_key, fingerprint_table
from featurestore.keys import time_range, to_arrow
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
    with pytest.raises(FeatureStoreError, match="raw="):
        key(raw=pd.DataFrame({"close": [1.0, 2.0]}))


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
