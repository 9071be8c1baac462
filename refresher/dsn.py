"""A PostgreSQL connection string as refresher reads one: parsed by libpq's rules, refused without being shown.

A URL's password with an ``@`` that is not %-escaped (``postgresql://u:p@ss@db/x``) is cut by libpq at the first
``@``: the rest of the password becomes the host (``ss@db``), or the port (``u:p@a:b@db``), and from there it
reached messages ("could not translate host name"), Redis (a job's target) and the worker's lines. No host or
port holds an ``@``, so one is refused here, before anything connects or prints.
"""

from __future__ import annotations

import psycopg
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


__all__ = ["parse_dsn", "without_password"]
