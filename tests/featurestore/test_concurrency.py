"""Many processes and threads on one root: single-flight computation, no errors, and crash consistency."""

from __future__ import annotations

import datetime as dt
import multiprocessing
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from featurestore import FeatureStore, collect_garbage
from featurestore.keys import feature_key
from tests.child_processes import reap
from tests.featurestore import _workers

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 8


def assert_consistent(store: FeatureStore) -> None:
    report = store.validate_cache_integrity(deep=True)
    assert report.ok, report
    entries = store.lookup([p.stem for p in (store.root / "data").glob("*/*.parquet")])
    for entry in entries.values():
        assert store.get(entry.key) is not None


def computations(markers: Path) -> Counter[str]:
    return Counter(path.name.rsplit("-", 1)[0] for path in markers.iterdir())


@pytest.mark.slow
def test_processes_compute_each_key_once(tmp_path: Path) -> None:
    root, markers = tmp_path / "cache", tmp_path / "markers"
    FeatureStore(root)
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        args = [(str(root), str(markers), worker, 3) for worker in range(PROCESSES)]
        results = pool.starmap(_workers.mixed_worker, args)
    assert [errors for _m, errors in results] == [[]] * PROCESSES
    assert [mismatches for mismatches, _e in results] == [0] * PROCESSES
    jobs = _workers.job_inputs(str(markers))
    assert computations(markers) == Counter({f"{c['window']}-{c['seed']}": 1 for _s, _r, c in jobs})
    store = FeatureStore(root)
    stats = store.get_cache_stats()
    assert stats.entries == len(jobs) == len(list((root / "data").glob("*/*.parquet")))
    assert stats.misses == len(jobs) and stats.hits == PROCESSES * 3 * len(jobs) - len(jobs)
    assert_consistent(store)
    assert store.validate_cache_integrity().temporaries == ()


def test_threads_compute_each_key_once(tmp_path: Path) -> None:
    root, markers = tmp_path / "cache", tmp_path / "markers"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda w: _workers.mixed_worker(str(root), str(markers), w, 2), range(8)))
    assert results == [(0, [])] * 8
    assert set(computations(markers).values()) == {1} and len(computations(markers)) == 6
    assert_consistent(FeatureStore(root))


@pytest.mark.slow
def test_sigkill_mid_write_leaves_a_consistent_store(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    store = FeatureStore(root)
    rng = random.Random(7)
    for _ in range(6):
        with subprocess.Popen(
            [sys.executable, "-m", "tests.featurestore._workers", str(root)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as writer:
            try:
                assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
                time.sleep(rng.uniform(0.2, 1.5))
                alive = writer.poll() is None
            finally:
                writer.send_signal(signal.SIGKILL)
                _out, err = writer.communicate()
            assert alive, err
        assert writer.returncode == -signal.SIGKILL
        assert_consistent(store)
    assert store.get_cache_stats().entries > 0
    # What a crash may leave is only strays (temporaries, unrecorded files); GC removes them.
    collect_garbage(store, retention=_weeks(4), grace=_weeks(0))
    report = store.validate_cache_integrity()
    assert report.ok and report.orphans == () and report.temporaries == ()


def _weeks(n: int) -> dt.timedelta:
    return dt.timedelta(weeks=n)


_SLOW_START = """
import pathlib, sys, time
import featurestore.manifest as manifest
started = manifest.Manifest._host
def slow(self):
    pathlib.Path(sys.argv[2]).touch()
    time.sleep(120)  # a process stopped (Ctrl-Z, SIGSTOP) or starved while its DuckDB starts
    return started(self)
manifest.Manifest._host = slow
from featurestore import FeatureStore
FeatureStore(pathlib.Path(sys.argv[1])).lookup_hashes(["key"])
"""


def test_a_process_starting_its_duckdb_holds_no_lock_on_the_manifest(tmp_path: Path) -> None:
    """A fresh process's first read started DuckDB (a third of a second, more on a busy machine) holding the
    manifest's lock: every writer waited, and for good behind a process stopped there."""
    root, marker = tmp_path / "cache", tmp_path / "starting"
    store = FeatureStore(root)
    store.put_many([("key", pa.table({"a": [1]}), None)])
    reader = subprocess.Popen([sys.executable, "-c", _SLOW_START, str(root), str(marker)], cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert reader.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        with store.manifest.write(wait=False):  # StoreLockTimeout at once if the reader holds the lock
            pass
        store.put_many([("other", pa.table({"a": [2]}), None)])
    finally:
        reader.kill()
        reader.wait()
    assert set(store.lookup_hashes(["key", "other"])) == {"key", "other"}


_HOLD_STOPPED = """
import os, pathlib, signal, sys
from featurestore._locks import file_lock
with file_lock(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_computation_held_by_a_stopped_process_is_waited_for_saying_so(tmp_path: Path) -> None:
    """Two processes computing one feature (two refreshes of profiles sharing it): the second waited for the
    first's lock of the key without a word, and for good behind one stopped (Ctrl-Z) while computing."""
    told: list[str] = []
    store = FeatureStore(tmp_path / "cache", on_wait=told.append)
    symbol, raw, config = _workers.job_inputs(str(tmp_path / "markers"))[0]
    key = feature_key(symbol, raw, config, _workers.rolling_features).key
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_STOPPED, str(store._key_lock(key))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    with ThreadPoolExecutor(1) as pool:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            stat = Path(f"/proc/{holder.pid}/stat")
            while stat.read_text().split()[2] != "T":  # stopped: continued only once the wait is told
                assert holder.poll() is None
                time.sleep(0.005)
            computed = pool.submit(store.get_or_compute, symbol, raw, config, _workers.rolling_features)
            deadline = time.monotonic() + 60
            while not told:
                assert time.monotonic() < deadline and not computed.done(), "the wait was never told"
                time.sleep(0.01)
            assert not computed.done()
            holder.send_signal(signal.SIGCONT)
            got = computed.result(timeout=60)
        finally:
            reap(holder)  # its lock released: a computation still waiting takes it and ends
    # Not "the same features": a batch holds all its stripes, which unrelated keys share (FeatureStore._computing).
    assert len(told) == 1 and "computing features holds a lock these keys share" in told[0], told
    assert "waiting for it" in told[0]
    assert got.equals(_workers._direct(raw, config))
