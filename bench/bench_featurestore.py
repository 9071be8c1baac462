"""Feature store benchmarks: fingerprint throughput, hit latency, manifest lookup, 8-process throughput, packs
against one file per key, and Zstandard level 3 (the store's default) against level 1.

Baselines are measured in the same run: the seed fingerprinted a frame by writing it to Parquet in memory and
hashing the bytes with SHA-256, and looked entries up the same way before reading the file with pandas.
Run as a script to print a markdown table; ``make bench`` collects ``run()`` with the other benchmarks.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

if not __package__:  # run as a script: make the repository importable, as `python -m bench` does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featurestore import FeatureStore, fingerprint_table
from featurestore.keys import to_arrow

PROCESSES = 8


def frame(nbytes: int, *, seed: int = 0) -> pd.DataFrame:
    """Minute-bar-like frame of about ``nbytes``: a UTC DatetimeIndex and float/int columns."""
    rows = max(1, nbytes // (8 * 9))
    rng = np.random.default_rng(seed)
    index = pd.date_range("2020-01-01", periods=rows, freq="min", tz="UTC")
    columns: dict[str, Any] = {f"f{i}": rng.random(rows) for i in range(6)}
    columns["volume"] = rng.integers(0, 10**6, rows)
    columns["trades"] = rng.integers(0, 10**4, rows)
    return pd.DataFrame(columns, index=index)


def seed_fingerprint(df: pd.DataFrame) -> str:
    """The seed's method: the whole frame serialised to Parquet in memory, then SHA-256."""
    sink = io.BytesIO()
    df.to_parquet(sink)
    return hashlib.sha256(sink.getvalue()).hexdigest()


def ours_fingerprint(df: pd.DataFrame) -> str:
    return fingerprint_table(to_arrow(df))


def best_of(func: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_fingerprint(size_mb: int) -> dict[str, Any]:
    df = frame(size_mb * 1_000_000)
    gigabytes = float(df.memory_usage(index=True).sum()) / 1e9
    repeat = 3 if size_mb <= 100 else 1
    ours = gigabytes / best_of(lambda: ours_fingerprint(df), repeat)
    baseline = gigabytes / best_of(lambda: seed_fingerprint(df), repeat)
    return _row(f"fingerprint {size_mb} MB frame", ours, baseline, "GB/s", higher_is_better=True)


def bench_fingerprint_arrow(size_mb: int) -> dict[str, Any]:
    """The hash alone, on a table already in Arrow (how the refresher's segments arrive)."""
    df = frame(size_mb * 1_000_000)
    table = to_arrow(df)
    gigabytes = table.nbytes / 1e9
    ours = gigabytes / best_of(lambda: fingerprint_table(table), 3)
    baseline = gigabytes / best_of(lambda: seed_fingerprint(df), 3)
    return _row(f"fingerprint {size_mb} MB Arrow table", ours, baseline, "GB/s", higher_is_better=True)


def rolling_features(raw: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    out = pd.DataFrame(index=raw.index)
    out["mean"] = raw["f0"].rolling(config["window"]).mean()
    out["std"] = raw["f0"].rolling(config["window"]).std()
    return out


def bench_hit_latency(root: Path) -> dict[str, Any]:
    store = FeatureStore(root / "hit")
    raw = frame(8 * 9 * 8_000)  # ~ one month of minute bars
    config = {"window": 20}
    store.get_or_compute("AAPL", raw, config, rolling_features)
    samples = []
    for _ in range(30):
        start = time.perf_counter()
        store.get_or_compute("AAPL", raw, config, rolling_features)
        samples.append(time.perf_counter() - start)
    ours = statistics.median(samples) * 1e3
    # Seed-style hit: key by Parquet+SHA-256 of the raw frame, then pandas reads the cached file.
    path = root / "seed.parquet"
    rolling_features(raw, config).to_parquet(path)
    baseline_samples = []
    for _ in range(30):
        start = time.perf_counter()
        seed_fingerprint(raw)
        pd.read_parquet(path)
        baseline_samples.append(time.perf_counter() - start)
    baseline = statistics.median(baseline_samples) * 1e3
    return _row("get_or_compute hit latency (8k-row frame)", ours, baseline, "ms", higher_is_better=False)


def bench_lookup(root: Path) -> dict[str, Any]:
    store = FeatureStore(root / "lookup")
    ts = pa.array([0], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    store.put_many([(f"seg-{i:05d}", pa.table({"ts": ts, "v": [float(i)]}), "S") for i in range(2_400)])
    keys = [f"seg-{i:05d}" for i in range(2_400)]
    ours = best_of(lambda: store.lookup(keys), 5) * 1e3
    return {"benchmark": "lookup of 2,400 keys (manifest only)", "ours": ours, "baseline": None, "unit": "ms",
            "ratio": None}  # fmt: skip


def _daily_segments(count: int, rows: int) -> list[tuple[str, pa.Table, str]]:
    """``count`` daily-bar-like segments of ``rows`` rows (symbol, date, prices, volume), as a source makes."""
    rng = np.random.default_rng(3)
    out = []
    for i in range(count):
        close = 100 + rng.standard_normal(rows).cumsum()
        table = pa.table(
            {
                "symbol": pa.array([f"S{i % 40:03d}"] * rows),
                "date": pa.array(np.arange(rows, dtype=np.int32) + 19_000 + 31 * (i // 40), pa.date32()),
                "open": np.round(close + rng.random(rows), 2),
                "high": np.round(close + 1 + rng.random(rows), 2),
                "low": np.round(close - 1 - rng.random(rows), 2),
                "close": np.round(close, 2),
                "volume": rng.integers(1, 10**6, rows),
            }
        )
        out.append((f"seg-{rows}-{i:04d}", table, f"S{i % 40:03d}"))
    return out


def _write_and_read(
    root: Path, items: list[tuple[str, pa.Table, str]], **options: Any
) -> tuple[float, float, int]:
    """(put_many seconds, get_many seconds, bytes on disk) for ``items`` in a fresh store."""
    store = FeatureStore(root, **options)
    start = time.perf_counter()
    store.put_many(items)
    wrote = time.perf_counter() - start
    start = time.perf_counter()
    store.get_many([key for key, _t, _s in items])
    read = time.perf_counter() - start
    return wrote, read, sum(p.stat().st_size for p in (root / "data").rglob("*.parquet"))


def bench_packs(root: Path) -> list[dict[str, Any]]:
    """One batch of 200 month-of-daily-bars segments (21 rows): packs vs one file per key, as the refresh stores
    them (``STORE_BATCH``); then Zstandard level 3 vs 1, on such packs and on single minute-bar segments."""
    daily = _daily_segments(200, 21)
    ours = _write_and_read(root / "packs", daily)
    single = _write_and_read(root / "single", daily, pack_max_rows=0)
    rows = [
        {**_row("put_many of 200 daily segments: packs", ours[0], single[0], "s", higher_is_better=False),
         "note": f"baseline: one file and fsync per key; size {ours[2] / 1e3:,.0f} kB vs {single[2] / 1e3:,.0f} kB"
                 f" ({single[2] / ours[2]:.1f}x smaller); get_many of the 200: {ours[1] * 1e3:.0f} ms vs"
                 f" {single[1] * 1e3:.0f} ms"},
    ]  # fmt: skip
    minute = _daily_segments(20, 8_190)
    for name, items in (("200 daily segments in a pack", daily), ("20 minute segments, own files", minute)):
        level3 = _write_and_read(root / f"z3-{len(items)}", items, compression_level=3)
        level1 = _write_and_read(root / f"z1-{len(items)}", items, compression_level=1)
        row = _row(f"Zstandard level 3 vs 1: {name}", level3[0], level1[0], "s", higher_is_better=False)
        row["note"] = (
            f"write time; size {level3[2] / 1e3:,.0f} kB vs {level1[2] / 1e3:,.0f} kB;"
            f" read {level3[1] * 1e3:.0f} ms vs {level1[1] * 1e3:.0f} ms"
        )
        rows.append(row)
    return rows


def bench_put_batches(root: Path, batches: int) -> dict[str, Any]:
    """The production-scale refresh's store writes: ``batches`` puts of 2,000 daily segments (30 for 60,000),
    ``put_many_hashes`` (what the refresh calls) against ``put_many`` (an Entry per key), thread CPU per key."""
    daily = _daily_segments(2_000, 21)
    seconds: dict[str, tuple[float, float]] = {}
    for name in ("put_many", "put_many_hashes"):
        store = FeatureStore(root / f"batches-{name}")
        put = getattr(store, name)
        wall = cpu = 0.0
        for b in range(batches):
            items = [(f"{key}-{b:02d}", table, symbol) for key, table, symbol in daily]
            start, started = time.perf_counter(), time.thread_time()
            put(items)
            wall, cpu = wall + time.perf_counter() - start, cpu + time.thread_time() - started
        seconds[name] = (wall, cpu)
    row = _row(
        f"put_many_hashes of {batches * 2_000:,} daily segments, batches of 2,000 (CPU)",
        seconds["put_many_hashes"][1], seconds["put_many"][1], "s", higher_is_better=False,
    )  # fmt: skip
    keys = batches * 2_000
    row["note"] = (
        f"baseline: put_many (an Entry per key); thread CPU {seconds['put_many_hashes'][1] / keys * 1e6:.0f} vs"
        f" {seconds['put_many'][1] / keys * 1e6:.0f} us a key, wall {seconds['put_many_hashes'][0]:.2f} s vs"
        f" {seconds['put_many'][0]:.2f} s"
    )
    return row


def _worker(root: str, worker: int, operations: int, go: Event, ready: Any) -> None:
    store = FeatureStore(root)
    inputs = [(f"S{i}", frame(8 * 9 * 2_000, seed=i), {"window": 10 + i % 3}) for i in range(12)]
    ready.put(worker)
    go.wait()
    for op in range(operations):
        symbol, raw, config = inputs[(op * 7 + worker) % len(inputs)]
        store.get_or_compute(symbol, raw, config, rolling_features)


def _throughput(root: Path, processes: int, operations: int) -> float:
    context = multiprocessing.get_context("spawn")
    go, ready = context.Event(), context.Queue()
    workers = [
        context.Process(target=_worker, args=(str(root), w, operations, go, ready)) for w in range(processes)
    ]
    for process in workers:
        process.start()
    for _ in workers:
        ready.get(timeout=120)
    start = time.perf_counter()
    go.set()
    for process in workers:
        process.join(timeout=600)
    elapsed = time.perf_counter() - start
    if any(process.exitcode != 0 for process in workers):
        raise RuntimeError(f"a benchmark worker failed: {[p.exitcode for p in workers]}")
    return processes * operations / elapsed


def bench_processes(root: Path, quick: bool) -> dict[str, Any]:
    operations = 40 if quick else 150
    FeatureStore(root / "procs")
    ours = _throughput(root / "procs", PROCESSES, operations)  # cold: includes the single-flight misses
    single = _throughput(root / "single", 1, operations)
    row = _row(f"{PROCESSES}-process get_or_compute throughput", ours, single, "ops/s", higher_is_better=True)
    row["note"] = "baseline: 1 process; 12 overlapping keys, cold start, 2-core machine"
    return row


def _row(name: str, ours: float, baseline: float, unit: str, *, higher_is_better: bool) -> dict[str, Any]:
    ratio = ours / baseline if higher_is_better else baseline / ours
    return {"benchmark": name, "ours": ours, "baseline": baseline, "unit": unit, "ratio": ratio}


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All feature store benchmarks; ``quick`` skips the 1 GB frame and shortens the process run."""
    rows = [bench_fingerprint(100), bench_fingerprint_arrow(100)]
    if not quick:
        rows.append(bench_fingerprint(1000))
    with tempfile.TemporaryDirectory(prefix="bench-featurestore-") as tmp:
        root = Path(tmp)
        rows.append(bench_hit_latency(root))
        rows.append(bench_lookup(root))
        rows.extend(bench_packs(root))
        rows.append(bench_put_batches(root, 10 if quick else 30))
        rows.append(bench_processes(root, quick))
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return "" if value is None else f"{value:,.3f}" if isinstance(value, float) else str(value)

    lines = ["| benchmark | ours | baseline | unit | ratio |", "|---|---:|---:|---|---:|"]
    lines += [
        f"| {r['benchmark']} | {fmt(r['ours'])} | {fmt(r['baseline'])} | {r['unit']} | {fmt(r['ratio'])} |"
        for r in rows
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(_markdown(run(quick="--quick" in sys.argv)))
