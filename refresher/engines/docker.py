"""The Docker engine: one PostgreSQL container per profile, found again by its labels after a CLI restart.

Per profile (``<prefix>`` is ``refresher`` unless a test namespaces it; ``<scope>`` is a hash of the state dir's
resolved path, so two checkouts on one daemon never share, list or remove each other's servers):

    container  <prefix>-<scope>-<profile>       labels io.refresher.project=refresher, io.refresher.profile,
                                                io.refresher.state=<scope>, io.refresher.state-path=<state dir>
    volume     <prefix>-<scope>-<profile>-data  the same labels; PGDATA lives here, not in the container
    state      <state_dir>/docker/<profile>.json   image, port and the password (0600, atomic)

The port is published on 127.0.0.1 only; Docker picks it unless one is pinned (Docker does not ask the kernel:
when another process holds its pick, the container is made again on a port the kernel says is free). The
password is random per volume: Postgres stores it at initdb time, so it must survive as long as the volume does.
If the state file is lost while the container exists, the password is read back from the container's
environment; if both the state file and the container are gone, the volume's password is unknowable and the
volume is recreated (its data is a throwaway copy that ``refresher refresh`` rebuilds from the feature store).
A container made with another image, command or environment than this refresher's (an older refresher's, its
CONFIG_LABEL another or none) is made again over its volume by the next start, with the same password and port.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.constants
import docker.errors
import docker.utils
import requests
from docker.models.containers import Container
from docker.models.volumes import Volume

from refresher.engines._common import (
    DB_SUPERUSER,
    HOST,
    INIT_BYTES_NEEDED,
    INITDB_ARGS,
    RETRYABLE_SQLSTATES,
    SERVER_ENV,
    TUNING,
    is_disk_full,
    noted_cluster,
    noted_servers,
    server_locked,
    sweep_private_tmps,
    validate_profile,
    wait_ready,
)
from refresher.engines._docker_state import ContainerState, checkout_id, first_line, resolve_image
from refresher.engines._owner import OWNER_LABELS, owner_gone
from refresher.engines.base import ServerInfo, ServerStatus
from refresher.errors import EngineStateError, EngineUnavailable

PGDATA = "/var/lib/postgresql/data"
PROJECT_LABEL = "io.refresher.project"
PROFILE_LABEL = "io.refresher.profile"
PREFIX_LABEL = "io.refresher.prefix"
STATE_LABEL = "io.refresher.state"
STATE_PATH_LABEL = "io.refresher.state-path"
CHECKOUT_LABEL = "io.refresher.checkout"
CHECKOUT_HOST_LABEL = "io.refresher.checkout-host"
# A digest of what the container was made to run (image, command, environment but the password): one that differs
# from what this refresher would make (an older refresher's, before lc_messages=C or SERVER_ENV) is made again.
CONFIG_LABEL = "io.refresher.config"
LOG_TAIL_LINES = 40
# Containers made in turn when the port Docker published a new one on is held by another process.
PORT_TRIES = 5
# Docker API calls that may pull or wait on a slow disk; a ping uses its own short timeout.
API_TIMEOUT = 120
# A container made again waits this long for its server's fast shutdown (the images' STOPSIGNAL is SIGINT).
STOP_SECONDS = 60

# A container or a volume: what a profile has one of, found again by name and labels.
_Made = TypeVar("_Made", Container, Volume)

# The same bulk-load tuning as the local engine, passed as server arguments. Listening is the image's business:
# all interfaces inside the container, which Docker publishes on 127.0.0.1 only.
SERVER_ARGS: tuple[str, ...] = tuple(arg for key, value in TUNING.items() for arg in ("-c", f"{key}={value}"))


def state_scope(state_dir: Path) -> str:
    """A short, stable name for a state dir: the hash of its resolved path (a checkout's own servers)."""
    return hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:10]


def docker_available(base_url: str | None = None, timeout: float = 2.0) -> bool:
    """Whether a Docker daemon answers a ping within ``timeout`` seconds (for ``--engine auto``)."""
    return docker_refusal(base_url, timeout) is None


def docker_refusal(base_url: str | None = None, timeout: float = 2.0) -> EngineUnavailable | None:
    """Why no Docker daemon answers a ping within ``timeout`` seconds (a socket closed to this user, a daemon
    not running), or None when one does: what ``--engine auto`` says when it may not fall back."""
    try:
        client = _connect(base_url, timeout)
    except EngineUnavailable as exc:
        return exc
    try:
        if client.ping():
            return None
        return _not_running(base_url, RuntimeError("the ping was not answered"))
    except (docker.errors.DockerException, requests.RequestException) as exc:
        return _not_running(base_url, exc)
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
        labels: Mapping[str, str] | None = None,
    ) -> None:
        """``client`` (owned by the caller) or ``base_url`` pick the daemon; else the SDK's DOCKER_HOST rules.

        ``image`` None resolves postgres:15, then refresher/postgres:15. ``port`` pins the host port.
        ``prefix`` namespaces container and volume names (tests use their own so they never touch yours); the
        state dir scopes them further. ``labels`` go on every container and volume made (the pytest plugin
        marks its throwaway servers with their owner process).
        """
        self.state_dir = Path(state_dir).absolute()
        self.base = self.state_dir / "docker"
        self.scope = state_scope(self.state_dir)
        self.extra_labels = dict(labels or {})
        self.image = image
        self.pinned_port = port
        self.prefix = prefix
        self.ready_timeout = ready_timeout
        self._client_arg = client
        self._base_url = base_url
        # With the checkout id, tells a checkout at the same path on another machine (or dev container) from
        # this one after its state dir was removed (`make clean`): only the first is someone else's.
        self.hostname = socket.gethostname()

    def resolved_image(self) -> str:
        """The image this engine runs: the one asked for, else the first default present locally or pullable.

        EngineUnavailable (naming `make image`) when none is. Tests ask it to run their own containers from
        the same image the engine would use.
        """
        with self._client() as client:
            return resolve_image(client, self.image)

    # -- the Engine protocol ------------------------------------------------------------------------------
    def start(
        self, profile: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> ServerInfo:
        validate_profile(profile)
        lock = server_locked(self._lock_path(profile), profile, self.name, wait=wait, on_wait=on_wait)
        with self._client() as client, lock:
            checkout_id(self.base, create=True)  # before anything is looked at or labelled
            self._sweep_state_tmps(profile)
            state = ContainerState.read(self._state_path(profile))
            container = self._container(client, profile)
            port: int | None = None
            if container is not None:
                if state is None:
                    state = self._adopt(container, profile)
                if self._outdated(client, container, profile, state):
                    port = self._retire(client, container, profile, state)
                    container = None
            # A server already running keeps its volume mounted: the cluster noted at its address is still its.
            running = container is not None and container.status == "running"
            if container is None or state is None:
                container, state = self._create(client, profile, state, port=port)
            tries = 1
            while container.status != "running" and not self._run(container, profile):
                # Docker hands out ports in turn without asking the kernel: its pick was another process's.
                if tries == PORT_TRIES:
                    raise EngineUnavailable(
                        f"container {container.name} could not publish its port: {tries} ports in a row on "
                        f"{HOST} were held by other processes; run the command again"
                    )
                tries += 1
                container, state = self._create(client, profile, state, port=_free_port())
            if container.status != "running":
                raise self._exited(container, profile)
            state = replace(state, port=_host_port(container))
            if state != ContainerState.read(self._state_path(profile)):  # its fsync: as LocalEngine's start
                state.write(self._state_path(profile))
            info = self._info(profile, state)
            self._wait_ready(container, info)
            cluster = self._note_cluster(profile, info, container, fresh=not running)
            return replace(info, cluster=cluster)

    def info(self, profile: str) -> ServerInfo | None:
        validate_profile(profile)
        state = ContainerState.read(self._state_path(profile))
        if state is None:
            return None
        with self._client() as client:
            container = self._container(client, profile, strict=False)
            if container is None or container.status != "running":
                return None
            info = self._info(profile, replace(state, port=_host_port(container)))
            noted = noted_servers(self._noted_path(profile))
            return replace(info, cluster=noted_cluster(noted, info.host, info.port, str(container.id)))

    def is_new(self, profile: str) -> bool:
        validate_profile(profile)
        with self._client() as client:
            if self._container(client, profile, strict=False) is not None:
                return False
            return self._volume(client, profile, strict=False) is None  # a kept volume keeps its data

    def stop(self, profile: str, *, on_wait: Callable[[str], None] | None = None) -> bool:
        validate_profile(profile)
        with (
            self._client() as client,
            server_locked(self._lock_path(profile), profile, self.name, on_wait=on_wait),
        ):
            existed = False
            # Another checkout's container or volume under our name (one at the same path elsewhere) stays.
            container = self._container(client, profile, strict=False)
            if container is not None:
                if container.status == "running":
                    self._forget_refills(container, profile)
                # Throwaway data: no clean shutdown needed, and force=True also takes a running container.
                _remove_container(client, container)
                existed = True
            volume = self._volume(client, profile, strict=False)
            if volume is not None:
                with contextlib.suppress(docker.errors.NotFound):
                    volume.remove(force=True)
                    existed = True
            path = self._state_path(profile)
            if path.exists():
                path.unlink()
                existed = True
            self._forget_noted(profile)
            self._sweep_state_tmps(profile)
            return existed

    def _forget_refills(self, container: Container, profile: str) -> None:
        """Remove what this host recorded of how the server's pool refills ended (``pool.forget_outcome``), in
        the user's cache directory, which nothing else cleans: each `down` left its files. While the server
        answers, which tells its cluster: the record is keyed by it, never another checkout's or server's (a
        server noted by a start, ``_forget_noted``, needs no answer; one started before notes were kept does)."""
        from refresher.pool import forget_outcome

        with contextlib.suppress(EngineStateError):  # no password in its environment, no port: none to ask
            state = self._adopt(container, profile)
            forget_outcome(self._info(profile, replace(state, port=_host_port(container))))

    def _note_cluster(
        self, profile: str, info: ServerInfo, container: Container, *, fresh: bool
    ) -> int | None:
        """Note the server's address, cluster and container in the state dir (``pool.note_server``): a `down` once
        its container was stopped or removed by hand, or its volume too, still finds the records its refills
        left, and ``info`` answers the cluster without a query (``ServerInfo.cluster``). The cluster noted."""
        from refresher.pool import note_server

        return note_server(self._noted_path(profile), info, fresh=fresh, container=str(container.id))

    def _forget_noted(self, profile: str) -> None:
        """Remove the refill records of every server this state dir noted for the profile (``pool.forget_noted``),
        whatever its container's state: stopped or gone, it cannot be asked, and its records stayed for good."""
        from refresher.pool import forget_noted

        forget_noted(self._noted_path(profile), profile)

    def status(self, profile: str | None = None) -> list[ServerStatus]:
        if profile is not None:
            validate_profile(profile)
        with self._client() as client:
            filters: dict[str, Any] = {
                "label": [
                    f"{PROJECT_LABEL}=refresher",
                    f"{PREFIX_LABEL}={self.prefix}",
                    f"{STATE_LABEL}={self.scope}",
                ]
            }
            if profile is not None:
                filters["label"].append(f"{PROFILE_LABEL}={profile}")
            checkout = checkout_id(self.base, create=False)
            containers = {
                c.labels[PROFILE_LABEL]: c
                for c in client.containers.list(all=True, filters=filters, ignore_removed=True)
                if self._ours(c.labels, checkout)
            }
            recorded = {p.stem for p in self.base.glob("*.json")} if self.base.is_dir() else set()
            if profile is not None:
                recorded &= {profile}
            statuses = []
            for name in sorted(containers.keys() | recorded):
                container = containers.get(name)
                if container is None:
                    foreign = self._foreign(client, name)
                    detail = foreign or self._missing(client, name)
                    statuses.append(ServerStatus(self.name, name, False, detail=detail, left_alone=foreign))
                elif container.status == "running":
                    detail = f"container {container.name} ({_image_name(container)}){self._renewal(client, container)}"
                    statuses.append(ServerStatus(self.name, name, True, HOST, _host_port(container), detail))
                else:
                    detail = (
                        f"container {container.name} {container.status} (`refresher refresh` restarts it)"
                    )
                    statuses.append(ServerStatus(self.name, name, False, detail=detail))
            return statuses

    def _renewal(self, client: docker.DockerClient, container: Container) -> str:
        """What ``status`` adds of a container the next start makes again (``_outdated``), else ""."""
        profile = container.labels[PROFILE_LABEL]
        try:
            state = ContainerState.read(self._state_path(profile))
        except EngineStateError:
            return ""  # the start says what is wrong with it
        if state is None or not self._outdated(client, container, profile, state):
            return ""
        return (
            "; made with another configuration (an older refresher's): the next `refresher refresh` makes it "
            "again over its volume, data kept"
        )

    def _foreign(self, client: docker.DockerClient, profile: str) -> str:
        """Why the container or volume under the profile's names is not ours ("" when none is another's)."""
        try:
            self._container(client, profile)
            self._volume(client, profile)
        except EngineStateError as exc:
            return str(exc)
        return ""

    def _missing(self, client: docker.DockerClient, profile: str) -> str:
        """What ``status`` says of a profile with a state file, no container, and nothing of another's."""
        if self._volume(client, profile, strict=False) is None:
            return (
                "no container or volume: a start interrupted before making them, or both removed outside refresher"
                " (the next `refresher refresh` starts over)"
            )
        return "container removed behind our back (volume kept; `refresher refresh` recreates it)"

    # -- container lifecycle --------------------------------------------------------------------------------
    def _create(
        self,
        client: docker.DockerClient,
        profile: str,
        state: ContainerState | None,
        *,
        port: int | None = None,
    ) -> tuple[Container, ContainerState]:
        """A new container over the kept volume (with the kept password), or over a fresh one; published on
        ``port``, else the pinned one, else one Docker picks."""
        volume_name = self._volume_name(profile)
        volume = self._volume(client, profile)
        if state is None and volume is not None:
            # Nobody knows the password this volume was initialised with: start it over.
            with contextlib.suppress(docker.errors.NotFound):
                volume.remove(force=True)
        # The volume's own default image while it is here (as ``_outdated`` counts it): the first default present
        # would bring another image over the data once one was tagged since (postgres:15 pulled).
        image = resolve_image(client, self.image, current=state.image if state else None)
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
        config = _server_config(image, state, profile)
        labels[CONFIG_LABEL] = _config_digest(config)
        deadline = time.monotonic() + self.ready_timeout
        while True:
            try:
                container = client.containers.create(
                    **config,
                    name=state.container,
                    labels=labels,
                    volumes={volume_name: {"bind": PGDATA, "mode": "rw"}},
                    ports={"5432/tcp": (HOST, port or self.pinned_port)},
                    detach=True,
                )
                return container, state
            except docker.errors.APIError as exc:
                if exc.status_code != 409 or time.monotonic() > deadline:
                    raise
            # The name is taken by a create still in flight in the daemon: one whose client was killed
            # mid-request finishes (or rolls back) after its client is gone. Take it over once it exists.
            existing = self._container(client, profile)
            if existing is not None:
                state = self._adopt(existing, profile)
                return existing, state
            time.sleep(0.2)

    def _outdated(
        self, client: docker.DockerClient, container: Container, profile: str, state: ContainerState
    ) -> bool:
        """Whether ``container`` runs another configuration than the one this refresher would make it with (an
        older refresher's has another digest, or none), and holds its data in the profile's volume, so that it
        can be made again without losing it. Never when the configured image is not here (no pull for this).

        Its own image counts while here, unless another is asked for (``image``, $REFRESHER_PG_IMAGE): another
        default tagged or untagged since (postgres:15 pulled) would end its sessions for nothing, every time."""
        try:
            image = resolve_image(client, self.image, pull=False, current=_image_name(container))
        except EngineUnavailable:
            return False
        if container.labels.get(CONFIG_LABEL) == _config_digest(_server_config(image, state, profile)):
            return False
        volume = self._volume_name(profile)
        mounts = container.attrs.get("Mounts") or []
        return any(m.get("Destination") == PGDATA and m.get("Name") == volume for m in mounts)

    def _retire(
        self, client: docker.DockerClient, container: Container, profile: str, state: ContainerState
    ) -> int | None:
        """Remove an outdated ``container``, its server shut down cleanly first; its volume stays. The port for
        the new container: the pinned one, else the one it published, to keep (None: let Docker pick).

        Each step leaves what a start already finishes: the state file (written first: a kill from here on still
        knows the volume's password) beside an exited container, or beside the volume alone.
        """
        state.write(self._state_path(profile))
        port = self.pinned_port or state.port or None
        if self.pinned_port is None and container.status == "running":
            with contextlib.suppress(EngineStateError):  # none published: Docker picks one
                port = _host_port(container)
        if container.status in ("running", "restarting", "paused"):
            with contextlib.suppress(docker.errors.NotFound):
                container.stop(timeout=STOP_SECONDS)  # fast shutdown: a checkpoint, every commit kept
        _remove_container(client, container)
        return port

    def _run(self, container: Container, profile: str) -> bool:
        """Start ``container``; False when its port, not pinned, is taken (the container is removed then)."""
        try:
            container.start()
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            if "already allocated" in text or "address already in use" in text:
                # Keep state consistent: a container that cannot bind is useless; the volume stays.
                container.remove(force=True, v=True)
                if self.pinned_port is None:
                    return False
                raise EngineUnavailable(
                    f"port {self.pinned_port} on {HOST} is already in use; choose another port for {profile}",
                    port=self.pinned_port,
                ) from exc
            raise EngineUnavailable(f"container {container.name} did not start: {text}") from exc
        container.reload()
        return True

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

        def alive() -> bool:
            try:
                container.reload()
            except docker.errors.NotFound:
                return False
            return bool(container.status == "running")

        try:
            wait_ready(
                info.dsn(),
                what=f"container {container.name} on {HOST}:{info.port}",
                timeout=self.ready_timeout,
                alive=alive,
                log_tail=lambda: _log_tail(container),
                # 3D000: the image creates POSTGRES_DB after a first, socket-only start.
                retryable=RETRYABLE_SQLSTATES | {"3D000"},
                interval=0.1,
            )
        except EngineUnavailable as exc:
            if _removed(container):
                raise EngineUnavailable(
                    f"container {container.name} was removed while it started (`docker rm` or another "
                    f"process); run the command again to make it anew"
                ) from exc
            if exc.fields.get("sqlstate") == "28P01":
                raise EngineStateError(
                    f"volume {self._volume_name(info.profile)} was initialised with another password; "
                    f"run `refresher down --profile {info.profile}`"
                ) from exc
            if container.status == "exited":  # as _removed left it
                raise self._exited(container, info.profile) from exc
            raise

    def _exited(self, container: Container, profile: str) -> EngineUnavailable:
        """Why a container stopped while it started: the volume filled up, or what its log says (an image that
        is no PostgreSQL 15, as a tag that now names another image).

        The container goes (its volume and the state file stay): restarting it would run the same image again,
        while the next start makes a new one from the image configured then.
        """
        tail = _log_tail(container)
        error = self._disk_full(container, profile) if is_disk_full(tail) else None
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)
        return error or EngineUnavailable(
            f"container {container.name} (image {_image_name(container)}) exited while it started; its log "
            f"tail says why (an image that is not PostgreSQL 15? `make image` builds refresher/postgres:15, "
            f"$REFRESHER_PG_IMAGE names another; the next start makes the container anew):\n{tail}"
        )

    def _disk_full(self, container: Container, profile: str) -> EngineUnavailable:
        volume = self._volume_name(profile)
        return EngineUnavailable(
            f"disk full: Docker volume {volume} ({_volume_path(container)}) ran out of space while "
            f"the server initialised it; it needs at least {INIT_BYTES_NEEDED // 2**20} MB free; "
            f"free some space and run `refresher down --profile {profile}`, then the command again",
            path=_volume_path(container),
            needed=INIT_BYTES_NEEDED,
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

    def _lock_path(self, profile: str) -> Path:
        """Two CLIs starting or stopping the same profile take turns."""
        return self.base / f".{profile}.lock"

    def _container(
        self, client: docker.DockerClient, profile: str, *, strict: bool = True
    ) -> Container | None:
        """The profile's container, None when there is none; one under its name that this state dir did not
        make raises EngineStateError (``strict=False``: counts as none, for the calls that only look or remove)."""
        return self._owned("container", client.containers.get, self._container_name(profile), profile, strict)

    def _volume(self, client: docker.DockerClient, profile: str, *, strict: bool = True) -> Volume | None:
        """The profile's data volume, None when there is none; one this state dir did not make as ``_container``."""
        return self._owned("volume", client.volumes.get, self._volume_name(profile), profile, strict)

    def _owned(
        self, kind: str, get: Callable[[str], _Made], name: str, profile: str, strict: bool
    ) -> _Made | None:
        """What ``get`` finds under ``name`` when this state dir made it, as ``_container`` describes."""
        try:
            found = get(name)
        except docker.errors.NotFound:
            return None
        labels = (found.labels if isinstance(found, Container) else found.attrs.get("Labels")) or {}
        if self._ours(labels, checkout_id(self.base, create=False)):
            return found
        if not strict:
            return None
        raise self._not_ours(kind, found.name or "?", labels, profile)

    def _ours(self, labels: Mapping[str, str], checkout: str | None) -> bool:
        """Whether labels name this state dir: its path, and its checkout id or this machine (what was made
        before ids existed has neither, and is ours)."""
        return (
            labels.get(PROJECT_LABEL) == "refresher"
            and labels.get(PREFIX_LABEL) == self.prefix
            and labels.get(STATE_LABEL) == self.scope
            and (
                labels.get(CHECKOUT_LABEL, checkout) == checkout
                or labels.get(CHECKOUT_HOST_LABEL) == self.hostname
            )
        )

    def _not_ours(self, kind: str, name: str, labels: Mapping[str, str], profile: str) -> EngineStateError:
        if labels.get(PROJECT_LABEL) != "refresher":
            return EngineStateError(
                f"{kind} {name} exists but refresher did not make it; remove or rename it"
            )
        made_by = labels.get(STATE_PATH_LABEL) or "an unknown state dir"
        host = labels.get(CHECKOUT_HOST_LABEL) or "another machine"
        return EngineStateError(
            f"{kind} {name} has profile {profile}'s name but belongs to another checkout (state dir {made_by} "
            f"on {host}, sharing this Docker daemon); refresher leaves it alone: set REFRESHER_STATE_DIR to "
            f"another path, or remove it with `docker rm -f -v` / `docker volume rm` once you know it is yours"
        )

    def _labels(self, profile: str) -> dict[str, str]:
        return {
            **self.extra_labels,
            PROJECT_LABEL: "refresher",
            PROFILE_LABEL: profile,
            PREFIX_LABEL: self.prefix,
            STATE_LABEL: self.scope,
            STATE_PATH_LABEL: str(self.state_dir.resolve()),
            CHECKOUT_LABEL: str(checkout_id(self.base, create=True)),
            CHECKOUT_HOST_LABEL: self.hostname,
        }

    def _container_name(self, profile: str) -> str:
        return f"{self.prefix}-{self.scope}-{profile}"

    def _volume_name(self, profile: str) -> str:
        return f"{self.prefix}-{self.scope}-{profile}-data"

    def _state_path(self, profile: str) -> Path:
        return self.base / f"{profile}.json"

    def _noted_path(self, profile: str) -> Path:
        """The servers (address, cluster) the profile's containers ran (``pool.note_server``); not ``*.json``,
        which are the profiles' state files."""
        return self.base / f"{profile}.clusters"

    def _sweep_state_tmps(self, profile: str) -> None:
        """Remove the state file's temporary files (each a copy of the volume's password) that a start killed
        between their write and their rename left. Under the profile's lock: every writer of the state file
        (a start) holds it, so any there is a dead one's."""
        sweep_private_tmps(self.base, self._state_path(profile).name, age=0)
        sweep_private_tmps(self.base, self._noted_path(profile).name, age=0)

    def _info(self, profile: str, state: ContainerState) -> ServerInfo:
        return ServerInfo(self.name, profile, HOST, state.port, state.user, state.password, profile)


def statuses_everywhere(base_url: str | None = None) -> list[ServerStatus]:
    """Every refresher container on the daemon, whichever state dir made it (read-only; for ``status``).

    Only the Docker engine's (they carry a profile label): `make up`'s compose containers are labelled
    ``io.refresher.project=refresher`` too, and its Redis publishes no Postgres port.
    """
    client = _connect(base_url, API_TIMEOUT)
    try:
        with _docker_errors(base_url):
            ours = {"label": [f"{PROJECT_LABEL}=refresher", PROFILE_LABEL]}
            containers = client.containers.list(all=True, filters=ours, ignore_removed=True)
            statuses = []
            for c in sorted(containers, key=lambda c: c.name or ""):
                owner = c.labels.get(STATE_PATH_LABEL) or "unknown state dir (made before state scoping)"
                running = c.status == "running"
                port = _host_port(c) if running else None
                detail = f"container {c.name} {c.status}, state dir {owner}"
                profile = c.labels.get(PROFILE_LABEL, "?")
                statuses.append(
                    ServerStatus("docker", profile, running, HOST if running else None, port, detail)
                )
            return statuses
    finally:
        client.close()


def remove_abandoned(marker_label: str, base_url: str | None = None) -> list[str]:
    """Remove containers and volumes labelled ``marker_label`` whose owner process is gone; their names.

    Only what carries owner labels naming a process on this host (and pid namespace) that no longer runs:
    another checkout's live run on the same daemon is never touched, nor anything made on another machine.
    """
    removed: list[str] = []
    client = _connect(base_url, API_TIMEOUT)
    try:
        with _docker_errors(base_url):
            wanted = {"label": [marker_label, *OWNER_LABELS]}
            for container in client.containers.list(all=True, filters=wanted, ignore_removed=True):
                # Every checkout's run sweeps: another may be removing this one right now.
                if owner_gone(container.labels) and _remove_container(client, container):
                    removed.append(container.name or container.id or "?")
            for volume in client.volumes.list(filters=wanted):
                if owner_gone(volume.attrs.get("Labels") or {}):
                    # A volume still mounted by a container (a live run's) refuses removal: leave it.
                    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                        volume.remove(force=True)
                        removed.append(volume.name or "?")
    finally:
        client.close()
    return removed


def _server_config(image: str, state: ContainerState, profile: str) -> dict[str, Any]:
    """What a profile's container runs: ``containers.create``'s image, command, environment and shm size."""
    return {
        "image": image,
        "command": ["postgres", *SERVER_ARGS],
        "environment": {
            "POSTGRES_USER": state.user,
            "POSTGRES_PASSWORD": state.password,
            "POSTGRES_DB": profile,
            # Read by the image's initdb only, on an empty volume: a kept volume keeps its layout.
            "POSTGRES_INITDB_ARGS": " ".join(INITDB_ARGS),
            **SERVER_ENV,
        },
        # Parallel query workers share memory through /dev/shm; Docker's default 64 MB is too small.
        "shm_size": "256m",
    }


def _config_digest(config: Mapping[str, Any]) -> str:
    """The CONFIG_LABEL of a container made with ``config`` (its password left out: labels are no secret)."""
    environment = {k: v for k, v in config["environment"].items() if k != "POSTGRES_PASSWORD"}
    text = json.dumps({**config, "environment": environment}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _remove_container(client: docker.DockerClient, container: Container) -> bool:
    """Remove ``container`` (forced, with its anonymous volumes) and return once it is gone, whoever removed it.

    True when this call removed it, False when it was already gone or another process's removal finished it.
    Several processes may remove one container at once (each checkout's test run sweeps what killed runs left;
    a ``stop`` meets such a sweep): the daemon answers all but the first 409 "removal of container ... is
    already in progress", and the container, still holding its volume, exists until that removal ends. So wait
    for it, rather than fail, or go on to a volume that is still in use.
    """
    try:
        container.remove(force=True, v=True)
        return True
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code != 409 or "already in progress" not in str(exc.explanation or exc):
            raise
        conflict = exc
    deadline = time.monotonic() + API_TIMEOUT
    while time.monotonic() < deadline:
        try:
            client.containers.get(container.id)
        except docker.errors.NotFound:
            return False
        time.sleep(0.1)
    raise EngineUnavailable(
        f"container {container.name} is still being removed after {API_TIMEOUT} s by another process "
        f"({conflict.explanation}); run the command again once it is gone"
    ) from conflict


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
    except PermissionError as exc:
        # The daemon may well be running: its socket (root:docker, mode 660) is closed to users outside the group.
        raise EngineUnavailable(
            f"Docker's socket {path} refuses this user ({exc.strerror}): add the user to the docker group "
            "(sudo usermod -aG docker $USER, then log in again), or use --engine local",
            base_url=base_url,
        ) from exc
    except OSError as exc:
        raise _not_running(base_url, exc) from exc
    finally:
        sock.close()


@contextlib.contextmanager
def _docker_errors(base_url: str | None) -> Iterator[None]:
    """A daemon gone, or a request it refused that nothing above handles, as one line instead of a traceback.

    Refusals come from what others do beside us: a volume mounted by someone's container (409 "in use"), a
    container removed by hand mid-operation (404), an image untagged between its look-up and the create.
    """
    try:
        yield
    except requests.ConnectionError as exc:
        raise _not_running(base_url, exc) from exc
    except docker.errors.APIError as exc:
        raise EngineUnavailable(f"Docker refused: {first_line(exc)}", status=exc.status_code) from exc


def _not_running(base_url: str | None, exc: BaseException) -> EngineUnavailable:
    where = base_url or "$DOCKER_HOST or the default socket"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EngineUnavailable(
        f"Docker is not running or not reachable at {where} ({reason}); "
        "start it (sudo systemctl start docker) or use --engine local",
        base_url=base_url,
    )


def _free_port() -> int:
    """A port of HOST that no process holds now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _host_port(container: Container) -> int:
    bindings = (container.attrs.get("NetworkSettings", {}).get("Ports") or {}).get("5432/tcp") or []
    for binding in bindings:
        if binding.get("HostIp") in (HOST, "0.0.0.0", "") and binding.get("HostPort"):
            return int(binding["HostPort"])
    raise EngineStateError(f"container {container.name} publishes no port for 5432; run `refresher down`")


def _removed(container: Container) -> bool:
    """Whether ``container`` is gone or being removed (an exited one is not: its log tail says why)."""
    try:
        container.reload()
    except docker.errors.NotFound:
        return True
    return bool(container.status in ("removing", "dead"))


def _image_name(container: Container) -> str:
    return str(container.attrs.get("Config", {}).get("Image") or container.image.id)


def _volume_path(container: Container) -> str:
    """Where the data volume lives on the Docker host (its mountpoint), for a disk-full message."""
    for mount in container.attrs.get("Mounts") or []:
        if mount.get("Destination") == PGDATA:
            return str(mount.get("Source") or mount.get("Name") or "?")
    return "?"


def _log_tail(container: Container) -> str:
    try:
        raw = container.logs(tail=LOG_TAIL_LINES)
    except docker.errors.APIError as exc:
        return f"(no log: {exc})"
    return raw.decode("utf-8", errors="replace").rstrip() if isinstance(raw, bytes) else str(raw)


__all__ = [
    "DockerEngine",
    "docker_available",
    "docker_refusal",
    "remove_abandoned",
    "state_scope",
    "statuses_everywhere",
]
