"""A PostgreSQL connection string as refresher reads one: parsed by libpq's rules, refused without being shown.

A URL's password with an ``@`` that is not %-escaped (``postgresql://u:p@ss@db/x``) is cut by libpq at the first
``@``: the rest of the password becomes the host (``ss@db``), or the port (``u:p@a:b@db``), and from there it
reached messages ("could not translate host name"), Redis (a job's target) and the worker's lines. No host or
port holds an ``@``, so one is refused here, before anything connects or prints.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from refresher.errors import RefresherError

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


def libpq_params(named: Mapping[str, object], *, login_name: bool = True) -> dict[str, str]:
    """``_WHERE`` of a DSN (``named``: its ``conninfo_to_dict``) as libpq connects it: its own, else libpq's defaults
    (``PQconndefaults``: a PGSERVICE file's, then PGHOST, PGHOSTADDR, PGPORT, PGDATABASE, PGUSER, then built in:
    port 5432, the login name as user), read now from this process's environment. ``login_name=False``: no user
    when libpq's would be its fall-back, the login name, so the user left is one somebody named (the DSN, PGUSER,
    a PGSERVICE file's user other than the login name: libpq says no source, so one naming it counts as none)."""
    defaults = {
        option.keyword.decode(): option.val.decode()
        for option in pq.Conninfo.get_defaults()
        if option.val is not None and option.keyword.decode() in _WHERE
    }
    if not login_name and not os.environ.get("PGUSER") and defaults.get("user") in ("", _login_name()):
        defaults.pop("user", None)
    return {**defaults, **{key: str(named[key]) for key in _WHERE if named.get(key) is not None}}


__all__ = ["libpq_params", "parse_dsn", "without_password"]
