"""`make up` / `--engine compose` / `make compose-down` against the real Docker daemon and compose.

Each test run uses its own compose project (COMPOSE_PROJECT / REFRESHER_COMPOSE_PROJECT), so the developer's own
`make up` of this checkout is never touched, and removes it whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import psycopg
import pytest
import redis

from refresher.engines.compose import PROJECT_LABEL, ComposeEngine, default_queue_url, find_service
from refresher.errors import ProfileError
from refresher.pool import _last_failure, _record_outcome
from refresher.settings import CHECKOUT, Settings, compose_project
from tests.child_processes import outputs
from tests.fixtures_docker import holding_dockers_next_ports
from tests.refresher.test_pool_refill_failed import record_files, record_path

pytestmark = pytest.mark.docker

TINY = """\
universe:
  symbols: [AAPL, KO]
exchange: XNYS
months: 1
as_of: 2025-03-31
timeframes: [1d, 1m]
features: []
"""


# Tries of `make up` with Docker's next picks held, each while other containers may take them all (see below).
PORT_HOLDING_TRIES = 4
SERVICE_PORTS = (("postgres", 5432), ("redis", 6379))
RETRIED = "a port Docker picked is held by another process"  # compose.sh's line when it tries other ports


def make(
    *args: str, env: dict[str, str] | None = None, checkout: Path = CHECKOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(checkout), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def _up_until(env: dict[str, str], line: str) -> tuple[subprocess.Popen[str], list[str]]:
    """`make up` started, its stderr read up to the first line holding ``line`` (or to its end)."""
    up = subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(CHECKOUT), "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert up.stderr is not None
    said = []
    for said_line in up.stderr:
        said.append(said_line)
        if line in said_line:
            break
    return up, said


def _rest_of(started: tuple[subprocess.Popen[str], list[str]]) -> subprocess.CompletedProcess[str]:
    """The `make up` of ``_up_until`` run to its end, with all it said."""
    up, said = started
    [(out, err)] = outputs([up], timeout=900)  # one still running at 900 s: killed, its pipes closed
    return subprocess.CompletedProcess(up.args, up.returncode, out, "".join(said) + err)


def make_variable(name: str, checkout: Path = CHECKOUT) -> str:
    return make("-s", f"--eval=print-var: ; @echo $({name})", "print-var", checkout=checkout).stdout.strip()


def leftovers(client: docker.DockerClient, project: str) -> list[str]:
    label = {"label": f"{PROJECT_LABEL}={project}"}
    containers = [c.name or c.id for c in client.containers.list(all=True, filters=label)]
    volumes = [v.name for v in client.volumes.list(filters=label)]
    return [*containers, *volumes]


@pytest.fixture
def project(docker_client: docker.DockerClient, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    if not make_variable("COMPOSE"):
        if Settings.from_env().require_docker:
            pytest.fail(
                "REFRESHER_REQUIRE_DOCKER=1 but no compose implementation is installed", pytrace=False
            )
        pytest.skip("no compose implementation (apt-get install docker-compose)")
    name = f"refresher-test-{secrets.token_hex(4)}"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "compose_tiny.yaml").write_text(TINY)
    env = {
        **{k: v for k, v in os.environ.items() if k != "MAKELEVEL"},
        "COMPOSE_PROJECT": name,
        "REFRESHER_COMPOSE_PROJECT": name,
        "REFRESHER_STATE_DIR": str(tmp_path / "state"),
        "FEATURE_STORE_PATH": str(tmp_path / "store"),
        "REFRESHER_PROFILES": str(tmp_path / "profiles"),
    }
    try:
        yield name, env
    finally:
        make("compose-down", env=env)


def running(client: docker.DockerClient, project: str) -> dict[str, tuple[str, str]]:
    """The project's running containers: id -> (when it started, the host ports it publishes)."""
    label = {"label": f"{PROJECT_LABEL}={project}"}
    return {
        str(c.id): (
            c.attrs["State"]["StartedAt"],
            json.dumps(c.attrs["NetworkSettings"]["Ports"], sort_keys=True),
        )
        for c in client.containers.list(filters=label)
    }


def make_up(env: dict[str, str]) -> str:
    """`make up` of the project ``env`` names, which must succeed; its output."""
    up = make("up", env=env)
    assert up.returncode == 0, up.stderr
    return up.stdout


def refresher(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "refresher.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done


def test_up_when_the_ports_docker_picks_are_held_by_other_processes(
    docker_client: docker.DockerClient,
    docker_pg_image: str,
    docker_prefix: str,
    project: tuple[str, dict[str, str]],
) -> None:
    # Docker hands out published ports in turn without asking the kernel: `make up` failed with "Error starting
    # userland proxy: listen tcp4 127.0.0.1:<port>: bind: address already in use" when another process held one.
    name, env = project
    for _ in range(PORT_HOLDING_TRIES):
        with holding_dockers_next_ports(docker_client, docker_pg_image, docker_prefix) as held:
            started = _up_until(env, RETRIED)
        # The ports go back once compose failed on them: its retry needs none of them, and each other container
        # started on the daemon while they are held fails its first start.
        up = _rest_of(started)
        if up.returncode != 0 or RETRIED in up.stderr:
            break
        # Nothing was tested: the other containers started on the daemon meanwhile (the other worker's tests,
        # other checkouts') had taken every held port in turn, so Docker's picks for compose were free. Compose's
        # ports say so; then down and again.
        got = [find_service(name, service, port, docker_client) for service, port in SERVICE_PORTS]
        assert all(s is not None and s.port not in held for s in got), ([s and s.port for s in got], held)
        down = make("compose-down", env=env)
        assert down.returncode == 0, down.stderr
    assert up.returncode == 0, up.stderr
    assert RETRIED in up.stderr, (  # the retry ran
        f"Docker's picks passed the held ports in each of {PORT_HOLDING_TRIES} tries"
    )
    server = find_service(name, "postgres", 5432, docker_client)
    assert server is not None
    with psycopg.connect(
        f"postgresql://{server.env['POSTGRES_USER']}:{server.env['POSTGRES_PASSWORD']}@{server.host}:{server.port}/"
        "postgres",
        connect_timeout=10,
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # The next plain `make up` changes nothing: it asked compose for Docker's pick again, another
        # configuration than the ports the retry chose, and compose recreated both containers (this session
        # ended, Postgres and Redis on new ports).
        first = running(docker_client, name)
        again = make("up", env=env)
        assert again.returncode == 0, again.stderr
        assert running(docker_client, name) == first
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert find_service(name, "redis", 6379, docker_client) is not None


def test_an_unpinned_up_keeps_the_port_an_earlier_up_pinned(
    docker_client: docker.DockerClient, project: tuple[str, dict[str, str]]
) -> None:
    # A plain `make up` after `REFRESHER_PG_PORT=<port> make up` asked compose for Docker's pick: another
    # configuration, so compose recreated Postgres under its sessions, on another port.
    name, env = project
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        pinned = probe.getsockname()[1]
    up = make("up", env={**env, "REFRESHER_PG_PORT": str(pinned)})
    assert up.returncode == 0, up.stderr
    first = running(docker_client, name)
    server = find_service(name, "postgres", 5432, docker_client)
    assert server is not None and server.port == pinned

    again = make("up", env=env)
    assert again.returncode == 0, again.stderr
    assert running(docker_client, name) == first


def test_up_refresh_reset_down(
    docker_client: docker.DockerClient, project: tuple[str, dict[str, str]]
) -> None:
    name, env = project
    assert "postgres  127.0.0.1:" in make_up(env)
    first = running(docker_client, name)
    assert len(first) == 2  # postgres and redis, healthy (make up waits)

    again = make("up", env=env)  # a no-op: the same containers, not restarted, on the same ports
    assert again.returncode == 0, again.stderr
    assert running(docker_client, name) == first

    engine = ComposeEngine(name, state_dir=Path(env["REFRESHER_STATE_DIR"]))
    with ThreadPoolExecutor(2) as pool:  # two starts at once both get the one new database
        servers = list(pool.map(lambda _: engine.start("compose_twice"), range(2)))
    assert servers[0] == servers[1] and engine.info("compose_twice") is not None
    assert engine.stop("compose_twice") and engine.info("compose_twice") is None
    assert not engine.stop("compose_twice")

    report = json.loads(
        refresher("refresh", "-p", "compose_tiny", "--engine", "compose", "--json", env=env).stdout
    )
    assert report["engine"] == "compose" and report["rows_loaded"] > 0
    dsn = json.loads(refresher("url", "-p", "compose_tiny", "--json", env=env).stdout)["dsn"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone()
        assert conn.execute("SHOW wal_segment_size").fetchone() == ("1MB",)
        conn.execute("DELETE FROM ohlcv_1min")
    # Without --engine: auto finds the profile on the compose Postgres that serves it.
    refresher("reset", "-p", "compose_tiny", env=env)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone() == rows
    status = json.loads(refresher("status", "--json", env=env).stdout)["servers"]
    assert {"engine": "compose", "profile": "compose_tiny"}.items() <= next(
        s for s in status if s["engine"] == "compose"
    ).items()

    queue = default_queue_url(Settings.from_env(env))
    assert queue and queue.startswith("redis://127.0.0.1:")
    with redis.Redis.from_url(queue) as client:
        assert client.ping()
    refresher(
        "jobs", "list", env={k: v for k, v in env.items() if k != "REFRESHER_QUEUE"}
    )  # no --queue needed

    for _ in range(2):  # down twice: the second is a no-op
        down = make("compose-down", env=env)
        assert down.returncode == 0, down.stderr
        assert leftovers(docker_client, name) == []
    assert default_queue_url(Settings.from_env(env)) is None
    assert default_queue_url(Settings.from_env({**env, "REFRESHER_QUEUE": "redis://elsewhere:1/0"})) == (
        "redis://elsewhere:1/0"
    )


def test_two_make_ups_at_once_start_one_postgres(
    docker_client: docker.DockerClient, project: tuple[str, dict[str, str]]
) -> None:
    # Two terminals' `make up` at once: compose made postgres_1 and postgres_2, two postmasters on one data
    # volume (each the PID 1 of its own namespace, so neither saw the other's postmaster.pid as live).
    name, env = project
    with ThreadPoolExecutor(2) as pool:
        ups = list(pool.map(lambda _: make("up", env=env), range(2)))
    assert [up.returncode for up in ups] == [0, 0], [up.stderr for up in ups]
    services = [
        c.labels["com.docker.compose.service"]
        for c in docker_client.containers.list(all=True, filters={"label": f"{PROJECT_LABEL}={name}"})
    ]
    assert sorted(services) == ["postgres", "redis"]


def test_up_without_compose_is_a_one_line_hint(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("docker", "sha256sum", "cut"):  # everything but a compose implementation
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    make_bin = shutil.which("make")
    assert make_bin
    done = subprocess.run(
        [make_bin, "--no-print-directory", "-C", str(CHECKOUT), "up"],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install docker-compose" in lines[0], done.stderr


def test_compose_project_is_unique_per_checkout_and_matches_the_makefile() -> None:
    assert make_variable("COMPOSE_PROJECT") == compose_project(CHECKOUT)
    assert compose_project(CHECKOUT / "elsewhere") != compose_project(CHECKOUT)


def test_checkouts_whose_paths_hold_spaces_get_their_own_project_the_one_refresher_computes(
    tmp_path: Path,
) -> None:
    # make's $(realpath) splits its argument on spaces: every such checkout hashed "" to one shared project
    # (`make compose-down` in one removed the other's volumes), and --engine compose looked for another one.
    projects = []
    for name in ("my checkout", "other checkout", "it's here"):
        checkout = tmp_path / name
        checkout.mkdir()
        shutil.copy(CHECKOUT / "Makefile", checkout / "Makefile")
        projects.append(make_variable("COMPOSE_PROJECT", checkout))
        assert projects[-1] == compose_project(checkout)
    assert len(set(projects)) == 3


def test_two_checkouts_run_side_by_side_and_down_touches_only_its_own(
    docker_client: docker.DockerClient, project: tuple[str, dict[str, str]]
) -> None:
    name, env = project
    other = f"refresher-test-{secrets.token_hex(4)}"
    other_env = {**env, "COMPOSE_PROJECT": other, "REFRESHER_COMPOSE_PROJECT": other}
    try:
        for e in (env, other_env):
            up = make("up", env=e)
            assert up.returncode == 0, up.stderr
        ports = {p: find_service(p, "postgres", 5432) for p in (name, other)}  # ports Docker chose
        assert ports[name] and ports[other] and ports[name].port != ports[other].port
        down = make("compose-down", env=other_env)
        assert down.returncode == 0, down.stderr
        assert leftovers(docker_client, other) == []
        assert len(docker_client.containers.list(filters={"label": f"{PROJECT_LABEL}={name}"})) == 2
    finally:
        make("compose-down", env=other_env)


def test_status_of_all_checkouts_lists_docker_servers_while_a_make_up_runs(
    project: tuple[str, dict[str, str]],
) -> None:
    # `make up`'s containers carry io.refresher.project=refresher too; its Redis publishes no 5432. The listing
    # of every checkout's Docker servers failed on it: "container ..._redis_1 publishes no port for 5432".
    name, env = project
    assert make("up", env=env).returncode == 0
    listed = refresher("status", "--all-checkouts", "--json", env=env)
    details = " ".join(s["detail"] for s in json.loads(listed.stdout)["servers"] if s["engine"] == "docker")
    assert name not in details  # compose's containers are `make compose-ps`'s, not Docker engine servers


def test_down_all_drops_only_the_databases_its_own_state_dir_made(
    project: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    # `refresher down --profile all` listed every database of the compose Postgres as a profile: it dropped one
    # made by hand, and those another state dir of the checkout (a test run's) had loaded.
    name, env = project
    assert make("up", env=env).returncode == 0
    mine = ComposeEngine(name, state_dir=Path(env["REFRESHER_STATE_DIR"]))
    theirs = ComposeEngine(name, state_dir=tmp_path / "other-state")
    server = mine.start("compose_mine")
    theirs.start("compose_theirs")
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("CREATE DATABASE by_hand")
    assert [s.profile for s in mine.status()] == ["compose_mine"]

    down = refresher("down", "--profile", "all", "--json", env=env)

    assert "compose_mine" in down.stdout and "by_hand" not in down.stdout
    with psycopg.connect(server.dsn("postgres")) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    assert {"by_hand", "compose_theirs"} <= names and "compose_mine" not in names
    assert [s.profile for s in theirs.status()] == ["compose_theirs"]
    assert mine.stop("by_hand") is False  # never made here: left alone
    assert theirs.stop("compose_theirs") is True


def _two_checkouts_failed(
    name: str, env: dict[str, str], tmp_path: Path
) -> tuple[ComposeEngine, ComposeEngine, Path, Path]:
    """This checkout's engine (the project's state dir) and another state dir's on the same compose server, each
    with a profile started and a failed refill recorded (at 1000): the engines and the two records' paths."""
    mine = ComposeEngine(name, state_dir=Path(env["REFRESHER_STATE_DIR"]))
    theirs = ComposeEngine(name, state_dir=tmp_path / "other-state")
    server, other = mine.start("compose_refilled"), theirs.start("compose_theirs")
    for each in (server, other):
        _record_outcome(each.dsn("postgres"), each.dbname, 1_000, f"{each.dbname} failed")
    return mine, theirs, record_path(server), record_path(other)


def test_down_removes_the_profiles_refill_record_alone_and_a_database_made_again_claims_no_failure(
    project: tuple[str, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The server stays when a profile goes: its database made again had the address, database name and cluster
    # of the dropped one, whose record of a failed refill (in the user's cache) `down` left behind.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    name, env = project
    assert make("up", env=env).returncode == 0
    mine, theirs, path, their_path = _two_checkouts_failed(name, env, tmp_path)
    path.with_name(f"{path.name}.part").write_text("1001 half")  # a writer killed before its rename
    assert path.is_relative_to(tmp_path / "cache") and record_files(path) == [".lock", ".part", "record"]

    assert mine.stop("compose_refilled")
    assert record_files(path) == []  # fails before: all three stayed
    assert _last_failure(their_path).endswith("failed: compose_theirs failed")

    # One dropped by hand, not by `down`, leaves its record: the next start, which makes the database, clears it.
    server = mine.start("compose_refilled")
    _record_outcome(server.dsn("postgres"), server.dbname, 1_002, "the dropped database's failure")
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as conn:
        conn.execute("DROP DATABASE compose_refilled WITH (FORCE)")
    assert record_path(mine.start("compose_refilled")) == path
    assert _last_failure(path) == ""  # fails before: the dropped database's failure
    assert theirs.stop("compose_theirs") and mine.stop("compose_refilled")


def test_down_after_the_server_was_made_again_removes_the_records_of_the_one_removed(
    project: tuple[str, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `make compose-down` removes the server's volume, its cluster with it: the records that cluster's refills left
    # in the user's cache are keyed by it, which nobody can ask now. `down` after a `make up` left them for good.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    name, env = project
    make_up(env)
    mine, _theirs, path, their_path = _two_checkouts_failed(name, env, tmp_path)
    assert make("compose-down", env=env).returncode == 0
    make_up(env)
    assert record_path(mine.start("compose_refilled")) != path  # another cluster

    assert mine.stop("compose_refilled")
    assert record_files(path) == []  # fails before: the removed server's record and lock stayed
    assert not list((Path(env["REFRESHER_STATE_DIR"]) / "compose").glob("compose_refilled.*"))
    assert _last_failure(their_path).endswith("failed: compose_theirs failed")  # another state dir's: kept


def test_profiles_named_like_the_servers_own_databases_are_refused(
    project: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    # A refresh of profile "template1" loaded into template1, which every later CREATE DATABASE copies; the
    # server's own database (POSTGRES_DB) and the maintenance one were taken over the same way.
    name, env = project
    assert make("up", env=env).returncode == 0
    engine = ComposeEngine(name, state_dir=tmp_path / "state")
    for reserved in ("template1", "postgres", "refresher"):
        with pytest.raises(
            ProfileError, match=rf"profile='{reserved}': .* keeps a database of that name for itself"
        ):
            engine.start(reserved)
        assert engine.info(reserved) is None
    assert engine.status() == [] and not (tmp_path / "state" / "compose").exists()


def test_up_without_a_docker_engine_says_so(tmp_path: Path) -> None:
    if not make_variable("COMPOSE"):
        pytest.skip("no compose implementation")
    env = {
        **os.environ,
        "DOCKER_HOST": f"unix://{tmp_path}/no-such.sock",
        "COMPOSE_PROJECT": "refresher-test-none",
    }
    done = make("up", env=env)
    assert done.returncode != 0
    assert "no Docker engine answers" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_stopped_stack_restarted_by_make_up_keeps_its_data_and_snapshot(
    docker_client: docker.DockerClient, project: tuple[str, dict[str, str]], how: str
) -> None:
    # `docker stop` (Postgres's fast shutdown), or SIGKILL: a crash its restart recovers from.
    name, env = project
    make_up(env)
    refresher("refresh", "-p", "compose_tiny", "--engine", "compose", env=env)
    dsn = json.loads(refresher("url", "-p", "compose_tiny", "--json", env=env).stdout)["dsn"]
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone()
    label = {"label": f"{PROJECT_LABEL}={name}"}
    for container in docker_client.containers.list(filters=label):
        if how == "stop":
            container.stop()
        else:
            container.kill()
    # Stopped: a refresh says so in one line, and touches nothing.
    done = subprocess.run(
        [sys.executable, "-m", "refresher.cli", "refresh", "-p", "compose_tiny", "--engine", "compose"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "make up" in done.stderr
    make_up(env)
    assert len(running(docker_client, name)) == 2
    report = json.loads(
        refresher("refresh", "-p", "compose_tiny", "--engine", "compose", "--json", env=env).stdout
    )
    assert report["rows_loaded"] == 0 and report["snapshot"] == "unchanged"
    dsn = json.loads(refresher("url", "-p", "compose_tiny", "--json", env=env).stdout)["dsn"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone() == rows
        conn.execute("DELETE FROM ohlcv_1min")
    refresher("reset", "-p", "compose_tiny", env=env)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM ohlcv_1min").fetchone() == rows


def test_make_up_in_two_checkout_directories_then_down_in_one_leaves_the_others_stack(
    docker_client: docker.DockerClient, project: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    # A second checkout in a directory of its own: its Makefile names its project after that directory
    # (no COMPOSE_PROJECT in its environment), and its lock is its own.
    name, env = project
    checkout = tmp_path / "other checkout"
    checkout.mkdir()
    shutil.copy(CHECKOUT / "Makefile", checkout / "Makefile")
    shutil.copytree(CHECKOUT / "compose", checkout / "compose")
    other = compose_project(checkout)
    other_env = {k: v for k, v in env.items() if k not in ("COMPOSE_PROJECT", "REFRESHER_COMPOSE_PROJECT")}
    assert other != name and make_variable("COMPOSE_PROJECT", checkout) == other
    try:
        make_up(env)
        mine = running(docker_client, name)
        up = make("up", env=other_env, checkout=checkout)
        assert up.returncode == 0, up.stderr
        assert f"compose project {other}" in up.stdout
        assert len(running(docker_client, other)) == 2
        make_up(env)  # again: nothing of either changes
        assert running(docker_client, name) == mine and len(running(docker_client, other)) == 2
        down = make("compose-down", env=other_env, checkout=checkout)
        assert down.returncode == 0, down.stderr
        assert leftovers(docker_client, other) == []
        assert running(docker_client, name) == mine
    finally:
        make("compose-down", env=other_env, checkout=checkout)


@pytest.fixture
def checkout_image(
    docker_client: docker.DockerClient, docker_pg_image: str, tmp_path: Path
) -> Callable[..., contextlib.AbstractContextManager[str]]:
    """Test-only images: the Postgres image with this checkout's entrypoint.sh, files (path in the image: text,
    executable) and Dockerfile lines; each removed at the end of its ``with``."""

    @contextlib.contextmanager
    def build(*lines: str, files: dict[str, str]) -> Iterator[str]:
        context = tmp_path / f"image-{secrets.token_hex(4)}"
        context.mkdir()
        shutil.copy(CHECKOUT / "compose" / "image" / "entrypoint.sh", context / "entrypoint.sh")
        copies = []
        for n, (path, text) in enumerate(files.items()):
            (context / f"file{n}").write_text(text)
            (context / f"file{n}").chmod(0o755)
            copies.append(f"COPY file{n} {path}")
        (context / "Dockerfile").write_text(
            "\n".join(
                [
                    f"FROM {docker_pg_image}",
                    "COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh",
                    *lines,
                    *copies,
                ]
            )
            + "\n"
        )
        tag = f"refresher-test/postgres:{context.name}"
        docker_client.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
        try:
            yield tag
        finally:
            docker_client.images.remove(tag, force=True)

    return build


def test_a_postgres_stopped_while_it_initialises_is_initialised_again_by_make_up(
    docker_client: docker.DockerClient,
    project: tuple[str, dict[str, str]],
    checkout_image: Callable[..., contextlib.AbstractContextManager[str]],
) -> None:
    # Seen once in CI under load: right after `make up` (its retry path recreated Postgres, whose first
    # container compose stopped while it initialised: the shell that is PID 1 ignores SIGINT, so Docker killed
    # it 10 s later), the first login through the published port got "server closed the connection
    # unexpectedly". initdb's PG_VERSION was on the volume, so the next start skipped the rest: no
    # listen_addresses = '*' (the healthcheck, inside the container, passed), no POSTGRES_DB. Here initdb pauses
    # once after its work, as under a loaded machine, and the container is killed there.
    name, env = project
    pausing_initdb = (
        '#!/bin/sh\n/usr/lib/postgresql/15/bin/initdb.real "$@" || exit\n'
        "[ -e /tmp/paused ] && exit 0\ntouch /tmp/paused\necho 'test: initdb done, pausing'\nexec sleep 600\n"
    )
    with checkout_image(
        'RUN ["mv", "/usr/lib/postgresql/15/bin/initdb", "/usr/lib/postgresql/15/bin/initdb.real"]',
        files={"/usr/lib/postgresql/15/bin/initdb": pausing_initdb},
    ) as image:
        env = {**env, "REFRESHER_PG_IMAGE": image}
        first = subprocess.Popen(
            ["make", "--no-print-directory", "-C", str(CHECKOUT), "up"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while (container := _postgres_container(docker_client, name)) is None or b"pausing" not in (
                container.logs()
            ):
                assert time.monotonic() < deadline, "initdb never paused"
                time.sleep(0.2)
            container.kill()
            assert first.wait(timeout=120) != 0  # its container exited
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        make_up(env)
        server = find_service(name, "postgres", 5432, docker_client)
        assert server is not None
        with psycopg.connect(
            f"postgresql://{server.env['POSTGRES_USER']}:{server.env['POSTGRES_PASSWORD']}@{server.host}:"
            f"{server.port}/{server.env['POSTGRES_DB']}",
            connect_timeout=10,
        ) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        make("compose-down", env=env)


def test_make_up_is_ready_only_once_a_login_through_the_published_port_works(
    project: tuple[str, dict[str, str]], checkout_image: Callable[..., contextlib.AbstractContextManager[str]]
) -> None:
    # A server healthy to pg_isready inside its container, which no client of the host reaches (it listens on
    # the container's loopback only: Docker's proxy accepts, then closes). `make up` said it was ready.
    _, env = project
    loopback_only = '#!/bin/sh\nexec docker-entrypoint.sh "$@" -c listen_addresses=localhost\n'
    with checkout_image(
        'ENTRYPOINT ["loopback-only"]',
        'CMD ["postgres"]',
        files={"/usr/local/bin/loopback-only": loopback_only},
    ) as image:
        env = {**env, "REFRESHER_PG_IMAGE": image, "WAIT_SECONDS": "15"}
        up = make("up", env=env)
        make("compose-down", env=env)
    assert up.returncode != 0
    assert "let no login in within" in up.stderr and "compose project" not in up.stdout, up.stderr
    assert "Traceback" not in up.stderr


def _postgres_container(
    client: docker.DockerClient, project: str
) -> docker.models.containers.Container | None:
    found = client.containers.list(
        all=True,
        filters={"label": [f"{PROJECT_LABEL}={project}", "com.docker.compose.service=postgres"]},
    )
    return found[0] if found else None


def test_a_retry_of_make_up_leaves_the_service_that_started_alone(
    docker_client: docker.DockerClient, project: tuple[str, dict[str, str]]
) -> None:
    # The retry gave both services new ports, so compose recreated a Postgres that had started and was
    # initialising its volume: its stop (SIGINT, lost on the entrypoint's shell, then SIGKILL 10 s later) cut the
    # initialisation short. Here Redis's pinned port is held until the first try failed on it.
    name, env = project
    for _ in range(PORT_HOLDING_TRIES):
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            started = _up_until({**env, "REFRESHER_REDIS_PORT": str(held.getsockname()[1])}, RETRIED)
            postgres = _postgres_container(docker_client, name)
        up = _rest_of(started)
        assert postgres is not None, "".join(started[1])
        assert up.returncode == 0, up.stderr
        if postgres.status == "running":  # it started on the first try: the retry is to leave it alone
            break
        # Docker's pick for Postgres was held too (another test's holding_dockers_next_ports on the shared
        # daemon): nothing was tested; down and again.
        down = make("compose-down", env=env)
        assert down.returncode == 0, down.stderr
    assert postgres.status == "running", (
        f"Postgres did not start on its first try in {PORT_HOLDING_TRIES} tries"
    )
    assert [c.id for c in docker_client.containers.list(filters={"label": f"{PROJECT_LABEL}={name}"})].count(
        postgres.id
    ) == 1


def test_a_record_whose_key_is_misspelled_by_hand_is_refused_naming_it(tmp_path: Path) -> None:
    """``projet`` for ``project`` read as no record: `down` left the profile's database (``stop`` returned
    False, "not made by this state dir") and status did not list it. Now one line names file, key and value;
    another project's record is still simply not this one's."""
    from refresher.errors import EngineStateError

    engine = ComposeEngine("refresher-abc", state_dir=tmp_path)
    record = tmp_path / "compose" / "p.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"projet": "refresher-abc"}))
    with pytest.raises(EngineStateError) as caught:
        engine.stop("p")  # fails before: False, nothing said
    assert str(caught.value) == (
        f"{record}: unreadable compose engine record: key 'projet' (value 'refresher-abc') is not one this"
        " refresher knows; did you mean 'project'? Correct the key in the file"
    )
    record.write_text(json.dumps({"project": "refresher-other"}))
    assert engine.stop("p") is False
