"""Configuration at the edge: environment variables and defaults are read here, and only here."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from refresher.errors import SettingError

# The official image's major version we pin; `make image` builds a look-alike under this tag for air gaps.
DEFAULT_PG_IMAGE = "postgres:15"
BUILTIN_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
STATE_DIR_NAME = ".refresher"
# The values of --engine / $REFRESHER_ENGINE; `refresher.engines` makes each (here so the CLI's parser names
# them without importing the engines, which import psycopg).
ENGINE_NAMES = ("auto", "local", "docker", "compose")
# The checkout this refresher runs from (an editable install): `make up` starts the compose project of it.
CHECKOUT = BUILTIN_PROFILES.parent
# Warm clones kept per loaded profile (refresher.pool): a reset renames one into place. Each is a full copy of
# the database on a filesystem without reflinks (ext4); 0 keeps none, and a reset then copies the pristine one.
DEFAULT_POOL_SIZE = 2
# Without a size from the user, the pool keeps none where the server's copies are full copies (no reflink) and a
# copy of the database is measured to take at most this many seconds (refresher.pool.default_pool_size): a reset
# promises less than a second, and the copy is measured at a busy moment (right after a refresh's loads).
FAST_COPY = 0.3
# Pool slots at and above 10,000 are private copies (refresher._snapshot_sql.PRIVATE_SLOTS); past the disk bound
# a bigger pool only makes a refill try copies that cannot fit.
MAX_POOL_SIZE = 100
POOL_SIZE_ENV = "REFRESHER_POOL_SIZE"
# `--pool-size auto`, $REFRESHER_POOL_SIZE=auto: the size refresher decides at each snapshot (the default's rule,
# refresher.pool.default_pool_size), a size the user chose before forgotten. Every pool, chosen or not, is bounded
# by the free disk at each refill (refresher.pool.pool_size_for_disk).
AUTO_POOL: Literal["auto"] = "auto"
PoolSize = int | Literal["auto"]
# How long `refresher worker` waits at its start for a Redis not up yet (`--connect-timeout`, this variable);
# 0 asks once. Every other command asks once: a human at a terminal wants an answer now.
CONNECT_TIMEOUT_ENV = "REFRESHER_WORKER_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 60.0
# The jobs' queue namespace for a queue URL that names none (`?namespace=`; refresher.jobs.namespace): two
# checkouts sharing one $REFRESHER_QUEUE each set their own here, and share no job.
QUEUE_NAMESPACE_ENV = "REFRESHER_QUEUE_NAMESPACE"


def compose_project(checkout: Path) -> str:
    """The compose project of a checkout, unique per path; the Makefile computes the same (sha256, 10 hex)."""
    digest = hashlib.sha256(str(checkout.resolve()).encode()).hexdigest()[:10]
    return f"refresher-{digest}"


def parse_pool_size(text: str) -> PoolSize:
    """A pool size as typed: a whole number from 0 to ``MAX_POOL_SIZE``, or ``auto`` (``AUTO_POOL``); ValueError
    saying what is wrong (the caller names the value: a variable, a flag or an option)."""
    value = text.strip()
    if value.lower() == AUTO_POOL:
        return AUTO_POOL
    if not value.isascii() or not value.isdigit() or int(value) > MAX_POOL_SIZE:
        raise ValueError(f"not a whole number from 0 to {MAX_POOL_SIZE}, nor {AUTO_POOL}")
    return int(value)


def parse_connect_timeout(text: str) -> float:
    """A worker's connect timeout as typed: seconds, 0 or more (0: ask Redis once); ValueError saying what is
    wrong (the caller names the value: the variable or the flag)."""
    try:
        seconds = float(text.strip())
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:  # nan too
        raise ValueError("not a number of seconds, 0 or more")
    return seconds


def pool_as_asked(asked: PoolSize | None, size: int, chosen: bool) -> bool:
    """Whether a pool recorded as ``size`` clones (``chosen``: by the user) is the one ``asked`` for: None asks
    for any; ``auto`` for one nobody chose (its size is the snapshot's rule's); a number for that size, chosen."""
    if asked is None:
        return True
    if asked == AUTO_POOL:
        return not chosen
    return (size, chosen) == (asked, True)


def find_state_dir(start: Path) -> Path:
    """The state directory for ``start``, found the way git finds ``.git``.

    Walk up from ``start``: the first directory holding ``.refresher`` wins; reaching a checkout's root (a
    directory holding ``.git``) first, its ``.refresher`` is the one, created later by whoever needs it; outside
    any checkout, ``start/.refresher``. One state dir per checkout means `refresher url` from ``tests/`` finds the
    server `refresh` started from the root, instead of reporting "no server" or starting a second one; and a
    ``~/.refresher`` never captures a checkout below it.
    """
    start = start.absolute()
    for directory in (start, *start.parents):
        if (directory / STATE_DIR_NAME).is_dir() or (directory / ".git").exists():
            return directory / STATE_DIR_NAME
    return start / STATE_DIR_NAME


def cache_directory(env: Mapping[str, str]) -> Path:
    """Where derived data that is safe to lose goes (compiled calendars, initdb templates, the outcome of a
    refill of a container's pool): ``$XDG_CACHE_HOME/refresher``, ``~/.cache/refresher`` without it."""
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "refresher"


@dataclass(frozen=True)
class Settings:
    """Where state, cache and profiles live, and which engine to use."""

    state_dir: Path
    store_root: Path
    profiles_dirs: tuple[Path, ...]
    engine: str = "auto"
    # None means "let the Docker engine resolve it": postgres:15 if present, else the `make image` build.
    pg_image_override: str | None = None
    require_docker: bool = False
    # Derived data that is safe to lose (compiled calendars): $XDG_CACHE_HOME/refresher.
    cache_dir: Path | None = None
    # `make up`'s project for --engine compose and the jobs' default Redis ($REFRESHER_COMPOSE_PROJECT).
    compose_project: str = ""
    # The jobs' queue ($REFRESHER_QUEUE); None: the compose Redis of this checkout when `make up` runs it.
    queue_url: str | None = None
    # Its namespace when the URL names none ($REFRESHER_QUEUE_NAMESPACE, as given; checked by the jobs commands).
    queue_namespace: str | None = None
    # Warm clones per loaded profile ($REFRESHER_POOL_SIZE, `refresh --pool-size`, which wins). None: for the CLI,
    # the size the server's pristine snapshot records as the user's (a size given once sticks), else the default
    # each snapshot decides (DEFAULT_POOL_SIZE, or 0 where a copy is fast and no reflink: FAST_COPY); for the
    # pytest plugin, one per xdist worker plus one (at least DEFAULT_POOL_SIZE). ``auto`` (AUTO_POOL): the default's
    # rule even where the user chose a size before (for the pytest plugin: as None).
    pool_size: PoolSize | None = None
    # $REFRESHER_WORKER_CONNECT_TIMEOUT as given (None: unset), read by `refresher worker` only
    # (``connect_timeout``): a value mistyped there is no other command's error.
    connect_timeout_text: str | None = None

    def connect_timeout(self, flag: float | None) -> float:
        """The seconds `refresher worker` waits for Redis at its start: its flag, else the variable, else
        DEFAULT_CONNECT_TIMEOUT; a bad variable is a SettingError (unless the flag, which wins, is given)."""
        if flag is not None:
            return flag
        if not (self.connect_timeout_text or "").strip():
            return DEFAULT_CONNECT_TIMEOUT
        text = self.connect_timeout_text or ""
        try:
            return parse_connect_timeout(text)
        except ValueError as exc:
            raise SettingError(CONNECT_TIMEOUT_ENV, text, str(exc)) from None

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        on_bad_pool_size: Callable[[SettingError], None] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Settings from ``env`` (default: the process environment), then ``overrides`` (None: not given).

        A bad $REFRESHER_POOL_SIZE raises SettingError, unless ``on_bad_pool_size`` is given: it is then handed
        the error and the pool size is left unset (a command that never uses it, such as `refresher down`,
        warns and goes on: a mistyped variable must not keep a user from tearing down).
        """
        env = os.environ if env is None else env
        profiles: list[Path] = []
        if env.get("REFRESHER_PROFILES"):
            profiles += [Path(p) for p in env["REFRESHER_PROFILES"].split(os.pathsep) if p]
        profiles.append(BUILTIN_PROFILES)
        store = env.get("FEATURE_STORE_PATH") or str(Path.home() / ".feature_cache")
        settings = cls(
            state_dir=(
                Path(env["REFRESHER_STATE_DIR"]).expanduser().absolute()
                if env.get("REFRESHER_STATE_DIR")
                else find_state_dir(Path.cwd())
            ),
            store_root=Path(store).expanduser().absolute(),
            profiles_dirs=tuple(profiles),
            engine=env.get("REFRESHER_ENGINE") or "auto",
            pg_image_override=env.get("REFRESHER_PG_IMAGE") or None,
            require_docker=env.get("REFRESHER_REQUIRE_DOCKER", "") not in ("", "0", "false"),
            cache_dir=cache_directory(env),
            compose_project=env.get("REFRESHER_COMPOSE_PROJECT") or compose_project(CHECKOUT),
            queue_url=env.get("REFRESHER_QUEUE") or None,
            queue_namespace=env.get(QUEUE_NAMESPACE_ENV) or None,
            connect_timeout_text=env.get(CONNECT_TIMEOUT_ENV),
            # An override (the CLI flag) wins, and then a bad variable is not an error: it is not used.
            pool_size=None
            if overrides.get("pool_size") is not None
            else _pool_size_from(env, on_bad_pool_size),
        )
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})


def _pool_size_from(env: Mapping[str, str], on_bad: Callable[[SettingError], None] | None) -> PoolSize | None:
    text = env.get(POOL_SIZE_ENV) or ""
    if not text.strip():
        return None
    try:
        return parse_pool_size(text)
    except ValueError as exc:
        error = SettingError(POOL_SIZE_ENV, text, str(exc))
    if on_bad is None:
        raise error
    on_bad(error)
    return None
