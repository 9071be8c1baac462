"""Which failures are worth retrying, and how long to wait before the next attempt."""

from __future__ import annotations

import random

import psycopg
import redis

# SQLSTATEs that say "try again": serialization failure, deadlock, lock not available, statement timeout
# (query_canceled), too many connections, and the admin shutdown family (a server restarting).
TRANSIENT_SQLSTATES = frozenset({"40001", "40P01", "55P03", "57014", "53300", "57P01", "57P02", "57P03"})


def is_transient(exc: BaseException) -> bool:
    """True for failures another attempt may not meet: connection refused/reset, lock or statement timeout,
    serialization failure, deadlock, Redis unavailable. Everything else (bad source data, a schema mismatch,
    rows outside their segment) is permanent: retrying gives the same answer."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, redis.ConnectionError | redis.TimeoutError | ConnectionError | TimeoutError):
            return True
        if isinstance(cause, psycopg.Error):
            state = cause.sqlstate
            if state in TRANSIENT_SQLSTATES:
                return True
            # No SQLSTATE on an OperationalError: the connection failed or broke (libpq's own error).
            return isinstance(cause, psycopg.OperationalError) and (state is None or state.startswith("08"))
        cause = cause.__cause__ or cause.__context__
    return False


def backoff_seconds(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2 ** max(attempt, 0)))
    return (rng or random).uniform(0, ceiling)


__all__ = ["TRANSIENT_SQLSTATES", "backoff_seconds", "is_transient"]
