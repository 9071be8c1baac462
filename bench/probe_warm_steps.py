"""A probe, not a ``make bench`` row: where the segments phase of the warm-store row (backtesting from a store
holding every segment and its COPY body, into a new database) spends its time and whose CPU it is.

    python -m bench.probe_warm_steps [--store DIR] [--runs 2]

Each run is the row's refresh (a new local cluster from the template's spare, ``refresh`` with two loaders),
with each new month's steps timed on the loader's thread and the server's CPU read from the loader session's
``/proc/<pid>/stat`` before and after (the local engine's server runs on this machine): CREATE TABLE, COPY
FREEZE of the bodies, the primary key, ATTACH, and the rest of the transaction (locks, DELETE, ledger, commit).
Wall times on a machine shared with other loads swell with them; the CPU columns do not, and they are what the
phase is bound by. Without ``--store``, one is filled first by a cold refresh and its refill's COPY bodies.
Results: docs/architecture.md, "Where the warm load's time goes".
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import resource
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import featurestore  # noqa: F401  (Arrow's memory pool, as a user's refresh)
from bench.bench_engine import settle, wait_for_spare
from bench.bench_refresh import _workdir
from featurestore import FeatureStore
from refresher import load, partitions
from refresher.body_keys import keys_path
from refresher.engines.local import TEMPLATES, LocalEngine
from refresher.profile import load_profile
from refresher.refresh import refresh
from refresher.settings import Settings

AS_OF = dt.date(2025, 10, 31)
_TICK = os.sysconf("SC_CLK_TCK")


def _backend_cpu(conn: Any) -> float:
    """The CPU seconds (user + system) the server process of ``conn``'s session has used."""
    fields = Path(f"/proc/{conn.info.backend_pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class _Steps:
    """Wall and server CPU per step, summed over the run's months."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])

    @contextmanager
    def step(self, name: str, conn: Any) -> Iterator[None]:
        wall, cpu = time.perf_counter(), _backend_cpu(conn)
        try:
            yield
        finally:
            entry = self.sums[name]
            entry[0] += 1
            entry[1] += time.perf_counter() - wall
            entry[2] += _backend_cpu(conn) - cpu

    def wrap(self, module: Any, attr: str, name: str) -> Callable[[], None]:
        """``module.attr`` timed as ``name`` (its first argument is the connection); returns the undo."""
        original = getattr(module, attr)

        def timed(conn: Any, *args: Any, **kwargs: Any) -> Any:
            with self.step(name, conn):
                return original(conn, *args, **kwargs)

        setattr(module, attr, timed)
        return lambda: setattr(module, attr, original)


def _filled_store(work: Path, settings: Settings, templates: Path | None) -> Path:
    """A store filled by a cold backtesting refresh, its minute segments' COPY bodies made by the refill."""
    state = work / "cold"
    engine = LocalEngine(state, template_dir=templates)
    profile = load_profile("backtesting", settings.profiles_dirs, as_of=AS_OF)
    store = work / "store"
    try:
        refresh(profile, engine, FeatureStore(store), state_dir=state)
        settle(engine.start(profile.name), engine, bodies=keys_path(state, profile.name))
    finally:
        engine.stop(profile.name)
    return store


def _run(store: Path, work: Path, settings: Settings, templates: Path | None, k: int) -> None:
    engine = LocalEngine(work / f"warm-{k}", template_dir=templates)
    wait_for_spare(engine)
    profile = load_profile("backtesting", settings.profiles_dirs, as_of=AS_OF)
    steps = _Steps()
    # The order of the months' steps (``load._fill_by_bodies``): create_filled (CREATE, then the COPY through
    # copy_bodies, then the key), attach_filled; the whole transaction inside load_segments.
    undo = [
        steps.wrap(load, "load_segments", "transaction"),
        steps.wrap(partitions, "create_filled", "create, copy, key"),
        steps.wrap(load, "copy_bodies", "copy"),
        steps.wrap(partitions, "attach_filled", "attach"),
    ]
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        report = refresh(profile, engine, FeatureStore(store))
    finally:
        for each in undo:
            each()
        engine.stop(profile.name)
    after = resource.getrusage(resource.RUSAGE_SELF)
    client = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(f"run {k + 1}: {report.seconds:.2f} s, {report.rows_loaded:,} rows; phases", report.phases)
    print(f"  client CPU (this process, the whole refresh) {client:.2f} s")
    sums = steps.sums
    total, whole, copy = sums["transaction"], sums["create, copy, key"], sums["copy"]
    rows = {
        "COPY FREEZE of the bodies": copy,
        "CREATE TABLE and primary key": [whole[0], whole[1] - copy[1], whole[2] - copy[2]],
        "ATTACH": sums["attach"],
        "the rest (locks, ledger, commit...)": [
            total[0],
            total[1] - whole[1] - sums["attach"][1],
            total[2] - whole[2] - sums["attach"][2],
        ],
    }
    for name, (count, wall, cpu) in rows.items():
        print(f"  {name:36s} x{int(count):<4d} wall {wall:6.2f} s  server CPU {cpu:5.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, help="a store holding backtesting's segments and COPY bodies")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    work = _workdir()  # world-traversable: the embedded server runs as another user when we are root
    settings = Settings.from_env(state_dir=work / "state", store_root=work / "store")
    templates = settings.cache_dir / TEMPLATES if settings.cache_dir is not None else None
    try:
        store = args.store or _filled_store(work, settings, templates)
        for k in range(args.runs):
            _run(store, work, settings, templates, k)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
