"""Fixtures for a real Docker engine; skip without one unless REFRESHER_REQUIRE_DOCKER=1.

Everything the tests make is namespaced by a per-session prefix (container and volume names, and the
``io.refresher.prefix`` label), so a developer's own ``refresher-<profile>`` containers are never touched,
and everything carrying the prefix is removed at the end of the session, whatever the tests left behind.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from refresher.engines.base import ServerInfo
from refresher.engines.docker import PREFIX_LABEL, DockerEngine, docker_available
from refresher.errors import EngineUnavailable
from refresher.settings import Settings


def _unavailable(reason: str) -> None:
    """Skip, or fail where the environment demands Docker (CI sets REFRESHER_REQUIRE_DOCKER=1)."""
    if Settings.from_env().require_docker:
        pytest.fail(f"REFRESHER_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the Docker daemon the SDK finds through DOCKER_HOST (or the default socket).

    Every container removed through it must take its anonymous volumes along (``v=True``): the image declares
    ``VOLUME`` for its data dir, so a container made without a named volume there gets an anonymous one, which a
    removal without ``v`` leaves on the daemon forever. Such removals are recorded, their volumes removed, and
    the session ends in an error naming the containers.
    """
    if not docker_available():
        _unavailable("no Docker engine answers (start dockerd)")
    client = docker.from_env(timeout=120)
    leaked = _record_leaked_volumes(client)
    try:
        yield client
        if leaked:
            for volume in leaked.values():
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    client.volumes.get(volume).remove(force=True)
            pytest.fail(
                "containers removed without v=True left their anonymous volumes (removed now): "
                + ", ".join(sorted(leaked)),
                pytrace=False,
            )
    finally:
        client.close()


def _record_leaked_volumes(client: docker.DockerClient) -> dict[str, str]:
    """Wrap ``client``'s container removal: a removal without ``v`` of a container holding an anonymous volume
    is recorded as {container name: volume name}, which the caller reports (this client only, not others')."""
    leaked: dict[str, str] = {}
    remove = client.api.remove_container

    def checked(container: str, v: bool = False, link: bool = False, force: bool = False) -> None:
        if not v:
            with contextlib.suppress(docker.errors.NotFound):
                attrs = client.api.inspect_container(container)
                for mount in attrs.get("Mounts") or []:
                    if mount.get("Type") == "volume" and _anonymous(mount.get("Name") or ""):
                        leaked[str(attrs.get("Name", container)).lstrip("/")] = mount["Name"]
        remove(container, v=v, link=link, force=force)

    client.api.remove_container = checked  # type: ignore[method-assign]
    return leaked


def _anonymous(volume: str) -> bool:
    """Whether a volume name is one Docker made up (64 hex digits), not one somebody chose."""
    return len(volume) == 64 and all(c in "0123456789abcdef" for c in volume)


@pytest.fixture(scope="session")
def docker_pg_image(docker_client: docker.DockerClient, docker_state_dir: Path) -> str:
    """The PostgreSQL image the engine would run here: $REFRESHER_PG_IMAGE, postgres:15 or the `make image` build."""
    try:
        engine = DockerEngine(
            docker_state_dir, image=Settings.from_env().pg_image_override, client=docker_client
        )
        return engine.resolved_image()
    except EngineUnavailable as exc:
        _unavailable(str(exc))
        raise  # unreachable: _unavailable always raises


@pytest.fixture(scope="session")
def docker_prefix(docker_client: docker.DockerClient) -> Iterator[str]:
    """A name prefix unique to this session; all containers and volumes under it are removed at the end."""
    prefix = f"rtest{secrets.token_hex(3)}"
    try:
        yield prefix
    finally:
        remove_prefixed(docker_client, prefix)


@pytest.fixture(scope="session")
def docker_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docker-state")


@pytest.fixture(scope="session")
def docker_engine(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, docker_state_dir: Path
) -> DockerEngine:
    """A DockerEngine over a session state dir; its containers and volumes go when the session ends."""
    return DockerEngine(docker_state_dir, image=docker_pg_image, client=docker_client, prefix=docker_prefix)


@pytest.fixture(scope="session")
def docker_server(docker_engine: DockerEngine) -> ServerInfo:
    """One running container shared by the tests that only read from it (profile ``shared``)."""
    return docker_engine.start("shared")


def labels_of_a_dead_process() -> dict[str, str]:
    """Owner labels naming a process of this host that has exited: what a killed test run leaves on its servers."""
    from refresher.engines import owner_labels

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        return owner_labels(child.pid)
    finally:
        child.kill()
        child.wait()


@contextlib.contextmanager
def holding_dockers_next_ports(
    client: docker.DockerClient, image: str, prefix: str, count: int = 200
) -> Iterator[range]:
    """Listen on the ports of 127.0.0.1 Docker publishes its next containers on: it hands them out in turn
    without asking the kernel, so these are what a process that took them would leave it. Yields the ports.

    A start whose pick is held tries Docker's next 9 picks before it fails (libnetwork's 10 attempts: a probe
    inside another window moved 10 ports on), so each container started meanwhile on the daemon (other tests',
    other checkouts') takes up to 10 of these: with 20, two other starts left compose's picks free (a test of
    `make up` failed so under load). A test that needs its pick held sees that by the ports it got (the range
    yielded). The probe learns Docker's last pick even when that pick is held already (another test's window):
    its failed start names the port."""
    probe = client.containers.create(
        image, entrypoint=["sleep", "60"], ports={"5432/tcp": ("127.0.0.1", None)},
        labels={PREFIX_LABEL: prefix},
    )  # fmt: skip
    try:
        try:
            probe.start()
            probe.reload()
            last = int(probe.attrs["NetworkSettings"]["Ports"]["5432/tcp"][0]["HostPort"])
        except docker.errors.APIError as exc:  # "listen tcp4 127.0.0.1:<port>: bind: address already in use"
            held = re.search(r"127\.0\.0\.1:(\d+)\b.*already in use", str(exc))
            if held is None:
                raise
            last = int(held.group(1))
    finally:
        probe.remove(force=True, v=True)
    ports = range(last + 1, last + 1 + count)
    with contextlib.ExitStack() as held_here:
        for port in ports:
            sock = held_here.enter_context(socket.socket())
            with contextlib.suppress(OSError):  # held already: by what we simulate
                sock.bind(("127.0.0.1", port))
                sock.listen()
        yield ports


def remove_prefixed(client: docker.DockerClient, prefix: str) -> None:
    """Remove every container and volume labelled with ``prefix``."""
    label = {"label": f"{PREFIX_LABEL}={prefix}"}
    for container in client.containers.list(all=True, filters=label):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)
    for volume in client.volumes.list(filters=label):
        with contextlib.suppress(docker.errors.NotFound):
            volume.remove(force=True)
