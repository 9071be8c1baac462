"""The CLI's wall time where a developer feels it: `market status` and a no-op `refresh` (issue 13).

Each command runs in a fresh interpreter, five times; the row is the median. Two baselines measured in the same
run: the interpreter alone (``python -c pass``, the floor no command can beat) and the eager imports every
command paid before the CLI imported only what it uses (pandas, pyarrow, DuckDB, psycopg and the refresh
pipeline): the floor the old CLI could not go below, before doing any work.
"""

from __future__ import annotations

import compileall
import datetime as dt
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_engine import settle
from refresher.engines import make_engine
from refresher.engines.local import LocalEngine
from refresher.settings import Settings

RUNS = 5
AS_OF = dt.date(2025, 10, 31)
EAGER = "import pandas, pyarrow, duckdb, psycopg, refresher.refresh, refresher.render, refresher.jobs.cli"


def _median_seconds(argv: list[str], env: dict[str, str]) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, check=True, env=env, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _settle(env: dict[str, str], profile: str) -> None:
    """Until the background work the cold refresh left is done (the pool refill, then its COPY bodies, the
    template's spare copy), so the no-ops below are timed on a quiet machine, as a developer's next command meets
    it."""
    engine = make_engine("local", Settings.from_env(env))
    assert isinstance(engine, LocalEngine)
    server = engine.info(profile)
    assert server is not None
    settle(server, engine)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "refresher.cli", *args]


def _compile_bytecode() -> None:
    """Write our packages' bytecode, as a user's first run does: with PYTHONDONTWRITEBYTECODE set (CI, sandboxes)
    every timed run would otherwise compile each module changed since its .pyc was written."""
    for package in ("refresher", "featurestore"):
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            compileall.compile_dir(Path(spec.origin).parent, quiet=1)


def run(quick: bool = False) -> list[dict[str, Any]]:
    _compile_bytecode()
    work = Path(tempfile.mkdtemp(prefix="refresher-bench-cli-", dir="/tmp"))
    work.chmod(0o755)  # the embedded server runs as another user when we are root
    env = {
        **os.environ,
        "REFRESHER_STATE_DIR": str(work / "state"),
        "FEATURE_STORE_PATH": str(work / "store"),
        "XDG_CACHE_HOME": str(work / "cache"),
    }
    floor = _median_seconds([sys.executable, "-c", "pass"], env)
    eager = _median_seconds([sys.executable, "-c", EAGER], env)
    rows: list[dict[str, Any]] = []

    market = _cli("market", "status", "--exchange", "XNYS")
    subprocess.run(market, check=True, env=env, capture_output=True)  # compiles the calendar cache once
    ours = _median_seconds(market, env)
    rows.append(
        {
            "benchmark": f"market status (CLI wall time, median of {RUNS})",
            "ours": ours,
            "baseline": eager,
            "unit": "s",
            "ratio": eager / ours,
            "note": f"goal <= 0.2 s; baseline: the old eager imports alone; interpreter alone {floor:.3f} s",
        }
    )

    # ui_testing with its as-of pinned in the file: a no-op without flags is answered by the refresh stamp, and
    # the same no-op with --as-of goes the full way (plan against the store's manifest and the ledger).
    profile = "ui_testing_pinned"
    (work / "profiles").mkdir()
    packaged = Path(__file__).resolve().parents[1] / "profiles" / "ui_testing.yaml"
    (work / "profiles" / f"{profile}.yaml").write_text(packaged.read_text() + f"as_of: {AS_OF.isoformat()}\n")
    env["REFRESHER_PROFILES"] = str(work / "profiles")
    refresh = _cli("refresh", "--profile", profile, "--engine", "local", "--json")
    try:
        subprocess.run(refresh, check=True, env=env, capture_output=True)  # cold: loads everything
        _settle(env, profile)
        for label, argv, goal in (
            ("answered by the refresh stamp", refresh, "goal <= 0.3 s"),
            ("past the stamp (--as-of)", [*refresh, "--as-of", AS_OF.isoformat()], "the full path"),
        ):
            ours = _median_seconds(argv, env)
            rows.append(
                {
                    "benchmark": f"no-op refresh, ui_testing, {label} (CLI wall time, median of {RUNS})",
                    "ours": ours,
                    "baseline": eager,
                    "unit": "s",
                    "ratio": eager / ours,
                    "note": f"{goal}; baseline: the old eager imports alone; interpreter alone {floor:.3f} s",
                }
            )
    finally:
        subprocess.run(_cli("down", "--profile", profile, "--engine", "local"), env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows
