"""Module-level functions run in child processes by the concurrency tests (spawn needs importable targets)."""

from __future__ import annotations

import os
import random
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from featurestore import FeatureStore
from tests.featurestore.conftest import make_bars


def rolling_features(raw: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    """A compute function that leaves one marker file per call, so the tests can count computations."""
    markers = Path(config["markers"])
    markers.mkdir(parents=True, exist_ok=True)
    (markers / f"{config['window']}-{config['seed']}-{uuid.uuid4().hex}").touch()
    time.sleep(0.05)  # widen the window in which other processes ask for the same key
    out = pd.DataFrame(index=raw.index)
    out["mean"] = raw["close"].rolling(config["window"]).mean()
    out["vol"] = raw["close"].pct_change().rolling(config["window"]).std()
    return out


def job_inputs(markers: str) -> list[tuple[str, pd.DataFrame, dict[str, Any]]]:
    """Six distinct (symbol, raw, config) jobs that every worker asks for, in its own order."""
    jobs = []
    for seed in (1, 2, 3):
        for window in (5, 20):
            config = {"window": window, "seed": seed, "markers": markers}
            jobs.append((f"SYM{seed}", make_bars(400, seed=seed), config))
    return jobs


def mixed_worker(root: str, markers: str, worker: int, rounds: int) -> tuple[int, list[str]]:
    """Ask for every job ``rounds`` times in a shuffled order; return (mismatches, error messages)."""
    store = FeatureStore(root)
    rng = random.Random(worker)
    jobs = job_inputs(markers)
    mismatches = 0
    errors: list[str] = []
    for _ in range(rounds):
        rng.shuffle(jobs)
        for symbol, raw, config in jobs:
            try:
                got = store.get_or_compute(symbol, raw, config, rolling_features)
                expected = _direct(raw, config)
                if not got.equals(expected):
                    mismatches += 1
            except Exception as exc:  # reported to the parent, which asserts there were none
                errors.append(f"{type(exc).__name__}: {exc}")
    return mismatches, errors


def _direct(raw: pd.DataFrame, config: dict[str, Any]) -> pd.DataFrame:
    out = pd.DataFrame(index=raw.index)
    out["mean"] = raw["close"].rolling(config["window"]).mean()
    out["vol"] = raw["close"].pct_change().rolling(config["window"]).std()
    return out


def segment(i: int, rows: int) -> pa.Table:
    """A deterministic raw segment; large enough that writing it takes a while."""
    rng = np.random.default_rng(i)
    ts = pa.array(
        np.arange(rows, dtype=np.int64) * 60_000_000 + 1_700_000_000_000_000 + i * 10**9, pa.int64()
    ).cast(pa.timestamp("us", tz="UTC"))
    return pa.table({"ts": ts, "close": rng.random(rows), "volume": rng.integers(0, 10**6, rows)})


def write_forever(root: str) -> None:
    """Write segments (single puts, batches, computed features, evictions) until killed."""
    store = FeatureStore(root)
    i = int.from_bytes(os.urandom(2), "little")
    print("ready", flush=True)
    while True:
        i += 1
        store.put(f"seg-{i % 50}", segment(i, 20_000), symbol=f"S{i % 7}")
        store.put_many([(f"batch-{(i + j) % 40}", segment(i + j, 5_000), "B") for j in range(8)])
        store.get_or_compute(
            f"S{i % 5}",
            make_bars(300, seed=i % 11),
            {"window": 5, "seed": i, "markers": root + "/m"},
            rolling_features,
        )
        if i % 9 == 0:
            store.clear_cache(symbol=f"S{i % 7}")


if __name__ == "__main__":
    write_forever(sys.argv[1])


def heal_and_read(root: str, start_at: float, keys: list[str]) -> int:
    """Open a store whose manifest is damaged at the same instant as other workers; return the keys it finds."""
    while time.time() < start_at:
        time.sleep(0.001)
    store = FeatureStore(root)
    found = store.lookup(keys)
    assert store.validate_cache_integrity(deep=False).ok
    return len(found)


def daily(key: str, rows: int = 21) -> pa.Table:
    """A small table whose content depends on ``key`` alone: any process writing ``key`` writes the same."""
    seed = int.from_bytes(key.encode()[-4:].rjust(4, b"\0"), "little")
    rng = np.random.default_rng(seed)
    ts = pa.array(np.arange(rows, dtype=np.int64) * 86_400_000_000 + seed * 10**6, pa.int64())
    return pa.table({"ts": ts.cast(pa.timestamp("us", tz="UTC")), "close": rng.random(rows)})


def put_overlapping_batches(root: str, start_at: float, first: int, rounds: int) -> list[str]:
    """Put batches of 30 keys starting at ``first``, shifted each round; returns error messages."""
    while time.time() < start_at:
        time.sleep(0.001)
    store = FeatureStore(root)
    errors: list[str] = []
    for r in range(rounds):
        keys = [f"d-{(first + r * 7 + j) % 90:03d}" for j in range(30)]
        try:
            store.put_many([(key, daily(key), "S") for key in keys])
            got = store.get_many(keys)
            if sorted(got) != sorted(keys) or any(not got[k].equals(daily(k)) for k in keys):
                errors.append(f"round {r}: read back {len(got)} of {len(keys)} or different content")
        except Exception as exc:  # reported to the parent, which asserts there were none
            errors.append(f"{type(exc).__name__}: {exc}")
    return errors


def die_before_commit(root: str) -> None:
    """Write a pack, then SIGKILL this process after its rename, before the manifest transaction commits."""
    from featurestore.manifest import Manifest

    def killed(*_args: Any, **_kwargs: Any) -> None:
        os.kill(os.getpid(), 9)

    Manifest.insert = killed  # type: ignore[method-assign]
    FeatureStore(root).put_many([(f"k-{i}", daily(f"k-{i}"), "S") for i in range(10)])


def die_inside_the_insert(root: str) -> None:
    """Put again ``k-0`` .. ``k-9`` (the odd ones with new content) and SIGKILL this process once the batch's
    one INSERT has run (the rows of the changed keys deleted before it), before the transaction commits."""
    from featurestore.manifest import Manifest

    insert = Manifest.insert

    def killed(self: Manifest, con: Any, columns: Any, *, present: Any = None) -> None:
        insert(self, con, columns, present=present)
        os.kill(os.getpid(), 9)

    Manifest.insert = killed  # type: ignore[method-assign]
    FeatureStore(root).put_many([(f"k-{i}", daily(f"k-{i}", 21 + i % 2), "S") for i in range(10)])
