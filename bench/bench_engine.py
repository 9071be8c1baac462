"""A new local cluster: ``LocalEngine.start`` of a new profile from the cached template against initdb, from the
template's spare copy against a copy of the template, and the template copy the start makes, parallel against one
``cp``.

Each way alternates with the other in one process, each start followed by ``stop`` (as ``refresher down`` then
``refresh`` does): on a busy filesystem the inodes the last stop freed slow the next copy, so both ways meet the
same state. The template is the user's (``$XDG_CACHE_HOME/refresher/pg-templates``), as the CLI's clusters use.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from refresher.engines.base import ServerInfo
from refresher.engines.local import TEMPLATES, LocalEngine
from refresher.pool import pool_status, wait_for_pool
from refresher.settings import Settings

CP = ["cp", "--reflink=auto", "--sparse=always", "-a", "--"]


def _one_cp(source: Path, target: Path) -> None:
    subprocess.run([*CP, f"{source}/.", str(target)], check=True)


def _cp_per_database(source: Path, target: Path) -> None:
    """What the engine runs: one cp per database directory under ``base/`` and one for the rest, at once."""
    (target / "base").mkdir()
    rest = [str(p) for p in source.iterdir() if p.name != "base"]
    jobs = [[*CP, *rest, str(target)]] + [
        [*CP, str(db), str(target / "base")] for db in (source / "base").iterdir()
    ]
    for proc in [subprocess.Popen(job) for job in jobs]:
        if proc.wait() != 0:
            raise OSError(f"{proc.args} failed")


def _template(cache: Path) -> Path:
    """The newest complete template cluster in the cache (the one the starts above just used)."""
    clusters = [p / "pgdata" for p in cache.iterdir() if (p / "complete").is_file()]
    return max(clusters, key=lambda p: (p.parent / "complete").stat().st_mtime)


def wait_for_spare(engine: LocalEngine) -> None:
    """Until the spare copy of the template waits (``LocalEngine.spare_ready``), as it does for a user's next new
    cluster: made in the background after the last start, at low priority."""
    deadline = time.monotonic() + 120
    while not engine.spare_ready():
        if time.monotonic() > deadline:
            raise RuntimeError("no spare copy of the template appeared within 120 s")
        time.sleep(0.1)


def settle(
    server: ServerInfo, engine: LocalEngine | None = None, *, bodies: Path | None = None, timeout: float = 600
) -> None:
    """Until the background work the last refresh, reset or checkout of ``server`` started is done, so the next
    timed step (a baseline above all) meets a quiet server, as a developer's next command does: its pool full
    (``wait_for_pool``; ``bodies``: a refresh's list of COPY bodies, made too), then its detached refill ended,
    whatever it does after its clones (its analyses, bodies, outcome record: ``PoolStatus.refilling``, the
    refill's running note, gone), and with ``engine`` the template's spare copy a new cluster's start leaves
    (``wait_for_spare``). ``wait_for_pool`` alone returns once the clones are ready, the refill still running:
    0.3 s more for ui_testing's (its outcome recorded), and a CLI refresh's refill then makes the COPY bodies the
    refresh listed, at idle priority (65 s for backtesting's 1,200 beside a load, 630cdb1)."""
    deadline = time.monotonic() + timeout
    wait_for_pool(server, timeout=timeout, bodies=bodies)
    while running := pool_status(server).refilling:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.dbname}: {running} after {timeout:.0f} s")
        time.sleep(0.1)
    if engine is not None:
        wait_for_spare(engine)


def run(quick: bool = False) -> list[dict[str, Any]]:
    repeat = 4 if quick else 10
    work = Path(tempfile.mkdtemp(prefix="refresher-bench-engine-", dir="/tmp"))
    work.chmod(0o755)  # the embedded server runs as another user when we are root
    cache_dir = Settings.from_env().cache_dir
    cache = cache_dir / TEMPLATES if cache_dir is not None else work / TEMPLATES
    engines = {
        "template": LocalEngine(work / "a", template_dir=cache, spare=False),
        "initdb": LocalEngine(work / "b"),
        "spare": LocalEngine(work / "c", template_dir=cache),
    }
    starts: dict[str, list[float]] = {way: [] for way in engines}
    copies: dict[str, list[float]] = {"parallel": [], "one": []}
    try:
        for engine in engines.values():  # the first start of a machine builds the template: not timed
            engine.start("bench_engine")
            engine.stop("bench_engine")
        for _ in range(repeat):
            for way, engine in engines.items():
                # The spare start leaves a spare copy to make in the background: each start (the two others
                # too, and the copies below) waits for it, or it times that copy beside it.
                wait_for_spare(engines["spare"])
                started = time.perf_counter()
                engine.start("bench_engine")
                starts[way].append(time.perf_counter() - started)
                engine.stop("bench_engine")
        wait_for_spare(engines["spare"])
        template = _template(cache)
        files = sum(1 for _ in template.rglob("*"))
        for _ in range(repeat):
            for way, copy in (("parallel", _cp_per_database), ("one", _one_cp)):
                target = work / "copy"
                target.mkdir()
                started = time.perf_counter()
                copy(template, target)
                copies[way].append(time.perf_counter() - started)
                shutil.rmtree(target)
    finally:
        for engine in engines.values():
            engine.stop("bench_engine")
        shutil.rmtree(work, ignore_errors=True)
    ours, initdb = statistics.median(starts["template"]), statistics.median(starts["initdb"])
    spare = statistics.median(starts["spare"])
    fewer = sum(s < t for s, t in zip(starts["spare"], starts["template"], strict=True))
    parallel, one = statistics.median(copies["parallel"]), statistics.median(copies["one"])
    return [
        {"benchmark": f"start of a new profile's local cluster (median of {repeat}, alternating)", "ours": ours,
         "baseline": initdb, "unit": "s", "ratio": initdb / ours,
         "note": "ours: template copy, password in single-user mode, pg_ctl start -W and a 10 ms login poll, the "
         "profile's database by FILE_COPY; baseline: the same start running initdb; each start followed by stop"},
        {"benchmark": f"start of a new profile's local cluster from the spare (median of {repeat}, alternating)",
         "ours": spare, "baseline": ours, "unit": "s", "ratio": ours / spare,
         "note": f"goal: faster (ratio > 1); ours: the template's spare copy, made in the background since the last "
         f"start, renamed in; baseline: the start above, copying the template (faster in {fewer} of {repeat}). "
         "Alone the copy into a fresh block group is short; in a refresh it competes with the plan and the fetcher "
         "for the cores (the warm store row's engine phase)"},
        {"benchmark": f"copy of the cluster template ({files:,} files and directories, median of {repeat})",
         "ours": parallel, "baseline": one, "unit": "s", "ratio": one / parallel,
         "note": "one cp per database directory and one for the rest, at once, vs one cp; nearly all kernel time "
         "creating files, so it varies with the filesystem's state and the machine's load"},
    ]  # fmt: skip
