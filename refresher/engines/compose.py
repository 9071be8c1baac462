"""The compose engine: the Postgres that `make up` runs, one database per profile on that shared server.

`make up` names its compose project after the checkout (``refresher-<hash of the checkout path>``) and lets
Docker choose the published ports, so two checkouts on one Docker daemon never meet. This engine finds that
project's containers by compose's own labels and reads the port and credentials from the running container:
nobody copies a DSN by hand. Starting and stopping the server is compose's business (`make up`,
`make compose-down`); ``start`` only creates the profile's database and ``stop`` drops it with its snapshots.

The server is shared: by every state dir of the checkout (a test run's beside yours), and with databases made by
hand. So ``start`` records each profile it serves in ``<state_dir>/compose/<profile>.json``, and ``status`` and
``stop`` (so ``refresher down --profile all``) know only the recorded ones: never another's database.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import psycopg
from docker.models.containers import Container
from psycopg import sql

from refresher.engines._common import (
    HOST,
    refuse_misspelled,
    validate_profile,
    wait_ready,
    write_private_json,
)
from refresher.engines.base import ServerInfo, ServerStatus
from refresher.engines.docker import API_TIMEOUT, _connect, _docker_errors, _log_tail
from refresher.errors import EngineStateError, EngineUnavailable, ProfileError
from refresher.settings import Settings

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
MAINTENANCE_DB = "postgres"
# Databases on the compose server that are not profiles: the image's own, and snapshot/pool copies.
_NOT_PROFILES = ("postgres", "template0", "template1")


@dataclass(frozen=True)
class ComposeService:
    """A running service of the project: where it is published on the host, and its environment."""

    name: str
    host: str
    port: int
    env: dict[str, str]


def find_service(
    project: str, service: str, container_port: int, client: docker.DockerClient | None = None
) -> ComposeService | None:
    """The project's running ``service`` and its published ``container_port``, or None when it is not up."""
    with _client(client) as docker_client:
        container = _container(docker_client, project, service)
        if container is None:
            return None
        bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get(
            f"{container_port}/tcp"
        )
        port = next((int(b["HostPort"]) for b in bindings or [] if b.get("HostPort")), None)
        if port is None:
            raise EngineStateError(f"container {container.name} publishes no port for {container_port}")
        env = dict(e.split("=", 1) for e in container.attrs["Config"].get("Env") or [] if "=" in e)
        return ComposeService(service, HOST, port, env)


def compose_redis_url(project: str, client: docker.DockerClient | None = None) -> str | None:
    """``redis://`` URL of the project's compose Redis when `make up` runs it, else None."""
    try:
        redis = find_service(project, "redis", 6379, client)
    except EngineUnavailable:
        return None
    return f"redis://{redis.host}:{redis.port}/0" if redis else None


def default_queue_url(settings: Settings) -> str | None:
    """The jobs' queue: $REFRESHER_QUEUE, else this checkout's compose Redis while `make up` runs it, else None."""
    return settings.queue_url or compose_redis_url(settings.compose_project)


class ComposeEngine:
    """Serves each profile as a database on the Postgres of one compose project (`make up`)."""

    name = "compose"

    def __init__(
        self,
        project: str,
        *,
        state_dir: Path,
        client: docker.DockerClient | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.project = project
        self.base = Path(state_dir).absolute() / "compose"
        self.ready_timeout = ready_timeout
        self._client_arg = client

    def start(
        self, profile: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> ServerInfo:
        validate_profile(profile)
        server = self._server(profile)
        if server is None:
            raise EngineUnavailable(
                f"no compose Postgres runs for this checkout (project {self.project}); run `make up` first",
                project=self.project,
            )
        if _reserved(server, profile):
            raise ProfileError(
                "--profile",
                "profile",
                profile,
                f"the compose Postgres of {self.project} keeps a database of that name for itself "
                f"({', '.join(_NOT_PROFILES)} and its POSTGRES_DB, {server.env_db}); name the profile otherwise",
            )
        self._wait_ready(server)
        with psycopg.connect(server.dsn(MAINTENANCE_DB), autocommit=True) as conn:
            created = False
            if not _database_exists(conn, profile):
                # A concurrent start may win the race: either error means the database now exists.
                with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(profile)))
                    created = True
        from refresher.pool import forget_outcome, note_server

        if created:
            # One dropped by hand (no `down`) left its record on the server that stays: not this database's.
            forget_outcome(server)
        # A database made is maybe on a server made again (`make compose-down` removes its volume): another cluster,
        # whose records `down` must find once that one is gone too.
        note_server(self._noted_path(profile), server, fresh=created)
        if not self._is_recorded(profile):
            write_private_json(self._record_path(profile), {"project": self.project})
        return server

    def info(self, profile: str) -> ServerInfo | None:
        validate_profile(profile)
        server = self._server(profile)
        if server is None or _reserved(server, profile):
            return None
        try:
            with psycopg.connect(server.dsn(MAINTENANCE_DB), connect_timeout=5) as conn:
                return server if _database_exists(conn, profile) else None
        except psycopg.OperationalError:
            return None

    def is_new(self, profile: str) -> bool:
        return False  # the compose server runs already (`make up`): a start is a quick CREATE DATABASE

    def stop(self, profile: str, *, on_wait: Callable[[str], None] | None = None) -> bool:
        """Drop the profile's database and its snapshots; the server stays up for the other profiles."""
        from refresher.pool import forget_noted, forget_outcome
        from refresher.snapshot import drop_snapshot

        if not self._is_recorded(profile):
            return False  # not made by this state dir: another's, or made by hand
        # The refill records of every server noted (``start``): one `make compose-down` removed with its volume,
        # whose cluster nobody can ask now, left them for good.
        forget_noted(self._noted_path(profile), profile)
        server = self._server(profile)
        if server is None:
            return False  # compose is down: the record waits for the database it names
        with psycopg.connect(server.dsn(MAINTENANCE_DB), autocommit=True) as conn:
            existed = _database_exists(conn, profile)
        if existed:
            drop_snapshot(server)
            with psycopg.connect(server.dsn(MAINTENANCE_DB), autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(profile))
                )
        # The server stays: a database made again under the name would show the dropped one's failed refill.
        forget_outcome(server)
        self._record_path(profile).unlink(missing_ok=True)
        return existed

    def status(self, profile: str | None = None) -> list[ServerStatus]:
        server = self._server(profile or MAINTENANCE_DB)
        if server is None:
            return []
        try:
            with psycopg.connect(server.dsn(MAINTENANCE_DB), connect_timeout=5) as conn:
                names = [
                    row[0]
                    for row in conn.execute(
                        "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> ALL(%s) "
                        "AND position('__' in datname) = 0 ORDER BY 1",
                        [list(_NOT_PROFILES)],
                    )
                ]
        except psycopg.OperationalError:
            return []
        detail = f"compose project {self.project} (`make compose-down` stops it)"
        recorded = self._recorded()
        return [
            ServerStatus(self.name, name, True, server.host, server.port, detail)
            for name in names
            if profile in (None, name) and name != server.env_db and name in recorded
        ]

    # -- small pieces --------------------------------------------------------------------------------------
    def _record_path(self, profile: str) -> Path:
        return self.base / f"{profile}.json"

    def _noted_path(self, profile: str) -> Path:
        """The servers (address, cluster) the profile's database was made on (``pool.note_server``); not
        ``*.json``, which are the profiles' records."""
        return self.base / f"{profile}.clusters"

    def _recorded(self) -> set[str]:
        """The profiles this state dir started on this project's server."""
        paths = self.base.glob("*.json") if self.base.is_dir() else ()
        return {path.stem for path in paths if self._names_project(path)}

    def _is_recorded(self, profile: str) -> bool:
        """Whether this state dir started ``profile`` on this project's server (its record alone is read)."""
        path = self._record_path(profile)
        return path.parent == self.base and self._names_project(path)  # a name with a slash has none

    def _names_project(self, record: Path) -> bool:
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
            # ``projet`` for ``project`` read as no record: the profile's database unlisted, left by `down`
            refuse_misspelled(recorded, ("project",), path=record, what="compose engine record")
            return bool(recorded.get("project") == self.project)
        except (OSError, ValueError, AttributeError):
            return False  # none, or half a record, which is no record: its database is left alone

    def _server(self, profile: str) -> _ComposeServer | None:
        with _client(self._client_arg) as client:
            postgres = find_service(self.project, "postgres", 5432, client)
        if postgres is None:
            return None
        return _ComposeServer(
            self.name,
            profile,
            postgres.host,
            postgres.port,
            postgres.env.get("POSTGRES_USER", "postgres"),
            postgres.env.get("POSTGRES_PASSWORD", ""),
            profile,
            env_db=postgres.env.get("POSTGRES_DB", ""),
        )

    def _wait_ready(self, server: ServerInfo) -> None:
        """`make up` returns before the server accepts connections; poll with a real query."""

        def log_tail() -> str:
            with _client(self._client_arg) as client:
                container = _container(client, self.project, "postgres")
                return _log_tail(container) if container is not None else "(container gone)"

        try:
            wait_ready(
                server.dsn(MAINTENANCE_DB),
                what=f"compose Postgres of {self.project} on {server.host}:{server.port}",
                timeout=self.ready_timeout,
                alive=lambda: True,  # compose restarts it; only the timeout ends the wait
                log_tail=log_tail,
                interval=0.2,
            )
        except EngineUnavailable as exc:
            if exc.fields.get("sqlstate") == "28P01":
                raise EngineStateError(
                    f"compose Postgres of {self.project} refused the password in its container's "
                    "environment (its volume was made with another); run `make compose-down` and `make up`"
                ) from exc
            raise


@dataclass(frozen=True)
class _ComposeServer(ServerInfo):
    env_db: str = ""  # the image's POSTGRES_DB: the server's own database, never a profile


@contextlib.contextmanager
def _client(client: docker.DockerClient | None) -> Iterator[docker.DockerClient]:
    if client is not None:
        with _docker_errors(None):
            yield client
        return
    own = _connect(None, API_TIMEOUT)
    try:
        with _docker_errors(None):
            yield own
    finally:
        own.close()


def _container(client: docker.DockerClient, project: str, service: str) -> Container | None:
    filters = {"label": [f"{PROJECT_LABEL}={project}", f"{SERVICE_LABEL}={service}"], "status": "running"}
    running = client.containers.list(filters=filters, ignore_removed=True)
    return running[0] if running else None


def _reserved(server: _ComposeServer, profile: str) -> bool:
    """Whether ``profile`` names one of the server's own databases: never a profile's to load into or drop."""
    return profile in _NOT_PROFILES or profile == server.env_db


def _database_exists(conn: psycopg.Connection[tuple[object, ...]], name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None


__all__ = ["ComposeEngine", "ComposeService", "compose_redis_url", "default_queue_url", "find_service"]
