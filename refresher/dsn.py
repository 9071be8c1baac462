"""A PostgreSQL connection string as refresher reads one: parsed by libpq's rules, refused without being shown.

A URL's password with an ``@`` that is not %-escaped (``postgresql://u:p@ss@db/x``) is cut by libpq at the first
``@``: the rest of the password becomes the host (``ss@db``), or the port (``u:p@a:b@db``), and from there it
reached messages ("could not translate host name"), Redis (a job's target) and the worker's lines. No host or
port holds an ``@``, so one is refused here, before anything connects or prints.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pwd
import socket
from collections.abc import Mapping, Sequence
from contextlib import suppress

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_attempts, conninfo_to_dict, make_conninfo

from refresher.engines import select_engine
from refresher.engines.base import ServerInfo
from refresher.errors import RefresherError
from refresher.settings import Settings

# Said instead of the connection string, which may hold a password.
_NOT_SHOWN = "not shown, it may hold a password"


def parse_dsn(dsn: str, field: str, error: type[RefresherError]) -> dict[str, str]:
    """libpq's parameters of ``dsn`` (a key=value string or a URL); ``error`` naming ``field`` if it is not one,
    or if a password's unescaped ``@`` spilled into its host or port. The message never shows any of ``dsn``."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        # libpq quotes the text it could not parse, which may be a piece of the password ('missing "="
        # after "123"' for password=abc 123)
        raise error(
            f"{field}: not a PostgreSQL connection string (key=value pairs, a value with spaces in single quotes, "
            f"or a postgresql:// URL with special characters %-escaped); {_NOT_SHOWN}",
            field=field,
        ) from None
    for key in ("host", "port"):
        if "@" in str(params.get(key) or ""):
            raise error(
                f"{field}: its {key} holds an '@', the rest of a password cut at its first '@': %-escape special "
                f"characters in the password (@ is %40, : is %3A, / is %2F); {_NOT_SHOWN}",
                field=field,
            )
    return {k: str(v) for k, v in params.items() if v is not None}


def without_password(dsn: str, field: str, error: type[RefresherError]) -> str:
    """``dsn`` as it may travel and be shown (Redis, status, messages): checked by ``parse_dsn``, no password."""
    params = parse_dsn(dsn, field, error)
    params.pop("password", None)
    return make_conninfo("", **params)


# The parameters that say which server and database a DSN reaches, and as whom (the user names an empty dbname).
_WHERE = ("host", "hostaddr", "port", "dbname", "user")


def _login_name() -> str | None:
    """libpq's last resort for the user (``pg_fe_getauthname``: this process's effective user's name), None when
    the system has no name for it (libpq has no user then either)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return None


def libpq_params(
    named: Mapping[str, object],
    *,
    login_name: bool = True,
    defaults: Sequence[pq.ConninfoOption] | None = None,
) -> dict[str, str]:
    """``_WHERE`` of a DSN (``named``: its ``conninfo_to_dict``) as libpq connects it: its own, else libpq's defaults
    (``PQconndefaults``: a PGSERVICE file's, then PGHOST, PGHOSTADDR, PGPORT, PGDATABASE, PGUSER, then built in:
    port 5432, the login name as user), read now from this process's environment. ``login_name=False``: no user
    when libpq's would be its fall-back, the login name, so the user left is one somebody named (the DSN, PGUSER,
    a PGSERVICE file's user other than the login name: libpq says no source, so one naming it counts as none).
    ``defaults``: ``PQconndefaults`` already read by the caller (it reads a PGSERVICE file each time)."""
    found = {
        option.keyword.decode(): option.val.decode()
        for option in (pq.Conninfo.get_defaults() if defaults is None else defaults)
        if option.val is not None and option.keyword.decode() in _WHERE
    }
    if not login_name and not os.environ.get("PGUSER") and found.get("user") in ("", _login_name()):
        found.pop("user", None)
    return {**found, **{key: str(named[key]) for key in _WHERE if named.get(key) is not None}}


# Seconds a look at a loopback address waits for its TCP handshake (``_passed_over``): one that took longer is
# counted as a server there.
_PROBE_TIMEOUT = 1.0
# What a connection to an address this machine cannot use fails with: libpq goes on to the next as from a refusal.
_UNUSABLE = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.ENETUNREACH})


def _endpoints(params: Mapping[str, str], default_port: str) -> list[tuple[str, str]]:
    """Where psycopg connects for ``params``, one (address, port) per attempt in the order it tries them
    (``conninfo_attempts``: each entry of a host list, each address a name resolves to): an IP address (a host's,
    a hostaddr, a name's; an IPv4-mapped one as its IPv4), a socket directory by its normalised path, "" for none
    (libpq's compiled-in socket directory); an empty port ``default_port`` (libpq's compiled-in one: an empty port
    is not PGPORT's)."""
    found = []
    for attempt in conninfo_attempts(params):
        port = str(attempt.get("port") or default_port)
        host = str(attempt.get("host") or "")
        # An IPv6 host is left as it is (psycopg takes "::1" for a Windows drive, "C:"); libpq reads it as hostaddr.
        if address := str(attempt.get("hostaddr") or "") or (host if _ip(host) else ""):
            ip = ipaddress.ip_address(address)
            found.append((str(getattr(ip, "ipv4_mapped", None) or ip), port))
        else:
            found.append((os.path.normpath(host) if host.startswith("/") else host, port))
    return found


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``address`` as an IP address; None for a socket directory or a host name."""
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None


def _passed_over(address: str, port: str) -> bool:
    """Whether a connection to ``address`` (an IP address of this machine's loopback) on ``port`` is refused now:
    libpq then tries the next address (``localhost``: ::1, then 127.0.0.1). One that accepts is another server
    than ours, which listen on 127.0.0.1 only."""
    try:
        with socket.create_connection((address, int(port)), timeout=_PROBE_TIMEOUT):
            return False
    except ConnectionRefusedError:
        return True
    except OSError as exc:
        return exc.errno in _UNUSABLE


def served_here(settings: Settings, profile: str, target: str) -> ServerInfo | None:
    """The profile's own server when this machine serves it and ``target`` (a DSN, its password or not) names its
    database: the same address, port and database, whatever the role, as libpq resolves them (``libpq_params``:
    PGPORT for a DSN without a port...), every host of a host list. A run submitted with ``--target "$(refresher
    url ...)"`` is that server as much as one without: a door a reset killed there left shut is opened, the
    pristine snapshot saved after it. Else None: a DSN naming a service (its file's values, which come before the
    environment's, are not read here), or a socket directory, where no engine's server listens (the local one
    listens on TCP only: ``refresher.engines.local.LISTEN``).

    Our engines' servers listen on 127.0.0.1 alone (the local one's LISTEN, Docker's and compose's published
    ports): another loopback address (``::1``, or ``localhost`` resolved to ::1 first) counts only while nothing
    accepts there on the port, so that psycopg goes on to 127.0.0.1 (``_passed_over``). ::1 counted as 127.0.0.1:
    another server on [::1] and the port was taken for ours (a session as the server's role went to ours, not
    to the server named; another role's went to the one named, a refusal there opened our door, and ours was
    saved as pristine after loads that went to it). Where one accepts, the target is not ours whichever server
    its sessions reach (psycopg goes on to the next address after any failure, a refused role's too): its door
    is not ours to open. A server that starts on [::1] after the look is seen at the next (a worker looks again
    after a failed connection, and within ``worker.OWN_SERVER_TTL``)."""
    with suppress(Exception):
        named = conninfo_to_dict(target)
        if named.get("service"):
            return None
        server = select_engine(settings.engine, settings, profile).info(profile)
        if server is None:
            return None
        defaults = pq.Conninfo.get_defaults()  # once: it reads a PGSERVICE file each time
        params = libpq_params(named, defaults=defaults)
        if (params.get("dbname") or params.get("user")) != server.dbname:
            return None
        compiled = next((o.compiled for o in defaults if o.keyword == b"port"), None) or b"5432"
        ours = set(_endpoints({"host": server.host, "hostaddr": "", "port": str(server.port)}, ""))
        theirs = _endpoints(params, compiled.decode())
        if ours & set(theirs) and all(
            where in ours or ((ip := _ip(where[0])) is not None and ip.is_loopback and _passed_over(*where))
            for where in theirs
        ):
            return server
    return None


__all__ = ["libpq_params", "parse_dsn", "served_here", "without_password"]
