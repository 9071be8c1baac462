"""A files source that matches no file (its directory emptied or wrong on the worker's machine) fails a queue run's
jobs at once with the one line a refresh gives, and `jobs submit` of such a profile is refused up front. Real
redis-server, real worker process, real embedded Postgres."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from refresher.jobs.queue import DEAD, connect, text
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_worker import status, submit, workspace
from tests.refresher.sources.test_files_preflight import no_file_line
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

__all__ = ["workspace"]  # the fixture, shared with test_worker

SYMBOLS = ["AAPL", "MSFT", "KO"]  # as no_file_line says
DAILY = "Date,Open,High,Low,Close,Volume\n2025-03-03,10,11,9,10.5,1000\n2025-03-04,10,11,9,10.5,1000\n"


def files_profile(ws: Workspace) -> tuple[Path, Path]:
    """``ws.profile`` as a files source reading ``data/daily/{symbol}.csv``, each file there; the profile file and
    the data directory."""
    data = ws.root / "data"
    (data / "daily").mkdir(parents=True)
    for symbol in SYMBOLS:
        (data / "daily" / f"{symbol}.csv").write_text(DAILY)
    path = ws.root / "profiles" / f"{ws.profile}.yaml"
    path.write_text(
        f"universe: {{symbols: [{', '.join(SYMBOLS)}]}}\nexchange: XNYS\nstart: 2025-02-01\nend: 2025-03-31\n"
        f"timeframes: [1d]\nsource: {{kind: files, path: '{data}', daily: 'daily/{{symbol}}.csv'}}\n"
    )
    return path, data


def no_directory_line(profile: Path, data: Path) -> str:
    return f"{profile}: source.path='{data}': no such directory"


@pytest.mark.parametrize("gone", ["files", "directory"])
def test_a_files_source_emptied_before_the_worker_dead_letters_its_jobs_with_the_refresh_line(
    workspace: Workspace, redis_server: RedisServer, gone: str
) -> None:
    """Each job loaded its segment empty (a note in the worker's store, no line anywhere) and the run read
    complete; with the directory gone too."""
    ws, url = workspace, redis_server.url
    profile, data = files_profile(ws)
    run = submit(ws, url)
    shutil.rmtree(data / "daily")  # emptied (files moved, a mount gone) on the worker's machine
    if gone == "files":
        (data / "daily").mkdir()
    else:
        shutil.rmtree(data)
    done = ws.run("worker", "--queue", url, "--burst", "--name", "w", "--max-attempts", "3")
    final = status(ws, url, run["run_id"])
    assert (final["done"], final["dead"]) == (0, run["jobs"]), (final, done.stderr)
    line = no_file_line(profile, data) if gone == "files" else no_directory_line(profile, data)
    letters = [(text(f[b"error"]), text(f[b"attempts"])) for _id, f in connect(url).xrange(DEAD)]
    assert letters == [(f"permanent: {line}", "1")] * run["jobs"], letters  # at once, not after 3 attempts
    assert line in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_submit_of_a_files_source_no_file_matches_is_refused_up_front(
    workspace: Workspace, redis_server: RedisServer
) -> None:
    ws, url = workspace, redis_server.url
    profile, data = files_profile(ws)
    shutil.rmtree(data / "daily")
    (data / "daily").mkdir()
    done = ws.run("jobs", "submit", "--profile", ws.profile, "--queue", url, expect=2)
    assert done.stderr == f"refresher: {no_file_line(profile, data)}\n", done.stderr
    assert connect(url).dbsize() == 0  # no run
    assert not any((ws.root / "state").rglob("postmaster.pid"))  # no server started for it
