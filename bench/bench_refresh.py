"""The product's numbers: backtesting cold, no-op and incremental refresh, and reset, against baselines.

Baselines measured in the same run on the same server: pandas ``to_sql`` (on a slice, extrapolated to the
cold load's row count) and CSV ``COPY`` of the same rows.
"""

from __future__ import annotations

import datetime as dt
import io
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

import psycopg
import pyarrow as pa
import pyarrow.csv as pacsv
from psycopg import sql

from bench._child import child_refresh
from bench.bench_engine import settle, wait_for_spare
from featurestore import FeatureStore
from refresher import snapshot
from refresher.body_keys import keys_path
from refresher.engines.base import ServerInfo
from refresher.engines.local import TEMPLATES, LocalEngine
from refresher.jobs.inprocess import LOADERS
from refresher.profile import load_profile
from refresher.refresh import refresh
from refresher.settings import Settings

AS_OF = dt.date(2025, 10, 31)
# The Arrow pool row: a warm store of this many symbols x months of minute bars into new databases, each pool
# this many times, alternating.
POOL_SYMBOLS, POOL_MONTHS, POOL_RUNS = 100, 2, 3
POOL_VARIABLE = "ARROW_DEFAULT_MEMORY_POOL"
PREVIOUS_MONTH_END = dt.date(2025, 9, 30)


def _workdir() -> Path:
    # World-traversable: the embedded server runs as another user when we are root.
    path = Path(tempfile.mkdtemp(prefix="refresher-bench-", dir="/tmp"))
    path.chmod(0o755)
    return path


def _csv_copy_rate(dsn: str, table: pa.Table) -> float:
    """Rows/s of CSV COPY of ``table`` into a scratch copy of ohlcv_1min."""
    buffer = io.BytesIO()
    pacsv.write_csv(table, buffer, pacsv.WriteOptions(include_header=False))
    payload = buffer.getvalue()
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TEMP TABLE bench_csv (LIKE ohlcv_1min INCLUDING ALL)")
        started = time.perf_counter()
        with conn.cursor().copy("COPY bench_csv FROM STDIN (FORMAT csv)") as copy:
            for offset in range(0, len(payload), 1 << 20):
                copy.write(payload[offset : offset + (1 << 20)])
        conn.commit()
        return table.num_rows / (time.perf_counter() - started)


def _to_sql_rate(dsn: str, table: pa.Table) -> float:
    """Rows/s of pandas ``to_sql`` (SQLAlchemy, multi-row inserts) of ``table``."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(dsn.replace("postgresql://", "postgresql+psycopg://"))
    frame = table.to_pandas()
    try:
        started = time.perf_counter()
        frame.to_sql("bench_to_sql", engine, if_exists="replace", index=False, method="multi", chunksize=5000)
        return table.num_rows / (time.perf_counter() - started)
    finally:
        engine.dispose()


def _plain_copy_seconds(server: ServerInfo, engine: LocalEngine) -> list[float]:
    """Seconds of three ``CREATE DATABASE ... TEMPLATE`` of the loaded database in a row, as the snapshot makes
    (each dropped): what the snapshot phase costs at least. Timed once the background work of the refresh before
    them is done (``settle``): its pool refill copies too, and the new cluster's start left a spare copy of the
    template to make. Three, for the first alone varies most, and not with that work: after a warm backtesting
    refresh, its refill ended, the first copy took 1.7-8.2 s in eight runs (the 3.39 s of e91cb8b's run was one),
    the next ones 0.4-1.9 s but one of 3.7 s, whatever database the first copied, the source all in the page
    cache (fincore), a CHECKPOINT before it 0.0 s, the kernel's dirty pages written back (sync) or not."""
    settle(server, engine)
    times = []
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        for _ in range(3):
            started = time.perf_counter()
            conn.execute(
                sql.SQL("CREATE DATABASE bench_plain_copy TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(server.dbname)
                )
            )
            times.append(time.perf_counter() - started)
            conn.execute("DROP DATABASE bench_plain_copy")
    return times


def _cli_seconds(args: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "refresher.cli", *args], check=True, env=env, capture_output=True)
    return time.perf_counter() - started


def _arrow_pool_row(work: Path) -> dict[str, Any]:
    """A warm store into new databases (fresh interpreters, alternating): the pool refresher chooses
    (``featurestore/__init__.py``) against pyarrow's own default, mimalloc."""
    listed = ", ".join(f"P{i:03d}" for i in range(POOL_SYMBOLS))
    path = work / "arrow_pool.yaml"
    path.write_text(
        f"universe:\n  symbols: [{listed}]\nmonths: {POOL_MONTHS}\nas_of: {AS_OF}\ntimeframes: [1m]\nfeatures: []\n"
    )
    store = work / "store-arrow-pool"
    ours_env = {k: v for k, v in os.environ.items() if k != POOL_VARIABLE}  # as a user who chose none
    envs = {"ours": ours_env, "mimalloc": {**ours_env, POOL_VARIABLE: "mimalloc"}}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in envs}
    for k in range(1 + POOL_RUNS * len(envs)):
        name = "fill" if k == 0 else list(envs)[(k - 1) % len(envs)]
        state = work / f"state-arrow-pool-{k}"
        try:
            result = child_refresh(state, path, store, envs.get(name, ours_env))
        finally:
            LocalEngine(state).stop(path.stem)  # its server and the pool refill it started leave the cores
        if name != "fill":
            assert result["loaded"] > 0 and result["pool"] == ("system" if name == "ours" else name)
            runs[name].append(result)
    ours, base = (statistics.median(r["phases"]["segments"] for r in runs[n]) for n in envs)

    def cpu(name: str) -> str:
        return ", ".join(f"{r['user']:.2f}/{r['sys']:.2f}" for r in runs[name])

    return {
        "benchmark": f"warm store, new database: Arrow's pool, glibc malloc vs mimalloc ({runs['ours'][0]['rows']:,} "
        "minute bars)",
        "ours": ours,
        "baseline": base,
        "unit": "s",
        "ratio": base / ours,
        "note": f"goal >= 1 with less client kernel time; segments phase, median of {POOL_RUNS} each, alternating; "
        f"baseline: ARROW_DEFAULT_MEMORY_POOL=mimalloc (pyarrow's default); client CPU user/sys s: ours {cpu('ours')}, "
        f"mimalloc {cpu('mimalloc')}; peak RSS MB: ours {max(r['rss_mb'] for r in runs['ours']):.0f}, mimalloc "
        f"{max(r['rss_mb'] for r in runs['mimalloc']):.0f}",
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    profile_name = "ui_testing" if quick else "backtesting"
    work = _workdir()
    rows: list[dict[str, Any]] = []
    settings = Settings.from_env(state_dir=work / "state", store_root=work / "store")
    # New clusters copy the user's cached initdb template, as the CLI's do (the first run of a machine builds it).
    templates = settings.cache_dir / TEMPLATES if settings.cache_dir is not None else None
    engine = LocalEngine(settings.state_dir, template_dir=templates)
    try:
        profile = load_profile(profile_name, settings.profiles_dirs, as_of=AS_OF)
        # With the state directory, as the CLI: the refresh notes its minute segments' COPY bodies for its refill.
        cold = refresh(profile, engine, FeatureStore(settings.store_root), state_dir=settings.state_dir)
        note = ", ".join(f"{k} {v:.2f}s" for k, v in cold.phases.items())
        server = engine.start(profile.name)
        dsn = server.dsn()
        # The refresh left a detached refill copying the database twice, then making the COPY bodies the warm
        # row below sends, and a spare copy of the template: timing anything next on the same disk and cores
        # before they end measures them too.
        settle(server, engine, bodies=keys_path(settings.state_dir, profile.name))

        # Baselines on a slice of the very bars we loaded, extrapolated to the cold load's row count.
        with psycopg.connect(dsn) as conn:
            cur = conn.execute(
                "SELECT * FROM ohlcv_1min ORDER BY symbol, ts LIMIT %s", (200_000 if quick else 1_000_000,)
            )
            names = [d.name for d in cur.description or []]
            slice_table = pa.Table.from_pylist([dict(zip(names, r, strict=True)) for r in cur.fetchall()])
        csv_rate = _csv_copy_rate(dsn, slice_table)
        to_sql_rate = _to_sql_rate(dsn, slice_table.slice(0, 20_000))
        total = cold.rows_loaded
        rows.append(
            {
                "benchmark": f"{profile_name} cold refresh ({total:,} rows)",
                "ours": cold.seconds,
                "baseline": total / csv_rate,
                "unit": "s",
                "ratio": total / csv_rate / cold.seconds,
                "note": f"goal <= 10 s (backtesting); baseline: CSV COPY of the same rows, load only; {note}",
            }
        )
        rows.append(
            {
                "benchmark": f"{profile_name} cold refresh vs pandas to_sql",
                "ours": cold.seconds,
                "baseline": total / to_sql_rate,
                "unit": "s",
                "ratio": total / to_sql_rate / cold.seconds,
                "note": "baseline: to_sql on 20k rows, extrapolated",
            }
        )

        noop_times = []
        for _ in range(3):
            report = refresh(profile, engine, FeatureStore(settings.store_root))
            assert report.segments.loaded == 0
            noop_times.append(report.seconds)
        rows.append(
            {
                "benchmark": "no-op refresh (library, median of 3)",
                "ours": statistics.median(noop_times),
                "unit": "s",
                "note": "target <= 0.5 s",
            }
        )
        env = {
            **os.environ,
            "REFRESHER_STATE_DIR": str(settings.state_dir),
            "FEATURE_STORE_PATH": str(settings.store_root),
        }
        args = [
            "refresh",
            "--profile",
            profile_name,
            "--engine",
            "local",
            "--json",
            "--as-of",
            AS_OF.isoformat(),
        ]
        cli = statistics.median(_cli_seconds(args, env) for _ in range(3))
        rows.append(
            {
                "benchmark": "no-op refresh (CLI wall time, median of 3)",
                "ours": cli,
                "unit": "s",
                "note": "includes interpreter start and the imports a no-op needs (psycopg, pyarrow, DuckDB; not pandas)",
            }
        )

        resets = []
        clone_times = []
        for _ in range(5):
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("DELETE FROM ohlcv_daily")
            resets.append(snapshot.restore_pristine(server).seconds)
            # The background refill ends, as between two developer resets, and before the baseline below.
            settle(server)
        template_started = time.perf_counter()
        with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE bench_template_clone TEMPLATE "{profile.name}__pristine"')
            clone_times.append(time.perf_counter() - template_started)
            conn.execute("DROP DATABASE bench_template_clone")
        rows.append(
            {
                "benchmark": "reset (median of 5)",
                "ours": statistics.median(resets) * 1000,
                "baseline": clone_times[0] * 1000,
                "unit": "ms",
                "ratio": clone_times[0] / statistics.median(resets),
                "note": "baseline: plain CREATE DATABASE ... TEMPLATE; target <= 1000 ms",
            }
        )

        # The same store into a database made from nothing: after `down`, a new checkout, a teammate's store. So
        # the first server goes down first: its autovacuum (a vacuum and analyze of every loaded month, about a
        # minute after its load) and its pool's refills would otherwise share the two cores with this row.
        engine.stop(profile.name)
        warm_engine = LocalEngine(work / "state-warm", template_dir=templates)
        # The template's spare copy, made in the background since the last new cluster, as for a user's next one.
        wait_for_spare(warm_engine)
        kept = FeatureStore(settings.store_root).get_cache_stats().bodies.entries  # the cold refill's
        try:
            warm = refresh(profile, warm_engine, FeatureStore(settings.store_root))
            copies = _plain_copy_seconds(warm_engine.start(profile.name), warm_engine)
        finally:
            warm_engine.stop(profile.name)
        assert (warm.segments.fetched, warm.rows_loaded) == (0, total)
        rows.insert(
            1,
            {
                "benchmark": f"{profile_name} warm store, new database",
                "ours": warm.seconds,
                "baseline": cold.seconds,
                "unit": "s",
                "ratio": cold.seconds / warm.seconds,
                "note": "goal <= 5 s (backtesting); baseline: the cold refresh above; "
                + ", ".join(f"{k} {v:.2f}s" for k, v in warm.phases.items())
                + "; a plain CREATE DATABASE ... TEMPLATE of the loaded database, its pool refill done, three in a "
                f"row: median {statistics.median(copies):.2f}s ({', '.join(f'{s:.2f}' for s in copies)})"
                + f"; {kept} COPY bodies in the store",
            },
        )
        # The same again with one loader: two months fill at once on two connections (``refresher.partitions``),
        # the server's COPY FREEZE and key build being one core's work a month.
        one_engine = LocalEngine(work / "state-one-loader", template_dir=templates)
        wait_for_spare(one_engine)  # as for the row it is compared with
        try:
            one = refresh(profile, one_engine, FeatureStore(settings.store_root), loaders=1)
        finally:
            one_engine.stop(profile.name)
        rows.insert(
            2,
            {
                "benchmark": f"{profile_name} warm store, new database: segments phase, {LOADERS} loaders",
                "ours": warm.phases["segments"],
                "baseline": one.phases["segments"],
                "unit": "s",
                "ratio": one.phases["segments"] / warm.phases["segments"],
                "note": "goal: more than 1 (a second core for the server); baseline: the same with one loader, "
                f"right after (whole refresh {one.seconds:.2f} s)",
            },
        )

        # Incremental: a second server and store, first one month short, then the full range.
        inc_settings = Settings.from_env(state_dir=work / "state-inc", store_root=work / "store-inc")
        inc_engine = LocalEngine(inc_settings.state_dir, template_dir=templates)
        try:
            short = load_profile(profile_name, inc_settings.profiles_dirs, as_of=PREVIOUS_MONTH_END)
            refresh(short, inc_engine, FeatureStore(inc_settings.store_root))
            # Its pool refill and the template's spare copy are done before the timed refresh, as a day later.
            settle(inc_engine.start(short.name), inc_engine)
            report = refresh(profile, inc_engine, FeatureStore(inc_settings.store_root), prune=True)
            rows.append(
                {
                    "benchmark": "incremental refresh (+1 month, --prune)",
                    "ours": report.seconds,
                    "unit": "s",
                    "note": f"{report.segments.loaded} segments, {report.rows_loaded:,} rows loaded, "
                    f"{report.segments.pruned} pruned",
                }
            )
        finally:
            inc_engine.stop(profile.name)
        rows.append(_arrow_pool_row(work))
    finally:
        engine.stop(profile_name)
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
