"""is_transient over every branch (chains, cycles, SQLSTATE classes) and backoff's edges, without any server."""

from __future__ import annotations

import random

import psycopg
import pytest
import redis

from refresher.errors import LoadError
from refresher.jobs.retry import (
    REFUSED_SQLSTATES,
    TRANSIENT_SQLSTATES,
    backoff_seconds,
    is_refused,
    is_transient,
)


def chained(outer: BaseException, inner: BaseException, *, implicit: bool = False) -> BaseException:
    if implicit:
        outer.__context__ = inner  # raised while handling inner
    else:
        outer.__cause__ = inner  # raise outer from inner
    return outer


@pytest.mark.parametrize("state", sorted(TRANSIENT_SQLSTATES))
def test_every_transient_sqlstate_is_retried(state: str) -> None:
    assert is_transient(psycopg.errors.lookup(state)())


@pytest.mark.parametrize("state", sorted(REFUSED_SQLSTATES))
def test_every_refusing_sqlstate_is_refused_not_transient(state: str) -> None:
    error = psycopg.errors.lookup(state)()
    assert is_refused(error) and not is_transient(error)


@pytest.mark.parametrize(
    "message",
    [
        'connection to server at "h", port 5 failed: FATAL:  password authentication failed for user "u"',
        'connection to server at "h", port 5 failed: FATAL:  database "d" does not exist',
        'connection to server at "h", port 5 failed: FATAL:  role "r" does not exist',
        'connection to server at "h", port 5 failed: FATAL:  no pg_hba.conf entry for host "h", user "u"',
        'connection to server at "h", port 5 failed: fe_sendauth: no password supplied',
    ],
)
def test_a_connection_the_server_refused_is_refused_though_libpq_gives_no_sqlstate(message: str) -> None:
    error = chained(LoadError("target: cannot connect"), psycopg.OperationalError(message))
    assert is_refused(error) and not is_transient(error)


@pytest.mark.parametrize(
    "message",
    [
        'connection to server at "h", port 5 failed: Connection refused',
        'connection to server at "h", port 5 failed: FATAL:  the database system is starting up',
        'connection to server at "h", port 5 failed: FATAL:  sorry, too many clients already',
    ],
)
def test_a_connection_failing_otherwise_stays_transient(message: str) -> None:
    error = psycopg.OperationalError(message)
    assert is_transient(error) and not is_refused(error)


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (psycopg.errors.lookup("08006")(), True),  # connection failure: class 08
        (psycopg.errors.lookup("08001")(), True),
        (psycopg.OperationalError(), True),  # libpq's own error: no SQLSTATE
        (psycopg.errors.lookup("53100")(), False),  # disk full: operational, but not class 08
        (psycopg.InterfaceError(), False),  # no SQLSTATE and not operational
        (psycopg.errors.lookup("23505")(), False),
        (redis.TimeoutError(), True),
        (redis.ConnectionError(), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (redis.ResponseError("WRONGTYPE"), False),
        (ValueError("bad row"), False),
    ],
)
def test_each_kind_of_error(error: BaseException, transient: bool) -> None:
    assert is_transient(error) is transient


def test_the_chain_is_followed_through_causes_and_contexts() -> None:
    assert is_transient(chained(LoadError("x"), chained(RuntimeError("y"), TimeoutError()), implicit=False))
    assert is_transient(chained(LoadError("x"), TimeoutError(), implicit=True))
    # An explicit cause wins over the context it replaced.
    assert not is_transient(chained(chained(LoadError("x"), TimeoutError(), implicit=True), ValueError("no")))


def test_the_first_database_error_in_the_chain_decides() -> None:
    permanent_over_transient = chained(psycopg.errors.lookup("23505")(), psycopg.OperationalError())
    assert not is_transient(permanent_over_transient)
    assert not is_transient(chained(LoadError("x"), permanent_over_transient))


def test_a_cyclic_chain_ends() -> None:
    first, second = RuntimeError("a"), RuntimeError("b")
    first.__context__, second.__context__ = second, first
    assert not is_transient(first)
    itself = ValueError("self")
    itself.__cause__ = itself
    assert not is_transient(itself)


def test_backoff_edges() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b  # the ceiling itself: the largest wait a draw can give

    top = Top()
    assert backoff_seconds(0, base=0.5, cap=30, rng=top) == 0.5
    assert backoff_seconds(-3, base=0.5, cap=30, rng=top) == 0.5  # a negative attempt counts as the first
    assert backoff_seconds(2, base=0.5, cap=30, rng=top) == 2.0
    assert backoff_seconds(6, base=0.5, cap=30, rng=top) == 30  # 32 capped
    assert backoff_seconds(5000, base=0.1, cap=5.0, rng=top) == 5.0  # was OverflowError (2**5000 * 0.1)
    random.seed(3)
    expected = random.Random(3).uniform(0, 2.0)
    assert backoff_seconds(2, base=0.5, cap=30) == expected  # the module's own generator by default
