"""Engines start servers; this module picks one.

``auto`` prefers a server that already runs for the profile (whichever engine started it), then Docker when a
daemon answers, then the embedded local engine, which needs nothing but the pip-installed binaries.
"""

from __future__ import annotations

from refresher.engines.base import Engine, ServerInfo, ServerStatus
from refresher.errors import EngineUnavailable
from refresher.settings import Settings

ENGINE_NAMES = ("auto", "local", "docker", "compose")


def make_engine(name: str, settings: Settings) -> Engine:
    """The engine called ``name`` (not ``auto``), configured from settings."""
    if name == "local":
        from refresher.engines.local import LocalEngine

        return LocalEngine(settings.state_dir)
    if name == "docker":
        from refresher.engines.docker import DockerEngine

        return DockerEngine(settings.state_dir, image=settings.pg_image_override)
    if name == "compose":
        from refresher.engines.compose import ComposeEngine

        return ComposeEngine(settings.compose_project)
    raise EngineUnavailable(f"--engine: unknown engine {name!r} (choose from {', '.join(ENGINE_NAMES)})")


def docker_answers() -> bool:
    from refresher.engines.docker import docker_available

    return docker_available()


def select_engine(name: str, settings: Settings, profile: str | None = None) -> Engine:
    """Resolve ``--engine``; ``auto`` keeps a profile on the engine that already serves it."""
    if name != "auto":
        return make_engine(name, settings)
    if profile is not None:
        owner = engine_serving(profile, settings)
        if owner is not None:
            return owner
    return make_engine("docker" if docker_answers() else "local", settings)


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


def all_statuses(settings: Settings) -> list[ServerStatus]:
    """Every server every engine knows of; an engine that cannot answer contributes nothing."""
    statuses = list(make_engine("local", settings).status())
    if docker_answers():
        statuses += make_engine("docker", settings).status()
        statuses += make_engine("compose", settings).status()
    return statuses


__all__ = [
    "ENGINE_NAMES",
    "Engine",
    "ServerInfo",
    "ServerStatus",
    "all_statuses",
    "docker_answers",
    "engine_serving",
    "make_engine",
    "select_engine",
]
