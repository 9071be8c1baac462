"""The Docker engine and the air-gapped image against a real Docker daemon (no mocks)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import psycopg
import pytest
from docker.models.containers import Container
from psycopg import sql

from refresher.engines import _docker_state
from refresher.engines import docker as docker_engine_module
from refresher.engines._common import SERVER_ENV, TUNING, wait_ready
from refresher.engines.base import Engine, ServerInfo
from refresher.engines.docker import (
    CONFIG_LABEL,
    PGDATA,
    PREFIX_LABEL,
    PROFILE_LABEL,
    PROJECT_LABEL,
    DockerEngine,
    _free_port,
    _log_tail,
    docker_available,
)
from refresher.errors import EngineStateError, EngineUnavailable, ProfileError
from refresher.stamp import stamp_path
from tests.fixtures_docker import holding_dockers_next_ports, labels_of_a_dead_process, remove_prefixed
from tests.fixtures_postgres import world_traversable_tmp
from tests.unprivileged import as_nobody

REPO = Path(__file__).resolve().parents[3]


def container_of(client: docker.DockerClient, engine: DockerEngine, profile: str) -> Container:
    """The profile's container, by the name the engine gives it."""
    return client.containers.get(f"{engine.prefix}-{engine.scope}-{profile}")


def query(info: ServerInfo, text: str) -> object:
    with psycopg.connect(info.dsn(), connect_timeout=10) as conn:
        row = conn.execute(text).fetchone()
        return row[0] if row else None


# -- the state files ----------------------------------------------------------------------------------------


def test_create_private_json_makes_the_file_once_and_keeps_the_first(tmp_path: Path) -> None:
    from refresher.engines._common import create_private_json

    path = tmp_path / "sub" / "id"
    assert create_private_json(path, {"n": 1}) is True
    assert create_private_json(path, {"n": 2}) is False
    assert json.loads(path.read_text()) == {"n": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["id"]  # no temporary left


def test_checkout_id_is_kept_and_a_state_dir_made_anew_gets_a_new_one(tmp_path: Path) -> None:
    from refresher.engines._docker_state import CHECKOUT_ID_FILE, checkout_id

    base = tmp_path / "docker"
    assert checkout_id(base, create=False) is None
    first = checkout_id(base, create=True)
    assert first is not None and checkout_id(base, create=False) == first == checkout_id(base, create=True)
    (base / CHECKOUT_ID_FILE).unlink()  # `make clean`
    assert checkout_id(base, create=False) is None
    second = checkout_id(base, create=True)
    assert second not in (None, first)
    assert checkout_id(base, create=False) == second
    assert sorted(p.name for p in base.iterdir()) == [CHECKOUT_ID_FILE]


# -- the image ----------------------------------------------------------------------------------------------


@pytest.mark.docker
def test_image_honours_official_variables_and_init_scripts(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    initdb = tmp_path / "initdb"
    initdb.mkdir()
    (initdb / "01-table.sql").write_text("CREATE TABLE marker (x int); INSERT INTO marker VALUES (42);\n")
    # Sourced (not executable): it runs in the entrypoint's shell, as the server's user, with psql at hand.
    (initdb / "02-script.sh").write_text(
        'psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" '
        '-c "INSERT INTO marker SELECT 100 + count(*) FROM pg_roles WHERE rolname = current_user"\n'
    )
    initdb.chmod(0o755)
    for f in initdb.iterdir():
        f.chmod(0o644)
    container = docker_client.containers.run(
        docker_pg_image,
        detach=True,
        name=f"{docker_prefix}-image",
        labels={PREFIX_LABEL: docker_prefix},
        environment={
            "POSTGRES_USER": "alice",
            "POSTGRES_PASSWORD": "s3cret 'quoted'",
            "POSTGRES_DB": "warehouse",
            "POSTGRES_INITDB_ARGS": "--data-checksums",
        },
        volumes={str(initdb): {"bind": "/docker-entrypoint-initdb.d", "mode": "ro"}},
        # The kernel's pick: Docker's may be held by another test (holding_dockers_next_ports), failing the run.
        ports={"5432/tcp": ("127.0.0.1", _free_port())},
    )
    try:
        container.reload()
        port = int(container.attrs["NetworkSettings"]["Ports"]["5432/tcp"][0]["HostPort"])
        info = ServerInfo("docker", "image", "127.0.0.1", port, "alice", "s3cret 'quoted'", "warehouse")
        # Readiness through the engine's own wait (a real query, retried), then the facts.
        DockerEngine(Path("/nonexistent"), client=docker_client)._wait_ready(container, info)
        assert query(info, "SELECT current_user") == "alice"
        assert query(info, "SELECT current_database()") == "warehouse"
        assert query(info, "SELECT array_agg(x ORDER BY x)::text FROM marker") == "{42,101}"
        assert query(info, "SHOW data_checksums") == "on"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(info.dsn().replace("s3cret", "wrong"), connect_timeout=10).close()
        # PID 1 is the postmaster itself (signals reach it), running as postgres, not root.
        code, out = container.exec_run(["sh", "-c", "stat -c %U /proc/1; cat /proc/1/comm; pg_isready"])
        assert code == 0, out
        assert out.decode().split()[:2] == ["postgres", "postgres"]
        assert b"accepting connections" in out
        logs = container.logs().decode()
        assert "02-script.sh" in logs
        assert "database system is ready to accept connections" in logs
    finally:
        container.remove(force=True, v=True)


@pytest.mark.docker
def test_testcontainers_postgres_works_with_the_image(
    docker_pg_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from testcontainers.community.postgres import PostgresContainer
    from testcontainers.core.config import testcontainers_config

    # No registry here, so no Ryuk reaper image; the container is removed by the `with` block instead.
    monkeypatch.setenv("TESTCONTAINERS_RYUK_DISABLED", "true")
    monkeypatch.setattr(testcontainers_config, "ryuk_disabled", True)
    with (
        PostgresContainer(docker_pg_image, username="tc", password="tcpw", dbname="tcdb", driver=None) as pg,
        psycopg.connect(pg.get_connection_url(), connect_timeout=10) as conn,
    ):
        assert conn.execute("SELECT current_user || '@' || current_database()").fetchone() == ("tc@tcdb",)


# -- the engine's lifecycle -----------------------------------------------------------------------------------


@pytest.mark.docker
def test_start_serves_the_profile_database_and_is_idempotent(
    docker_engine: DockerEngine, docker_server: ServerInfo, docker_client: docker.DockerClient
) -> None:
    assert isinstance(docker_engine, Engine)
    info = docker_server
    assert (info.engine, info.host, info.user, info.dbname) == ("docker", "127.0.0.1", "refresher", "shared")
    assert query(info, "SELECT current_user || '@' || current_database()") == "refresher@shared"
    assert query(info, "SHOW fsync") == "off"
    assert query(info, "SHOW synchronous_commit") == "off"
    assert query(info, "SHOW wal_segment_size") == "1MB"  # INITDB_ARGS reached the image's initdb
    state_file = docker_engine.base / "shared.json"
    written = state_file.stat()
    assert docker_engine.start("shared") == info
    # Not rewritten when it says the same: every refresh starts the running server, and the write's fsync waited
    # behind the kernel's writeback of what was written last (a pool refill's clones).
    assert (state_file.stat().st_ino, state_file.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)
    assert docker_engine.info("shared") == info
    container = docker_client.containers.get(f"{docker_engine.prefix}-{docker_engine.scope}-shared")
    assert container.labels[PROJECT_LABEL] == "refresher"
    assert container.labels[PROFILE_LABEL] == "shared"
    # The server's malloc settings (SERVER_ENV) reach the postmaster through the container's environment.
    assert {f"{k}={v}" for k, v in SERVER_ENV.items()} <= set(container.attrs["Config"]["Env"])
    # Published on loopback only.
    bindings = container.attrs["NetworkSettings"]["Ports"]["5432/tcp"]
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
    volume = docker_client.volumes.get(f"{docker_engine.prefix}-{docker_engine.scope}-shared-data")
    assert volume.attrs["Labels"][PROFILE_LABEL] == "shared"
    [status] = docker_engine.status("shared")
    assert (status.running, status.port) == (True, info.port)


@pytest.mark.docker
def test_password_is_random_and_kept_in_a_private_state_file(
    docker_engine: DockerEngine, docker_server: ServerInfo
) -> None:
    path = docker_engine.base / "shared.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    state = json.loads(path.read_text())
    assert state["password"] == docker_server.password
    assert len(docker_server.password) >= 20
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.docker
def test_lost_state_file_is_rebuilt_from_the_running_container(
    docker_engine: DockerEngine, docker_server: ServerInfo
) -> None:
    (docker_engine.base / "shared.json").unlink()
    assert docker_engine.info("shared") is None  # info never guesses
    assert docker_engine.start("shared") == docker_server
    assert json.loads((docker_engine.base / "shared.json").read_text())["password"] == docker_server.password


@pytest.mark.docker
def test_killed_cli_leaves_a_server_a_new_engine_finds_beside_another_profile(
    docker_engine: DockerEngine, docker_server: ServerInfo, docker_pg_image: str
) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from refresher.engines.docker import DockerEngine
        engine = DockerEngine(Path(sys.argv[1]), image=sys.argv[2], prefix=sys.argv[3])
        info = engine.start("killed")
        print(info.port, flush=True)
        time.sleep(600)
        """
    )
    args = [
        sys.executable,
        "-c",
        script,
        str(docker_engine.base.parent),
        docker_pg_image,
        docker_engine.prefix,
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    fresh = DockerEngine(docker_engine.base.parent, image=docker_pg_image, prefix=docker_engine.prefix)
    try:
        statuses = {s.profile: s for s in fresh.status()}
        assert statuses["killed"].running and statuses["killed"].port == port
        assert statuses["shared"].running and statuses["shared"].port == docker_server.port
        info = fresh.info("killed")
        assert info is not None and info.port != docker_server.port
        assert query(info, "SELECT current_database()") == "killed"
        assert query(docker_server, "SELECT current_database()") == "shared"
    finally:
        assert fresh.stop("killed")


@pytest.mark.docker
def test_container_removed_behind_our_back_is_recreated_over_its_volume_and_down_leaves_nothing(
    docker_engine: DockerEngine, docker_client: docker.DockerClient
) -> None:
    prefix = docker_engine.prefix
    assert docker_engine.is_new("gone")
    info = docker_engine.start("gone")
    assert not docker_engine.is_new("gone")
    with psycopg.connect(info.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        # synchronous_commit=off: a SIGKILLed server loses its last commits; a checkpoint makes them stick.
        conn.execute("CHECKPOINT")
    docker_client.containers.get(f"{prefix}-{docker_engine.scope}-gone").remove(force=True, v=True)

    assert docker_engine.info("gone") is None
    assert not docker_engine.is_new("gone")  # its volume, and the data in it, stay
    [status] = docker_engine.status("gone")
    assert not status.running and "removed behind our back" in status.detail

    again = docker_engine.start("gone")
    assert again.password == info.password
    assert query(again, "SELECT x FROM kept") == 7  # same volume, same password

    assert docker_engine.stop("gone") is True
    assert docker_engine.stop("gone") is False
    assert docker_engine.is_new("gone")
    assert docker_engine.status("gone") == []
    assert not (docker_engine.base / "gone.json").exists()
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(f"{prefix}-{docker_engine.scope}-gone")
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(f"{prefix}-{docker_engine.scope}-gone-data")


@pytest.mark.docker
def test_a_volume_made_with_16mb_wal_segments_keeps_them_when_its_container_is_made_again(
    docker_engine: DockerEngine, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as before:
        before.setattr(docker_engine_module, "INITDB_ARGS", ())  # the container as versions before made it
        info = docker_engine.start("wal16")
    try:
        assert query(info, "SHOW wal_segment_size") == "16MB"
        with psycopg.connect(info.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept AS SELECT 7 AS x")
            conn.execute("CHECKPOINT")
        docker_client.containers.get(f"{docker_engine.prefix}-{docker_engine.scope}-wal16").remove(
            force=True, v=True
        )
        # A new container on the volume, with today's POSTGRES_INITDB_ARGS: initdb does not run again.
        again = docker_engine.start("wal16")
        assert query(again, "SHOW wal_segment_size") == "16MB"
        assert query(again, "SELECT x FROM kept") == 7
    finally:
        docker_engine.stop("wal16")


# -- bad input and a hostile environment ----------------------------------------------------------------------


@pytest.mark.docker
def test_missing_image_says_how_to_get_one_and_leaves_nothing(
    docker_client: docker.DockerClient, docker_prefix: str, tmp_path: Path
) -> None:
    engine = DockerEngine(
        tmp_path, image="refresher/no-such-image:0", client=docker_client, prefix=docker_prefix
    )
    with pytest.raises(EngineUnavailable, match=r"make image.*\$REFRESHER_PG_IMAGE"):
        engine.start("noimage")
    assert not (tmp_path / "docker" / "noimage.json").exists()
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(f"{docker_prefix}-{engine.scope}-noimage")


@pytest.mark.docker
def test_pinned_port_taken_is_a_clear_error_and_leaves_no_container(
    docker_client: docker.DockerClient, docker_pg_image: str, tmp_path: Path
) -> None:
    prefix = f"rtestport{os.getpid()}"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        engine = DockerEngine(tmp_path, image=docker_pg_image, client=docker_client, port=port, prefix=prefix)
        try:
            with pytest.raises(EngineUnavailable, match=f"port {port} on 127.0.0.1 is already in use"):
                engine.start("taken")
            with pytest.raises(docker.errors.NotFound):
                docker_client.containers.get(f"{prefix}-{engine.scope}-taken")
        finally:
            remove_prefixed(docker_client, prefix)


def test_docker_not_running_is_engine_unavailable(tmp_path: Path) -> None:
    dead = f"unix://{tmp_path}/no-docker.sock"
    assert docker_available(dead) is False
    engine = DockerEngine(tmp_path, base_url=dead)
    for call in (lambda: engine.start("dead"), lambda: engine.status(), lambda: engine.stop("dead")):
        with pytest.raises(
            EngineUnavailable, match="Docker is not running or not reachable at unix://"
        ) as raised:
            call()
        # how to start it, in words a user can paste (a first run on a machine where dockerd is installed)
        assert "sudo systemctl start docker" in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "docker" / "dead.json").exists()


def test_profile_names_are_validated_before_docker_is_asked(tmp_path: Path) -> None:
    engine = DockerEngine(tmp_path, base_url=f"unix://{tmp_path}/no-docker.sock")
    with pytest.raises(ProfileError, match="profile"):
        engine.start("../Evil")


@pytest.mark.docker
def test_a_container_that_dies_fails_the_wait_with_its_log_tail(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str
) -> None:
    # The image refuses to initialise without a password: the entrypoint exits, and the wait must say why.
    container = docker_client.containers.run(
        docker_pg_image, detach=True, name=f"{docker_prefix}-dies", labels={PREFIX_LABEL: docker_prefix}
    )
    try:
        info = ServerInfo("docker", "dies", "127.0.0.1", 9, "refresher", "x", "dies")
        engine = DockerEngine(Path("/nonexistent"), client=docker_client, ready_timeout=30)
        with pytest.raises(
            EngineUnavailable, match=r"(?s)exited while it started.*superuser password is not spec"
        ):
            engine._wait_ready(container, info)
    finally:
        with contextlib.suppress(docker.errors.NotFound):  # the failed start removed it
            container.remove(force=True, v=True)


# -- servers scoped to their state dir ------------------------------------------------------------------------


def _cli(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFRESHER_STATE_DIR": str(state_dir), "REFRESHER_ENGINE": "auto"}
    return subprocess.run(
        [sys.executable, "-m", "refresher.cli", *args], capture_output=True, text=True, env=env, cwd=REPO
    )


@pytest.mark.docker
@pytest.mark.slow
def test_two_state_dirs_on_one_daemon_never_see_or_remove_each_other(
    docker_client: docker.DockerClient, docker_pg_image: str, tmp_path: Path
) -> None:
    # The real names the CLI uses (prefix "refresher"), in two checkouts' state dirs, one profile name.
    mine, theirs = tmp_path / "mine" / ".refresher", tmp_path / "theirs" / ".refresher"
    engines = [DockerEngine(d, image=docker_pg_image, client=docker_client) for d in (mine, theirs)]
    try:
        a, b = (engine.start("shared_name") for engine in engines)
        assert a.port != b.port
        assert engines[0].status() != engines[1].status()

        listed = _cli(mine, "status", "--json")
        assert listed.returncode == 0, listed.stderr
        [server] = [s for s in json.loads(listed.stdout)["servers"] if s["engine"] == "docker"]
        assert server["port"] == a.port

        everywhere = _cli(mine, "status", "--all-checkouts", "--json")
        assert everywhere.returncode == 0, everywhere.stderr
        details = " ".join(s["detail"] for s in json.loads(everywhere.stdout)["servers"])
        assert str(mine.resolve()) in details and str(theirs.resolve()) in details

        down = _cli(mine, "down", "--profile", "all")
        assert down.returncode == 0, down.stderr
        assert query(b, "SELECT 1") == 1  # the other checkout's server still answers
        assert engines[1].status("shared_name")[0].running
        assert engines[0].status() == []
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(a.dsn(), connect_timeout=3).close()
    finally:
        for engine in engines:
            engine.stop("shared_name")


@pytest.mark.docker
def test_sweep_removes_only_what_a_dead_owner_left(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str
) -> None:
    from refresher.engines import owner_labels
    from refresher.engines.docker import remove_abandoned

    marker = f"io.refresher.test-{docker_prefix}"
    dead, alive = labels_of_a_dead_process(), owner_labels(os.getpid())
    elsewhere = {**dead, "io.refresher.owner.host": "another-machine"}
    made = {}
    for name, owner in (("dead", dead), ("alive", alive), ("elsewhere", elsewhere)):
        labels = {marker: "1", PREFIX_LABEL: docker_prefix, **owner}
        made[name] = docker_client.containers.create(
            docker_pg_image, name=f"{docker_prefix}-{name}", labels=labels
        )
        docker_client.volumes.create(f"{docker_prefix}-{name}-data", labels=labels)

    removed = remove_abandoned(marker)

    assert sorted(removed) == sorted([f"{docker_prefix}-dead", f"{docker_prefix}-dead-data"])
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(made["dead"].id)
    for kept in ("alive", "elsewhere"):
        docker_client.containers.get(made[kept].id)
        docker_client.volumes.get(f"{docker_prefix}-{kept}-data")


@pytest.mark.docker
def test_kill_9_while_the_container_initialises_then_the_next_start_serves(
    docker_engine: DockerEngine, docker_client: docker.DockerClient, docker_pg_image: str
) -> None:
    script = (
        "import sys; from pathlib import Path; from refresher.engines.docker import DockerEngine;"
        "DockerEngine(Path(sys.argv[1]), image=sys.argv[2], prefix=sys.argv[3]).start('halfway')"
    )
    args = [sys.executable, "-c", script, str(docker_engine.state_dir), docker_pg_image, docker_engine.prefix]
    child = subprocess.Popen(args, cwd=REPO)
    name = f"{docker_engine.prefix}-{docker_engine.scope}-halfway"
    try:
        deadline = time.monotonic() + 120
        while not docker_client.containers.list(all=True, filters={"name": name}, sparse=True):
            assert child.poll() is None, "the start finished before it could be interrupted"
            assert time.monotonic() < deadline, "the container was never made"
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    try:
        assert len(docker_engine.status("halfway")) == 1  # whatever moment it died at, status names it
        info = docker_engine.start("halfway")
        assert query(info, "SELECT current_database()") == "halfway"
        assert docker_engine.status("halfway")[0].running
    finally:
        docker_engine.stop("halfway")
    assert docker_client.containers.list(all=True, filters={"name": name}, sparse=True) == []


@pytest.mark.docker
def test_a_create_still_in_flight_for_a_killed_start_is_taken_over_not_a_conflict(
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    docker_pg_image: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A start killed mid-request leaves its create running in the daemon: the next start's look-up finds no
    # container, then its own create meets the name taken (409). Here the first look-up misses and the
    # killed start's container appears right after, made as that start would have made it.
    profile = "inflight"
    first = docker_engine.start(profile)
    made = docker_client.containers.get(f"{docker_engine.prefix}-{docker_engine.scope}-{profile}")
    config = made.attrs["Config"]
    made.remove(force=True, v=True)
    look_up = docker_engine._container
    missed: list[bool] = []

    def late(client: docker.DockerClient, name: str) -> object:
        if not missed:
            missed.append(True)
            docker_client.containers.create(
                docker_pg_image,
                command=config["Cmd"],
                name=made.name,
                labels=config["Labels"],
                environment=config["Env"],
                volumes={f"{made.name}-data": {"bind": PGDATA, "mode": "rw"}},
                ports={"5432/tcp": ("127.0.0.1", None)},
                detach=True,
            )
            return None
        return look_up(client, name)

    monkeypatch.setattr(docker_engine, "_container", late)
    try:
        info = docker_engine.start(profile)
        assert missed and query(info, "SELECT current_database()") == profile
        assert info.password == first.password
    finally:
        monkeypatch.undo()
        docker_engine.stop(profile)


@pytest.mark.docker
def test_a_full_volume_during_initdb_is_one_line_naming_it_and_the_space(
    docker_engine: DockerEngine, docker_client: docker.DockerClient, docker_pg_image: str
) -> None:
    from refresher.engines._docker_state import ContainerState

    profile = "fullvol"
    volume = f"{docker_engine.prefix}-{docker_engine.scope}-{profile}-data"
    # A state file names the volume's password, so the engine keeps the (tiny, tmpfs-backed) volume we made.
    ContainerState(f"{docker_engine.prefix}-{docker_engine.scope}-{profile}", volume, docker_pg_image,
                   "refresher", "pw-for-the-test").write(docker_engine.base / f"{profile}.json")  # fmt: skip
    docker_client.volumes.create(
        volume,
        driver="local",
        driver_opts={"type": "tmpfs", "device": "tmpfs", "o": "size=8m"},
        labels=docker_engine._labels(profile),  # as the engine makes its volumes
    )
    try:
        with pytest.raises(EngineUnavailable) as caught:
            docker_engine.start(profile)
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"disk full: Docker volume {volume} (")
        assert "needs at least 64 MB free" in message
    finally:
        docker_engine.stop(profile)


@pytest.mark.docker
def test_down_while_another_container_uses_the_volume_is_one_line_and_a_later_down_finishes(
    docker_engine: DockerEngine, docker_client: docker.DockerClient, docker_pg_image: str
) -> None:
    # Someone mounted the data volume to look inside (docker run -v refresher-...-data:/x): the volume's
    # removal is refused (409 "volume is in use"), which was a traceback.
    info = docker_engine.start("inuse")
    volume = f"{docker_engine.prefix}-{docker_engine.scope}-inuse-data"
    looker = docker_client.containers.run(
        docker_pg_image, entrypoint=["sleep", "300"], volumes={volume: {"bind": "/x", "mode": "ro"}},
        labels={PREFIX_LABEL: docker_engine.prefix}, detach=True,
    )  # fmt: skip
    try:
        with pytest.raises(EngineUnavailable, match=rf"^Docker refused: .*{volume}.*in use") as refused:
            docker_engine.stop("inuse")
        assert "\n" not in str(refused.value) and info.password not in str(refused.value)
        looker.reload()
        assert looker.status == "running"  # not ours: untouched
    finally:
        looker.remove(force=True, v=True)
    assert docker_engine.stop("inuse") is True  # the rest: the volume and the state file
    assert docker_engine.status("inuse") == []
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(volume)


@pytest.mark.docker
def test_a_container_removed_by_hand_while_it_starts_ends_the_wait_in_one_line(
    docker_engine: DockerEngine, docker_client: docker.DockerClient
) -> None:
    info = docker_engine.start("rmf")
    try:
        container = container_of(docker_client, docker_engine, "rmf")
        container.remove(force=True, v=True)  # docker rm -f while `start` waits for the server
        with pytest.raises(EngineUnavailable, match=r"was removed while it started") as ended:
            docker_engine._wait_ready(container, info)
        assert "\n" not in str(ended.value)
    finally:
        docker_engine.stop("rmf")


# A start (or a down) SIGKILLed right after one of its steps: the child runs the real engine against the real
# daemon and kills itself once the named step returns.
KILLED_AFTER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from docker.models.containers import Container, ContainerCollection
    from docker.models.volumes import VolumeCollection
    from refresher.engines import docker as engine_module
    from refresher.engines._docker_state import ContainerState

    state_dir, image, prefix, step, call = sys.argv[1:6]
    owners = {"state": (ContainerState, "write"), "volume": (VolumeCollection, "create"),
              "create": (ContainerCollection, "create"), "run": (engine_module.DockerEngine, "_run"),
              "remove": (engine_module, "_remove_container"), "stop": (Container, "stop")}
    owner, name = owners[step]
    original = getattr(owner, name)

    def then_die(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, then_die)
    getattr(engine_module.DockerEngine(Path(state_dir), image=image, prefix=prefix), call)("killed_at")
    """
)


@pytest.mark.docker
@pytest.mark.parametrize(
    ("step", "call"),
    [("state", "start"), ("volume", "start"), ("create", "start"), ("run", "start"), ("remove", "stop")],
)
def test_sigkill_after_each_step_leaves_what_the_next_start_and_down_finish(
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    docker_pg_image: str,
    step: str,
    call: str,
) -> None:
    args = [str(docker_engine.state_dir), docker_pg_image, docker_engine.prefix]
    name = f"{docker_engine.prefix}-{docker_engine.scope}-killed_at"
    try:
        if call == "stop":
            docker_engine.start("killed_at")
        child = subprocess.run([sys.executable, "-c", KILLED_AFTER, *args, step, call], cwd=REPO, timeout=180)
        assert child.returncode == -signal.SIGKILL
        assert len(docker_engine.status("killed_at")) == 1  # status names what was left
        info = docker_engine.start("killed_at")
        assert query(info, "SELECT current_database()") == "killed_at"
    finally:
        docker_engine.stop("killed_at")
    assert docker_engine.status("killed_at") == []
    assert docker_client.containers.list(all=True, filters={"name": name}, sparse=True) == []
    with pytest.raises(docker.errors.NotFound):
        docker_client.volumes.get(f"{name}-data")
    assert not (docker_engine.base / "killed_at.json").exists()


# A start killed between writing the profile's state file's temporary file and renaming it, at its WRITE-th write.
KILLED_WRITING_STATE = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from refresher.engines.docker import DockerEngine

    state_dir, image, prefix, profile, write = sys.argv[1:6]
    replace, writes = os.replace, 0

    def killed(src, dst, *args, **kwargs):
        global writes
        writes += os.fspath(dst).endswith(f"{profile}.json")
        if writes == int(write):
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    os.replace = killed
    DockerEngine(Path(state_dir), image=image, prefix=prefix).start(profile)
    """
)


@pytest.mark.docker
@pytest.mark.parametrize(
    ("write", "then"),
    [(1, "start"), (2, "stop")],
    ids=["before-the-container-then-start", "after-it-then-down"],
)
def test_kill_9_between_writing_the_state_file_and_its_rename_leaves_no_copy_of_the_password(
    docker_engine: DockerEngine, docker_pg_image: str, write: int, then: str
) -> None:
    """The temporary file holds the volume's password: it stayed beside the state file for good, after the next
    start and after a down, where the local engine's start sweeps its own (3076d66)."""
    profile = f"killjson{write}"
    leftovers = f".{profile}.json.*.tmp"
    args = [str(docker_engine.state_dir), docker_pg_image, docker_engine.prefix, profile, str(write)]
    try:
        child = subprocess.run([sys.executable, "-c", KILLED_WRITING_STATE, *args], cwd=REPO, timeout=180)
        assert child.returncode == -signal.SIGKILL
        assert len(list(docker_engine.base.glob(leftovers))) == 1  # what the kill left
        if then == "start":
            info = docker_engine.start(profile)
            assert query(info, "SELECT current_database()") == profile
            assert list(docker_engine.base.glob(leftovers)) == []
    finally:
        docker_engine.stop(profile)
    assert list(docker_engine.base.glob(leftovers)) == []


# The server arguments of a container refresher made before lc_messages=C (e3d4efd); it had no SERVER_ENV either
# (d8bff5a) and no CONFIG_LABEL.
OLD_SERVER_ARGS = tuple(
    arg for key, value in TUNING.items() if key != "lc_messages" for arg in ("-c", f"{key}={value}")
)


@contextlib.contextmanager
def as_an_older_refresher(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The engine makes its containers as refresher did before lc_messages=C and SERVER_ENV (with a digest)."""
    with monkeypatch.context() as before:
        before.setattr(docker_engine_module, "SERVER_ARGS", OLD_SERVER_ARGS)
        before.setattr(docker_engine_module, "SERVER_ENV", {})
        yield


def made_by_an_older_refresher(client: docker.DockerClient, container: Container) -> Container:
    """``container`` made again (running) as an older refresher made it: without lc_messages=C, SERVER_ENV and
    CONFIG_LABEL; the same name, labels otherwise, volume, port and password."""
    config, port = container.attrs["Config"], container.attrs["NetworkSettings"]["Ports"]["5432/tcp"][0]
    container.stop(timeout=60)
    container.remove(v=True)  # its named volume, and the data in it, stay
    old = client.containers.run(
        config["Image"],
        command=["postgres", *OLD_SERVER_ARGS],
        name=container.name,
        labels={k: v for k, v in config["Labels"].items() if k != CONFIG_LABEL},
        environment=[e for e in config["Env"] if e.split("=", 1)[0] not in SERVER_ENV],
        volumes={f"{container.name}-data": {"bind": PGDATA, "mode": "rw"}},
        ports={"5432/tcp": (port["HostIp"], int(port["HostPort"]))},
        shm_size="256m",
        detach=True,
    )
    assert "lc_messages=C" not in old.attrs["Config"]["Cmd"]
    return old


def _server_env(container: Container) -> set[str]:
    """SERVER_ENV's entries in ``container``'s environment."""
    return {f"{k}={v}" for k, v in SERVER_ENV.items()} & set(container.attrs["Config"]["Env"])


@pytest.mark.docker
@pytest.mark.slow
def test_a_refresh_brings_a_container_an_older_refresher_made_up_to_date_and_keeps_its_rows(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    # A container an older refresher made kept its command and environment (no lc_messages=C, no SERVER_ENV)
    # until `down` and `refresh`, which lost its database: a refresh makes it again over its volume.
    from tests.refresher.test_refresh_e2e import Workspace

    ws = Workspace(world_traversable_tmp("refresher-renew-"), "docker", f"renew_{secrets.token_hex(4)}")
    ws.write_profile(symbols=["AAPL", "KO"], months=1)
    # Another checkout on this daemon with an old container of its own: never touched.
    theirs = DockerEngine(
        tmp_path / "theirs", image=docker_pg_image, client=docker_client, prefix=docker_prefix
    )
    try:
        ws.refresh()
        rows = ws.scalar("SELECT count(*) FROM ohlcv_1min")
        mine = DockerEngine(ws.root / "state", image=docker_pg_image, client=docker_client)
        old = made_by_an_older_refresher(docker_client, container_of(docker_client, mine, ws.profile))
        theirs.start(ws.profile)
        other = made_by_an_older_refresher(docker_client, container_of(docker_client, theirs, ws.profile))
        server = ws.server()
        wait_ready(server.dsn(), what="old", timeout=60, alive=lambda: True, log_tail=str)
        assert ws.scalar("SHOW lc_messages") == "C.UTF-8"  # the image's, as initdb chose it
        # The stamp the older refresher wrote does not answer this one (stamp.code_fingerprint).
        stamp_path(ws.root / "state", ws.profile, "docker").unlink()

        report = ws.refresh()
        assert report["segments"]["loaded"] == 0  # nothing was lost, nothing loaded again
        assert ws.scalar("SELECT count(*) FROM ohlcv_1min") == rows > 0
        assert ws.scalar("SHOW lc_messages") == "C"
        assert ws.server() == server  # the same port and password
        renewed = container_of(docker_client, mine, ws.profile)
        assert renewed.id != old.id and _server_env(renewed) and CONFIG_LABEL in renewed.labels
        # Up to date now: the next start keeps the container.
        assert mine.start(ws.profile) == server
        assert container_of(docker_client, mine, ws.profile).id == renewed.id

        other.reload()
        assert other.status == "running" and not _server_env(other)
        assert container_of(docker_client, theirs, ws.profile).id == other.id
    finally:
        ws.down()
        theirs.stop(ws.profile)
        shutil.rmtree(ws.root, ignore_errors=True)


@pytest.mark.docker
@pytest.mark.parametrize(("step", "lost_state"), [("stop", False), ("remove", False), ("remove", True)])
def test_a_start_killed_while_it_makes_an_outdated_container_again_leaves_what_the_next_start_finishes(
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
    docker_pg_image: str,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    lost_state: bool,
) -> None:
    # SIGKILL once the old container's server is stopped, or once the container is removed and before the new
    # one exists (its state file lost before: the password must survive in it all the same).
    with as_an_older_refresher(monkeypatch):
        old = docker_engine.start("killed_at")
    try:
        with psycopg.connect(old.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept AS SELECT generate_series(1, 1000) AS x")
        assert query(old, "SHOW lc_messages") == "C.UTF-8"
        [status] = docker_engine.status("killed_at")
        assert "(an older refresher's): the next `refresher refresh` makes it again" in status.detail
        if lost_state:
            (docker_engine.base / "killed_at.json").unlink()
        args = [str(docker_engine.state_dir), docker_pg_image, docker_engine.prefix, step, "start"]
        child = subprocess.run([sys.executable, "-c", KILLED_AFTER, *args], cwd=REPO, timeout=180)
        assert child.returncode == -signal.SIGKILL
        assert len(docker_engine.status("killed_at")) == 1  # status names what was left
        info = docker_engine.start("killed_at")
        assert info.password == old.password
        assert query(info, "SHOW lc_messages") == "C"
        assert query(info, "SELECT count(*) FROM kept") == 1000
        assert _server_env(container_of(docker_client, docker_engine, "killed_at"))
        [status] = docker_engine.status("killed_at")
        assert status.running and "older refresher" not in status.detail
    finally:
        docker_engine.stop("killed_at")


@pytest.mark.docker
def test_an_outdated_container_is_made_again_on_the_pinned_port_not_its_old_one(
    docker_engine: DockerEngine, docker_client: docker.DockerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with as_an_older_refresher(monkeypatch):
        old = docker_engine.start("repinned")
    try:
        port = _free_port()
        pinned = DockerEngine(
            docker_engine.state_dir,
            image=docker_engine.image,
            client=docker_client,
            prefix=docker_engine.prefix,
            port=port,
        )
        info = pinned.start("repinned")
        assert (info.port, info.password) == (port, old.password)
        assert query(info, "SHOW lc_messages") == "C"
    finally:
        docker_engine.stop("repinned")


@pytest.fixture
def two_defaults(
    docker_client: docker.DockerClient,
    docker_pg_image: str,
    docker_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[str, str]]:
    """Two test-only tags standing for the two default images (the shared ones are never tagged or removed
    here), preferred first: (preferred, fallback), the fallback tagged, the preferred not yet."""
    preferred, fallback = f"{docker_prefix}/preferred:15", f"{docker_prefix}/fallback:15"
    monkeypatch.setattr(_docker_state, "DEFAULT_IMAGES", (preferred, fallback))
    docker_client.images.get(docker_pg_image).tag(fallback)
    try:
        yield preferred, fallback
    finally:
        for image in (preferred, fallback):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(image)


@pytest.mark.docker
def test_a_preferred_default_image_tagged_later_keeps_the_container_its_other_default_made(
    docker_client: docker.DockerClient,
    docker_pg_image: str,
    docker_prefix: str,
    tmp_path: Path,
    two_defaults: tuple[str, str],
) -> None:
    # The digest took the first default present (postgres:15) for the container's image: a container made from
    # refresher/postgres:15 was stopped and made again once postgres:15 was pulled, every session ended.
    preferred, fallback = two_defaults
    engine = DockerEngine(tmp_path, client=docker_client, prefix=docker_prefix)
    try:
        first = engine.start("defaults")
        made = container_of(docker_client, engine, "defaults")
        assert made.attrs["Config"]["Image"] == fallback
        docker_client.images.get(docker_pg_image).tag(preferred)
        [status] = engine.status("defaults")
        assert "another configuration" not in status.detail
        with psycopg.connect(first.dsn(), autocommit=True) as session:
            assert engine.start("defaults") == first
            assert container_of(docker_client, engine, "defaults").id == made.id
            assert session.execute("SELECT 1").fetchone() == (1,)  # the open session lives on
            session.execute("CREATE TABLE kept AS SELECT 7 AS x")
        # Asked for by name, the preferred image makes it again (data kept) ...
        asked = DockerEngine(tmp_path, image=preferred, client=docker_client, prefix=docker_prefix)
        assert "another configuration" in asked.status("defaults")[0].detail
        # ... as it does once the container's own image is gone.
        docker_client.images.remove(fallback)
        assert query(engine.start("defaults"), "SELECT x FROM kept") == 7
        renewed = container_of(docker_client, engine, "defaults")
        assert renewed.id != made.id and renewed.attrs["Config"]["Image"] == preferred
    finally:
        engine.stop("defaults")


@pytest.mark.docker
def test_an_outdated_container_is_made_again_from_its_own_default_image_not_one_tagged_since(
    docker_client: docker.DockerClient,
    docker_pg_image: str,
    docker_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    two_defaults: tuple[str, str],
) -> None:
    # Its own default image counts while here (f7a00c2), but the container made again for its outdated command
    # took the first default present: an older refresher's container from refresher/postgres:15 came back from
    # postgres:15 once that was pulled, another image over the same volume.
    preferred, fallback = two_defaults
    engine = DockerEngine(tmp_path, client=docker_client, prefix=docker_prefix)
    try:
        with as_an_older_refresher(monkeypatch):
            old = engine.start("owndefault")
        made = container_of(docker_client, engine, "owndefault")
        assert made.attrs["Config"]["Image"] == fallback
        assert query(old, "SHOW lc_messages") == "C.UTF-8"  # the older refresher's command
        docker_client.images.get(docker_pg_image).tag(preferred)
        info = engine.start("owndefault")
        assert (info.port, info.password) == (old.port, old.password)
        assert query(info, "SHOW lc_messages") == "C"  # made again, as this refresher makes it
        renewed = container_of(docker_client, engine, "owndefault")
        assert renewed.id != made.id and renewed.attrs["Config"]["Image"] == fallback
        assert engine.start("owndefault") == info
        assert container_of(docker_client, engine, "owndefault").id == renewed.id
    finally:
        engine.stop("owndefault")


@pytest.mark.docker
def test_the_image_tag_replaced_by_another_image_is_a_clear_error_and_the_data_waits_for_the_right_one(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    # The container was removed (by hand, or a reboot's cleanup) and the tag now names something else: the new
    # container exited at once, and the error was "publishes no port for 5432; run `refresher down`" (which
    # would throw the volume away).
    tag = f"{docker_prefix}/pg:15"
    docker_client.images.get(docker_pg_image).tag(tag)
    maker = docker_client.containers.create(docker_pg_image, labels={PREFIX_LABEL: docker_prefix})
    other = maker.commit(changes=['ENTRYPOINT ["sh", "-c", "echo not PostgreSQL; exit 1"]'])
    maker.remove(v=True)
    engine = DockerEngine(tmp_path, image=tag, client=docker_client, prefix=docker_prefix)
    try:
        info = engine.start("retagged")
        with psycopg.connect(info.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept AS SELECT 7 AS x")
            conn.execute("CHECKPOINT")
        docker_client.containers.get(f"{docker_prefix}-{engine.scope}-retagged").remove(force=True, v=True)
        other.tag(tag)  # not a PostgreSQL image
        with pytest.raises(
            EngineUnavailable, match=rf"(?s)\(image {tag}\) exited while it started.*not PostgreSQL$"
        ) as failed:
            engine.start("retagged")
        assert "refresher down" not in str(failed.value)
        docker_client.images.get(docker_pg_image).tag(tag)
        assert query(engine.start("retagged"), "SELECT x FROM kept") == 7
    finally:
        engine.stop("retagged")
        for image in (tag, other.id):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(image)


# PostgreSQL 15's German messages, where this host has them (Debian's postgresql-15): an image speaking German.
GERMAN_CATALOG = Path("/usr/share/locale/de/LC_MESSAGES/postgres-15.mo")


@pytest.mark.docker
def test_a_server_whose_image_speaks_german_refuses_a_login_in_english(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    # A login refusal reaches psycopg without its SQLSTATE (psycopg #1188): its words are all that tell a wrong
    # password from a server still starting (a job's target, refresher.jobs.retry). An image whose initdb chose
    # German (LANG=de_DE.utf8, as the official image's docs show; here LANGUAGE=de and the catalog) refused in
    # German, and the refusal read as transient.
    if not GERMAN_CATALOG.is_file():
        pytest.skip(f"no German catalog of PostgreSQL 15 on this host ({GERMAN_CATALOG})")
    from refresher.jobs.retry import is_refused

    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for directory in ("usr/share/locale/de", "usr/share/locale/de/LC_MESSAGES"):
            entry = tarfile.TarInfo(directory)
            entry.type, entry.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(entry)
        tar.add(GERMAN_CATALOG, arcname=f"usr/share/locale/de/LC_MESSAGES/{GERMAN_CATALOG.name}")
    maker = docker_client.containers.create(docker_pg_image, labels={PREFIX_LABEL: docker_prefix})
    assert maker.put_archive("/", archive.getvalue())
    german = maker.commit(repository=f"{docker_prefix}/pg-de", tag="15", changes=["ENV LANGUAGE=de"])
    maker.remove(v=True)
    engine = DockerEngine(
        tmp_path, image=f"{docker_prefix}/pg-de:15", client=docker_client, prefix=docker_prefix
    )
    try:
        info = engine.start("german")
        with psycopg.connect(info.dsn(), autocommit=True) as conn:  # the image does speak German
            conn.execute("SET lc_messages = 'C.UTF-8'")
            with pytest.raises(psycopg.errors.UndefinedTable, match="existiert nicht"):
                conn.execute("SELECT * FROM missing")
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(info.dsn().replace(info.password, "wrong"), connect_timeout=10)
        assert "password authentication failed" in str(refused.value)
        assert is_refused(refused.value)
    finally:
        engine.stop("german")
        with contextlib.suppress(docker.errors.ImageNotFound):
            docker_client.images.remove(german.id, force=True)


@pytest.mark.docker
def test_a_volume_initialised_with_another_password_is_one_line_at_once(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    # The state file names another password than the kept volume's (restored from a backup, edited): the engine's
    # 28P01 line never came, since a login refusal carries no SQLSTATE (psycopg #1188); the start retried the
    # refusal as a server still starting for its whole ready_timeout, then failed with the log tail.
    engine = DockerEngine(tmp_path, image=docker_pg_image, client=docker_client, prefix=docker_prefix)
    try:
        engine.start("repassword")
        container_of(docker_client, engine, "repassword").remove(force=True, v=True)  # its named volume stays
        path = engine.base / "repassword.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "password": "another"}))
        with pytest.raises(EngineStateError, match="initialised with another password") as failed:
            engine.start("repassword")
        assert "\n" not in str(failed.value)
    finally:
        engine.stop("repassword")


@pytest.mark.docker
def test_the_password_never_shows_in_a_servers_repr(
    docker_engine: DockerEngine, docker_server: ServerInfo
) -> None:
    # A failing assertion on a server (pytest -l shows locals), a log line with the object: its repr printed
    # the password of a server that listens on the machine.
    from refresher.engines._docker_state import ContainerState

    state = ContainerState.read(docker_engine.base / "shared.json")
    assert state is not None and state.password == docker_server.password
    for shown in (docker_server, state):
        assert docker_server.password not in repr(shown)
        assert f"port={docker_server.port}" in repr(shown)


@pytest.mark.docker
def test_after_a_reboot_the_exited_container_restarts_on_another_port_when_its_old_one_is_taken(
    docker_engine: DockerEngine, docker_client: docker.DockerClient
) -> None:
    # A reboot (or a daemon restart) leaves the container exited; meanwhile something else took its port.
    before = docker_engine.start("rebooted")
    try:
        # A session the server ended (as a shutdown does) leaves its side, the published port, in TIME_WAIT.
        with (
            pytest.raises(psycopg.OperationalError),
            psycopg.connect(before.dsn(), autocommit=True, connect_timeout=10) as conn,
        ):
            conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        container_of(docker_client, docker_engine, "rebooted").kill()
        [status] = docker_engine.status("rebooted")
        assert not status.running and "exited" in status.detail
        assert docker_engine.info("rebooted") is None
        with socket.socket() as taken:
            # Bound as servers bind (SO_REUSEADDR): the TIME_WAIT left on the port does not keep it off.
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("127.0.0.1", before.port))
            taken.listen()
            after = docker_engine.start("rebooted")
            assert after.port != before.port and after.password == before.password
            assert query(after, "SELECT current_database()") == "rebooted"
            assert json.loads((docker_engine.base / "rebooted.json").read_text())["port"] == after.port
    finally:
        docker_engine.stop("rebooted")


@pytest.mark.docker
def test_a_port_docker_picks_that_another_process_holds_is_skipped_not_a_pinned_port_error(
    docker_engine: DockerEngine, docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str
) -> None:
    # Docker hands out published ports in turn from its own range without asking the kernel; one that a host
    # process listens on failed the start with "port None on 127.0.0.1 is already in use; choose another port".
    try:
        with holding_dockers_next_ports(docker_client, docker_pg_image, docker_prefix):
            info = docker_engine.start("portheld")
        assert query(info, "SELECT current_database()") == "portheld"
        assert json.loads((docker_engine.base / "portheld.json").read_text())["port"] == info.port
    finally:
        docker_engine.stop("portheld")


# -- a full disk inside the container ---------------------------------------------------------------------------


@pytest.fixture
def container_on_a_small_disk(
    request: pytest.FixtureRequest,
    docker_client: docker.DockerClient,
    docker_pg_image: str,
    docker_prefix: str,
) -> Iterator[tuple[ServerInfo, Container]]:
    """A server in a container whose data dir is a 100 MB tmpfs: its free space is not this host's to see.

    Parametrized "host dir": the data dir's path is also a directory of this host (on another disk), as a host
    running its own Postgres at the image's path has; "another cluster": that directory holds another cluster's
    ``global/pg_control`` (the session's local server's)."""
    from refresher.engines.docker import SERVER_ARGS

    password = "small-disk"
    param = getattr(request, "param", "")
    host_dir = Path(tempfile.mkdtemp(prefix="refresher-hostdir-")) if param else None
    pgdata = str(host_dir / "pgdata") if host_dir else PGDATA
    if host_dir:
        (host_dir / "pgdata" / "global").mkdir(parents=True)
    if host_dir and param == "another cluster":
        other: ServerInfo = request.getfixturevalue("pg_server")
        with psycopg.connect(other.dsn("postgres")) as conn:
            row = conn.execute("SHOW data_directory").fetchone()
        assert row is not None
        shutil.copyfile(Path(row[0], "global", "pg_control"), host_dir / "pgdata" / "global" / "pg_control")
    # The kernel's pick of a port: Docker's may be held by another test's holding_dockers_next_ports.
    container = docker_client.containers.run(
        docker_pg_image, command=["postgres", *SERVER_ARGS], detach=True,
        environment={
            "POSTGRES_USER": "refresher", "POSTGRES_PASSWORD": password, "POSTGRES_DB": "small", "PGDATA": pgdata
        },
        tmpfs={pgdata: "size=100m"}, ports={"5432/tcp": ("127.0.0.1", _free_port())}, shm_size="256m",
        labels={PREFIX_LABEL: docker_prefix},
    )  # fmt: skip
    try:
        container.reload()
        port = int(container.attrs["NetworkSettings"]["Ports"]["5432/tcp"][0]["HostPort"])
        server = ServerInfo("existing", "small", "127.0.0.1", port, "refresher", password, "small")
        deadline = time.monotonic() + 60
        while True:
            try:
                query(server, "SELECT 1")
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, _log_tail(container)
                time.sleep(0.2)
        yield server, container
    finally:
        container.remove(force=True, v=True)
        if host_dir:
            shutil.rmtree(host_dir)


def _pgdata(container: Container) -> str:
    """The container's data directory (its PGDATA)."""
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    return env.get("PGDATA", PGDATA)


def _free(container: Container) -> int:
    """Bytes free on the container's data disk, as its own df sees them."""
    return int(container.exec_run(["df", "-B1", "--output=avail", _pgdata(container)]).output.split()[-1])


def _fill(container: Container, leave: int) -> None:
    """Fill the container's data disk up to ``leave`` bytes free (a file beside the cluster's)."""
    filler = f"{_pgdata(container)}/filler"
    filled = container.exec_run(["fallocate", "-l", str(_free(container) - leave), filler])
    assert filled.exit_code == 0, filled.output


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.parametrize("container_on_a_small_disk", ["", "host dir", "another cluster"], indirect=True)
def test_a_load_into_a_container_without_room_is_refused_before_it_writes(
    container_on_a_small_disk: tuple[ServerInfo, Container],
) -> None:
    # The load's check measured this host's disk at the container's data directory's path: none (no check, the
    # load went on into the full disk, where a WAL write can PANIC the server) or another disk's (plenty).
    import datetime as dt

    from refresher.database import ensure_schema
    from refresher.diskfull import data_directory
    from refresher.errors import DiskFull
    from refresher.load import load_segment
    from refresher.segments import Segment
    from tests.fixtures_postgres import minute_bars

    server, container = container_on_a_small_disk
    start = dt.datetime(2024, 1, 1, 5, tzinfo=dt.UTC)
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        ensure_schema(conn)
        load_segment(
            conn, Segment("S0", "1m", dt.date(2024, 1, 1)), minute_bars("S0", start, 20_000), "h", tz="UTC"
        )
    _fill(container, leave=4 * 2**20)  # less than a segment's check asks for (its WAL segment of slack alone)
    with psycopg.connect(server.dsn(), autocommit=True) as conn, pytest.raises(DiskFull) as loading:
        assert data_directory(conn) is None
        load_segment(
            conn, Segment("S1", "1m", dt.date(2024, 1, 1)), minute_bars("S1", start, 40_000), "h", tz="UTC"
        )
    message = str(loading.value)
    assert "\n" not in message and loading.value.exit_code == 2
    assert message.startswith(f"disk full: {_pgdata(container)} ") and "loading S1/1m/2024-01" in message, (
        message
    )
    # Refused by the check, before the server wrote anything, and with no free space but the container's own.
    assert loading.value.fields["sqlstate"] is None, message
    # The server's own df said it (this host measures none of these: no directory, or not its cluster).
    assert loading.value.fields["free"] is None and " has less than " in message, message
    assert query(server, "SELECT count(*) FROM ohlcv_1min") == 20_000


@pytest.mark.docker
@pytest.mark.slow
def test_a_reset_on_a_full_disk_in_a_container_leaves_the_database_as_it_was(
    container_on_a_small_disk: tuple[ServerInfo, Container],
) -> None:
    # No pool, no room for the copy even with the database it replaces gone: the host cannot see the container's
    # free space, and the reset dropped the database to make room anyway; the copy still failed, leaving none.
    from refresher.diskfull import data_directory, has_room
    from refresher.errors import DiskFull
    from refresher.snapshot import pristine_name, restore_pristine
    from tests.refresher.test_diskfull import _load_and_save

    server, container = container_on_a_small_disk
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        # This host cannot see the container's disk; the server answers, in bytes, both ways (an answer of None,
        # nobody can tell, also left the database as it was below).
        assert data_directory(conn) is None
        free = _free(container)
        assert has_room(conn, 1) is True and has_room(conn, free // 2) is True
        assert has_room(conn, 2 * free) is False and has_room(conn, 2**40) is False
    _load_and_save(server, symbols=3)
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol <> 'S0'")
        conn.execute("VACUUM FULL ohlcv_1min")  # its disk is given back: dropping it now gives back little
    _fill(container, leave=2 * 2**20)
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        assert has_room(conn, 2**19) is True and has_room(conn, 8 * 2**20) is False
    with pytest.raises(DiskFull) as resetting:
        restore_pristine(server, refill=False)
    message = str(resetting.value)
    assert "\n" not in message and resetting.value.exit_code == 2
    assert message.endswith(f"({server.dbname} is left as it was, not reset)"), message
    assert query(server, "SELECT count(*) FROM ohlcv_1min WHERE symbol = 'S0'") == 25_000
    assert container.exec_run(["rm", f"{PGDATA}/filler"]).exit_code == 0
    assert restore_pristine(server, refill=False).method == "template"
    assert query(server, "SELECT count(*) FROM ohlcv_1min") == 75_000
    # With room for the copy once the database it replaces is gone, which the server itself says: it resets.
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM ohlcv_1min WHERE symbol = 'S0'")
        conn.execute("VACUUM FULL ohlcv_1min")  # smaller than the copy: the server is asked (needed > 0)
        # The last reset's trash, which the first retry drops and the copy then fits without the server's word.
        trash = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", [f"{server.dbname}__trash_"]
        ).fetchall()
        for (name,) in trash:
            conn.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    size, pristine = (
        query(server, f"SELECT pg_database_size('{name}')")
        for name in (server.dbname, pristine_name(server.dbname))
    )
    assert isinstance(size, int) and isinstance(pristine, int) and pristine > size
    _fill(container, leave=(pristine - size + pristine) // 2)  # room for the difference, not for the copy
    assert restore_pristine(server, refill=False).method == "template"
    assert query(server, "SELECT count(*) FROM ohlcv_1min WHERE symbol = 'S0'") == 25_000


@contextlib.contextmanager
def _socket_closed_to_nobody() -> Iterator[Path]:
    """A listening Unix socket that ``as_nobody`` may not open, as root:docker 660 is to a user outside the group."""
    home = Path(tempfile.mkdtemp(prefix="rtest-docker-sock-"))
    try:
        home.chmod(0o755)  # enterable by the other user, as /var/run is
        path = home / "docker.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
            listening.bind(str(path))
            listening.listen()
            path.chmod(0o000 if os.geteuid() != 0 else 0o600)  # root's own, as root:docker 660 to an outsider
            yield path
    finally:
        shutil.rmtree(home)


def _assert_says_join_the_docker_group(message: str) -> None:
    assert "Permission denied" in message, message
    assert "docker group" in message and "usermod -aG docker" in message, message
    assert "not running" not in message and "\n" not in message, message


def test_a_docker_socket_this_user_may_not_use_says_to_join_the_docker_group() -> None:
    # Most users are not root: the daemon runs, its socket is root:docker 660, and a user outside the group gets
    # EACCES. "Docker is not running ... start the daemon" sent them after a daemon that was running all along.
    with _socket_closed_to_nobody() as path:

        def status() -> str:
            try:
                DockerEngine(path.parent, base_url=f"unix://{path}").status()
            except EngineUnavailable as exc:
                return str(exc)
            return "no error"

        message = as_nobody(status)
    _assert_says_join_the_docker_group(message)


def test_engine_auto_requiring_docker_says_to_join_the_docker_group() -> None:
    # --engine auto only asked whether Docker answers: a refused socket was "no Docker daemon answers ... (start
    # dockerd ...)" with REFRESHER_REQUIRE_DOCKER set, though the daemon ran and the user lacked the group.
    from refresher.engines import select_engine
    from refresher.settings import Settings

    with _socket_closed_to_nobody() as path:
        settings = Settings.from_env({}, state_dir=path.parent / "state", require_docker=True)

        def auto() -> str:
            os.environ["DOCKER_HOST"] = f"unix://{path}"  # the forked child's own environment
            try:
                return f"chose {select_engine('auto', settings, 'tiny').name}"
            except EngineUnavailable as exc:
                return str(exc)

        message = as_nobody(auto)
    _assert_says_join_the_docker_group(message)
    assert "REFRESHER_REQUIRE_DOCKER" in message, message


def test_a_state_file_with_a_field_a_newer_refresher_adds_is_read(tmp_path: Path) -> None:
    """A field this refresher does not know was a TypeError, 'unreadable Docker engine state': every start failed,
    and its advice, `refresher down`, removed the volume."""
    from refresher.engines._docker_state import ContainerState

    state = ContainerState("c", "v", "refresher/postgres:15", "postgres", "secret", 5432)
    path = tmp_path / "p.json"
    state.write(path)
    recorded = json.loads(path.read_text())
    # A known key garbled beside a newer one is left out as unknown: its field missing, the state still refused.
    garbled = json.dumps(
        {**{k: v for k, v in recorded.items() if k != "image"}, "image_": recorded["image"], "newer": 1}
    )
    path.write_text(json.dumps({**recorded, "newer": {"x": 1}}))
    assert ContainerState.read(path) == state  # fails before: EngineStateError
    for broken in ("[1, 2]", '{"container": "c"}', "{", garbled):
        path.write_text(broken)
        with pytest.raises(EngineStateError, match="unreadable Docker engine state"):
            ContainerState.read(path)


def test_a_state_file_key_misspelled_by_hand_is_refused_naming_it(tmp_path: Path) -> None:
    """``prot`` for ``port`` was left out as a newer refresher's key and the port read as its default, 0: the next
    start published the container on another port, silently. Now one line names the file, key, value and field;
    the password's value is never shown."""
    from refresher.engines._docker_state import ContainerState

    state = ContainerState("c", "v", "refresher/postgres:15", "postgres", "secret", 5432)
    path = tmp_path / "p.json"
    state.write(path)
    recorded = json.loads(path.read_text())
    path.write_text(json.dumps({**{k: v for k, v in recorded.items() if k != "port"}, "prot": 5432}))
    with pytest.raises(EngineStateError) as caught:
        ContainerState.read(path)  # fails before: read with port=0
    assert str(caught.value).startswith(f"{path}: unreadable Docker engine state: key 'prot' (value 5432)")
    assert "did you mean 'port'" in str(caught.value)
    path.write_text(
        json.dumps({**{k: v for k, v in recorded.items() if k != "password"}, "passwd": "secret"})
    )
    with pytest.raises(EngineStateError, match=r"key 'passwd' \(value not shown\).*'password'") as caught:
        ContainerState.read(path)
    assert "secret" not in str(caught.value)
    path.write_text(json.dumps({k: v for k, v in recorded.items() if k != "port"}))  # an older refresher's
    assert ContainerState.read(path) == dataclasses.replace(state, port=0)
