"""The Engine protocol: engines start and stop servers and hand out connection details, nothing more.

Loading, snapshots and resets work on any server through SQL (``refresher.snapshot``), so they never care
which engine runs it (the pytest-postgresql split of executor and janitor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable
from urllib.parse import quote

# The database every server has, which the pool's and snapshot's administration connects to.
MAINTENANCE_DB = "postgres"


@dataclass(frozen=True)
class ServerInfo:
    """Where a running server for one profile listens, and how to log in."""

    engine: str
    profile: str
    host: str
    port: int
    user: str
    password: str = field(repr=False)  # a repr ends up in logs and test failures
    dbname: str
    # A psql that reaches the server from this machine (the local engine's own installation's), or None. The
    # stamped no-op asks it its one question (``refresher.stamp``): a process costs less than importing psycopg.
    psql: str | None = None
    # The cluster's system identifier when the engine knows it without asking the server (the Docker engine's
    # note of its container's, ``pool.note_server``), else None: the pool asks (``pool._outcome_path``). Not
    # compared: it says nothing the address does not, it only spares a query.
    cluster: int | None = field(default=None, compare=False)

    def dsn(self, dbname: str | None = None, *, with_password: bool = True) -> str:
        secret = f":{quote(self.password, safe='')}" if with_password and self.password else ""
        return f"postgresql://{quote(self.user, safe='')}{secret}@{self.host}:{self.port}/{dbname or self.dbname}"


@dataclass(frozen=True)
class ServerStatus:
    """What ``refresher status`` shows for one profile's server."""

    engine: str
    profile: str
    running: bool
    host: str | None = None
    port: int | None = None
    detail: str = ""
    # Why a server under this profile's names is another checkout's, which this one leaves alone ("" if none).
    left_alone: str = ""


@runtime_checkable
class Engine(Protocol):
    """Starts, finds and stops one PostgreSQL server per profile."""

    name: str

    def start(
        self, profile: str, *, wait: bool = True, on_wait: Callable[[str], None] | None = None
    ) -> ServerInfo:
        """Start the profile's server, or return the running one. Idempotent; waits until it accepts queries.
        While another command starts or stops it: ``on_wait`` is told, then waits for it, or with ``wait`` False
        ``ProfileBusy`` at once."""
        ...

    def info(self, profile: str) -> ServerInfo | None:
        """The running server of ``profile``, or None when there is none. Never starts anything."""
        ...

    def is_new(self, profile: str) -> bool:
        """True when nothing of the profile's server exists yet (no cluster, no container or volume), so that
        ``start`` would make it from nothing, with an empty database. A cheap look that starts nothing; a hint,
        not a promise (another process may make the server meanwhile): a refresh plans and fetches during the
        start on its strength, then checks the real database (``refresher.refresh``). False when unsure."""
        ...

    def stop(self, profile: str, *, on_wait: Callable[[str], None] | None = None) -> bool:
        """Stop the server and remove everything it owns (data, container, volume). True if one existed. While
        another command starts or stops it, ``on_wait`` is told before the wait."""
        ...

    def status(self, profile: str | None = None) -> list[ServerStatus]:
        """Every server this engine knows of (after a CLI restart too), or only ``profile``'s."""
        ...
