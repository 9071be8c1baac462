"""Features: the grid search the store exists for, and the feature load before/after binary COPY.

Grid search: 10 parameter combinations of ``trend_analysis`` x 5 expanding folds over the profile's daily bars
(``backtesting``; its first 10 symbols with --quick), every (entry, symbol) through ``compute_features`` exactly as a
refresh computes them; wall time with an empty store, then the same grid again on the now warm store.

Feature load: the same computed rows into PostgreSQL, ours (one binary COPY and transaction per feature) against
the row-at-a-time text COPY with one transaction per symbol that loaded features before.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from contextlib import closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from featurestore import FeatureStore
from refresher.engines.local import LocalEngine
from refresher.features.cached import compute_features
from refresher.features.registry import resolve_feature
from refresher.features.tables import FeaturePart, feature_table, replace_feature_rows
from refresher.profile import Profile, load_profile, months_covering
from refresher.refresh import compute_plan
from refresher.sources import make_source

AS_OF = dt.date(2025, 6, 30)
GRID = [(fast, slow) for fast in (5, 10, 15, 20, 25) for slow in (40, 60)]  # 10 combinations
FOLDS = 5


def _grid_profile(base: Profile, fold: int) -> Profile:
    """Fold ``fold`` of 5: an expanding window ending ``fold + 1`` fifths of the way through the months."""
    months = base.months[: max(2, len(base.months) * (fold + 1) // FOLDS)]
    end = min(base.end, (months[-1].replace(day=28) + dt.timedelta(days=4)).replace(day=1) - dt.timedelta(1))
    uses = tuple(
        resolve_feature("(bench)", "features", "trend_analysis", f"trend_{f}_{s}", {"fast": f, "slow": s})
        for f, s in GRID
    )
    return replace(base, features=uses, months=months_covering(base.start, end), end=end)


def _grid(base: Profile, store: FeatureStore) -> tuple[float, int]:
    started, computed = time.perf_counter(), 0
    with closing(make_source(base)) as source:
        for fold in range(FOLDS):
            profile = _grid_profile(base, fold)
            plan = compute_plan(profile, source, store, None)
            computed += sum(batch.computed for batch in compute_features(profile, store, plan))
    return time.perf_counter() - started, computed


def _store_bars(base: Profile, store: FeatureStore) -> None:
    with closing(make_source(base)) as source:
        plan = compute_plan(base, source, store, None)
        store.put_many((plan.keys[s], source.fetch(s), s.symbol) for s in plan.to_fetch)


def _row_loop_load(conn: psycopg.Connection[Any], name: str, parts: list[FeaturePart]) -> None:
    """The loading this replaced: per symbol, a transaction and a text COPY fed one Python row at a time."""
    table = sql.Identifier(feature_table(name))
    for part in parts:
        with conn.transaction():
            conn.execute(sql.SQL("DELETE FROM {} WHERE symbol = %s").format(table), (part.symbol,))
            names = part.rows.column_names
            columns = sql.SQL(", ").join(map(sql.Identifier, names))
            with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, columns)) as copy:
                for row in zip(*(part.rows.column(n).to_pylist() for n in names), strict=True):
                    copy.write_row(row)


def run(quick: bool = False) -> list[dict[str, Any]]:
    name = "backtesting"
    base = load_profile(name, [Path("profiles")], as_of=AS_OF)
    # Quick: the same 12 months (five distinct folds) over its first 10 symbols.
    base = replace(base, timeframes=("1d",), listings=base.listings[:10] if quick else base.listings)
    work = Path(tempfile.mkdtemp(prefix="refresher-bench-features-", dir="/tmp"))
    work.chmod(0o755)  # the embedded server runs as another user when we are root
    engine = LocalEngine(work / "state")
    try:
        store = FeatureStore(work / "store")
        _store_bars(base, store)
        cold, computed_cold = _grid(base, store)
        warm, computed_warm = _grid(base, store)
        pairs = len(GRID) * FOLDS * len(base.listings)

        # Feature load: the last fold's rows of every grid entry, both ways, into one database.
        profile = _grid_profile(base, FOLDS - 1)
        with closing(make_source(profile)) as source:
            batches = list(compute_features(profile, store, compute_plan(profile, source, store, None)))
        rows = sum(part.rows.num_rows for batch in batches for part in batch.parts)
        server = engine.start("bench_features")
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            started = time.perf_counter()
            for batch in batches:
                replace_feature_rows(conn, batch.use.name, batch.parts)
            ours = time.perf_counter() - started
            started = time.perf_counter()
            for batch in batches:
                _row_loop_load(conn, batch.use.name, batch.parts)
            before = time.perf_counter() - started
    finally:
        engine.stop("bench_features")
        shutil.rmtree(work, ignore_errors=True)
    return [
        {
            "benchmark": f"grid search {len(GRID)} params x {FOLDS} folds, {name}, {len(base.listings)} symbols ({pairs:,} sets)",
            "ours": warm,
            "baseline": cold,
            "unit": "s",
            "ratio": cold / warm,
            "note": f"ours: warm store ({computed_warm} computed); baseline: empty store ({computed_cold} computed)",
        },
        {
            "benchmark": f"feature load, {len(batches)} features x {len(base.listings)} symbols ({rows:,} rows)",
            "ours": ours,
            "baseline": before,
            "unit": "s",
            "ratio": before / ours,
            "note": "ours: one binary COPY per feature; baseline: row-at-a-time text COPY, a transaction per symbol",
        },
    ]


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
