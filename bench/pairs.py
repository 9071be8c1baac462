"""Refreshes of two checkouts, alternating, for comparing a change against the code before it.

    python -m bench.pairs --base /path/to/other/checkout [--runs 3] {backtesting,production,warm}

Each run is a fresh interpreter with ``PYTHONPATH`` set to its checkout, a new local server and an empty store
in a temporary directory (removed after); ``warm`` is ``bench_refresh``'s warm-store row alone: backtesting from
one store into a new server (its cluster from the template's spare, waited for, as the row does), the store
filled once first by a run of ``--base`` (``--store`` keeps it between invocations). Each run is under ``flock`` of ``--lock`` (one comparison at a time on a shared
machine). A run prints one JSON line: wall seconds, the refresh's phases, the interpreter's CPU (user + sys)
and the server's (the postmaster, its backends and those that exited, read just before it stops). Compare the
ratios of a sitting's pairs, not seconds across sittings: other loads move every number.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# The child: one cold refresh (backtesting, or the production daily profile of bench_production at --symbols).
_CODE = r"""
import datetime as dt, json, os, resource, shutil, sys, tempfile, time
from pathlib import Path
import featurestore
from featurestore import FeatureStore
from refresher.engines.local import TEMPLATES, LocalEngine
from refresher.profile import load_profile
from refresher.refresh import refresh
from refresher.settings import Settings

kind, symbols = sys.argv[1], int(sys.argv[2])
work = Path(tempfile.mkdtemp(prefix="refresher-pairs-", dir="/tmp"))
work.chmod(0o755)  # the embedded server runs as another user when we are root
settings = Settings.from_env(state_dir=work / "state", store_root=Path(sys.argv[3]) if kind == "warm" else work / "store")
engine = LocalEngine(settings.state_dir, template_dir=settings.cache_dir / TEMPLATES if settings.cache_dir else None)
if kind == "warm" and engine.template_dir is not None:
    from bench.bench_engine import wait_for_spare
    wait_for_spare(engine)
if kind in ("backtesting", "warm"):
    profile = load_profile("backtesting", settings.profiles_dirs, as_of=dt.date(2025, 10, 31))
else:
    path = work / "prod.yaml"
    listed = ", ".join(f"S{i:04d}" for i in range(symbols))
    path.write_text(
        f"universe:\n  symbols: [{listed}]\nmonths: 60\nas_of: 2025-03-31\ntimeframes: [1d]\nfeatures: []\n"
    )
    profile = load_profile(str(path), [])


def server_cpu() -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    pids = [int(f.read_text().split()[0]) for f in (work / "state").rglob("postmaster.pid")]
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) in pids:  # its own time and that of the children it has reaped
            total += sum(int(x) for x in fields[11:15]) / ticks
        elif int(fields[1]) in pids:
            total += sum(int(x) for x in fields[11:13]) / ticks
    return total


try:
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    report = refresh(profile, engine, FeatureStore(settings.store_root))
    seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(json.dumps({"seconds": round(seconds, 3), "phases": report.phases, "rows": report.rows_loaded,
                      "client_cpu": round(cpu, 2), "server_cpu": round(server_cpu(), 2),
                      "load": round(os.getloadavg()[0], 1)}))
finally:
    engine.stop(profile.name)
    shutil.rmtree(work, ignore_errors=True)
"""


def one_run(checkout: Path, kind: str, symbols: int, lock: Path, store: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    done = subprocess.run(
        ["flock", str(lock), sys.executable, "-c", _CODE, kind, str(symbols), str(store)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=checkout,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pairs", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("backtesting", "production", "warm"))
    parser.add_argument("--base", type=Path, required=True, help="the checkout to compare against")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--runs", type=int, default=3, help="pairs (default 3)")
    parser.add_argument(
        "--symbols", type=int, default=1000, help="production profile's symbols (default 1000)"
    )
    parser.add_argument("--lock", type=Path, default=Path("/tmp/refresher-bench.lock"))
    parser.add_argument("--store", type=Path, help="warm: the store to keep (default: a new one, removed)")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    work = Path(tempfile.mkdtemp(prefix="refresher-pairs-store-", dir="/tmp"))
    store = args.store or work / "store"
    try:
        if args.kind == "warm" and not (store / "manifest.duckdb").exists():
            one_run(args.base, args.kind, args.symbols, args.lock, store)  # fills the store
        for k in range(args.runs):
            # Alternating which goes first: a machine getting busier or quieter favours neither.
            order = ("base", "new") if k % 2 == 0 else ("new", "base")
            for name in order:
                checkout = args.base if name == "base" else args.new
                result = one_run(checkout, args.kind, args.symbols, args.lock, store)
                runs[name].append(result)
                print(json.dumps({"pair": k + 1, "tree": name, **result}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for key in ("seconds", "client_cpu", "server_cpu"):
        base, new = (statistics.median(r[key] for r in runs[n]) for n in ("base", "new"))
        wins = sum(n[key] < b[key] for b, n in zip(runs["base"], runs["new"], strict=True))
        print(
            f"{key}: median {base:.2f} -> {new:.2f} ({base / new:.3f}x), lower in {wins} of {args.runs} pairs"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
