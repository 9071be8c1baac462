"""What a server's refusal at login stands for: psycopg gives no SQLSTATE for one (psycopg #1188: libpq has no
result to read it from), only the server's words. They are English on every server refresher's engines run
(``lc_messages = C``, ``refresher.engines._common.TUNING``); a server speaking another language goes unrecognised.
"""

from __future__ import annotations

import re

import psycopg

# The server's words for each refusal, and libpq's own for a password it does not have.
_REFUSALS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("28P01", re.compile(r"FATAL:\s+\w+ authentication failed|fe_sendauth: no password supplied")),
    (
        "28000",
        re.compile(r"FATAL:\s+(?:role \".*\" does not exist|no pg_hba\.conf entry|pg_hba\.conf rejects)"),
    ),
    ("3D000", re.compile(r"FATAL:\s+database \".*\" does not exist")),
    ("42501", re.compile(r"FATAL:\s+permission denied for database")),
)

# A database that takes no new sessions (ALLOW_CONNECTIONS false: a reset's door, ``snapshot._Door``), 55000.
_CLOSED = re.compile(r"FATAL:\s+database \".*\" is not currently accepting connections")


def refusal_sqlstate(exc: psycopg.Error) -> str | None:
    """``exc``'s SQLSTATE, or the one a login refusal without it stands for, read from its words (a wrong password:
    28P01; a role missing or pg_hba.conf refusing: 28000; a database missing: 3D000; no CONNECT: 42501); None for
    any other error without one (a connection refused or reset, a server starting up)."""
    if exc.sqlstate is not None or not isinstance(exc, psycopg.OperationalError):
        return exc.sqlstate
    text = str(exc)
    return next((state for state, words in _REFUSALS if words.search(text)), None)


def refused_by_door(exc: BaseException) -> bool:
    """Whether ``exc`` is a login refused because the database takes no new sessions (ALLOW_CONNECTIONS false: a
    reset's door, open again in milliseconds). Not one of ``refusal_sqlstate``'s: those are permanent."""
    return isinstance(exc, psycopg.OperationalError) and _CLOSED.search(str(exc)) is not None


__all__ = ["refusal_sqlstate", "refused_by_door"]
