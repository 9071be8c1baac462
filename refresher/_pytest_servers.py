"""Servers the pytest plugin owns: start one, load a profile into it, describe it as JSON, stop it.

A ``LoadedServer`` says everything another process needs to use the server and, later, to stop it, so xdist
workers can share one server built by whichever worker came first (``refresher._pytest_share``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refresher.engines.base import ServerInfo
from refresher.errors import EngineUnavailable
from refresher.settings import Settings

if TYPE_CHECKING:
    from featurestore import FeatureStore
    from refresher.profile import Profile

# The loading pipeline (pandas, pyarrow, duckdb) and the engines are imported when a server is built, not when
# pytest loads the plugin: every test run of a project that merely has refresher installed loads this module.

# Labels on plugin-made containers, so a leftover from a killed run can be found with `docker ps --filter`.
PYTEST_LABEL = "io.refresher.pytest"
CONTAINER_USER = "refresher"
CONTAINER_PORT = 5432


@dataclass(frozen=True)
class LoadedServer:
    """A loaded server for one profile, and what to remove to stop it (a local state dir or a container)."""

    profile: str
    info: ServerInfo
    # The profile's resolved date range, so tests can compute what the database must hold.
    start: dt.date
    end: dt.date
    state_dir: str | None = None
    container_id: str | None = None
    rows_loaded: int = 0
    load_seconds: float = 0.0

    @property
    def engine(self) -> str:
        return self.info.engine

    @property
    def dsn(self) -> str:
        """The loaded working database (tests should use a ``refresher_db`` clone rather than write here)."""
        return self.info.dsn()

    def to_json(self) -> str:
        data = asdict(self)
        data["start"], data["end"] = self.start.isoformat(), self.end.isoformat()
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> LoadedServer:
        data: dict[str, Any] = json.loads(text)
        data["info"] = ServerInfo(**data["info"])
        data["start"], data["end"] = dt.date.fromisoformat(data["start"]), dt.date.fromisoformat(data["end"])
        return cls(**data)


def choose_engine(requested: str, settings: Settings) -> str:
    """``auto`` means docker when a daemon answers, else local; REFRESHER_REQUIRE_DOCKER=1 forbids the fallback."""
    from refresher.engines.docker import docker_available

    if requested == "local":
        return "local"
    if docker_available():
        return "docker"
    if requested == "docker" or settings.require_docker:
        raise EngineUnavailable(
            f"--refresher-engine={requested}: no Docker daemon answers"
            + (" (REFRESHER_REQUIRE_DOCKER is set)" if requested == "auto" else ""),
            engine=requested,
        )
    return "local"


def build_server(
    name_or_path: str, engine: str, settings: Settings, *, as_of: dt.date | None, labels: dict[str, str]
) -> LoadedServer:
    """Start a new server for the profile with ``engine`` (local or docker) and load the profile into it."""
    from featurestore import FeatureStore
    from refresher.profile import load_profile

    profile = load_profile(name_or_path, settings.profiles_dirs, as_of=as_of)
    store = FeatureStore(settings.store_root)
    if engine == "docker":
        return _build_docker(profile, store, settings, labels)
    return _build_local(profile, store, settings)


def stop_server(record: LoadedServer) -> None:
    """Stop the server and remove its data; tolerant of a server already gone (a crashed run, a second call)."""
    if record.state_dir is not None:
        from refresher.engines.local import LocalEngine

        state = Path(record.state_dir)
        if state.exists():
            LocalEngine(state).stop(record.profile)
            shutil.rmtree(state, ignore_errors=True)
    if record.container_id is not None:
        import docker
        import docker.errors

        client = docker.from_env()
        try:
            client.containers.get(record.container_id).remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        finally:
            client.close()


def _build_local(profile: Profile, store: FeatureStore, settings: Settings) -> LoadedServer:
    from refresher.engines.local import LocalEngine
    from refresher.refresh import refresh

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    # A fresh directory per run: never the CLI's own server for this profile, never another session's.
    state = Path(tempfile.mkdtemp(prefix="pytest-", dir=settings.state_dir))
    # The embedded server runs as another OS user when we are root; it must be able to traverse the directory.
    os.chmod(state, 0o755)
    engine = LocalEngine(state)
    try:
        report = refresh(profile, engine, store)
        info = engine.info(profile.name)
        if info is None:
            raise EngineUnavailable(f"the local server for {profile.name} in {state} stopped after loading")
    except BaseException:
        with contextlib.suppress(Exception):
            engine.stop(profile.name)
        shutil.rmtree(state, ignore_errors=True)
        raise
    return LoadedServer(
        profile.name, info, profile.start, profile.end, state_dir=str(state),
        rows_loaded=report.rows_loaded, load_seconds=report.seconds,
    )  # fmt: skip


@contextlib.contextmanager
def _ryuk_disabled() -> Iterator[None]:
    """Start containers without testcontainers' reaper.

    Ryuk removes a session's containers when the process that started them exits, but a shared server must
    outlive the xdist worker that built it; the plugin removes its containers itself (and Ryuk's image is
    often not available offline anyway).
    """
    from testcontainers.core.config import testcontainers_config

    before = testcontainers_config.ryuk_disabled
    testcontainers_config.ryuk_disabled = True
    try:
        yield
    finally:
        testcontainers_config.ryuk_disabled = before


def _build_docker(
    profile: Profile, store: FeatureStore, settings: Settings, labels: dict[str, str]
) -> LoadedServer:
    import docker
    from testcontainers.community.postgres import PostgresContainer

    from refresher.engines._docker_state import resolve_image
    from refresher.engines.docker import SERVER_ARGS
    from refresher.engines.existing import ExistingServerEngine
    from refresher.refresh import refresh

    client = docker.from_env()
    try:
        image = resolve_image(client, settings.pg_image_override)
    finally:
        client.close()
    password = secrets.token_urlsafe(18)
    # POSTGRES_DB makes the image create the working database, named after the profile as refresh() expects.
    container = PostgresContainer(
        image,
        port=CONTAINER_PORT,
        username=CONTAINER_USER,
        password=password,
        dbname=profile.name,
        driver=None,
    )
    # Loopback only, like the docker engine: a test database is nobody else's business.
    # (with_bind_ports takes no host address; the docker SDK's (ip, port) form goes straight through.)
    container.ports[str(CONTAINER_PORT)] = ("127.0.0.1", None)  # type: ignore[assignment]
    container.with_command(["postgres", *SERVER_ARGS])
    container.with_kwargs(labels={PYTEST_LABEL: "1", **labels})
    with _ryuk_disabled():
        container.start()
    try:
        info = ServerInfo(
            "docker", profile.name, "127.0.0.1",
            int(container.get_exposed_port(CONTAINER_PORT)), CONTAINER_USER, password, profile.name,
        )  # fmt: skip
        report = refresh(profile, ExistingServerEngine(info), store)
    except BaseException:
        with contextlib.suppress(Exception):
            container.stop()
        raise
    return LoadedServer(
        profile.name, info, profile.start, profile.end, container_id=container.get_wrapped_container().id,
        rows_loaded=report.rows_loaded, load_seconds=report.seconds,
    )  # fmt: skip


__all__ = ["PYTEST_LABEL", "LoadedServer", "build_server", "choose_engine", "stop_server"]
