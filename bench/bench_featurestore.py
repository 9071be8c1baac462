"""Feature store benchmarks: fingerprint throughput, hit latency, manifest lookup and 8-process throughput.

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
