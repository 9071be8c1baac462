"""The import budget of the quick commands (issue 13): which modules each command imports, read from
``sys.modules`` when it exits (not ``python -X importtime``, which misses lazy imports), never how long it took.

pandas, pyarrow, DuckDB, exchange_calendars and numpy cost about a second of imports on this machine;
`market status`, `status`, `url`, `reset` and `profiles` use none of them, nor does a no-op refresh the stamp
answers; past the stamp, a no-op refresh uses only pyarrow and DuckDB (the store's manifest). Parsing a profile
(pydantic, YAML) is for `profiles` and the full refresh; rich draws only the progress bar of a refresh on a
terminal. Each command runs in a fresh interpreter against a real local server.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.refresher.test_refresh_e2e import AS_OF, Workspace

HEAVY = frozenset({"pandas", "pyarrow", "duckdb", "exchange_calendars"})
# What none of the quick commands may import, the profile's parser aside for `profiles`.
DATA = HEAVY | {"numpy"}
PARSER = frozenset({"pydantic", "pydantic_core", "yaml"})
OUTSIDE_QUICK = DATA | PARSER | {"rich"}
# Modules (dotted, beyond the interpreter's own start) a command may import: about 10% above what each took
# when the budget was set (market status 64, a stamped no-op refresh 267, psycopg alone about 230 of those),
# against 265 and 513 before issue 13; counted from sys.modules, 63 and 270 at 9465bd3, as at 94358ca; the
# stamped no-op 109 since it asks its server through psql, psycopg unimported. A count, not a time: it does not
# move with the machine's load, and every module costs its import.
BUDGET = {"market status": 72, "stamped no-op refresh": 120}
# Our own modules each quick path may import, by name: a module new on the path (an import at the top of a
# module the path loads, where a lazy one would do) fails here with its name, before it moves any count.
# Every command parses its arguments (cli, jobs.parser), may print (render) and ends (featurestore.console);
# `market status` reads the calendar cache; the stamped no-op adds the engine, the stamp and the store's
# generation and the list of COPY bodies to make (the snapshot and pool modules, and psycopg, only when psql's
# answer differs from the stamp's: refresher.stamp).
OURS_MARKET = frozenset(
    {
        "featurestore",
        "featurestore.console",
        "featurestore.errors",
        "refresher",
        "refresher._installed",
        "refresher._lazy",
        "refresher.calendar",
        "refresher.cli",
        "refresher.errors",
        "refresher.jobs",
        "refresher.jobs.parser",
        "refresher.jobs.tiers",
        "refresher.render",
        "refresher.segments",
        "refresher.settings",
    }
)
OURS = {
    "market status": OURS_MARKET,
    "stamped no-op refresh": OURS_MARKET
    | {
        "featurestore.generation",
        "refresher.body_keys",  # whether a killed refill left COPY bodies to make (commands.refresh_if_noop)
        "refresher.commands",
        "refresher.engines",
        "refresher.engines._common",
        "refresher.engines._owner",
        "refresher.engines._pgctl",
        "refresher.engines._pgspare",
        "refresher.engines._pgtemplate",
        "refresher.engines._placement",
        "refresher.engines.base",
        "refresher.engines.local",
        "refresher.profile_files",
        "refresher.stamp",
    },
}


# Runs ``-m MODULE ARGS`` (or nothing) and, at exit, writes every module in ``sys.modules`` to the file named
# first. ``python -X importtime``, which this file read before, logs the ``import`` statement's path only: a
# module imported through ``importlib.import_module`` is not there (refresher.stamp and refresher.engines, which
# the CLI imports lazily through ``refresher._lazy``, were missing from the stamped no-op's count), and an import
# that failed (``try: import simplejson``) is.
_RUNNER = """
import atexit, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sys.modules)))
if len(sys.argv) > 2 and sys.argv[1] == "-m":
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def modules_imported(
    argv: list[str], env: dict[str, str]
) -> tuple[frozenset[str], subprocess.CompletedProcess[str]]:
    """The dotted modules ``python ARGV`` had imported when it exited (``ARGV`` is ``-m MODULE ...``, or empty:
    the interpreter's start alone), whatever the route, and the finished process."""
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "modules"
        done = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(dump), *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        names = frozenset(dump.read_text().split())
    assert "sys" in names, "no module list: the checks below would pass vacuously"
    return names, done


def imported_by(
    args: list[str], env: dict[str, str]
) -> tuple[frozenset[str], subprocess.CompletedProcess[str]]:
    """The top-level packages ``refresher ARGS`` imported, and the finished process."""
    names, done = modules_imported(["-m", "refresher.cli", *args], env)
    return frozenset(name.split(".")[0] for name in names), done


def beyond_the_interpreter(args: list[str], env: dict[str, str]) -> frozenset[str]:
    """The modules ``refresher ARGS`` imported that a bare interpreter start (site, sitecustomize) does not."""
    bare, _ = modules_imported([], env)
    names, _ = modules_imported(["-m", "refresher.cli", *args], env)
    return names - bare


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["url", "--profile", "{profile}"],
        ["reset", "--profile", "{profile}"],
        ["profiles"],
        ["market", "status", "--exchange", "XNYS"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_quick_commands_import_no_data_library(checkout: Workspace, command: list[str]) -> None:
    args = [part.format(profile=checkout.profile) for part in command]
    names, done = imported_by([*args, "--json"], checkout.env)
    assert json.loads(done.stdout)  # it answered, from what it imported
    assert names & (DATA | {"rich"}) == set()
    if command[0] != "profiles":  # which parses every profile
        assert names & PARSER == set()
    if command[0] in ("profiles", "market"):  # which ask no server
        assert "psycopg" not in names
        # No user's module ran: nothing of C's stdio to flush (cli._flush_c_stdio).
        assert "ctypes" not in names
    assert "refresher" in names  # the parse saw our own modules: a broken parse cannot pass


def stamped_noop(checkout: Workspace) -> tuple[frozenset[str], dict[str, Any]]:
    """The top-level packages a no-op refresh the stamp answers imported, and its report. Run again (within a
    deadline) while one is answered through psycopg: the first after the fixture's refresh, or after its
    detached analysis finished, checks with psycopg and records the rows psql compares (refresher.stamp)."""
    refresh = ["refresh", "--profile", checkout.profile, "--engine", "local", "--json"]
    deadline = time.monotonic() + 120
    while True:
        names, done = imported_by(refresh, checkout.env)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        if (set(report["phases"]) == {"stamp"} and "psycopg" not in names) or time.monotonic() > deadline:
            return names, report


def test_a_noop_refresh_imports_no_data_library(checkout: Workspace) -> None:
    names, report = stamped_noop(checkout)
    assert report["segments"]["loaded"] == 0 and report["features"]["computed"] == 0
    # The stamp (refresher.stamp) answers "is it all there?" with the server's psql, the profile's file unparsed:
    # importing psycopg was two thirds of the command's CPU.
    assert set(report["phases"]) == {"stamp"}
    assert names & OUTSIDE_QUICK == set()
    assert "psycopg" not in names


def test_the_quick_paths_stay_within_their_module_budget(checkout: Workspace) -> None:
    refresh = ["refresh", "--profile", checkout.profile, "--engine", "local", "--json"]
    stamped_noop(checkout)  # stamped, whatever happened since the fixture's refresh
    for label, args in (
        ("market status", ["market", "status", "--exchange", "XNYS", "--json"]),
        ("stamped no-op refresh", refresh),
    ):
        extra = beyond_the_interpreter(args, checkout.env)
        assert any(name.startswith("refresher.") for name in extra), label  # the count saw our modules
        assert len(extra) <= BUDGET[label], (label, len(extra), sorted(extra))
        ours = {name for name in extra if name.split(".")[0] in ("refresher", "featurestore")}
        assert ours <= OURS[label], (label, sorted(ours - OURS[label]))


def test_a_noop_refresh_past_the_stamp_imports_the_store_but_not_pandas(checkout: Workspace) -> None:
    # --as-of skips the stamp: the manifest (DuckDB, Arrow) answers; nothing is computed, so no pandas.
    names, done = imported_by(
        [
            "refresh",
            "--profile",
            checkout.profile,
            "--engine",
            "local",
            "--json",
            "--as-of",
            AS_OF.isoformat(),
        ],
        checkout.env,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["segments"]["loaded"] == 0 and "plan" in report["phases"]
    assert names & HEAVY == {"pyarrow", "duckdb"}


def test_market_status_from_the_cache_agrees_with_exchange_calendars(checkout: Workspace) -> None:
    import exchange_calendars as xcals

    instants = [
        "2024-11-26T15:00:00+00:00",  # New York, open
        "2024-11-28T17:00:00+00:00",  # Thanksgiving
        "2024-11-29T18:30:00+00:00",  # after the early close
        "2024-11-30T12:00:00+00:00",  # Saturday
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = xcals.get_calendar("XNYS", start="2024-01-01", end="2025-12-31")
        for at in instants:
            names, done = imported_by(["market", "status", "-x", "XNYS", "--at", at, "--json"], checkout.env)
            assert names & OUTSIDE_QUICK == set()
            state = json.loads(done.stdout)
            minute = dt.datetime.fromisoformat(at)
            assert state["is_open"] == bool(cal.is_open_on_minute(minute)), at
            assert dt.datetime.fromisoformat(state["next_open"]) == cal.next_open(minute).to_pydatetime(), at
            assert dt.datetime.fromisoformat(state["next_close"]) == cal.next_close(minute).to_pydatetime(), (
                at
            )


def test_market_status_with_a_cold_cache_builds_it_then_needs_no_pandas(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    at = ["--at", "2025-07-03T16:59:00-04:00", "--json"]
    cold, first = imported_by(["market", "status", "-x", "XTKS", *at], env)
    assert "exchange_calendars" in cold  # the first answer compiles the calendar
    warm, second = imported_by(["market", "status", "-x", "XTKS", *at], env)
    assert warm & OUTSIDE_QUICK == set()
    assert json.loads(second.stdout) == json.loads(first.stdout)
