"""Features over many symbols in one pass: the same numbers, bit for bit, as the per-symbol functions, and the
same feature-store keys, so a store filled before finds its entries."""

from __future__ import annotations

import datetime as dt
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featurestore import FeatureStore
from refresher.calendar import get_calendar
from refresher.features import equal_weight_index, get_feature
from refresher.features.bulk import BULK, compute_bulk
from refresher.features.cached import compute_features, daily_frame, daily_frames, store_key
from refresher.profile import Listing, profile_from_file
from refresher.refresh import compute_plan
from refresher.sources import make_source
from refresher.sources.synthetic import generate_daily

SYMBOLS = ("AAA", "BBB", "CCC", "DDD", "EEE")


def bars(symbol: str, seed: int) -> pd.DataFrame:
    table = generate_daily(
        Listing(symbol, "XNYS", "equity", seed),
        get_calendar("XNYS"),
        dt.date(2023, 1, 1),
        dt.date(2024, 6, 30),
    )
    df: pd.DataFrame = table.to_pandas().drop(columns="symbol")
    return df.set_index(pd.DatetimeIndex(pd.to_datetime(df.pop("date")), name="date"))


@pytest.fixture(scope="module")
def frames() -> list[pd.DataFrame]:
    full = [bars(symbol, seed) for seed, symbol in enumerate(SYMBOLS)]
    # Fewer rows than every window, fewer than the long ones, and a single bar: their neighbours' windows must
    # not reach into them, nor theirs into their neighbours.
    return [full[0], full[1].iloc[:7], full[2], full[3].iloc[:30], full[4].iloc[-1:]]


PARAMS = [
    ("high_low_detection", {}),
    ("high_low_detection", {"window": 5}),
    ("trend_analysis", {}),
    ("trend_analysis", {"fast": 3, "slow": 8, "slope": 2, "adx": 4}),
    ("full_analysis", {}),
    ("full_analysis", {"rsi": 3, "macd_fast": 2, "macd_slow": 5, "bollinger": 4}),
    ("performance_metrics", {}),
    ("performance_metrics", {"sharpe": 10, "min_returns": 4}),
    ("dashboard_data", {}),
    ("etf_metadata", {}),
    ("correlation_analysis", {}),
    ("correlation_analysis", {"window": 6, "min_pairs": 3}),
]


def test_every_registered_daily_feature_has_a_bulk_form() -> None:
    from refresher.features import FEATURES

    daily = {name for name, spec in FEATURES.items() if spec.timeframe == "1d"}
    assert daily == set(BULK)
    assert {name for name, _params in PARAMS} == daily


@pytest.mark.parametrize(("name", "params"), PARAMS)
def test_one_pass_over_all_symbols_equals_each_symbol_alone(
    frames: list[pd.DataFrame], name: str, params: dict[str, object]
) -> None:
    spec = get_feature(name)
    values = {**spec.defaults, **params}
    inputs = frames
    if spec.needs_universe:
        benchmark = equal_weight_index(dict(zip(SYMBOLS, frames, strict=True)))
        inputs = [f.assign(benchmark=benchmark.reindex(f.index)) for f in frames]
    got = compute_bulk(name, values, SYMBOLS, inputs)
    for symbol, frame, result in zip(SYMBOLS, inputs, got, strict=True):
        want = spec.compute(frame, **values)
        assert list(result.columns) == list(want.columns), symbol
        assert result.index.equals(want.index), symbol
        for column in want.columns:
            mine, theirs = result[column].to_numpy("float64"), want[column].to_numpy("float64")
            # Bit for bit, NULLs in the same rows: not approximately.
            assert np.array_equal(mine, theirs, equal_nan=True), (symbol, column)
    # The long symbols' windows filled: the comparison covered numbers, not only NULLs.
    assert got[0].iloc[-1].notna().all() and got[2].iloc[-1].notna().all()


def test_bulk_results_are_stored_under_the_per_symbol_keys(tmp_path: Path) -> None:
    path = tmp_path / "bulk.yaml"
    path.write_text(
        "universe:\n  symbols: [AAA, BBB, CCC]\nexchange: XNYS\nmonths: 3\ntimeframes: [1d]\n"
        "features: [dashboard_data, full_analysis]\nseed: 5\n"
    )
    profile = profile_from_file(path, as_of=dt.date(2024, 6, 28))
    store = FeatureStore(tmp_path / "store")
    with closing(make_source(profile)) as source:
        plan = compute_plan(profile, source, store, None)
        store.put_many((plan.keys[s], source.fetch(s), s.symbol) for s in plan.to_fetch)
        plan = compute_plan(profile, source, store, None)
    batches = list(compute_features(profile, store, plan))
    assert [b.computed for b in batches] == [3, 3]
    for use, batch in zip(profile.features, batches, strict=True):
        for part in batch.parts:
            raw = daily_frame(
                list(store.get_many([plan.keys[s] for s in plan.desired if s.symbol == part.symbol]).values())
            )
            stored = store.get(store_key(store, use, part.symbol, raw))
            assert stored is not None, (use.name, part.symbol)
            want = use.compute(raw)
            assert np.array_equal(
                stored.select(list(want.columns)).to_pandas().to_numpy("float64"),
                want.to_numpy("float64"),
                equal_nan=True,
            )
    # A second pass finds every entry: nothing is computed again.
    assert [b.computed for b in compute_features(profile, store, plan)] == [0, 0]


def test_daily_frames_of_many_symbols_equal_each_symbols_own() -> None:
    tables = {}
    for seed, symbol in enumerate(SYMBOLS):
        months = [
            generate_daily(Listing(symbol, "XNYS", "equity", seed), get_calendar("XNYS"), start, end)
            for start, end in [
                (dt.date(2024, 2, 1), dt.date(2024, 2, 29)),
                (dt.date(2024, 1, 1), dt.date(2024, 1, 31)),
            ]
        ]
        tables[symbol] = months[::-1] if seed % 2 else months  # months out of order: the frame sorts them
    tables["EMPTY"] = [tables["AAA"][0].slice(0, 0)]
    together = daily_frames(tables)
    assert set(together) == set(tables)
    for symbol, parts in tables.items():
        pd.testing.assert_frame_equal(together[symbol], daily_frame(parts), check_exact=True)
    # Each is its own frame: writing to one leaves the others (and no pandas warning about a copy).
    together["AAA"]["close"] = 0.0
    assert (together["BBB"]["close"] != 0.0).all()
