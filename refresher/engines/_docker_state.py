"""What the Docker engine remembers about a profile's container, and which image it runs.

The container and its volume live in Docker; the one thing Docker cannot give back safely is the password the
volume was initialised with (it is in the container's environment, but the container may be gone while the
volume stays). So ``<state_dir>/docker/<profile>.json`` keeps it, mode 0600, written atomically.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import docker
import docker.errors
import requests

from refresher.engines._common import create_private_json, known_fields, write_private_json
from refresher.errors import EngineStateError, EngineUnavailable

# Tried in order when no image is asked for: the official image when someone could pull it, then the
# look-alike `make image` builds from Debian packages for machines without a registry.
DEFAULT_IMAGES = ("postgres:15", "refresher/postgres:15")
# Not ``*.json``: those are the profiles' state files.
CHECKOUT_ID_FILE = "checkout-id"


@dataclass(frozen=True)
class ContainerState:
    """What ``<profile>.json`` records: enough to recreate the container over a kept volume."""

    container: str
    volume: str
    image: str
    user: str
    password: str = field(repr=False)  # a repr ends up in logs and test failures
    port: int = 0

    @classmethod
    def read(cls, path: Path) -> ContainerState | None:
        """The state at ``path``, None when there is none; a field a newer refresher added is left out."""
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
            return cls(**known_fields(cls, recorded, path=path, what="Docker engine state"))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, AttributeError) as exc:
            raise EngineStateError(
                f"{path}: unreadable Docker engine state ({exc}); run `refresher down --profile {path.stem}`",
                path=str(path),
            ) from exc

    def write(self, path: Path) -> None:
        """Atomically, and never readable by others: the file holds the database password."""
        write_private_json(path, asdict(self))


def checkout_id(base: Path, *, create: bool) -> str | None:
    """This state dir's own random name, kept in ``<base>/checkout-id``; None when it has none and not ``create``.

    Container and volume names come from the state dir's path, which another checkout shares when it sits at
    the same path on another machine or container using this Docker daemon (dev containers mounting
    /workspaces/<repo>): the id, written on everything made, tells the two apart. Made once and never replaced:
    two first starts at once keep whichever was linked into place first.

    Read once per file: the cache is keyed by the file's identity (device, inode, modification time), so a
    state dir removed and made anew (`make clean`) is read again, and a removed one answers None.
    """
    path = base / CHECKOUT_ID_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        _CHECKOUT_IDS.pop(path, None)
        if not create:
            return None
        create_private_json(path, {"checkout": secrets.token_hex(8)})
        stat = path.stat()
    identity = (stat.st_dev, stat.st_ino, stat.st_mtime_ns)
    cached = _CHECKOUT_IDS.get(path)
    if cached is not None and cached[0] == identity:
        return cached[1]
    try:
        checkout = str(json.loads(path.read_text(encoding="utf-8"))["checkout"])
    except (ValueError, TypeError, KeyError) as exc:
        raise EngineStateError(
            f"{path}: unreadable ({exc}); remove this state dir's containers and volumes by hand (`refresher "
            "status --all-checkouts` lists them), then the file",
            path=str(path),
        ) from exc
    _CHECKOUT_IDS[path] = (identity, checkout)
    return checkout


# checkout_id's cache: the file's path to its identity when read and the id it held.
_CHECKOUT_IDS: dict[Path, tuple[tuple[int, int, int], str]] = {}


def resolve_image(
    client: docker.DockerClient, requested: str | None, *, pull: bool = True, current: str | None = None
) -> str:
    """The image to run: ``requested`` or the first default present locally, else the first that pulls.

    ``current``, the default a container already runs, comes first among the defaults while it is here: a default
    tagged or removed since (postgres:15 pulled beside refresher/postgres:15) changes nothing for that container.
    Pulling is tried last and only once per candidate (never without ``pull``): on an air-gapped machine it fails
    within milliseconds (no DNS), and the error then points at `make image`.
    """
    candidates: tuple[str, ...] = (requested,) if requested else DEFAULT_IMAGES
    if not requested and current in DEFAULT_IMAGES:
        candidates = (current, *(name for name in DEFAULT_IMAGES if name != current))
    for name in candidates:
        try:
            client.images.get(name)
            return name
        except docker.errors.ImageNotFound:
            continue
    failures = []
    for name in candidates if pull else ():
        try:
            client.images.pull(name)
            return name
        except (docker.errors.APIError, requests.RequestException) as exc:
            failures.append(f"{name}: {first_line(exc)}")
    wanted = " or ".join(candidates)
    raise EngineUnavailable(
        f"no PostgreSQL image {wanted} locally and none could be pulled ({'; '.join(failures)}); "
        "run `make image` to build refresher/postgres:15 from Debian packages, or set $REFRESHER_PG_IMAGE "
        "to an image you have",
        images=list(candidates),
    )


def first_line(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


__all__ = [
    "CHECKOUT_ID_FILE",
    "DEFAULT_IMAGES",
    "ContainerState",
    "checkout_id",
    "first_line",
    "resolve_image",
]
