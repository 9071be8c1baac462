"""Engines start servers; this module picks one, and is the one door to them for the CLI and the pytest plugin.

``auto`` prefers a server that already runs for the profile (whichever engine started it), then Docker when a
daemon answers, then the embedded local engine, which needs nothing but the pip-installed binaries, unless
``Settings.require_docker`` forbids that fallback (CI sets it).
"""

from __future__ import annotations

from collections.abc import Mapping

from refresher.engines._common import (
    locked,
    noted_cluster,
    noted_servers,
    sweep_private_tmps,
    try_locked,
    validate_profile,
    waited_for,
    write_private_json,
)
from refresher.engines._owner import owner_gone, owner_labels
from refresher.engines.base import Engine, ServerInfo, ServerStatus
from refresher.errors import EngineUnavailable
from refresher.settings import ENGINE_NAMES as ENGINE_NAMES
from refresher.settings import Settings


def make_engine(name: str, settings: Settings, *, labels: Mapping[str, str] | None = None) -> Engine:
    """The engine called ``name`` (not ``auto``), configured from settings.

    ``labels`` mark what the engine creates where it can carry labels (Docker containers and volumes): the
    pytest plugin marks its throwaway servers with ``owner_labels`` so ``sweep_abandoned`` can find them.
    """
    if name == "local":
        from refresher.engines.local import TEMPLATES, LocalEngine

        templates = settings.cache_dir / TEMPLATES if settings.cache_dir is not None else None
        return LocalEngine(settings.state_dir, template_dir=templates)
    if name == "docker":
        from refresher.engines.docker import DockerEngine

        return DockerEngine(settings.state_dir, image=settings.pg_image_override, labels=labels)
    if name == "compose":
        from refresher.engines.compose import ComposeEngine

        return ComposeEngine(settings.compose_project, state_dir=settings.state_dir)
    raise EngineUnavailable(f"--engine: unknown engine {name!r} (choose from {', '.join(ENGINE_NAMES)})")


def docker_answers() -> bool:
    from refresher.engines.docker import docker_available

    return docker_available()


def select_engine(
    name: str, settings: Settings, profile: str | None = None, *, labels: Mapping[str, str] | None = None
) -> Engine:
    """Resolve ``--engine``; ``auto`` keeps a profile on the engine that already serves it.

    The one place ``require_docker`` is decided: with it, ``auto`` never falls back to the local engine.
    """
    if name != "auto":
        return make_engine(name, settings, labels=labels)
    if profile is not None:
        owner = engine_serving(profile, settings)
        if owner is not None:
            return owner
    from refresher.engines.docker import docker_refusal

    refusal = docker_refusal()
    if refusal is None:
        return make_engine("docker", settings, labels=labels)
    if settings.require_docker:
        # The reason, not just "no daemon": a socket closed to this user needs the docker group, not a dockerd.
        raise EngineUnavailable(
            f"--engine auto: REFRESHER_REQUIRE_DOCKER is set and Docker cannot be used: {refusal} "
            "(or unset REFRESHER_REQUIRE_DOCKER to fall back to the local engine)",
            engine=name,
        )
    return make_engine("local", settings, labels=labels)


def engine_serving(profile: str, settings: Settings) -> Engine | None:
    """The engine that has state for ``profile`` in the state directory (running or not), or the compose
    Postgres of this checkout when it holds the profile's database."""
    for name in ("local", "docker"):
        if (settings.state_dir / name).exists():
            engine = make_engine(name, settings) if name == "local" or docker_answers() else None
            if engine is not None and engine.status(profile):
                return engine
    if docker_answers():
        compose = make_engine("compose", settings)
        if compose.status(profile):
            return compose
    return None


def all_statuses(settings: Settings, *, all_checkouts: bool = False) -> list[ServerStatus]:
    """Every server of this state dir (``all_checkouts``: plus every refresher container on the daemon)."""
    statuses = list(make_engine("local", settings).status())
    if docker_answers():
        if all_checkouts:
            from refresher.engines.docker import statuses_everywhere

            statuses += statuses_everywhere()
        else:
            statuses += make_engine("docker", settings).status()
        statuses += make_engine("compose", settings).status()
    return statuses


def interrupted_removals(settings: Settings) -> list[ServerStatus]:
    """Local clusters a ``down`` was interrupted removing, which ``all_statuses`` does not list: for ``down``."""
    from refresher.engines.local import LocalEngine

    engine = make_engine("local", settings)
    return engine.interrupted_removals() if isinstance(engine, LocalEngine) else []


def sweep_abandoned(marker_label: str) -> list[str]:
    """Remove Docker containers and volumes marked ``marker_label`` whose owner process is gone."""
    if not docker_answers():
        return []
    from refresher.engines.docker import remove_abandoned

    return remove_abandoned(marker_label)


__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "ServerInfo",
    "ServerStatus",
    "all_statuses",
    "docker_answers",
    "engine_serving",
    "interrupted_removals",
    "locked",
    "make_engine",
    "noted_cluster",
    "noted_servers",
    "owner_gone",
    "owner_labels",
    "select_engine",
    "sweep_abandoned",
    "sweep_private_tmps",
    "try_locked",
    "validate_profile",
    "waited_for",
    "write_private_json",
]
