"""A run's target DSN matched to this machine's server of the profile (``served_here``) as libpq resolves it, and a
session to it through ``connect_target`` carrying the target's options. A real embedded Postgres (the session's
local server, its database the profile's); only libpq's environment variables are set."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from refresher.dsn import served_here
from refresher.engines.base import ServerInfo
from refresher.settings import Settings
from refresher.snapshot import connect_target
from tests.fixtures_postgres import PYTEST_PROFILE, throwaway_postgres

pytestmark = [pytest.mark.postgres]

# What libpq reads for what a DSN leaves out: unset, but for what a test sets.
_LIBPQ_ENV = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGDATABASE",
    "PGUSER",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGAPPNAME",
)


@pytest.fixture
def settings(
    local_state_dir: Path, pg_server: ServerInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The settings whose local engine serves ``pg_server`` as profile PYTEST_PROFILE, libpq's environment clear."""
    for name in _LIBPQ_ENV:
        monkeypatch.delenv(name, raising=False)
    return Settings(
        state_dir=local_state_dir, store_root=tmp_path / "store", profiles_dirs=(), engine="local"
    )


def _here(settings: Settings, target: str) -> bool:
    return served_here(settings, PYTEST_PROFILE, target) is not None


def test_a_target_without_a_port_is_served_here_on_pgports_port(
    settings: Settings, pg_server: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DSN without a port was compared as 5432, PGPORT ignored: a run against this machine's own server (the
    port libpq connects it on) waited 30 s at a door a killed reset left shut, then failed."""
    target = f"postgresql://{pg_server.user}@127.0.0.1/{pg_server.dbname}"
    assert not _here(settings, target)  # libpq's 5432
    monkeypatch.setenv("PGPORT", str(pg_server.port + 1))
    assert not _here(settings, target)
    monkeypatch.setenv("PGPORT", str(pg_server.port))
    assert _here(settings, target)  # before: not here


def test_libpqs_defaults_for_host_and_database_are_read_as_it_reads_them(
    settings: Settings, pg_server: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PGHOST and PGDATABASE fill in what a DSN leaves out, an empty database is the user's name, as libpq
    connects them; a host's name resolves (``localhost``); a host list is here only when every host is."""
    port, db = pg_server.port, pg_server.dbname
    monkeypatch.setenv("PGPORT", str(port))
    assert not _here(settings, f"dbname={db}")  # libpq's socket directory: no server of ours listens there
    monkeypatch.setenv("PGHOST", "localhost")
    assert _here(settings, f"dbname={db}")  # before: no host is no host
    assert not _here(settings, "dbname=postgres")
    assert not _here(settings, "")  # the database is the login name's
    assert _here(settings, f"user={db}")  # ... here the profile's
    monkeypatch.setenv("PGDATABASE", db)
    assert _here(settings, "")
    assert _here(settings, f"host=127.0.0.1,localhost port={port},{port}")
    assert not _here(settings, f"host=127.0.0.1,192.0.2.1 port={port}")  # the session may go to the other
    assert not _here(settings, f"service=elsewhere dbname={db}")  # its file's values come first: not read


def test_a_socket_directory_is_not_this_servers(settings: Settings, pg_server: ServerInfo) -> None:
    """The local engine's server listens on loopback TCP only: a DSN naming a socket directory (the usual ones,
    on the server's port) reaches another server or none, never ours, which no engine exposes a socket of."""
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        assert conn.execute("SHOW unix_socket_directories").fetchone() == ("",)
    for directory in ("/tmp", "/var/run/postgresql", "/tmp/"):
        target = f"host={directory} port={pg_server.port} dbname={pg_server.dbname} user={pg_server.user}"
        assert not _here(settings, target)


def _session(conn: psycopg.Connection[Any]) -> tuple[str, str, str]:
    """The session's search_path and application_name, and the name pg_stat_activity shows it under."""
    row = conn.execute(
        "SELECT current_setting('search_path'), current_setting('application_name'), application_name"
        " FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1]), str(row[2])


@pytest.mark.parametrize("role", ["the server's", "none"])
def test_a_session_to_our_server_as_its_role_keeps_the_targets_options(
    settings: Settings, pg_server: ServerInfo, role: str
) -> None:
    """A target naming the server's own role (or none) was connected as the server's DSN alone: its options
    (``options=-c ...``, application_name, sslmode...) were dropped. They are kept; where and as whom, the
    server's own (a target without a port still reaches it)."""
    user = f"user={pg_server.user} " if role == "the server's" else ""
    target = (
        f"host=127.0.0.1 port={pg_server.port} dbname={pg_server.dbname} {user}"
        "application_name=x options='-c search_path=mine,public'"
    )
    server = served_here(settings, PYTEST_PROFILE, target)
    assert server is not None
    with connect_target(server, target, autocommit=True) as conn:
        assert _session(conn) == ("mine,public", "x", "x")  # before: ('"$user", public', '', '')
    portless = f"dbname={pg_server.dbname} {user}application_name=y"
    with connect_target(server, portless, autocommit=True) as conn:
        assert _session(conn)[1:] == ("y", "y")
    with pytest.raises(psycopg.OperationalError, match="SSL"):  # the server has no SSL: sslmode asked for it
        connect_target(server, f"{target} sslmode=require", autocommit=True)


def test_a_door_a_killed_reset_left_shut_opens_for_a_target_on_pgports_port(
    settings: Settings, pg_server: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run's way in: a target without a port, PGPORT this server's, is this server, so a door a killed reset
    left shut (no TAKE held) is opened, where it was a foreign door waited for 30 s, then a failure."""
    monkeypatch.setenv("PGPORT", str(pg_server.port))
    target = f"postgresql://{pg_server.user}@localhost/{pg_server.dbname}?application_name=door"
    door = sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}")
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(door.format(sql.Identifier(pg_server.dbname), sql.SQL("false")))
        try:
            with connect_target(
                served_here(settings, PYTEST_PROFILE, target), target, autocommit=True
            ) as conn:
                assert _session(conn)[1:] == ("door", "door")
        finally:
            admin.execute(door.format(sql.Identifier(pg_server.dbname), sql.SQL("true")))


@pytest.fixture
def alice(pg_server: ServerInfo) -> Iterator[tuple[str, str]]:
    """A login role other than the server's, allowed into the profile's database: (its name, its password)."""
    role, password = f"alice_{secrets.token_hex(4)}", secrets.token_hex(8)
    with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
        )
        admin.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(pg_server.dbname), sql.Identifier(role)
            )
        )
    try:
        yield role, password
    finally:
        with psycopg.connect(pg_server.dsn("postgres"), autocommit=True) as admin:
            admin.execute(
                sql.SQL("REVOKE CONNECT ON DATABASE {} FROM {}").format(
                    sql.Identifier(pg_server.dbname), sql.Identifier(role)
                )
            )
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_target_naming_no_role_connects_as_pgusers(
    settings: Settings, pg_server: ServerInfo, alice: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A target naming no user, PGUSER another role than the server's: the session was the server's owner role
    (its rights, not the restricted role's libpq connects as); it is PGUSER's, its password libpq's (PGPASSWORD).
    libpq's own fall-back, the login name, names nobody: without PGUSER, or with the server's, the server's role."""
    role, password = alice
    target = f"host=127.0.0.1 port={pg_server.port} dbname={pg_server.dbname} application_name=mine"
    server = served_here(settings, PYTEST_PROFILE, target)
    assert server is not None

    def whom() -> tuple[str, str]:
        with connect_target(server, target, autocommit=True) as conn:
            row = conn.execute("SELECT current_user, current_setting('application_name')").fetchone()
            assert row is not None
            return str(row[0]), str(row[1])

    assert whom() == (pg_server.user, "mine")  # no PGUSER: the server's role, its credentials
    monkeypatch.setenv("PGUSER", pg_server.user)
    assert whom() == (pg_server.user, "mine")
    monkeypatch.setenv("PGUSER", role)
    monkeypatch.setenv("PGPASSWORD", password)
    assert whom() == (role, "mine")  # before: the server's role
    monkeypatch.setenv("PGPASSWORD", "not-" + password)  # its password is libpq's, never the server's
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        whom()


def test_another_server_on_the_ipv6_loopback_and_our_port_is_not_ours(
    settings: Settings, pg_server: ServerInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our engines' servers listen on 127.0.0.1 alone (the local one's LISTEN, Docker's and compose's published
    ports). ::1 counted as 127.0.0.1: a real server of no engine's on [::1] and our port, where a target naming
    hostaddr ::1 (or ``localhost``, resolved to ::1 first as /etc/hosts often has it) connects, was taken for
    ours (a session as the server's role sent to ours instead; another role's to it, a refusal there opening our
    door, ours saved as pristine after loads that went to it). ::1 now counts only while nothing accepts there,
    so that psycopg goes on to 127.0.0.1."""
    resolve = socket.getaddrinfo

    def both(host: Any, *args: Any, **kwargs: Any) -> Any:  # ::1 first, then 127.0.0.1
        if host != "localhost":
            return resolve(host, *args, **kwargs)
        return [*resolve("::1", *args, **kwargs), *resolve("127.0.0.1", *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    port, db, user = pg_server.port, pg_server.dbname, pg_server.user
    named = [f"{where} port={port} dbname={db} user={user}" for where in ("hostaddr=::1", "host=::1")]
    first = [
        f"postgresql://{user}@localhost:{port}/{db}",
        f"host=::1,127.0.0.1 port={port} dbname={db} user={user}",
        f"hostaddr=::1,::ffff:127.0.0.1 port={port} dbname={db} user={user}",
    ]
    assert [_here(settings, target) for target in first] == [True] * 3  # nothing on [::1]: on to ours
    assert [_here(settings, target) for target in named] == [False] * 2  # fails there (before: ours, not)
    with throwaway_postgres(port, "::1"):
        with psycopg.connect(f"postgresql://postgres@localhost:{port}/postgres") as other:
            assert other.execute("SELECT host(inet_server_addr())").fetchone() == ("::1",)
        assert [_here(settings, target) for target in first] == [False] * 3  # before: True, False, True
        assert [_here(settings, target) for target in named] == [False] * 2
        assert _here(settings, f"host=127.0.0.1 port={port} dbname={db} user={user}")
    assert _here(settings, first[0])
