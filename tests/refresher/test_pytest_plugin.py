"""The pytest plugin, exercised the way users meet it: example test projects run through ``pytester``.

Every example runs in a subprocess against a real server (embedded Postgres, and a Docker container when a
daemon answers) loaded with a tiny profile written here: 3 symbols, one month, daily and minute bars.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import exchange_calendars as xcals
import psycopg
import pytest

from refresher._pytest_servers import OWNER_FILE, THROWAWAY_PREFIX, LoadedServer, stop_everything
from refresher._pytest_share import SharedServers, clone_note, drop_abandoned_clones, per_test_clone_prefix
from refresher.engines import owner_labels
from refresher.engines.base import ServerInfo
from refresher.errors import ProfileError
from refresher.pool import checkout_clone
from refresher.settings import Settings
from refresher.snapshot import save_pristine
from tests.child_processes import reap
from tests.fixtures_postgres import found, refillers, refills_gone

pytest_plugins = ["pytester"]

AS_OF = dt.date(2024, 3, 28)
TINY = """\
description: three symbols, one month, for the pytest plugin's tests
universe:
  symbols: [AAA, BBB, CCC]
exchange: XNYS
months: 1
timeframes: [1d, 1m]
seed: 11
"""
TINY_TWO = TINY.replace("[AAA, BBB, CCC]", "[XXX, YYY]").replace("seed: 11", "seed: 12")
INNER_INI = """\
[pytest]
addopts = -p no:cacheprovider
filterwarnings = error
{extra}
"""
SUBPROCESS_TIMEOUT = 600


@dataclass(frozen=True)
class Expected:
    """What a database loaded with a profile of ``symbols`` symbols over [start, end] must hold."""

    symbols: int
    daily: int
    minute: int


def expected_counts(symbols: int, start: dt.date, end: dt.date) -> Expected:
    """Counted from exchange_calendars directly, not through refresher: one bar per session and per minute."""
    with warnings.catch_warnings():
        # exchange_calendars trips a pandas deprecation warning of its own (not ours to fix here).
        warnings.simplefilter("ignore")
        cal = xcals.get_calendar("XNYS")
        sessions = cal.sessions_in_range(start.isoformat(), end.isoformat())
        minutes = sum(
            int((cal.session_close(s) - cal.session_open(s)).total_seconds() // 60) for s in sessions
        )
    return Expected(symbols, symbols * len(sessions), symbols * minutes)


TINY_EXPECTED = expected_counts(3, AS_OF.replace(day=1), AS_OF)
TINY_TWO_EXPECTED = expected_counts(2, AS_OF.replace(day=1), AS_OF)


@dataclass(frozen=True)
class PluginEnv:
    root: Path
    profiles: Path
    store: Path
    state: Path

    def args(self, engine: str, *more: str) -> list[str]:
        return [
            f"--refresher-profiles-dir={self.profiles}",
            f"--refresher-store={self.store}",
            f"--refresher-state-dir={self.state}",
            f"--refresher-engine={engine}",
            f"--refresher-as-of={AS_OF.isoformat()}",
            "--refresher-profile=tiny",
            *more,
        ]


@pytest.fixture(scope="module")
def plugin_env() -> Iterator[PluginEnv]:
    # One store for the module, so only the first example pays for generating the data.
    with new_plugin_env() as env:
        yield env


@contextlib.contextmanager
def new_plugin_env() -> Iterator[PluginEnv]:
    """Profiles, a store and a state dir of their own for example projects, stopped and removed after. Under /tmp
    and world-traversable: as root the embedded server runs as another user (pytest's own tmp_path is 0700).

    A run's detached refill makes the COPY bodies its refresh listed after the run has ended, into the store: it
    is waited for before the store goes, or the removal races its writes (rmtree failing "Directory not empty",
    the bodies' directory made again under a root removed) and it outlives the test."""
    root = Path(tempfile.mkdtemp(prefix="refresher-plugin-test-"))
    root.chmod(0o755)
    env = PluginEnv(root, root / "profiles", root / "store", root / "state")
    for d in (env.profiles, env.store, env.state):
        d.mkdir(mode=0o755)
    (env.profiles / "tiny.yaml").write_text(TINY)
    (env.profiles / "tiny_two.yaml").write_text(TINY_TWO)
    try:
        yield env
    finally:
        stop_leftovers(root)  # what a failed example left running (kept servers too)
        refills_gone(str(env.store))  # the refills the runs spawned that make bodies (``--store``) into it
        shutil.rmtree(root, ignore_errors=True)


def stop_leftovers(root: Path) -> None:
    """Stop every server the plugin's throwaway directories under ``root`` hold."""
    # found, not rglob: a failed example's servers may still run here, their pgdata changing while walked.
    for owner in found(root, OWNER_FILE):
        if owner.parent.name.startswith(THROWAWAY_PREFIX):
            stop_everything(Settings.from_env(state_dir=owner.parent))


def docker_or_skip() -> None:
    from refresher.engines.docker import docker_available

    if docker_available():
        return
    if os.environ.get("REFRESHER_REQUIRE_DOCKER", "") not in ("", "0", "false"):
        pytest.fail("REFRESHER_REQUIRE_DOCKER is set but no Docker daemon answers")
    pytest.skip("no Docker daemon answers")


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "docker":
        docker_or_skip()
    return str(request.param)


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _checkout_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # The example runs in a subprocess whose cwd is pytester's directory: put this checkout first on its path,
    # so it tests these sources whatever state the venv's editable install is in.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def write_project(pytester: pytest.Pytester, source: str, *, ini_extra: str = "") -> None:
    pytester.makeini(INNER_INI.format(extra=ini_extra))
    pytester.makepyfile(test_example=textwrap.dedent(source))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*args, timeout=SUBPROCESS_TIMEOUT)


def assert_server_gone(record: dict[str, object]) -> None:
    """After the run, the plugin's server no longer answers and its data or container is gone."""
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host=str(record["host"]), port=int(str(record["port"])), user="x", dbname="x", connect_timeout=3
        ).close()
    state_dir = Path(str(record["state_dir"]))
    assert not state_dir.exists()
    if record["engine"] == "docker":
        import docker

        client = docker.from_env()
        try:
            label = {"label": f"io.refresher.state-path={state_dir.resolve()}"}
            assert client.containers.list(all=True, filters=label) == []
            assert client.volumes.list(filters=label) == []
        finally:
            client.close()


RECORD_SERVER = """
import json, os

def record(server, path=OUT_PATH):
    info = server.info
    row = {"pid": os.getpid(), "worker": os.environ.get("PYTEST_XDIST_WORKER", "master"),
           "host": info.host, "port": info.port, "engine": info.engine, "profile": server.profile,
           "state_dir": server.state_dir}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\\n")
"""


def write_recording_project(pytester: pytest.Pytester, source: str) -> Path:
    """A project whose tests may call ``record(server)``; returns the JSON-lines file it appends to."""
    out = pytester.path / "servers.jsonl"
    write_project(pytester, RECORD_SERVER.replace("OUT_PATH", repr(str(out))) + textwrap.dedent(source))
    return out


def read_records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_refresher_db_is_loaded_with_the_profile(
    pytester: pytest.Pytester, plugin_env: PluginEnv, engine: str
) -> None:
    e = TINY_EXPECTED
    out = write_recording_project(
        pytester,
        f"""
import sqlalchemy

def test_counts(refresher_db, refresher_postgres):
    record(refresher_postgres)
    assert refresher_postgres.profile == "tiny"
    assert refresher_db.dbname != refresher_postgres.info.dbname
    with refresher_db.connect() as conn:
        counts = [conn.execute(f"SELECT count(*) FROM {{t}}").fetchone()[0]
                  for t in ("symbols", "ohlcv_daily", "ohlcv_1min")]
    assert counts == [{e.symbols}, {e.daily}, {e.minute}]

def test_sqlalchemy(refresher_db):
    engine = refresher_db.sqlalchemy_engine()
    assert engine.url.drivername == "postgresql+psycopg"
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT count(DISTINCT symbol) FROM ohlcv_1min")).scalar() == 3
        assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == refresher_db.dbname
""",
    )
    result = run(pytester, *plugin_env.args(engine))
    result.assert_outcomes(passed=2)
    [server] = read_records(out)
    assert server["engine"] == engine
    assert_server_gone(server)


def test_a_run_leaves_the_copy_bodies_of_its_minute_segments_to_its_detached_refill(
    pytester: pytest.Pytester,
) -> None:
    """The plugin loads each run into a new server from the store: the warm load that the store's COPY bodies
    speed up (``refresher.bodies``). Its refresh lists the minute segments without one in the run's state dir and
    its detached refill makes them after the run, as after `refresher refresh`. Before: the plugin's refresh
    had no state dir, so no run, in CI or anywhere, ever left a body (0 in the store after the run, counted),
    and every run read every minute segment's Parquet file again."""
    from featurestore import FeatureStore
    from refresher import body_keys

    write_project(pytester, "def test_x(refresher_db):\n    pass\n")
    with new_plugin_env() as env:  # a store of its own: the module's gets bodies from every example
        run(pytester, *env.args("local")).assert_outcomes(passed=1)
        keys = body_keys.keys_path(env.state, "tiny")
        deadline = time.monotonic() + 120
        while body_keys.pending(keys):  # the refill, detached, holds the list until it is done
            assert time.monotonic() < deadline, "the run's refill never made its bodies"
            time.sleep(0.2)
        assert FeatureStore(env.store).get_cache_stats().bodies.entries == 3  # 3 symbols x 1 month
        assert not keys.exists()  # made, and the list removed
        # The next run's load finds them all: nothing is left to make.
        run(pytester, *env.args("local")).assert_outcomes(passed=1)
        assert not keys.exists()
        assert FeatureStore(env.store).get_cache_stats().bodies.entries == 3


def test_an_environment_removed_after_a_run_waits_for_the_refill_making_its_bodies(
    pytester: pytest.Pytester,
) -> None:
    """A run's refill makes the bodies its refresh listed after the run, into the environment's store: removing
    the environment right after the run must wait for it, or the refill goes on writing into a store being
    removed (a flaky "Directory not empty", the store made again under a root gone) and outlives the test. The
    refill starts 2 s late here, as on a loaded machine: the project's directory is on its path (``spawn_refill``
    hands it the run's ``sys.path``) and holds a ``sitecustomize`` that sleeps; the run's own pytest does not
    import it (its path gets the directory after ``site`` ran)."""
    write_project(pytester, "def test_x(refresher_db):\n    pass\n")
    pytester.makepyfile(sitecustomize="import time\n\ntime.sleep(2)\n")
    with new_plugin_env() as env:
        run(pytester, *env.args("local")).assert_outcomes(passed=1)
    try:
        assert refillers(str(env.store)) == []
        assert not env.root.exists()
    finally:
        refills_gone(str(env.store))
        shutil.rmtree(env.root, ignore_errors=True)


@pytest.mark.slow
def test_every_test_gets_a_full_database_whatever_the_previous_one_did(
    pytester: pytest.Pytester, plugin_env: PluginEnv, engine: str
) -> None:
    e = TINY_EXPECTED
    write_project(
        pytester,
        f"""
import pytest

@pytest.mark.parametrize("i", range(20))
def test_delete_everything(refresher_db, i):
    with refresher_db.connect() as conn:
        for table, expected in (("ohlcv_1min", {e.minute}), ("ohlcv_daily", {e.daily})):
            assert conn.execute(f"SELECT count(*) FROM {{table}}").fetchone()[0] == expected
            conn.execute(f"DELETE FROM {{table}}")
        conn.execute("DELETE FROM refresher_segments")
""",
    )
    run(pytester, *plugin_env.args(engine)).assert_outcomes(passed=20)


@pytest.mark.slow
def test_marker_selects_another_profile(pytester: pytest.Pytester, plugin_env: PluginEnv) -> None:
    write_project(
        pytester,
        f"""
import pytest

def count(db):
    with db.connect() as conn:
        return conn.execute("SELECT count(*) FROM symbols").fetchone()[0], conn.execute(
            "SELECT count(*) FROM ohlcv_daily").fetchone()[0]

def test_default(refresher_db):
    assert refresher_db.profile == "tiny"
    assert count(refresher_db) == ({TINY_EXPECTED.symbols}, {TINY_EXPECTED.daily})

@pytest.mark.refresher_profile("tiny_two")
def test_marked(refresher_db):
    assert refresher_db.profile == "tiny_two"
    assert count(refresher_db) == ({TINY_TWO_EXPECTED.symbols}, {TINY_TWO_EXPECTED.daily})

@pytest.mark.refresher_profile("tiny_two")
class TestMarkedClass:
    def test_inherits(self, refresher_db):
        assert refresher_db.profile == "tiny_two"
""",
    )
    run(pytester, *plugin_env.args("local")).assert_outcomes(passed=3)


@pytest.mark.slow
def test_ini_options_choose_profile_engine_and_as_of(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    as_of = dt.date(2024, 2, 29)
    e = expected_counts(2, as_of.replace(day=1), as_of)
    ini = f"""\
refresher_profile = tiny_two
refresher_engine = local
refresher_as_of = {as_of.isoformat()}
refresher_store = {plugin_env.store}
refresher_state_dir = {plugin_env.state}
refresher_profiles_dir = {plugin_env.profiles}
"""
    write_project(
        pytester,
        f"""
import datetime as dt

def test_from_ini(refresher_db, refresher_postgres):
    assert refresher_postgres.profile == "tiny_two"
    assert refresher_postgres.engine == "local"
    assert refresher_postgres.end == dt.date.fromisoformat({as_of.isoformat()!r})
    with refresher_db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone()[0] == {e.daily}
        last = conn.execute("SELECT max(date) FROM ohlcv_daily").fetchone()[0]
    assert last <= dt.date.fromisoformat({as_of.isoformat()!r})
""",
        ini_extra=ini,
    )
    run(pytester).assert_outcomes(passed=1)


@pytest.mark.slow
def test_xdist_workers_share_one_server(
    pytester: pytest.Pytester, plugin_env: PluginEnv, engine: str
) -> None:
    out = write_recording_project(
        pytester,
        f"""
import pytest, time

@pytest.mark.parametrize("i", range(8))
def test_uses_server(refresher_db, refresher_postgres, i):
    record(refresher_postgres)
    with refresher_db.connect() as conn:
        conn.execute("DELETE FROM ohlcv_daily")
        assert conn.execute("SELECT count(*) FROM symbols").fetchone()[0] == {TINY_EXPECTED.symbols}
    time.sleep(0.2)  # keeps both workers busy, so each of them runs tests
""",
    )
    run(pytester, "-n", "2", *plugin_env.args(engine)).assert_outcomes(passed=8)
    records = read_records(out)
    assert {r["worker"] for r in records} == {"gw0", "gw1"}
    assert len({r["pid"] for r in records}) == 2
    servers = {(r["host"], r["port"], r["state_dir"]) for r in records}
    assert len(servers) == 1, servers
    assert_server_gone(records[0])


def assert_one_line_usage_error(result: pytest.RunResult, message: str) -> None:
    """The run stopped before collecting, with pytest's one-line usage error and no traceback."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()[-2000:]
    assert [line for line in result.errlines if line.strip()] == [f"ERROR: refresher: {message}"]
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_bad_option_values_are_one_line_usage_errors(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    write_project(pytester, "def test_x(refresher_db):\n    pass\n\ndef test_y(refresher_db):\n    pass\n")
    result = run(pytester, *plugin_env.args("local", "--refresher-as-of=yesterday"))
    assert_one_line_usage_error(result, "--refresher-as-of: as_of='yesterday': not a date (want YYYY-MM-DD)")
    result = run(pytester, *plugin_env.args("sideways"))
    assert_one_line_usage_error(result, "--refresher-engine='sideways': choose one of auto, docker, local")
    result = run(pytester, *plugin_env.args("local", "--refresher-profile=no_such_profile"))
    assert_one_line_usage_error(
        result,
        f"{plugin_env.profiles}, {REPO / 'profiles'}: profile='no_such_profile': no such profile (known: "
        "backtesting, etf_analysis, patterns, tiny, tiny_two, ui_testing)",
    )
    pytester.makeini(INNER_INI.format(extra="refresher_engine = nowhere"))
    result = run(pytester)
    assert_one_line_usage_error(result, "--refresher-engine='nowhere': choose one of auto, docker, local")


def test_a_bad_environment_alone_fails_the_fixtures_in_one_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No refresher option given: a project that merely has refresher installed still runs its other tests,
    and the ones asking for a database fail with one line each."""
    monkeypatch.setenv("REFRESHER_ENGINE", "sideways")
    write_project(pytester, "def test_x(refresher_db):\n    pass\n\ndef test_plain():\n    pass\n")
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["refresher: --refresher-engine='sideways': choose one of auto, docker, local"]
    )
    assert "Traceback" not in result.stdout.str() and "raise " not in result.stdout.str()


@pytest.mark.parametrize(
    ("engine", "require"),
    [("docker", None), ("auto", "1")],
    ids=["docker requested", "auto with REFRESHER_REQUIRE_DOCKER"],
)
def test_no_docker_daemon_fails_in_one_line_naming_the_plugins_own_option(
    pytester: pytest.Pytester,
    plugin_env: PluginEnv,
    monkeypatch: pytest.MonkeyPatch,
    engine: str,
    require: str | None,
) -> None:
    """The engines' advice names the CLI's flag ("or use --engine local"): in pytest that is an "unrecognized
    arguments" error, so the line a CI log shows must name --refresher-engine instead."""
    monkeypatch.setenv("DOCKER_HOST", f"unix://{pytester.path / 'no-daemon.sock'}")  # nothing listens there
    if require is not None:
        monkeypatch.setenv("REFRESHER_REQUIRE_DOCKER", require)
    write_project(pytester, "def test_x(refresher_db):\n    pass\n")
    result = run(pytester, *plugin_env.args(engine))
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "--refresher-engine=local" in out
    assert "--engine" not in out.replace("--refresher-engine", "")
    assert "Traceback" not in out


def test_a_bad_marker_fails_its_test_in_one_line(pytester: pytest.Pytester, plugin_env: PluginEnv) -> None:
    write_project(
        pytester,
        """
import pytest

@pytest.mark.refresher_profile()
def test_x(refresher_db):
    pass
""",
    )
    result = run(pytester, *plugin_env.args("local"))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.refresher_profile*takes exactly one profile name or path"])
    assert "Traceback" not in result.stdout.str() and "raise " not in result.stdout.str()


def test_unknown_marker_profile_names_the_choices(pytester: pytest.Pytester, plugin_env: PluginEnv) -> None:
    write_project(
        pytester,
        """
import pytest

@pytest.mark.refresher_profile("no_such_profile")
def test_x(refresher_db):
    pass
""",
    )
    result = run(pytester, *plugin_env.args("local"))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*profile='no_such_profile': no such profile (known: *tiny*"])
    assert "During handling" not in result.stdout.str()


def test_plugin_registers_its_options_and_marker(pytester: pytest.Pytester) -> None:
    result = run(pytester, "--help")
    result.stdout.fnmatch_lines(["*--refresher-profile=*", "*--refresher-engine=*", "*refresher_store*"])
    result = run(pytester, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.refresher_profile(name)*"])


@pytest.mark.slow
def test_a_project_that_does_not_use_the_plugin_does_not_import_psycopg_or_the_pool(
    pytester: pytest.Pytester,
) -> None:
    """Installed is loaded: every pytest run of a project with refresher in its environment imports the plugin.
    psycopg, the pool and the reuse records (about 0.5 s here, more than pytest's own import) wait for a test that
    asks for a database; a project that never does pays for none of them."""
    out = pytester.path / "modules.json"
    pytester.makeconftest(
        f"""
        import json, sys

        def pytest_collection_finish(session):
            with open({str(out)!r}, "w") as f:
                json.dump(sorted(sys.modules), f)
        """
    )
    write_project(pytester, "def test_plain():\n    pass\n")
    # Without the other plugins that import psycopg themselves (pytest-postgresql, installed beside us).
    run(pytester, "--collect-only", "-p", "no:xdist", "-p", "no:postgresql").assert_outcomes()
    loaded = set(json.loads(out.read_text()))
    assert "refresher.pytest_plugin" in loaded  # the plugin is there, only lighter
    assert loaded.isdisjoint({"psycopg", "refresher.pool", "refresher._pytest_reuse", "refresher.stamp"})


def test_fixture_factories_make_more_fixtures(pytester: pytest.Pytester, plugin_env: PluginEnv) -> None:
    pytester.makeconftest(
        """
from refresher.pytest_plugin import refresher_database, refresher_proc

two_postgres = refresher_proc("tiny_two", engine="local", as_of="2024-02-29")
two_db = refresher_database("two_postgres")
"""
    )
    write_project(
        pytester,
        f"""
import datetime as dt

def test_factory(two_db, two_postgres):
    assert two_postgres.profile == "tiny_two" and two_postgres.end == dt.date(2024, 2, 29)
    assert two_db.profile == "tiny_two"
    with two_db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM symbols").fetchone()[0] == {TINY_TWO_EXPECTED.symbols}
""",
    )
    run(pytester, *plugin_env.args("local")).assert_outcomes(passed=1)


@pytest.mark.slow
def test_a_killed_run_leaves_servers_the_next_run_removes(
    pytester: pytest.Pytester, plugin_env: PluginEnv, engine: str
) -> None:
    out = write_recording_project(
        pytester,
        """
import os, signal

def test_dies(refresher_postgres):
    record(refresher_postgres)
    os.kill(os.getpid(), signal.SIGKILL)  # no teardown: the server is left running
""",
    )
    run(pytester, *plugin_env.args(engine))
    [left] = read_records(out)
    assert Path(str(left["state_dir"])).exists()
    socket.create_connection((str(left["host"]), int(str(left["port"]))), timeout=5).close()  # still serving

    write_project(pytester, "def test_ok(refresher_postgres):\n    pass\n")
    run(pytester, *plugin_env.args(engine)).assert_outcomes(passed=1)
    assert_server_gone(left)


@pytest.mark.slow
def test_refresher_tx_leaves_no_trace(pytester: pytest.Pytester, plugin_env: PluginEnv) -> None:
    e = TINY_EXPECTED
    write_project(
        pytester,
        f"""
import psycopg, pytest

def state(conn):
    return (
        conn.execute("SELECT count(*) FROM symbols").fetchone()[0],
        conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone()[0],
        conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone()[0],
        conn.execute("SELECT sum(close) FROM ohlcv_daily").fetchone()[0],
        conn.execute("SELECT to_regclass('scratch') IS NULL").fetchone()[0],
    )

PRISTINE = []

@pytest.mark.parametrize("i", range(6))
def test_writes_then_the_next_sees_nothing(refresher_tx, refresher_postgres, i):
    assert refresher_tx.execute("SELECT current_database()").fetchone()[0] == refresher_postgres.info.dbname
    now = state(refresher_tx)
    assert now[:3] == ({e.symbols}, {e.daily}, {e.minute}) and now[4]
    PRISTINE.append(now)
    assert PRISTINE[0] == now
    refresher_tx.execute("INSERT INTO symbols (symbol) VALUES ('ZZZ')")
    refresher_tx.execute("UPDATE ohlcv_daily SET close = close + 1")
    refresher_tx.execute("CREATE TABLE scratch (x int)")
    refresher_tx.execute("TRUNCATE ohlcv_1min")
    assert state(refresher_tx)[2] == 0
    if i % 2:
        refresher_tx.execute("SELECT 1/0")  # a failed statement: the rollback still undoes everything

def test_commit_is_refused(refresher_tx):
    with pytest.raises(psycopg.ProgrammingError):
        refresher_tx.commit()

def test_raw_commit_fails_the_test(refresher_tx):
    refresher_tx.execute("CREATE TABLE committed_by_mistake (x int)")
    refresher_tx.execute("COMMIT")

def test_clones_are_untouched(refresher_db):
    with refresher_db.connect() as conn:
        assert state(conn)[:3] == ({e.symbols}, {e.daily}, {e.minute})
""",
    )
    result = run(pytester, *plugin_env.args("local"))
    result.assert_outcomes(passed=6, failed=3, errors=1)
    result.stdout.fnmatch_lines(["*refresher_tx: the test ended its transaction*use refresher_db*"])


@pytest.mark.slow
def test_refresher_tx_survives_its_idle_connection_being_ended(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """The connection kept between refresher_tx tests is ended while idle (a test on another worker ending the
    database's sessions, a server restart, idle_session_timeout): the next test gets a new one, not an error."""
    write_project(
        pytester,
        """
import psycopg

def test_a_uses_tx(refresher_tx):
    refresher_tx.execute("SELECT 1")

def test_b_ends_the_other_sessions(refresher_postgres):
    with psycopg.connect(refresher_postgres.dsn, autocommit=True) as conn:
        ended = conn.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()[0]
    assert ended >= 1

def test_c_uses_tx_again(refresher_tx):
    assert refresher_tx.execute("SELECT 1").fetchone()[0] == 1
""",
    )
    run(pytester, *plugin_env.args("local")).assert_outcomes(passed=3)


REUSE_PROBE = """
import json, os

def test_probe(refresher_postgres, refresher_db, refresher_tx):
    with refresher_db.connect() as conn:
        started = str(conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0])
        counts = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("symbols", "ohlcv_1min")]
        conn.execute("DELETE FROM ohlcv_1min")
    counts.append(refresher_tx.execute("SELECT count(*) FROM ohlcv_daily").fetchone()[0])
    refresher_tx.execute("DELETE FROM ohlcv_daily")
    row = {"started": started, "counts": counts, "port": refresher_postgres.info.port, "host": "127.0.0.1",
           "engine": refresher_postgres.engine, "state_dir": refresher_postgres.state_dir}
    with open(OUT_PATH, "a") as f:
        f.write(json.dumps(row) + "\\n")
"""
# What REUSE_PROBE counts in a pristine database: symbols, ohlcv_1min, ohlcv_daily.
PROBE_PRISTINE = [TINY_EXPECTED.symbols, TINY_EXPECTED.minute, TINY_EXPECTED.daily]


def write_reuse_probe(pytester: pytest.Pytester) -> Path:
    """A project whose one test records the server's start time and what it sees; returns the JSON-lines file."""
    out = pytester.path / "probe.jsonl"
    write_project(pytester, REUSE_PROBE.replace("OUT_PATH", repr(str(out))))
    return out


@pytest.mark.slow
def test_reuse_keeps_the_loaded_server_for_the_next_run(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    out = write_reuse_probe(pytester)
    args = plugin_env.args("local")
    pristine = PROBE_PRISTINE

    run(pytester, *args, "--refresher-reuse").assert_outcomes(passed=1)
    run(pytester, *args, "--refresher-reuse").assert_outcomes(passed=1)
    first, second = read_records(out)
    assert first["counts"] == second["counts"] == pristine
    assert (first["started"], first["port"]) == (
        second["started"],
        second["port"],
    )  # not restarted or reloaded

    # A killed server is detected and rebuilt.
    [pidfile] = found(Path(str(second["state_dir"])), "postmaster.pid")  # a live pgdata: not rglob
    os.kill(int(pidfile.read_text().split()[0]), 9)
    run(pytester, *args, "--refresher-reuse").assert_outcomes(passed=1)
    third = read_records(out)[2]
    assert third["counts"] == pristine and third["started"] != second["started"]
    assert not Path(str(second["state_dir"])).exists()

    # A run without the flag stops the kept server (and its own one) when it ends.
    write_project(pytester, "def test_ok(refresher_postgres):\n    pass\n")
    run(pytester, *args).assert_outcomes(passed=1)
    assert_server_gone(third)


# A conftest for the run after the one that kept the server: just before the run checks its kept server (``now``
# answers ``_current``, the check before ``_serving``), the server's postmaster stops taking sessions for STALL s (a
# new one waits: the kernel still accepts the connection), as a loaded machine's postmaster slow to fork a backend.
STALL_KEPT_SERVER = """
import datetime as dt, os, signal, threading
import refresher._pytest_reuse as reuse

def stall_then_now():
    os.kill(PID, signal.SIGSTOP)
    threading.Timer(STALL, os.kill, (PID, signal.SIGCONT)).start()
    return dt.datetime.now(dt.UTC)

reuse.now = stall_then_now
"""


@pytest.mark.slow
def test_reuse_waits_for_a_kept_server_slow_to_answer(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """A live kept server slow to take a session is still the kept server: it was given 3 s, then stopped and
    rebuilt (seen under -n 2 beside heavy tests), the user's reuse silently lost. A dead one is still rebuilt at
    once (``test_reuse_keeps_the_loaded_server_for_the_next_run``)."""
    out = write_reuse_probe(pytester)
    args = [*plugin_env.args("local"), "--refresher-reuse"]
    run(pytester, *args).assert_outcomes(passed=1)
    kept = Path(str(read_records(out)[0]["state_dir"]))
    [pidfile] = found(kept, "postmaster.pid")  # a live pgdata: not rglob
    pid = int(pidfile.read_text().split()[0])
    stall = STALL_KEPT_SERVER.replace("PID", str(pid)).replace("STALL", "5")  # the old wait was 3 s
    pytester.makeconftest(stall)
    try:
        run(pytester, *args).assert_outcomes(passed=1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # a run that failed before its timer
        (pytester.path / "conftest.py").unlink()
        run(pytester, *args[:-1]).assert_outcomes(passed=1)  # a plain run stops the kept server
    first, second = read_records(out)[:2]
    assert second["counts"] == PROBE_PRISTINE
    assert (second["started"], second["port"]) == (first["started"], first["port"])  # not stopped and rebuilt


def remove_containers_under(root: Path) -> None:
    """Remove (volumes too) every container and volume of the plugin whose state dir is under ``root``."""
    import docker
    import docker.errors

    from refresher._pytest_servers import PYTEST_LABEL
    from refresher.engines.docker import STATE_PATH_LABEL

    client = docker.from_env()
    try:
        label = {"label": PYTEST_LABEL}
        under = str(root.resolve())
        for container in client.containers.list(all=True, filters=label):
            if container.labels.get(STATE_PATH_LABEL, "").startswith(under):
                with contextlib.suppress(docker.errors.NotFound):
                    container.remove(force=True, v=True)
        for volume in client.volumes.list(filters=label):
            if (volume.attrs.get("Labels") or {}).get(STATE_PATH_LABEL, "").startswith(under):
                with contextlib.suppress(docker.errors.NotFound):
                    volume.remove(force=True)
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.docker
def test_reuse_keeps_the_docker_container_for_the_next_run(
    pytester: pytest.Pytester, plugin_env: PluginEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--refresher-reuse with the docker engine: the second run finds the first run's container, still pristine;
    a plain run removes the container and its volume."""
    docker_or_skip()
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    state = Path(tempfile.mkdtemp(prefix="reuse-docker-", dir=plugin_env.root))
    state.chmod(0o755)
    out = write_reuse_probe(pytester)
    args = [a for a in plugin_env.args("docker") if not a.startswith("--refresher-state-dir")]
    args.append(f"--refresher-state-dir={state}")
    try:
        run(pytester, *args, "--refresher-reuse").assert_outcomes(passed=1)
        run(pytester, *args, "--refresher-reuse").assert_outcomes(passed=1)
        first, second = read_records(out)
        assert first["engine"] == second["engine"] == "docker"
        assert first["counts"] == second["counts"] == PROBE_PRISTINE
        assert (first["started"], first["port"], first["state_dir"]) == (
            second["started"],
            second["port"],
            second["state_dir"],
        )  # the same container, not restarted or reloaded
        run(pytester, *args).assert_outcomes(passed=1)  # a plain run stops the kept server
        assert_server_gone(second)
    finally:
        stop_leftovers(state)
        remove_containers_under(state)


@pytest.mark.slow
@pytest.mark.docker
def test_reuse_two_checkouts_at_once_on_one_docker_daemon_keep_their_own_containers(
    pytester: pytest.Pytester, plugin_env: PluginEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two checkouts sharing one state dir and one Docker daemon run --refresher-reuse at the same time, twice:
    each gets a container of its own, then finds that same one again; a plain run of one stops its own only."""
    docker_or_skip()
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    state = Path(tempfile.mkdtemp(prefix="reuse-docker-two-", dir=plugin_env.root))
    state.chmod(0o755)
    args = [a for a in plugin_env.args("docker") if not a.startswith("--refresher-state-dir")]
    args.append(f"--refresher-state-dir={state}")
    checkouts = {name: pytester.mkdir(name) for name in ("one", "two")}
    for path in checkouts.values():
        (path / "pytest.ini").write_text(INNER_INI.format(extra=""))
        (path / "test_example.py").write_text(
            REUSE_PROBE.replace("OUT_PATH", repr(str(path / "probe.jsonl")))
        )

    def run_both(*more: str) -> dict[str, dict[str, object]]:
        """Both checkouts' runs at once; each one's probe record of this round."""
        command = [sys.executable, "-m", "pytest", *args, *more]
        runs = {
            name: subprocess.Popen(command, cwd=path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            for name, path in checkouts.items()
        }
        try:
            for proc in runs.values():
                stdout, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
                assert proc.returncode == 0, stdout.decode()[-3000:]
        finally:
            reap(*runs.values())
        return {name: read_records(path / "probe.jsonl")[-1] for name, path in checkouts.items()}

    def containers(record: dict[str, object]) -> list[str]:
        """The running containers of the server ``record`` names (by its state dir)."""
        import docker

        from refresher.engines.docker import STATE_PATH_LABEL

        label = f"{STATE_PATH_LABEL}={Path(str(record['state_dir'])).resolve()}"
        client = docker.from_env()
        try:
            return [c.name or "" for c in client.containers.list(filters={"label": label})]
        finally:
            client.close()

    try:
        first = run_both("--refresher-reuse")
        one, two = first["one"], first["two"]
        assert one["counts"] == two["counts"] == PROBE_PRISTINE
        assert one["engine"] == two["engine"] == "docker"
        assert one["state_dir"] != two["state_dir"] and one["port"] != two["port"]
        assert len(containers(one)) == len(containers(two)) == 1

        again = run_both("--refresher-reuse")
        for name, before in first.items():
            after = again[name]
            assert after["counts"] == PROBE_PRISTINE  # the other run's deletes never reached it
            assert (after["started"], after["port"], after["state_dir"]) == (
                before["started"],
                before["port"],
                before["state_dir"],
            )  # its own container, not restarted or reloaded, not the other checkout's

        # A plain run of the first checkout stops its kept server, and only its.
        result = subprocess.run(
            [sys.executable, "-m", "pytest", *args], cwd=checkouts["one"], capture_output=True, check=False
        )
        assert result.returncode == 0, result.stdout.decode()[-3000:]
        assert_server_gone(one)
        assert containers(two)
        third = run_both("--refresher-reuse")
        assert (third["two"]["started"], third["two"]["state_dir"]) == (two["started"], two["state_dir"])
        assert third["one"]["state_dir"] != one["state_dir"]  # rebuilt
        for path in checkouts.values():
            done = subprocess.run(
                [sys.executable, "-m", "pytest", *args], cwd=path, capture_output=True, check=False
            )
            assert done.returncode == 0, done.stdout.decode()[-3000:]
        assert_server_gone(third["one"])
        assert_server_gone(third["two"])
    finally:
        stop_leftovers(state)
        remove_containers_under(state)


@pytest.mark.slow
def test_reuse_ini_key_and_edited_profile_rebuilds(pytester: pytest.Pytester, plugin_env: PluginEnv) -> None:
    out = pytester.path / "probe.jsonl"
    write_project(
        pytester, REUSE_PROBE.replace("OUT_PATH", repr(str(out))), ini_extra="refresher_reuse = true"
    )
    profiles = pytester.mkdir("profiles")
    (profiles / "tiny.yaml").write_text(TINY)
    args = [a for a in plugin_env.args("local") if not a.startswith("--refresher-profiles-dir")]
    args.append(f"--refresher-profiles-dir={profiles}")
    run(pytester, *args).assert_outcomes(passed=1)
    (profiles / "tiny.yaml").write_text(TINY.replace("seed: 11", "seed: 13"))  # other data: must not reuse
    run(pytester, *args).assert_outcomes(passed=1)
    first, second = read_records(out)
    assert first["started"] != second["started"]
    assert not Path(str(first["state_dir"])).exists()
    run(pytester, *args, "-o", "refresher_reuse=false").assert_outcomes(passed=1)
    assert_server_gone(second)


@pytest.mark.slow
def test_xdist_hundred_tests_each_get_a_private_pristine_database(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    e = TINY_EXPECTED
    dbs = pytester.path / "databases.jsonl"
    out = write_recording_project(
        pytester,
        f"""
import json, pytest

DBS = {str(dbs)!r}

@pytest.mark.parametrize("i", range(100))
def test_alternating(refresher_db, refresher_postgres, i):
    record(refresher_postgres)
    with refresher_db.connect() as conn:
        counts = [conn.execute(f"SELECT count(*) FROM {{t}}").fetchone()[0]
                  for t in ("symbols", "ohlcv_daily", "ohlcv_1min", "refresher_segments")]
        assert counts[:3] == [{e.symbols}, {e.daily}, {e.minute}] and counts[3] > 0
        if i % 2:
            conn.execute("DELETE FROM ohlcv_1min")
            conn.execute("DROP TABLE ohlcv_daily")
            conn.execute("TRUNCATE refresher_segments")
            conn.commit()
    with open(DBS, "a") as f:
        f.write(json.dumps({{"db": refresher_db.dbname, "server": refresher_db.server.info.port}}) + "\\n")
""",
    )
    run(pytester, "-n", "2", *plugin_env.args("local")).assert_outcomes(passed=100)
    records = read_records(out)
    assert {r["worker"] for r in records} == {"gw0", "gw1"}
    assert len({(r["host"], r["port"], r["state_dir"]) for r in records}) == 1  # one server for both workers
    databases = read_records(dbs)
    assert len({d["db"] for d in databases}) == 100  # a private database each
    assert_server_gone(records[0])


@pytest.mark.slow
def test_two_reuse_runs_at_once_share_one_kept_server(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    out = write_reuse_probe(pytester)
    args = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        *plugin_env.args("local"),
        "--refresher-reuse",
    ]
    runs = [pytester.popen(args, stdin=subprocess.DEVNULL) for _ in range(2)]
    for proc in runs:
        stdout, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert proc.returncode == 0, stdout.decode()[-3000:]
    first, second = read_records(out)
    assert first["counts"] == second["counts"] == PROBE_PRISTINE
    assert (first["started"], first["port"]) == (second["started"], second["port"])  # built once
    run(pytester, *plugin_env.args("local")).assert_outcomes(passed=1)  # a plain run stops the kept server
    assert_server_gone(first)


@pytest.mark.slow
def test_xdist_three_workers_each_test_gets_its_own_pristine_clone(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """Three workers take clones from one pool while their refillers fill it: no clone is handed out twice
    (each test marks its database and must find no other test's mark), and each is pristine."""
    e = TINY_EXPECTED
    dbs = pytester.path / "databases.jsonl"
    out = write_recording_project(
        pytester,
        f"""
import json, time, pytest

@pytest.mark.parametrize("i", range(36))
def test_claims_a_private_database(refresher_db, refresher_postgres, i):
    record(refresher_postgres)
    with refresher_db.connect() as conn:
        counts = [conn.execute(f"SELECT count(*) FROM {{t}}").fetchone()[0]
                  for t in ("symbols", "ohlcv_daily", "ohlcv_1min")]
        assert counts == [{e.symbols}, {e.daily}, {e.minute}]
        assert conn.execute("SELECT to_regclass('claimed')").fetchone()[0] is None
        conn.execute("CREATE TABLE claimed (test int)")
        conn.execute("INSERT INTO claimed VALUES (%s)", (i,))
        conn.execute("DELETE FROM ohlcv_daily")
        conn.commit()
        oid = conn.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
        time.sleep(0.05)  # another test holding this database would write its mark now
        assert conn.execute("SELECT array_agg(test) FROM claimed").fetchone()[0] == [i]
    with open({str(dbs)!r}, "a") as f:
        f.write(json.dumps({{"db": refresher_db.dbname, "oid": oid}}) + "\\n")
""",
    )
    run(pytester, "-n", "3", *plugin_env.args("local")).assert_outcomes(passed=36)
    records = read_records(out)
    assert {r["worker"] for r in records} == {"gw0", "gw1", "gw2"}
    assert len({(r["host"], r["port"], r["state_dir"]) for r in records}) == 1  # one server for all
    databases = read_records(dbs)
    assert len({d["db"] for d in databases}) == len({d["oid"] for d in databases}) == 36
    assert_server_gone(records[0])


@pytest.mark.slow
def test_a_reuse_run_killed_mid_test_leaves_its_clone_for_the_next_run_to_drop(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    out = pytester.path / "clones.jsonl"
    write_project(
        pytester,
        f"""
import json, os, signal

def test_dies_holding_a_clone(refresher_db, refresher_postgres):
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps({{"db": refresher_db.dbname, "admin": refresher_postgres.info.dsn("postgres")}}))
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no teardown drops the clone
""",
    )
    args = plugin_env.args("local")
    killed = run(pytester, *args, "--refresher-reuse")
    assert killed.ret not in (0, 1)
    left = json.loads(out.read_text())

    def databases() -> set[str]:
        with psycopg.connect(left["admin"], connect_timeout=10) as conn:
            return {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}

    assert left["db"] in databases()  # left on the kept server
    write_project(pytester, "def test_ok(refresher_db):\n    pass\n")
    run(pytester, *args, "--refresher-reuse").assert_outcomes(passed=1)
    assert left["db"] not in databases()
    assert not [name for name in databases() if "__test_" in name]
    run(pytester, *args).assert_outcomes(passed=1)  # a plain run stops the kept server


def test_abandoned_clones_are_those_of_dead_owners_only(loaded: ServerInfo) -> None:
    save_pristine(loaded, pool_size=0)
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_note = clone_note(exited.pid)  # labels naming it while it runs (its start time)
    exited.wait()
    prefix = per_test_clone_prefix(loaded)
    checkout_clone(loaded, f"{prefix}live", refill=False, note=clone_note(os.getpid()))
    checkout_clone(loaded, f"{prefix}dead", refill=False, note=dead_note)
    checkout_clone(loaded, f"{prefix}other", refill=False, note="someone else's")
    assert drop_abandoned_clones(loaded) == [f"{prefix}dead"]
    with psycopg.connect(loaded.dsn("postgres")) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()}
    assert {f"{prefix}live", f"{prefix}other"} <= names and f"{prefix}dead" not in names


def test_a_server_that_failed_to_build_fails_each_later_test_with_a_traceback_that_does_not_grow(
    tmp_path: Path,
) -> None:
    # Every later test of the run gets the build's error at once: the one exception object raised again must not
    # gather the raising frames each time (500 tests: reports ever longer, every frame held).
    servers = SharedServers(tmp_path, owner=False, stop=lambda _server: None)
    builds: list[int] = []

    def build() -> LoadedServer:
        builds.append(1)
        raise ProfileError("p.yaml", "months", "-3", "must be positive")

    lengths = []
    for _ in range(4):
        with pytest.raises(ProfileError) as info:
            servers.get("key", build)
        lengths.append(len(traceback.extract_tb(info.value.__traceback__)))
    assert builds == [1] and lengths == [lengths[0]] * 4, lengths


POOL_PROBE = """
import psycopg
import pytest


@pytest.mark.parametrize("i", range(4))
def test_each_gets_a_full_copy(refresher_db, refresher_postgres, i):
    with refresher_db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_daily").fetchone()[0] == DAILY
        conn.execute("DELETE FROM ohlcv_daily")
    info = refresher_postgres.info
    with psycopg.connect(info.dsn("postgres")) as conn:
        pools = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (info.dbname + "__pool_",)
        ).fetchall()
        mark = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (info.dbname + "__pristine",),
        ).fetchone()[0]
    assert "pool_size=SIZE " in mark
    # Private slots (10000 and up) hold a copy on its way elsewhere (a checkout's, the template's analysis).
    kept = {name for (name,) in pools if int(name.rsplit("_", 1)[1]) < 10000}
    assert kept <= {info.dbname + f"__pool_{n}" for n in range(SIZE)}
"""


@pytest.mark.slow
def test_the_pool_size_comes_from_the_environment_or_the_option(
    pytester: pytest.Pytester, plugin_env: PluginEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFRESHER_POOL_SIZE", "0")  # no clone at all: each refresher_db is a template copy
    daily = str(TINY_EXPECTED.daily)
    write_project(pytester, POOL_PROBE.replace("DAILY", daily).replace("SIZE", "0"))
    run(pytester, *plugin_env.args("local")).assert_outcomes(passed=4)
    write_project(pytester, POOL_PROBE.replace("DAILY", daily).replace("SIZE", "1"))
    run(pytester, *plugin_env.args("local", "--refresher-pool-size=1")).assert_outcomes(passed=4)
    result = run(pytester, *plugin_env.args("local", "--refresher-pool-size=-1"))
    assert_one_line_usage_error(
        result, "--refresher-pool-size='-1': not a whole number from 0 to 100, nor auto"
    )
    monkeypatch.setenv("REFRESHER_POOL_SIZE", "lots")
    result = run(pytester, *plugin_env.args("local"))
    result.stderr.fnmatch_lines(["ERROR: refresher: *REFRESHER_POOL_SIZE='lots': not a whole number*"])


@pytest.mark.slow
def test_refresher_tx_a_commit_followed_by_more_statements_still_fails_the_test(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """A script that commits (a migration's COMMIT) and a query after it: the query opens a new transaction,
    which the teardown rolls back, but the committed table stays for every later test; the test must fail."""
    write_project(
        pytester,
        """
def test_a_runs_a_script_that_commits(refresher_tx):
    refresher_tx.execute("CREATE TABLE leaked (x int); INSERT INTO leaked VALUES (1); COMMIT")
    assert refresher_tx.execute("SELECT count(*) FROM leaked").fetchone()[0] == 1

def test_b_a_rolled_back_error_after_a_commit(refresher_tx):
    refresher_tx.execute("CREATE TABLE leaked_too (x int); COMMIT")
    try:
        refresher_tx.execute("SELECT 1/0")
    except Exception:
        pass

def test_c_next(refresher_tx):
    pass
""",
    )
    result = run(pytester, *plugin_env.args("local"))
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(["*refresher_tx: the test ended its transaction*use refresher_db*"] * 2)


@pytest.mark.slow
def test_refresher_tx_session_state_does_not_outlive_the_test(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """What a rollback does not undo: a session advisory lock (another xdist worker's test asking for it would
    wait forever), a prepared statement, a session-level setting made outside any transaction."""
    write_project(
        pytester,
        """
def test_a_leaves_session_state(refresher_tx):
    refresher_tx.execute("SELECT pg_advisory_lock(42)")
    refresher_tx.execute("PREPARE leftover AS SELECT 1")

def test_b_finds_a_clean_session(refresher_tx):
    locks = refresher_tx.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    ).fetchone()[0]
    prepared = refresher_tx.execute("SELECT array_agg(name) FROM pg_prepared_statements").fetchone()[0]
    assert (locks, prepared) == (0, None)
    for _ in range(6):  # psycopg prepares a query it runs five times: it still works after the clean-up
        refresher_tx.execute("SELECT count(*) FROM symbols WHERE symbol = %s", ("AAA",)).fetchone()

def test_c_psycopg_prepared_statements_still_work(refresher_tx):
    for _ in range(6):
        refresher_tx.execute("SELECT count(*) FROM symbols WHERE symbol = %s", ("AAA",)).fetchone()
""",
    )
    run(pytester, *plugin_env.args("local")).assert_outcomes(passed=3)


@pytest.mark.slow
def test_refresher_tx_teardown_is_one_round_trip(pytester: pytest.Pytester, plugin_env: PluginEnv) -> None:
    """The rollback and session clean-up after each refresher_tx test cost one round trip to the server, whatever
    the test left (a failed statement, DDL, an advisory lock, statements psycopg prepared): libpq's own trace of
    the connection, from the end of one test to the next one's BEGIN, holds a single Sync (each statement sent
    on its own would be one more)."""
    trace = pytester.path / "trace.txt"
    write_project(
        pytester,
        f"""
import os
import pytest
from psycopg import pq

TRACE = {str(trace)!r}
TRACED = []

def leave_work_to_undo(conn, *, failed):
    conn.execute("CREATE TABLE scratch (x int)")
    conn.execute("SELECT pg_advisory_lock(42)")
    for _ in range(6):  # psycopg prepares it: the clean-up deallocates it
        conn.execute("SELECT count(*) FROM symbols WHERE symbol = %s", ("AAA",)).fetchone()
    if failed:
        with pytest.raises(Exception):
            conn.execute("SELECT 1/0")
    fd = os.open(TRACE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    conn.pgconn.trace(fd)  # libpq line-buffers it
    conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
    TRACED.append((conn, fd))

def assert_the_teardown_was_one_round_trip(conn):
    traced, fd = TRACED.pop()
    assert traced is conn  # the same kept connection: the teardown was traced
    conn.pgconn.untrace()
    os.close(fd)
    with open(TRACE) as f:
        lines = f.read().splitlines()
    teardown = lines[: next(i for i, line in enumerate(lines) if '"BEGIN"' in line)]
    sent = [line.split("\t")[2].strip() for line in teardown if line.startswith("F\t")]
    assert sent.count("Sync") + sent.count("Query") == 1, teardown
    assert any("ROLLBACK TO SAVEPOINT refresher_tx" in line for line in teardown)
    assert any("DISCARD ALL" in line for line in teardown)

def test_1_leaves_work(refresher_tx):
    leave_work_to_undo(refresher_tx, failed=False)

def test_2_reads_the_trace(refresher_tx):
    assert_the_teardown_was_one_round_trip(refresher_tx)

def test_3_leaves_work_and_a_failed_statement(refresher_tx):
    leave_work_to_undo(refresher_tx, failed=True)

def test_4_reads_the_trace(refresher_tx):
    assert_the_teardown_was_one_round_trip(refresher_tx)

def test_5_finds_a_clean_session(refresher_tx):
    locks = refresher_tx.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    ).fetchone()[0]
    assert locks == 0
    assert refresher_tx.execute("SELECT to_regclass('scratch') IS NULL").fetchone()[0]
""",
    )
    run(pytester, *plugin_env.args("local")).assert_outcomes(passed=5)


KILLED_IN_THE_LOAD = """
import os, signal
import refresher.refresh

_refresh = refresher.refresh.refresh

def _refresh_then_die(profile, engine, *args, **kwargs):
    _refresh(profile, engine, *args, **kwargs)  # the server runs, loaded; its record is not written yet
    os.kill(os.getpid(), signal.SIGKILL)

refresher.refresh.refresh = _refresh_then_die
"""


@pytest.mark.slow
def test_a_reuse_run_killed_while_building_leaves_nothing_the_next_run_keeps(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """kill -9 (a CI timeout, a closed terminal) while a --refresher-reuse run loads its server: the server
    is not recorded for reuse yet, so nothing would ever stop it unless the sweep knows whose it is."""
    state = plugin_env.root / "state-killed-build"
    state.mkdir(mode=0o755)
    args = [*plugin_env.args("local"), f"--refresher-state-dir={state}", "--refresher-reuse"]
    pytester.makeconftest(KILLED_IN_THE_LOAD)
    write_project(pytester, "def test_ok(refresher_db):\n    pass\n")
    try:
        assert run(pytester, *args).ret not in (0, 1)
        [left] = throwaway_dirs(state)
        [pidfile] = found(left, "postmaster.pid")
        port = int(pidfile.read_text().splitlines()[3])
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # still serving

        (pytester.path / "conftest.py").unlink()
        run(pytester, *args).assert_outcomes(passed=1)  # builds the server it keeps
        run(pytester, *args[:-1]).assert_outcomes(passed=1)  # a plain run: stops the kept one, and its own
        assert not left.exists()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert throwaway_dirs(state) == []
    finally:
        stop_leftovers(state)


def throwaway_dirs(state: Path) -> list[Path]:
    """The plugin's throwaway server directories under ``state``."""
    return sorted(d.parent for d in state.glob(f"{THROWAWAY_PREFIX}*/{OWNER_FILE}"))


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    """An empty directory on a read-only mount (as root, a mode-555 directory is still writable)."""
    path = Path(tempfile.mkdtemp(prefix="refresher-ro-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


def test_a_read_only_store_or_state_dir_fails_in_one_line(
    pytester: pytest.Pytester, plugin_env: PluginEnv, read_only_dir: Path
) -> None:
    write_project(pytester, "def test_x(refresher_db):\n    pass\n\ndef test_y(refresher_tx):\n    pass\n")
    for option in ("--refresher-store", "--refresher-state-dir"):
        result = run(pytester, *plugin_env.args("local"), f"{option}={read_only_dir}")
        result.assert_outcomes(errors=2)
        result.stdout.fnmatch_lines([f"refresher: {read_only_dir}*: Read-only file system*"] * 2)
        assert "Traceback" not in result.stdout.str() and "raise " not in result.stdout.str()


@pytest.mark.slow
def test_reuse_rebuilds_when_the_universe_file_changes(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """The profile's bytes are not all it was loaded from: an edited universe file means other symbols, and a
    kept server loaded from the old one would hand every test the wrong data."""
    profiles = pytester.mkdir("uni_profiles")
    profiles.chmod(0o755)
    (profiles / "tiny.yaml").write_text(TINY.replace("symbols: [AAA, BBB, CCC]", "file: uni.csv"))
    (profiles / "uni.csv").write_text("symbol,exchange,asset_class\nAAA,XNYS,equity\nBBB,XNYS,equity\n")
    out = pytester.path / "symbols.jsonl"
    write_project(
        pytester,
        f"""
import json

def test_symbols(refresher_db):
    with refresher_db.connect() as conn:
        symbols = [r[0] for r in conn.execute("SELECT symbol FROM symbols ORDER BY symbol").fetchall()]
    with open({str(out)!r}, "a") as f:
        f.write(json.dumps(symbols) + "\\n")
""",
    )
    args = [a for a in plugin_env.args("local") if not a.startswith("--refresher-profiles-dir")]
    args += [f"--refresher-profiles-dir={profiles}", "--refresher-reuse"]
    try:
        run(pytester, *args).assert_outcomes(passed=1)
        (profiles / "uni.csv").write_text("symbol,exchange,asset_class\nAAA,XNYS,equity\nZZZ,XNYS,equity\n")
        run(pytester, *args).assert_outcomes(passed=1)
        assert read_records(out) == [["AAA", "BBB"], ["AAA", "ZZZ"]]
    finally:
        run(pytester, *args[:-1]).assert_outcomes(passed=1)  # a plain run stops the kept server


@pytest.mark.slow
def test_a_plain_run_leaves_a_kept_server_another_live_run_uses(
    pytester: pytest.Pytester, plugin_env: PluginEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of one checkout at once (a terminal with --refresher-reuse, an IDE without): the plain one must
    not stop the kept server under the other's tests."""
    started, plain_done = pytester.path / "started", pytester.path / "plain_done"
    write_project(
        pytester,
        f"""
import os, pathlib, time

def test_1_waits_for_the_plain_run(refresher_db):
    if os.environ.get("ROLE") != "reuse":
        return
    pathlib.Path({str(started)!r}).touch()
    deadline = time.monotonic() + 300
    while not pathlib.Path({str(plain_done)!r}).exists() and time.monotonic() < deadline:
        time.sleep(0.2)

def test_2_still_has_its_server(refresher_db):
    with refresher_db.connect() as conn:
        assert conn.execute("SELECT count(*) FROM symbols").fetchone()[0] == {TINY_EXPECTED.symbols}
""",
    )
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *plugin_env.args("local")]
    monkeypatch.setenv("ROLE", "reuse")  # pytester.popen passes on the environment of the moment
    reuse = pytester.popen([*base, "--refresher-reuse"], stdin=subprocess.DEVNULL)
    monkeypatch.delenv("ROLE")
    try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not started.exists() and reuse.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started.exists()
        run(pytester, *plugin_env.args("local")).assert_outcomes(passed=2)
        plain_done.touch()
        stdout, _ = reuse.communicate(timeout=SUBPROCESS_TIMEOUT)
        assert reuse.returncode == 0, stdout.decode()[-3000:]
    finally:
        plain_done.touch()
        if reuse.poll() is None:
            reuse.kill()
            reuse.wait()
        run(pytester, *plugin_env.args("local")).assert_outcomes(passed=2)  # stops the kept server


@pytest.mark.slow
def test_a_killed_run_leaves_a_run_directory_the_next_run_removes(
    pytester: pytest.Pytester, plugin_env: PluginEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run directory (servers' records with their passwords, lock files) of a run killed with -9, under
    the temporary directory: nothing else ever removes it. Another live run's is never touched."""
    tmp = plugin_env.root / "tmp-run-dirs"
    tmp.mkdir(mode=0o755)
    monkeypatch.setenv("TMPDIR", str(tmp))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        other = tmp / "refresher-pytest-live"  # a live run's, as its plugin writes it
        other.mkdir()
        (other / OWNER_FILE).write_text(json.dumps(owner_labels(live.pid)))
        write_project(
            pytester,
            "import os, signal\n\ndef test_dies(refresher_postgres):\n    os.kill(os.getpid(), signal.SIGKILL)\n",
        )
        run(pytester, *plugin_env.args("local"))
        [left] = set(tmp.glob("refresher-pytest-*")) - {other}
        write_project(pytester, "def test_ok(refresher_postgres):\n    pass\n")
        run(pytester, *plugin_env.args("local")).assert_outcomes(passed=1)
        assert not left.exists()
        assert list(tmp.glob("refresher-pytest-*")) == [other]
    finally:
        live.kill()
        live.wait()


@pytest.mark.slow
def test_a_reuse_run_removes_what_a_killed_run_left(pytester: pytest.Pytester, plugin_env: PluginEnv) -> None:
    """A laptop that always runs with --refresher-reuse never builds, so it must sweep on the reuse path too."""
    args = plugin_env.args("local")
    write_project(pytester, "def test_ok(refresher_postgres):\n    pass\n")
    run(pytester, *args, "--refresher-reuse").assert_outcomes(passed=1)  # the kept server exists from now on
    out = write_recording_project(
        pytester,
        """
import os, signal

def test_dies(refresher_postgres):
    record(refresher_postgres)
    os.kill(os.getpid(), signal.SIGKILL)
""",
    )
    run(pytester, *args, "--refresher-profile=tiny_two")  # another profile's run, killed with its server up
    [left] = read_records(out)
    assert Path(str(left["state_dir"])).exists()
    write_project(pytester, "def test_ok(refresher_postgres):\n    pass\n")
    run(pytester, *args, "--refresher-reuse").assert_outcomes(passed=1)  # reuses the kept server: no build
    assert_server_gone(left)
    run(pytester, *args).assert_outcomes(passed=1)  # a plain run stops the kept server


def test_a_server_that_cannot_be_built_is_tried_once(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """Every later test fails with the first one's line at once, instead of starting (and failing) the whole
    build again: a missing image or a broken profile cost each of 500 tests a second or more."""
    calls = pytester.path / "builds"
    pytester.makeconftest(
        f"""
import refresher.pytest_plugin as plugin

_build = plugin.build_server

def counting(*args, **kwargs):
    with open({str(calls)!r}, "a") as f:
        f.write("build\\n")
    return _build(*args, **kwargs)

plugin.build_server = counting
"""
    )
    profiles = pytester.mkdir("broken_profiles")
    (profiles / "tiny.yaml").write_text(TINY.replace("months: 1", "months: -1"))
    write_project(
        pytester,
        """
import pytest

@pytest.mark.parametrize("i", range(2))
def test_x(refresher_db, i):
    pass

@pytest.mark.refresher_profile("tiny")  # a marker's server is no session fixture, which pytest would cache
@pytest.mark.parametrize("i", range(2))
def test_marked(refresher_db, i):
    pass
""",
    )
    args = [a for a in plugin_env.args("local") if not a.startswith("--refresher-profiles-dir")]
    result = run(pytester, *args, f"--refresher-profiles-dir={profiles}")
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(["refresher: *tiny.yaml*months*"] * 4)
    assert calls.read_text().splitlines() == ["build"]


@pytest.mark.slow
def test_reuse_without_as_of_rebuilds_after_the_next_session_close(
    pytester: pytest.Pytester, plugin_env: PluginEnv
) -> None:
    """Without a fixed as_of the data end at the last completed session: a server kept in the morning lacks the
    session that closes in the afternoon, though the date has not changed."""
    out = write_reuse_probe(pytester)
    args = [a for a in plugin_env.args("local") if not a.startswith("--refresher-as-of")]
    args.append("--refresher-reuse")
    try:
        run(pytester, *args).assert_outcomes(passed=1)
        run(pytester, *args).assert_outcomes(passed=1)
        pytester.makeconftest(
            """
import datetime as dt
import refresher._pytest_reuse as reuse
from refresher.calendar import next_close

# The moment after the next close of the exchange (the profile's: XNYS), the date unchanged.
reuse.now = lambda: next_close("XNYS", dt.datetime.now(dt.UTC)) + dt.timedelta(seconds=1)
"""
        )
        run(pytester, *args).assert_outcomes(passed=1)
        first, second, third = read_records(out)
        assert first["started"] == second["started"]  # reused within the session
        assert third["started"] != second["started"]  # rebuilt after the close
    finally:
        run(pytester, *args[:-1]).assert_outcomes(passed=1)  # a plain run stops the kept server
