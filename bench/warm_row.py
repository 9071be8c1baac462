"""The warm-store row alone (``bench_refresh``'s "warm store, new database"), trees alternating.

    flock /work/wt/bench.lock python -m bench.warm_row --pairs 6 /path/to/tree-a /path/to/tree-b

Each run is a refresh of the profile in a fresh interpreter whose ``PYTHONPATH`` is one tree, from the same store
into a new state directory (a new cluster from the user's cached template, its spare waited for, as the row
does), stopped and removed after. The store is filled once by a first run of the first tree (``--store`` keeps it
between invocations). Prints each run's phases, the client's and the server's CPU, then per tree the medians, and
for two trees how many pairs the second won and the ratios of the medians (first / second: above 1, the second is
better). Compare CPU as well as wall time: on a machine shared with other loads the wall time follows the load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench._child import child_refresh
from bench.bench_engine import wait_for_spare
from refresher.engines.local import TEMPLATES, LocalEngine
from refresher.profile_files import find_profile_file
from refresher.settings import Settings

MEASURES = ("seconds", "segments", "snapshot", "client", "server")


def _measures(result: dict[str, Any]) -> dict[str, float]:
    phases = result["phases"]
    return {
        "seconds": result["seconds"],
        "segments": phases["segments"],
        "snapshot": phases.get("snapshot", 0.0),
        "client": result["user"] + result["sys"],
        "server": result["server"],
    }


def _run(tree: Path, profile: Path, store: Path, templates: Path | None) -> dict[str, float]:
    state = Path(tempfile.mkdtemp(prefix="refresher-warm-row-", dir="/tmp"))
    state.chmod(0o755)  # the embedded server runs as another user when we are root
    engine = LocalEngine(state, template_dir=templates)
    try:
        if templates is not None:
            wait_for_spare(engine)
        result = child_refresh(
            state, profile, store, {**os.environ, "PYTHONPATH": str(tree)}, template_dir=templates
        )
    finally:
        engine.stop(profile.stem)  # its server and the pool refill it started leave the cores
        shutil.rmtree(state, ignore_errors=True)
    return _measures(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_row", description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (PYTHONPATH) to alternate")
    parser.add_argument(
        "--pairs", type=int, default=4, help="rounds; each runs every tree once, order alternating"
    )
    parser.add_argument("--profile", default="backtesting")
    parser.add_argument(
        "--store", type=Path, help="the warm store (default: a new one, filled first, removed)"
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    profile = find_profile_file(args.profile, settings.profiles_dirs)
    templates = settings.cache_dir / TEMPLATES if settings.cache_dir is not None else None
    work = Path(tempfile.mkdtemp(prefix="refresher-warm-row-store-", dir="/tmp"))
    store = args.store or work / "store"
    trees = [tree.absolute() for tree in args.trees]
    try:
        if not (store / "manifest.duckdb").exists():
            _run(trees[0], profile, store, templates)
        runs: dict[Path, list[dict[str, float]]] = {tree: [] for tree in trees}
        for k in range(args.pairs):
            for tree in trees if k % 2 == 0 else trees[::-1]:
                measured = _run(tree, profile, store, templates)
                runs[tree].append(measured)
                print(f"{k} {tree}: " + " ".join(f"{m} {measured[m]:.2f}" for m in MEASURES), flush=True)
        medians = {tree: {m: statistics.median(r[m] for r in runs[tree]) for m in MEASURES} for tree in trees}
        for tree in trees:
            print(f"median {tree}: " + " ".join(f"{m} {medians[tree][m]:.2f}" for m in MEASURES))
        if len(trees) == 2:
            first, second = trees
            for m in MEASURES:
                won = sum(b[m] < a[m] for a, b in zip(runs[first], runs[second], strict=True))
                ratio = medians[first][m] / medians[second][m] if medians[second][m] else float("nan")
                print(f"{m}: ratio {ratio:.3f}, second lower in {won} of {args.pairs}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
