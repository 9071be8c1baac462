"""The Docker engine: one PostgreSQL container per profile, found again by its labels after a CLI restart.

Per profile (``<prefix>`` is ``refresher`` unless a test namespaces it):

    container  <prefix>-<profile>         labels io.refresher.project=refresher, io.refresher.profile=<profile>
    volume     <prefix>-<profile>-data    the same labels; PGDATA lives here, not in the container
    state      <state_dir>/docker/<profile>.json   image, port and the password (0600, atomic)

The port is published on 127.0.0.1 only; Docker picks it unless one is pinned. The password is random per
volume: Postgres stores it at initdb time, so it must survive as long as the volume does. If the state file is
lost while the container exists, the password is read back from the container's environment; if both the state
file and the container are gone, the volume's password is unknowable and the volume is recreated (its data is a
throwaway copy that ``refresher refresh`` rebuilds from the feature store).
"""

from __future__ import annotations

import contextlib
import fcntl
import secrets
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import docker.constants
import docker.errors
import docker.utils
import psycopg
import requests
from docker.models.containers import Container

from refresher.engines._docker_state import ContainerState, resolve_image
from refresher.engines.base import ServerInfo, ServerStatus
from refresher.engines.local import TUNING, validate_profile
from refresher.errors import EngineStateError, EngineUnavailable

HOST = "127.0.0.1"
DB_SUPERUSER = "refresher"
PGDATA = "/var/lib/postgresql/data"
PROJECT_LABEL = "io.refresher.project"
PROFILE_LABEL = "io.refresher.profile"
PREFIX_LABEL = "io.refresher.prefix"
LOG_TAIL_LINES = 40
# Docker API calls that may pull or wait on a slow disk; a ping uses its own short timeout.
API_TIMEOUT = 120

# The same bulk-load tuning as the local engine (throwaway dev data: durability buys nothing), passed as
# server arguments. Listening is the image's business: all interfaces inside the container, which Docker
# publishes on 127.0.0.1 only.
SERVER_ARGS: tuple[str, ...] = tuple(
    arg
    for key, value in TUNING.items()
    if key not in ("listen_addresses", "unix_socket_directories")
    for arg in ("-c", f"{key}={value}")
)


def docker_available(base_url: str | None = None, timeout: float = 2.0) -> bool:
    """Whether a Docker daemon answers a ping within ``timeout`` seconds (for ``--engine auto``)."""
    try:
        client = _connect(base_url, timeout)
    except EngineUnavailable:
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, requests.RequestException):
        return False
    finally:
        client.close()


class DockerEngine:
    """PostgreSQL in Docker containers, one per profile, that outlive the CLI until ``stop``."""

    name = "docker"

    def __init__(
        self,
        state_dir: Path,
        *,
        image: str | None = None,
        client: docker.DockerClient | None = None,
        base_url: str | None = None,
        port: int | None = None,
        prefix: str = "refresher",
        ready_timeout: float = 60.0,
    ) -> None:
        """``client`` (owned by the caller) or ``base_url`` pick the daemon; else the SDK's DOCKER_HOST rules.

        ``image`` None resolves postgres:15, then refresher/postgres:15. ``port`` pins the host port.
        ``prefix`` namespaces container and volume names (tests use their own so they never touch yours).
        """
        self.base = Path(state_dir).absolute() / "docker"
        self.image = image
        self.pinned_port = port
        self.prefix = prefix
        self.ready_timeout = ready_timeout
        self._client_arg = client
        self._base_url = base_url

    # -- the Engine protocol ------------------------------------------------------------------------------
    def start(self, profile: str) -> ServerInfo:
        validate_profile(profile)
        with self._client() as client, self._locked(profile):
            state = ContainerState.read(self._state_path(profile))
            container = self._container(client, profile)
            if container is not None and state is None:
                state = self._adopt(container, profile)
            if container is None or state is None:
                container, state = self._create(client, profile, state)
            if container.status != "running":
                self._run(container, profile)
            state = replace(state, port=_host_port(container))
            state.write(self._state_path(profile))
            info = self._info(profile, state)
            self._wait_ready(container, info)
            return info

    def info(self, profile: str) -> ServerInfo | None:
        validate_profile(profile)
        state = ContainerState.read(self._state_path(profile))
        if state is None:
            return None
        with self._client() as client:
            container = self._container(client, profile)
            if container is None or container.status != "running":
                return None
            return self._info(profile, replace(state, port=_host_port(container)))

    def stop(self, profile: str) -> bool:
        validate_profile(profile)
        with self._client() as client, self._locked(profile):
            existed = False
            container = self._container(client, profile)
            if container is not None:
                # Throwaway data: no clean shutdown needed, and force=True also takes a running container.
                container.remove(force=True, v=True)
                existed = True
            with contextlib.suppress(docker.errors.NotFound):
                client.volumes.get(self._volume_name(profile)).remove(force=True)
                existed = True
            path = self._state_path(profile)
            if path.exists():
                path.unlink()
                existed = True
            return existed

    def status(self, profile: str | None = None) -> list[ServerStatus]:
        if profile is not None:
            validate_profile(profile)
        with self._client() as client:
            filters: dict[str, Any] = {
                "label": [f"{PROJECT_LABEL}=refresher", f"{PREFIX_LABEL}={self.prefix}"]
            }
            if profile is not None:
                filters["label"].append(f"{PROFILE_LABEL}={profile}")
            containers = {
                c.labels[PROFILE_LABEL]: c for c in client.containers.list(all=True, filters=filters)
            }
            recorded = {p.stem for p in self.base.glob("*.json")} if self.base.is_dir() else set()
            if profile is not None:
                recorded &= {profile}
            statuses = []
            for name in sorted(containers.keys() | recorded):
                container = containers.get(name)
                if container is None:
                    detail = (
                        "container removed behind our back (volume kept; `refresher refresh` recreates it)"
                    )
                    statuses.append(ServerStatus(self.name, name, False, detail=detail))
                elif container.status == "running":
                    detail = f"container {container.name} ({_image_name(container)})"
                    statuses.append(ServerStatus(self.name, name, True, HOST, _host_port(container), detail))
                else:
                    detail = (
                        f"container {container.name} {container.status} (`refresher refresh` restarts it)"
                    )
                    statuses.append(ServerStatus(self.name, name, False, detail=detail))
            return statuses

    # -- container lifecycle --------------------------------------------------------------------------------
    def _create(
        self, client: docker.DockerClient, profile: str, state: ContainerState | None
    ) -> tuple[Container, ContainerState]:
        """A new container over the kept volume (with the kept password), or over a fresh one."""
        volume_name = self._volume_name(profile)
        if state is None:
            # Nobody knows the password this volume was initialised with: start it over.
            with contextlib.suppress(docker.errors.NotFound):
                client.volumes.get(volume_name).remove(force=True)
        image = resolve_image(client, self.image)
        state = ContainerState(
            container=self._container_name(profile),
            volume=volume_name,
            image=image,
            user=state.user if state else DB_SUPERUSER,
            password=state.password if state else secrets.token_urlsafe(24),
        )
        # Written before the container exists: a CLI killed from here on still knows the volume's password.
        state.write(self._state_path(profile))
        labels = self._labels(profile)
        try:
            client.volumes.get(volume_name)
        except docker.errors.NotFound:
            client.volumes.create(volume_name, labels=labels)
        container = client.containers.create(
            image,
            command=["postgres", *SERVER_ARGS],
            name=state.container,
            labels=labels,
            environment={
                "POSTGRES_USER": state.user,
                "POSTGRES_PASSWORD": state.password,
                "POSTGRES_DB": profile,
            },
            volumes={volume_name: {"bind": PGDATA, "mode": "rw"}},
            ports={"5432/tcp": (HOST, self.pinned_port)},
            # Parallel query workers share memory through /dev/shm; Docker's default 64 MB is too small.
            shm_size="256m",
            detach=True,
        )
        return container, state

    def _run(self, container: Container, profile: str) -> None:
        try:
            container.start()
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            if "already allocated" in text or "address already in use" in text:
                # Keep state consistent: a container that cannot bind is useless; the volume stays.
                container.remove(force=True)
                raise EngineUnavailable(
                    f"port {self.pinned_port} on {HOST} is already in use; choose another port for {profile}",
                    port=self.pinned_port,
                ) from exc
            raise EngineUnavailable(f"container {container.name} did not start: {text}") from exc
        container.reload()

    def _adopt(self, container: Container, profile: str) -> ContainerState:
        """Rebuild lost state from a container we made: its environment holds the password it was made with."""
        env = dict(e.split("=", 1) for e in container.attrs["Config"].get("Env") or [] if "=" in e)
        if "POSTGRES_PASSWORD" not in env:
            raise EngineStateError(
                f"container {container.name} has no POSTGRES_PASSWORD; run `refresher down --profile {profile}`"
            )
        return ContainerState(
            container=container.name or self._container_name(profile),
            volume=self._volume_name(profile),
            image=_image_name(container),
            user=env.get("POSTGRES_USER", DB_SUPERUSER),
            password=env["POSTGRES_PASSWORD"],
        )

    def _wait_ready(self, container: Container, info: ServerInfo) -> None:
        """Poll with a real query until the server answers; fail fast if the container exits."""
        deadline = time.monotonic() + self.ready_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(info.dsn(), connect_timeout=3) as conn:
                    conn.execute("SELECT 1")
                    return
            except psycopg.OperationalError as exc:
                # None: refused or reset by Docker's proxy while the server (or its init) starts;
                # 57P03: "the database system is starting up" / "shutting down" between init and start.
                if exc.sqlstate == "28P01":
                    raise EngineStateError(
                        f"volume {self._volume_name(info.profile)} was initialised with another password; "
                        f"run `refresher down --profile {info.profile}`"
                    ) from exc
                if exc.sqlstate not in (None, "57P03", "3D000"):
                    raise EngineUnavailable(f"container {container.name} refused us: {exc}") from exc
                last = exc
            container.reload()
            if container.status != "running":
                break
            time.sleep(0.1)
        raise EngineUnavailable(
            f"container {container.name} on {HOST}:{info.port} is not ready after {self.ready_timeout:.0f}s "
            f"(status {container.status}; {last}); log tail:\n{_log_tail(container)}"
        )

    # -- small pieces --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _client(self) -> Iterator[docker.DockerClient]:
        """The caller's client, or one of our own for the length of one operation (closed: no leaked sockets)."""
        if self._client_arg is not None:
            with _docker_errors(self._base_url):
                yield self._client_arg
            return
        client = _connect(self._base_url, API_TIMEOUT)
        try:
            with _docker_errors(self._base_url):
                yield client
        finally:
            client.close()

    @contextlib.contextmanager
    def _locked(self, profile: str) -> Iterator[None]:
        """Two CLIs starting or stopping the same profile take turns; the lock dies with its process."""
        self.base.mkdir(parents=True, exist_ok=True)
        with (self.base / f".{profile}.lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _container(self, client: docker.DockerClient, profile: str) -> Container | None:
        try:
            container: Container = client.containers.get(self._container_name(profile))
        except docker.errors.NotFound:
            return None
        if container.labels.get(PROJECT_LABEL) != "refresher":
            raise EngineStateError(
                f"a container named {container.name} exists but refresher did not make it; remove or rename it"
            )
        return container

    def _labels(self, profile: str) -> dict[str, str]:
        return {PROJECT_LABEL: "refresher", PROFILE_LABEL: profile, PREFIX_LABEL: self.prefix}

    def _container_name(self, profile: str) -> str:
        return f"{self.prefix}-{profile}"

    def _volume_name(self, profile: str) -> str:
        return f"{self.prefix}-{profile}-data"

    def _state_path(self, profile: str) -> Path:
        return self.base / f"{profile}.json"

    def _info(self, profile: str, state: ContainerState) -> ServerInfo:
        return ServerInfo(self.name, profile, HOST, state.port, state.user, state.password, profile)


def _connect(base_url: str | None, timeout: float) -> docker.DockerClient:
    """A client for ``base_url`` or the SDK's environment rules; constructing one already asks the daemon."""
    _probe_unix_socket(base_url)
    try:
        if base_url is not None:
            return docker.DockerClient(base_url=base_url, timeout=int(max(1, timeout)))
        return docker.from_env(timeout=int(max(1, timeout)))
    except docker.errors.DockerException as exc:
        raise _not_running(base_url, exc) from exc


def _probe_unix_socket(base_url: str | None) -> None:
    """Fail on a dead Unix socket before the SDK does: its failed connect leaks the socket (a ResourceWarning)."""
    url = base_url or docker.utils.kwargs_from_env().get("base_url") or docker.constants.DEFAULT_UNIX_SOCKET
    if "unix://" not in url:
        return
    path = url.split("unix://", 1)[1]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(path)
    except OSError as exc:
        raise _not_running(base_url, exc) from exc
    finally:
        sock.close()


@contextlib.contextmanager
def _docker_errors(base_url: str | None) -> Iterator[None]:
    try:
        yield
    except requests.ConnectionError as exc:
        raise _not_running(base_url, exc) from exc


def _not_running(base_url: str | None, exc: BaseException) -> EngineUnavailable:
    where = base_url or "$DOCKER_HOST or the default socket"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EngineUnavailable(
        f"Docker is not running or not reachable at {where} ({reason}); start the daemon or use --engine local",
        base_url=base_url,
    )


def _host_port(container: Container) -> int:
    bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get("5432/tcp") or []
    for binding in bindings:
        if binding.get("HostIp") in (HOST, "0.0.0.0", "") and binding.get("HostPort"):
            return int(binding["HostPort"])
    raise EngineStateError(f"container {container.name} publishes no port for 5432; run `refresher down`")


def _image_name(container: Container) -> str:
    return str(container.attrs.get("Config", {}).get("Image") or container.image.id)


def _log_tail(container: Container) -> str:
    try:
        raw = container.logs(tail=LOG_TAIL_LINES)
    except docker.errors.APIError as exc:
        return f"(no log: {exc})"
    return raw.decode("utf-8", errors="replace").rstrip() if isinstance(raw, bytes) else str(raw)


__all__ = ["DockerEngine", "docker_available"]
