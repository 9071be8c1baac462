"""Which failures are worth retrying, and how long to wait before the next attempt."""

from __future__ import annotations

import random
from collections.abc import Iterator

import psycopg
import redis

from refresher.login import refusal_sqlstate

# SQLSTATEs that say "try again": serialization failure, deadlock, lock not available, statement timeout
# (query_canceled), too many connections, and the admin shutdown family (a server restarting).
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014", "53300", "57P01", "57P02", "57P03"})

# SQLSTATEs of a server refusing us at the door: a wrong password (28P01), a role missing or pg_hba.conf
# refusing (28000), a database missing (3D000). No attempt changes that until someone fixes the target.
REFUSED_SQLSTATES = frozenset({"28P01", "28000", "3D000"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (explicit first, else the context), each once."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


def _refused(error: psycopg.Error) -> bool:
    if error.sqlstate is not None:
        return error.sqlstate in REFUSED_SQLSTATES
    return (
        refusal_sqlstate(error) is not None
    )  # the server's words: libpq reports a refusal without its SQLSTATE


def is_refused(exc: BaseException) -> bool:
    """True when the target refused us (password, role, database): permanent, and no other attempt of any job of
    the run can pass until the target or its credentials are fixed, so the job is dead-lettered at once."""
    for cause in _chain(exc):
        if isinstance(cause, psycopg.Error):
            return _refused(cause)
    return False


def is_transient(exc: BaseException) -> bool:
    """True for failures another attempt may not meet: connection refused/reset, lock or statement timeout,
    serialization failure, deadlock, Redis unavailable. Everything else (bad source data, a schema mismatch,
    rows outside their segment, a password the target refuses) is permanent: retrying gives the same answer."""
    for cause in _chain(exc):
        if isinstance(cause, redis.ConnectionError | redis.TimeoutError | ConnectionError | TimeoutError):
            return True
        if isinstance(cause, psycopg.Error):
            state = cause.sqlstate
            if state in TRANSIENT_SQLSTATES:
                return True
            # No SQLSTATE on an OperationalError: the connection failed or broke (libpq's own error), unless
            # the server refused it (its SQLSTATE lost on the way).
            return (
                isinstance(cause, psycopg.OperationalError)
                and (state is None or state.startswith("08"))
                and not _refused(cause)
            )
    return False


def backoff_seconds(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]. The exponent stops at 64
    (past any cap): 2**1100 times a float overflowed, so a worker whose Redis stayed down for a thousand tries (an
    hour at most 5 s apart), or waited that long for it at its start, raised OverflowError instead of waiting."""
    ceiling = min(cap, base * (2 ** min(max(attempt, 0), 64)))
    return (rng or random).uniform(0, ceiling)


__all__ = ["REFUSED_SQLSTATES", "TRANSIENT_SQLSTATES", "backoff_seconds", "is_refused", "is_transient"]
