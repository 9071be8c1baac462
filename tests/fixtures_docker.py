"""Fixtures for a real Docker engine; skip without one unless REFRESHER_REQUIRE_DOCKER=1.

Everything the tests make is namespaced by a per-session prefix (container and volume names, and the
``io.refresher.prefix`` label), so a developer's own ``refresher-<profile>`` containers are never touched,
and everything carrying the prefix is removed at the end of the session, whatever the tests left behind.
"""

from __future__ import annotations

import contextlib
import secrets
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
    """A client of the Docker daemon the SDK finds through DOCKER_HOST (or the default socket)."""
    if not docker_available():
        _unavailable("no Docker engine answers (start dockerd)")
    client = docker.from_env(timeout=120)
    try:
        yield client
    finally:
        client.close()


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


def remove_prefixed(client: docker.DockerClient, prefix: str) -> None:
    """Remove every container and volume labelled with ``prefix``."""
    label = {"label": f"{PREFIX_LABEL}={prefix}"}
    for container in client.containers.list(all=True, filters=label):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True, v=True)
    for volume in client.volumes.list(filters=label):
        with contextlib.suppress(docker.errors.NotFound):
            volume.remove(force=True)
