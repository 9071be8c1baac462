"""End to end, through the real CLI and a real server of each engine: refresh, no-op, --verify, seed change,
kill -9 mid-load, reset. Expected counts come from exchange_calendars, not from refresher."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import exchange_calendars as xcals
import psycopg
import pytest

from refresher import profile_lock
from refresher.engines.base import ServerInfo
from tests.fixtures_postgres import refills_gone, world_traversable_tmp

AS_OF = dt.date(2025, 3, 31)
START = dt.date(2025, 2, 1)
SYMBOLS = ["AAPL", "MSFT", "KO"]

PROFILE_YAML = """\
description: end-to-end test profile
universe:
  symbols: [{symbols}]
exchange: XNYS
months: {months}
as_of: {as_of}
timeframes: [1d, 1m]
features: [dashboard_data]
seed: 11
{seeds}reset_target_seconds: 5
"""

CHECKSUMS = """
SELECT 'd', symbol, to_char(date, 'YYYY-MM'),
       md5(string_agg(concat_ws(',', date, open, high, low, close, volume), ';' ORDER BY date))
FROM ohlcv_daily GROUP BY 1, 2, 3
UNION ALL
SELECT 'm', symbol, to_char(ts AT TIME ZONE 'America/New_York', 'YYYY-MM'),
       md5(string_agg(concat_ws(',', ts, open, high, low, close, volume), ';' ORDER BY ts))
FROM ohlcv_1min GROUP BY 1, 2, 3
"""


def expected_rows(symbols: int, start: dt.date, end: dt.date) -> tuple[int, int]:
    """(daily, minute) rows for ``symbols`` XNYS symbols over [start, end], from exchange_calendars itself."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = xcals.get_calendar("XNYS", start="2024-01-01", end="2026-01-01")
        sessions = cal.sessions_in_range(start.isoformat(), end.isoformat())
        minutes = sum(len(cal.session_minutes(s)) for s in sessions)
    return symbols * len(sessions), symbols * minutes


@dataclass
class Workspace:
    """A state dir, a store and a profiles dir, driven through the real `refresher` command."""

    root: Path
    engine: str
    profile: str
    written: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "REFRESHER_STATE_DIR": str(self.root / "state"),
            "FEATURE_STORE_PATH": str(self.root / "store"),
            "REFRESHER_PROFILES": str(self.root / "profiles"),
        }

    def write_profile(
        self, name: str | None = None, *, symbols: list[str] = SYMBOLS, months: int = 2, seeds: str = ""
    ) -> str:
        name = name or self.profile
        self.written.append(name)
        (self.root / "profiles").mkdir(exist_ok=True)
        text = PROFILE_YAML.format(
            symbols=", ".join(symbols), months=months, as_of=AS_OF.isoformat(), seeds=seeds
        )
        (self.root / "profiles" / f"{name}.yaml").write_text(text)
        return name

    def down(self) -> None:
        # By name, never `all`: other tests' servers (and the developer's own) share the Docker engine.
        for name in {self.profile, *self.written}:
            subprocess.run(
                self.command("down", "--profile", name), env=self.env, capture_output=True, timeout=120
            )

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "refresher.cli", *args, "--engine", self.engine]

    def run(self, *args: str, expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.command(*args), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == expect, done.stderr
        return done

    def refresh(self, *extra: str, profile: str | None = None) -> dict[str, Any]:
        done = self.run("refresh", "--profile", profile or self.profile, "--json", *extra)
        return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def dsn(self, profile: str | None = None) -> str:
        return self.run("url", "--profile", profile or self.profile).stdout.strip()

    def server(self) -> ServerInfo:
        """The profile's server as its engine describes it (to call refresher's functions on it in-process)."""
        parts = psycopg.conninfo.conninfo_to_dict(self.dsn())
        return ServerInfo(
            self.engine,
            self.profile,
            str(parts["host"]),
            int(str(parts["port"])),
            str(parts["user"]),
            str(parts.get("password", "")),
            str(parts["dbname"]),
        )

    def checksums(self, profile: str | None = None) -> dict[tuple[str, str, str], str]:
        with psycopg.connect(self.dsn(profile)) as conn:
            return {(kind, sym, month): digest for kind, sym, month, digest in conn.execute(CHECKSUMS)}

    def scalar(self, query: str, profile: str | None = None) -> Any:
        with psycopg.connect(self.dsn(profile)) as conn:
            row = conn.execute(query).fetchone()
            assert row is not None
            return row[0]


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def workspace(request: pytest.FixtureRequest) -> Iterator[Workspace]:
    if request.param == "docker":
        request.getfixturevalue("docker_pg_image")  # skips (or fails in CI) without a Docker engine
    root = world_traversable_tmp("refresher-e2e-")
    ws = Workspace(root, request.param, f"e2e_{uuid.uuid4().hex[:8]}")
    ws.write_profile()
    try:
        yield ws
    finally:
        ws.down()


@pytest.mark.slow
def test_refresh_loads_everything_then_a_second_run_loads_nothing(workspace: Workspace) -> None:
    first = workspace.refresh()
    daily, minute = expected_rows(len(SYMBOLS), START, AS_OF)
    assert first["segments"]["desired"] == len(SYMBOLS) * 2 * 2
    assert first["segments"]["loaded"] == first["segments"]["desired"]
    assert first["rows_loaded"] == daily + minute
    assert first["features"]["loaded"] == len(SYMBOLS)
    assert workspace.scalar("SELECT count(*) FROM ohlcv_daily") == daily
    assert workspace.scalar("SELECT count(*) FROM ohlcv_1min") == minute
    assert workspace.scalar("SELECT count(*) FROM features_dashboard_data") == daily
    assert workspace.scalar("SELECT count(DISTINCT symbol) FROM symbols") == len(SYMBOLS)

    # Answered by the refresh stamp (refresher.stamp), then the full way (--as-of skips the stamp): the same.
    stamped, second = workspace.refresh(), workspace.refresh("--as-of", AS_OF.isoformat())
    assert set(stamped["phases"]) == {"stamp"} and "plan" in second["phases"]
    for report in (stamped, second):
        assert report["segments"]["loaded"] == 0
        assert report["segments"]["present"] == report["segments"]["desired"]
        assert report["rows_loaded"] == 0
        assert report["features"]["loaded"] == 0
        assert "password" not in json.dumps(report) and workspace.dsn().split("@")[0] not in report["dsn"]
    assert second["store"] == {"hits": second["segments"]["desired"], "misses": 0}
    assert stamped["store"] == {"hits": 0, "misses": 0}  # the stamp answers without asking the store


@pytest.mark.slow
def test_verify_reloads_exactly_the_segment_deleted_by_hand(workspace: Workspace) -> None:
    workspace.refresh()
    before = workspace.checksums()
    with psycopg.connect(workspace.dsn()) as conn:
        conn.execute(
            "DELETE FROM ohlcv_1min WHERE symbol = 'MSFT' AND ts >= '2025-02-10' AND ts < '2025-02-20'"
        )
    assert workspace.refresh()["segments"]["loaded"] == 0  # the ledger alone cannot see it

    plan = json.loads(workspace.run("plan", "--profile", workspace.profile, "--verify", "--json").stdout)
    assert plan["to_load"] == ["MSFT/1m/2025-02"]

    report = workspace.refresh("--verify")
    assert report["segments"]["loaded"] == 1
    assert workspace.checksums() == before


@pytest.mark.slow
def test_changing_one_symbols_seed_reloads_exactly_that_symbol(workspace: Workspace) -> None:
    workspace.refresh()
    before = workspace.checksums()
    workspace.write_profile(seeds="seeds: {MSFT: 99}\n")

    report = workspace.refresh()
    assert report["segments"]["loaded"] == 4  # MSFT x {1d, 1m} x {Feb, Mar}
    after = workspace.checksums()
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {key for key in before if key[1] == "MSFT"}


@pytest.mark.slow
def test_reset_restores_a_dropped_table_and_deleted_rows(workspace: Workspace) -> None:
    workspace.refresh()
    before = workspace.checksums()
    with psycopg.connect(workspace.dsn()) as conn:
        conn.execute("DROP TABLE ohlcv_daily")
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol = 'KO'")
        conn.execute("UPDATE ohlcv_1min SET close = 0")
    reset = json.loads(workspace.run("reset", "--profile", workspace.profile, "--json").stdout)
    assert reset["seconds"] < 60  # a sanity bound only: speed is measured by `make bench`
    assert workspace.checksums() == before
    # Twice in a row: the pool was refilled (or the template fallback works).
    with psycopg.connect(workspace.dsn()) as conn:
        conn.execute("DELETE FROM ohlcv_1min")
    workspace.run("reset", "--profile", workspace.profile)
    assert workspace.checksums() == before


def _working_in(directory: Path) -> bool:
    """Whether a live process (not a zombie) has ``directory`` as its working directory."""
    for proc in Path("/proc").iterdir():
        try:
            if os.readlink(proc / "cwd") == str(directory) and "zombie" not in (proc / "status").read_text():
                return True
        except OSError:  # not a process, gone, or not ours to look at
            continue
    return False


def _remove_data_by_hand(workspace: Workspace) -> None:
    """What a user's cleanup does behind refresher's back, its state file left: the local engine's postmaster
    killed and its data directory removed; the Docker container and its volume removed (`docker system prune
    --volumes` after a reboot)."""
    state = workspace.root / "state"
    if workspace.engine == "local":
        pgdata = state / "local" / workspace.profile / "pgdata"
        # The refresh's detached refill keeps its lock files in the data directory: done first, as a user's is.
        refills_gone(workspace.profile)
        os.kill(int((pgdata / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        # Its children outlive it for a moment, writing into the directory (their working directory) meanwhile.
        deadline = time.monotonic() + 60
        while _working_in(pgdata):
            assert time.monotonic() < deadline, "the killed postmaster's children never exited"
            time.sleep(0.05)
        shutil.rmtree(pgdata)
    else:
        names = json.loads((state / "docker" / f"{workspace.profile}.json").read_text())
        with contextlib.closing(docker.from_env()) as client:
            client.containers.get(names["container"]).remove(force=True)
            client.volumes.get(names["volume"]).remove()


@pytest.mark.slow
def test_url_and_reset_of_a_server_whose_data_was_removed_by_hand_say_to_refresh_and_start_nothing(
    workspace: Workspace,
) -> None:
    workspace.refresh()
    before = workspace.checksums()
    _remove_data_by_hand(workspace)
    # Under `make test` (MAKELEVEL set) the hint is make's target, as a user of the Makefile types it.
    hint = (
        f"make refresh PROFILE={workspace.profile}"
        if workspace.env.get("MAKELEVEL")
        else f"refresher refresh --profile {workspace.profile}"
    )

    for command in ("url", "reset"):
        done = workspace.run(command, "--profile", workspace.profile, expect=2)
        # Not an empty server made for the URL (exit 0, no tables) or for the reset to find without a snapshot.
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and "has no data" in done.stderr, done.stderr
        assert f"run `{hint}` first" in done.stderr
    status = json.loads(workspace.run("status", "--json").stdout)
    (listed,) = [s for s in status["servers"] if s["profile"] == workspace.profile]
    assert not listed["running"] and "removed" in listed["detail"], listed

    assert workspace.refresh()["segments"]["present"] == 0
    assert workspace.checksums() == before
    workspace.run("reset", "--profile", workspace.profile)
    assert workspace.checksums() == before


@pytest.mark.slow
@pytest.mark.docker
def test_a_reset_right_after_a_first_refresh_killed_while_its_container_initialises_says_to_refresh(
    docker_client: docker.DockerClient, docker_pg_image: str
) -> None:
    workspace = Workspace(world_traversable_tmp("refresher-e2e-"), "docker", f"e2e_{uuid.uuid4().hex[:8]}")
    workspace.write_profile()
    try:
        proc = subprocess.Popen(
            workspace.command("refresh", "--profile", workspace.profile),
            env=workspace.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Killed as soon as its container runs: the image's entrypoint is still making the cluster (initdb, a
            # server on a socket alone, then the real one), which refuses every connection for a few seconds.
            deadline = time.monotonic() + 300
            while not docker_client.containers.list(filters={"name": f"-{workspace.profile}$"}, sparse=True):
                assert proc.poll() is None, "the refresh finished before its container ran"
                assert time.monotonic() < deadline, "the container never ran"
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)

        done = workspace.run("reset", "--profile", workspace.profile, expect=2)
        # Not "cannot reach the server for snapshots: ... server closed the connection unexpectedly" over three
        # lines: the reset waits for the server, then says what is true.
        assert done.stderr.count("\n") == 1 and "no pristine snapshot yet" in done.stderr, done.stderr
        workspace.refresh()
        workspace.run("reset", "--profile", workspace.profile)
    finally:
        workspace.down()


def made_in_start(state: Path, profile: str) -> bool:
    """Whether a first refresh of ``profile`` (local engine) has made its cluster and still holds the engine's lock
    to start it: the whole start from there on (a poll watching for the tens of milliseconds before its server's
    pid file appears missed them on a loaded machine). Its server may have started, or not yet."""
    return (state / "local" / profile / "pgdata" / "PG_VERSION").exists() and profile_lock.file_held(
        state / "local" / f".{profile}.lock"
    )


def _stop_when(proc: subprocess.Popen[bytes], ready: Any, what: str) -> None:
    """SIGSTOP ``proc`` as soon as ``ready()`` holds (polled); it must still be running then."""
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"the refresh finished before {what}"
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.005)
    proc.send_signal(signal.SIGSTOP)


@pytest.mark.slow
def test_url_during_a_first_refresh_waits_for_it_and_a_later_refresh_is_not_waited_for() -> None:
    workspace = Workspace(world_traversable_tmp("refresher-e2e-"), "local", f"e2e_{uuid.uuid4().hex[:8]}")
    workspace.write_profile()
    state = workspace.root / "state"
    url = workspace.command("url", "--profile", workspace.profile)
    busy = "another refresh or reset is running"
    proc = subprocess.Popen(
        workspace.command("refresh", "--profile", workspace.profile),
        env=workspace.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    waiting: subprocess.Popen[str] | None = None
    try:
        # Its lock held, no server made yet: "no local server; run `refresher refresh` first" was untrue.
        _stop_when(proc, lambda: profile_lock.held(state, workspace.profile), "took its lock")
        done = workspace.run("url", "--profile", workspace.profile, "--no-wait", expect=2)
        assert done.stdout == "" and done.stderr.count("\n") == 1 and busy in done.stderr, done.stderr
        waiting = subprocess.Popen(
            url, env=workspace.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(1.5)
        assert waiting.poll() is None, "url answered while the first refresh was stopped"
        pgdata = state / "local" / workspace.profile / "pgdata"
        stops = {
            # Its cluster made, its server not yet started: `url --no-wait` started it itself, waiting for the
            # engine's lock that the stopped refresh held, for good (a CI run's 600 s timeout).
            "made its cluster": lambda: made_in_start(state, workspace.profile),
            # Its server running and loading: the URL of a half-loaded database was printed (exit 0) as if ready.
            "started its server": lambda: (pgdata / "postmaster.pid").exists(),
        }
        for what, ready in stops.items():
            proc.send_signal(signal.SIGCONT)
            _stop_when(proc, ready, what)
            done = workspace.run("url", "--profile", workspace.profile, "--no-wait", expect=2, timeout=60)
            assert done.stdout == "" and busy in done.stderr, (what, done.stderr)
            assert waiting.poll() is None, what
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=600) == 0
        out, err = waiting.communicate(timeout=60)
        assert waiting.returncode == 0, err
        assert out.startswith("postgresql://") and busy in err and "is running; waiting for it\n" in err, (
            out,
            err,
        )
        # it answered once the refresh had finished: the pristine snapshot is there to reset to
        workspace.run("reset", "--profile", workspace.profile)

        # A later refresh holding the lock is not waited for: the loaded database is whole.
        with profile_lock.hold_profile(state, workspace.profile, wait=False):
            done = workspace.run("url", "--profile", workspace.profile, "--no-wait")
        assert done.stdout.startswith("postgresql://") and done.stderr == "", done.stderr
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        for child in (proc, waiting):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait(timeout=60)
        if waiting is not None:  # its pipes, left open by a failure above: a later test's garbage collection
            waiting.communicate()  # raised their ResourceWarning (PytestUnraisableExceptionWarning) as its failure
        workspace.down()


@pytest.mark.slow
def test_kill_9_mid_load_then_rerun_equals_a_clean_load(workspace: Workspace) -> None:
    many = [f"S{i:03d}" for i in range(40)]
    # Load March first, so the server and its DSN exist before the run we kill (which adds Jan and Feb).
    victim = workspace.write_profile(symbols=many, months=1)
    first = workspace.refresh(profile=victim)["segments"]["loaded"]
    dsn = workspace.dsn(victim)
    workspace.write_profile(victim, symbols=many, months=3)
    clean = workspace.write_profile(f"{victim}_clean", symbols=many, months=3)

    proc = subprocess.Popen(
        workspace.command("refresh", "--profile", victim, "--json"),
        env=workspace.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    loaded = 0
    deadline = time.monotonic() + 300
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while time.monotonic() < deadline and proc.poll() is None:
                row = conn.execute("SELECT count(*) FROM refresher_segments").fetchone()
                loaded = row[0] if row else 0
                if loaded >= first + 5:
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.005)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the refresh finished before it could be killed mid-load"
    total = len(many) * 3 * 2
    assert first + 5 <= loaded < total

    resumed = workspace.refresh(profile=victim)
    assert resumed["segments"]["loaded"] + resumed["segments"]["present"] == total
    assert resumed["segments"]["present"] >= loaded  # nothing committed before the kill was redone
    workspace.refresh(profile=clean)
    assert workspace.checksums(victim) == workspace.checksums(clean)
    assert workspace.scalar("SELECT count(*) FROM refresher_segments", victim) == total


@pytest.mark.slow
def test_refresh_ui_testing_profile_as_shipped(tmp_path: Path) -> None:
    root = world_traversable_tmp("refresher-ui-")
    ws = Workspace(root, "local", "ui_testing")
    as_of = "2025-06-30"
    try:
        report = ws.refresh("--as-of", as_of)
        daily, minute = expected_rows(20, dt.date(2025, 4, 1), dt.date(2025, 6, 30))
        assert report["rows_loaded"] == daily + minute
        assert report["segments"]["desired"] == 20 * 3 * 2
        assert ws.refresh("--as-of", as_of)["segments"]["loaded"] == 0
        assert ws.scalar("SELECT count(*) FROM features_websocket_testing") == daily
    finally:
        ws.down()


FILES_PROFILE = """\
description: user files, one symbol missing
universe:
  symbols: [AAPL, MSFT]
exchange: XNYS
start: 2025-02-01
end: 2025-02-28
timeframes: [1d, 1m]
source:
  kind: files
  path: data
  daily: "{symbol}_daily.csv.gz"
  minute: "{symbol}_1m.parquet"
  columns: {symbol: Ticker, date: Date, close: Adj Close}
"""


@pytest.mark.slow
def test_refresh_from_user_files_records_empty_segments_and_reports_off_session_rows() -> None:
    import gzip

    import pandas as pd
    import pyarrow.parquet as pq

    from refresher.profile import load_profile
    from refresher.segments import Segment
    from refresher.sources import make_source

    root = world_traversable_tmp("refresher-files-")
    ws = Workspace(root, "local", "user_files")
    (root / "profiles" / "data").mkdir(parents=True)
    (root / "profiles" / "user_files.yaml").write_text(FILES_PROFILE)
    # AAPL's files are made from the synthetic market; MSFT has none (before its "listing").
    reference = root / "reference.yaml"
    reference.write_text(FILES_PROFILE.split("source:")[0])  # the same profile on the synthetic source
    source = make_source(load_profile(str(reference), []))
    month = dt.date(2025, 2, 1)
    daily = source.fetch(Segment("AAPL", "1d", month)).to_pandas()
    minute = source.fetch(Segment("AAPL", "1m", month))
    frame = daily.rename(columns={"symbol": "Ticker", "date": "Date", "close": "Adj Close"})
    holiday = frame.iloc[[0]].assign(Date=dt.date(2025, 2, 17))  # Presidents' Day: not a session
    with gzip.open(root / "profiles" / "data" / "AAPL_daily.csv.gz", "wt") as handle:
        pd.concat([frame, holiday]).to_csv(handle, index=False)
    theirs = minute.rename_columns(["Ticker", "ts", "open", "high", "low", "Adj Close", "volume"])
    pq.write_table(theirs, root / "profiles" / "data" / "AAPL_1m.parquet")
    try:
        report = ws.refresh()
        assert report["segments"]["loaded"] == 4  # AAPL x 2, and MSFT x 2 recorded as empty
        assert report["rows_loaded"] == len(daily) + minute.num_rows
        assert any("AAPL/1d/2025-02" in note and "2025-02-17" in note for note in report["notes"])
        assert any("MSFT" in note for note in report["notes"])
        with psycopg.connect(ws.dsn()) as conn:
            rows = conn.execute("SELECT symbol, timeframe, rows FROM refresher_segments").fetchall()
        ledger = {(sym, tf): count for sym, tf, count in rows}
        assert ledger == {
            ("AAPL", "1d"): len(daily),
            ("AAPL", "1m"): minute.num_rows,
            ("MSFT", "1d"): 0,
            ("MSFT", "1m"): 0,
        }
        again = ws.refresh()
        assert again["segments"]["loaded"] == 0 and again["segments"]["present"] == 4
    finally:
        ws.down()
