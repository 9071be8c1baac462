"""Segment jobs on Redis Streams: submitting 120,000 jobs, `jobs status` on that run, and rows/s of an
in-process refresh against one and two worker processes on the same profile (each with a cold store and a
fresh server, so all three fetch, store and load the same segments).

Needs redis-server on PATH; it runs on a free loopback port with AOF (everysec) in a temp dir.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from featurestore import FeatureStore
from refresher.engines.local import LocalEngine
from refresher.jobs.queue import connect, stream_key
from refresher.jobs.runs import RunSpec, run_status, submit_jobs
from refresher.jobs.segment import SegmentJob
from refresher.profile import load_profile
from refresher.refresh import refresh
from refresher.segments import Segment
from refresher.settings import Settings
from tests.redis_server import RedisServer

AS_OF = dt.date(2025, 10, 31)


def _burst_workers(
    n: int, prefix: str, common: list[str], env: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    """``n`` worker processes that drain the queue and exit."""
    cli = [sys.executable, "-m", "refresher.cli", "worker", "--burst"]
    return [
        subprocess.Popen(
            [*cli, "--name", f"{prefix}{i}", *common],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(n)
    ]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _submit_rows(url: str) -> list[dict[str, Any]]:
    client = connect(url)
    jobs = [
        SegmentJob(
            Segment(f"S{i:04d}", tf, dt.date(2020 + m // 12, m % 12 + 1, 1)), f"seg-{i}-{tf}-{m}", "UTC"
        )  # type: ignore[arg-type]
        for i in range(1000)
        for m in range(60)
        for tf in ("1d", "1m")
    ]
    spec = RunSpec("bench", "/bench.yaml", AS_OF.isoformat(), "host=db dbname=bench", False)
    now = dt.datetime.now(dt.UTC)
    submitted = submit_jobs(client, spec, jobs, now=now, chunk=1000)
    per_job_ms = [t / submitted.chunk_size * 1000 for t in submitted.chunk_seconds]
    # Baseline: one XADD per round trip, on a sample.
    single = []
    for job in jobs[:2000]:
        began = time.perf_counter()
        client.xadd(stream_key("low"), {"job": json.dumps({"seg": str(job.segment)})})
        single.append((time.perf_counter() - began) * 1000)
    status_ms = []
    for _ in range(50):
        began = time.perf_counter()
        run_status(client, submitted.run_id)
        status_ms.append((time.perf_counter() - began) * 1000)
    return [
        {
            "benchmark": f"jobs submit, {submitted.jobs:,} jobs (total)",
            "ours": submitted.seconds,
            "unit": "s",
            "note": "pipelined XADD in chunks of 1,000; required per job < 100 ms",
        },
        {
            "benchmark": "jobs submit, per job p50 / p99",
            "ours": statistics.median(per_job_ms),
            "baseline": statistics.median(single),
            "unit": "ms",
            "ratio": statistics.median(single) / statistics.median(per_job_ms),
            "note": f"p99 {_pct(per_job_ms, 0.99):.4f} ms (goal < 5); baseline one XADD per round trip, "
            f"p99 {_pct(single, 0.99):.3f} ms",
        },
        {
            "benchmark": "jobs status on the 120,000-job run, p50",
            "ours": statistics.median(status_ms),
            "unit": "ms",
            "note": f"p99 {_pct(status_ms, 0.99):.2f} ms (required < 50, goal < 10); library call",
        },
    ]


def _throughput(url: str, work: Path, profile_name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    settings = Settings.from_env(state_dir=work / "state-inproc", store_root=work / "store-inproc")
    engine = LocalEngine(settings.state_dir)
    profile = load_profile(profile_name, settings.profiles_dirs, as_of=AS_OF)
    try:
        report = refresh(profile, engine, FeatureStore(settings.store_root))
        seconds = report.seconds - report.phases.get("engine", 0) - report.phases.get("snapshot", 0)
        inproc = report.rows_loaded / seconds
        rows.append(
            {
                "benchmark": f"{profile_name}: in-process refresh",
                "ours": inproc,
                "unit": "rows/s",
                "note": f"{report.rows_loaded:,} rows in {seconds:.1f} s (plan, segments, features)",
            }
        )
    finally:
        engine.stop(profile.name)
    for workers in (1, 2):
        state, store = work / f"state-w{workers}", work / f"store-w{workers}"
        env = {**os.environ, "REFRESHER_STATE_DIR": str(state), "FEATURE_STORE_PATH": str(store)}
        cli = [sys.executable, "-m", "refresher.cli"]
        common = ["--engine", "local", "--queue", url]
        # The server starts before the clock does, as the in-process row leaves out engine start.
        LocalEngine(state).start(profile.name)
        began = time.perf_counter()
        submitted = subprocess.run(
            [
                *cli,
                "jobs",
                "submit",
                "--profile",
                profile_name,
                "--as-of",
                AS_OF.isoformat(),
                "--json",
                *common,
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        run_id = json.loads(submitted.stdout)["run_id"]
        procs = _burst_workers(workers, "bench", common, env)
        for proc in procs:
            proc.wait()
        seconds = time.perf_counter() - began
        status = run_status(connect(url), run_id)
        rows.append(
            {
                "benchmark": f"{profile_name}: {workers} worker process(es)",
                "ours": status.rows_loaded / seconds,
                "baseline": inproc,
                "unit": "rows/s",
                "ratio": status.rows_loaded / seconds / inproc,
                "note": f"{status.rows_loaded:,} rows, {status.done}/{status.total} jobs in {seconds:.1f} s "
                "(submit + load + features); baseline: in-process",
            }
        )
        LocalEngine(state).stop(profile.name)
    return rows


def _collector_seconds(url: str, work: Path, profile_name: str, *, held: bool) -> tuple[float, int, float]:
    """(seconds in cyclic collections, collections, wall seconds) of an in-process burst worker draining a run of
    ``profile_name`` into a fresh server and a cold store; ``held=False`` runs it without holding the collector
    back per batch (the worker as it was)."""
    import contextlib
    import gc
    from unittest import mock

    from refresher.jobs import worker as worker_module

    tag = "held" if held else "plain"
    state, store = work / f"state-gc-{tag}", work / f"store-gc-{tag}"
    env = {**os.environ, "REFRESHER_STATE_DIR": str(state), "FEATURE_STORE_PATH": str(store)}
    engine = LocalEngine(state)
    engine.start(profile_name)
    spent, count, began = [0.0], [0], [0.0]

    def timed(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - began[0]
            count[0] += 1

    submit = [sys.executable, "-m", "refresher.cli", "jobs", "submit", "--profile", profile_name]
    submit += ["--as-of", AS_OF.isoformat(), "--engine", "local", "--queue", url]
    # The baseline: the worker as it was, its batches run with the collector as Python sets it.
    unheld = mock.patch.object(worker_module, "fewer_collections", lambda **_: contextlib.nullcontext())
    try:
        subprocess.run(submit, env=env, check=True, capture_output=True)
        if not held:
            unheld.start()
        settings = Settings.from_env(env, engine="local")
        gc.collect()
        gc.callbacks.append(timed)
        started = time.perf_counter()
        worker_module.Worker(url, settings, worker_module.WorkerOptions("gc", burst=True)).run()
        wall = time.perf_counter() - started
    finally:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(timed)
        if not held:
            unheld.stop()
        engine.stop(profile_name)
    return spent[0], count[0], wall


def _collector_row(url: str, work: Path, profile_name: str) -> dict[str, Any]:
    plain = _collector_seconds(url, work, profile_name, held=False)
    redis.Redis.from_url(url).flushall()
    ours = _collector_seconds(url, work, profile_name, held=True)
    return {
        "benchmark": f"{profile_name}: an in-process worker's time in cyclic garbage collections",
        "ours": ours[0],
        "baseline": plain[0],
        "unit": "s",
        "ratio": plain[0] / max(ours[0], 1e-6),
        "note": f"goal: fewer pauses, the worker's memory flat; ours: the collector held back per job batch "
        f"({ours[1]} collections, drained in {ours[2]:.1f} s); baseline: the same run without "
        f"({plain[1]} collections, {plain[2]:.1f} s); a worker's live set is small, so collections cost it little",
    }


def _peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set so far (VmHWM), in MB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _scale_profiles(work: Path, symbols: int) -> Path:
    """Two profiles over one synthetic universe: 5 years of daily bars, and its last month of minute bars."""
    folder = work / f"profiles-{symbols}"
    folder.mkdir()
    names = ", ".join(f"Z{i:04d}" for i in range(symbols))
    for name, months, timeframe in (("scale_daily", 60, "1d"), ("scale_minute", 1, "1m")):
        (folder / f"{name}.yaml").write_text(
            f"universe:\n  symbols: [{names}]\nmonths: {months}\ntimeframes: [{timeframe}]\nfeatures: []\n"
        )
    return folder


def _scale_run(url: str, work: Path, symbols: int, workers: int = 2) -> dict[str, Any]:
    """Submit the two scale profiles into one target database, drain with ``workers`` processes, and record
    rows, seconds and each worker's peak RSS (sampled from /proc while it runs)."""
    profiles = _scale_profiles(work, symbols)
    state, store = work / f"state-scale-{symbols}", work / f"store-scale-{symbols}"
    env = {
        **os.environ,
        "REFRESHER_STATE_DIR": str(state),
        "FEATURE_STORE_PATH": str(store),
        "REFRESHER_PROFILES": str(profiles),
    }
    engine = LocalEngine(state)
    info = engine.start("scale")
    target = info.dsn()
    # Jobs carry the target without its password; workers take it from libpq's environment (docs/jobs.md).
    env["PGPASSWORD"] = info.password
    cli = [sys.executable, "-m", "refresher.cli"]
    common = ["--engine", "local", "--queue", url]
    try:
        began = time.perf_counter()
        run_ids = []
        as_of = ["--as-of", AS_OF.isoformat()]
        for name in ("scale_daily", "scale_minute"):
            out = subprocess.run(
                [*cli, "jobs", "submit", "--profile", name, "--target", target, "--json", *common, *as_of],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            run_ids.append(json.loads(out.stdout)["run_id"])
        procs = _burst_workers(workers, "scale", common, env)
        peaks = [0.0] * workers
        while any(proc.poll() is None for proc in procs):
            for i, proc in enumerate(procs):
                peaks[i] = max(peaks[i], _peak_rss_mb(proc.pid) or 0.0)
            time.sleep(0.2)
        seconds = time.perf_counter() - began
        client = connect(url)
        statuses = [run_status(client, run_id) for run_id in run_ids]
        if any(proc.returncode != 0 for proc in procs) or any(s.done != s.total for s in statuses):
            raise RuntimeError(f"scale run with {symbols} symbols did not complete: {statuses}")
        return {
            "symbols": symbols,
            "jobs": sum(s.total for s in statuses),
            "rows": sum(s.rows_loaded for s in statuses),
            "seconds": seconds,
            "peak_mb": max(peaks),
        }
    finally:
        engine.stop("scale")


def _scale_rows(url: str, work: Path, quick: bool) -> list[dict[str, Any]]:
    """The run grows 4x in symbols; a worker's peak RSS should not (jobs are streamed, never held whole)."""
    # The size is 500 symbols (about 30,500 jobs); BENCH_SCALE_SYMBOLS=small,large changes it.
    default = "10,40" if quick else "125,500"
    small, large = (int(n) for n in os.environ.get("BENCH_SCALE_SYMBOLS", default).split(","))
    runs = [_scale_run(url, work, n) for n in (small, large)]
    big = runs[-1]
    return [
        {
            "benchmark": f"scale run through the queue, {big['symbols']} symbols x 5 y daily + 1 month of minutes",
            "ours": big["rows"] / big["seconds"],
            "unit": "rows/s",
            "note": f"{big['rows']:,} rows, {big['jobs']:,} jobs in {big['seconds']:.0f} s, 2 worker processes",
        },
        {
            "benchmark": f"scale run: peak RSS per worker, {big['symbols']} vs {runs[0]['symbols']} symbols",
            "ours": big["peak_mb"],
            "baseline": runs[0]["peak_mb"],
            "unit": "MB",
            "ratio": runs[0]["peak_mb"] / big["peak_mb"],
            "note": f"goal: flat as the run grows 4x (ratio near 1); {runs[0]['jobs']:,} vs {big['jobs']:,} jobs",
        },
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="refresher-bench-jobs-", dir="/tmp"))
    work.chmod(0o755)
    server = RedisServer.started(work)
    url = server.url
    try:
        rows = _submit_rows(url)
        redis.Redis.from_url(url).flushall()
        rows += _throughput(url, work, "ui_testing" if quick else "backtesting")
        redis.Redis.from_url(url).flushall()
        rows.append(_collector_row(url, work, "ui_testing"))
        redis.Redis.from_url(url).flushall()
        rows += _scale_rows(url, work, quick)
        return rows
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
