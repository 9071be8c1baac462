"""The detached refill's watch on a server that keeps its connections open but never answers them.

TCP keepalives and ``tcp_user_timeout`` (``pool._dead_peer_bounded``) find a host that is gone, but a server whose
processes are stopped (SIGSTOP, ``docker pause``, a frozen VM) keeps its kernel answering both: a query in flight
to it, a clone's CREATE DATABASE, waited for good, and the refill with it. No ``statement_timeout`` can bound it
without bounding a big database's legitimate copy, so ``watching`` asks from outside, every ``WATCH_INTERVAL`` s,
on a connection of its own (``WATCH_TIMEOUT`` s to connect and answer): whether the server answers at all, and, on
this host's server (the local engine: its backends are processes here), whether a backend of the refill's
sessions (found by their ``application_name``) is stopped. ``WATCH_MISSES`` unanswered probes in a row and the
refill gives up (``silenced``), saying why. A refill of a few seconds never probes; a long one costs one
connection and one query of ``pg_stat_activity`` every ``WATCH_INTERVAL`` s.

Not seen: a container's backend stopped alone (its server answers the probe, and its pid is not this host's).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
from psycopg import conninfo

# Seconds between probes, how long one may take (connect and query), and how many unanswered in a row give up:
# a server stalled for a moment (a checkpoint's fsync, swapping) is not given up on, one stopped for a minute is.
WATCH_INTERVAL = 20.0
WATCH_TIMEOUT = 10
WATCH_MISSES = 3

# The refill's sessions running a query now.
_ACTIVE = (
    "SELECT pid FROM pg_stat_activity"
    " WHERE application_name = %s AND state = 'active' AND pid <> pg_backend_pid()"
)


@contextlib.contextmanager
def watching(dsn: str, session: str, *, local: bool, silenced: Callable[[str], None]) -> Iterator[None]:
    """Probe the server of ``dsn`` while the block runs (``WATCH_INTERVAL``...); ``silenced`` is called once, from
    the watch's thread, with why, when ``WATCH_MISSES`` probes in a row find no answer or a stopped backend of the
    sessions named ``session`` (looked at only when ``local``: the server's processes are this host's).

    Never once the block ended: its end waits for a call under way. Looked at, then called, a block ending in
    between was silenced after it (a refill that filled its pool stopped, "gave up"). A call under way as the
    block's work returns may still stop what follows: the caller drops that stop (``pool._Stops.watched``)."""
    done = threading.Event()
    # The watch's look at ``done`` and its call, or the block's end: one, then the other.
    ending = threading.Lock()
    watch = threading.Thread(
        target=_watch, args=(dsn, session, local, silenced, done, ending), name="refill-watch", daemon=True
    )
    watch.start()
    try:
        yield
    finally:
        with ending:
            done.set()


def _watch(
    dsn: str,
    session: str,
    local: bool,
    silenced: Callable[[str], None],
    done: threading.Event,
    ending: threading.Lock,
) -> None:
    probe_dsn = conninfo.make_conninfo(dsn, application_name=f"{session} watch")
    misses: list[str] = []
    asking: threading.Thread | None = None
    while not done.wait(WATCH_INTERVAL):
        answer: list[str | None] = []
        if asking is None or not asking.is_alive():  # one probe at a time: a hung one is a miss until it ends
            asking = threading.Thread(target=_probe, args=(probe_dsn, session, local, answer), daemon=True)
            asking.start()
            asking.join(WATCH_TIMEOUT + 1)
        miss = answer[0] if answer else f"a probe of the server had no answer in {WATCH_TIMEOUT} s"
        misses = [*misses, miss] if miss is not None else []
        if len(misses) >= WATCH_MISSES:
            waited = round(WATCH_INTERVAL * len(misses))
            with ending:
                if not done.is_set():
                    silenced(f"gave up: the server did not answer for {waited} s ({misses[-1]})")
            return


def _probe(dsn: str, session: str, local: bool, answer: list[str | None]) -> None:
    """Append to ``answer`` why the server does not answer, None when it does (an error it sends back is an
    answer: a server refusing more clients is alive)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=WATCH_TIMEOUT) as conn:
            active = [int(pid) for (pid,) in conn.execute(_ACTIVE, (session,))]
    except psycopg.errors.ConnectionTimeout:
        answer.append(f"a connection to the server had no answer in {WATCH_TIMEOUT} s")
        return
    except psycopg.Error:
        answer.append(None)
        return
    stopped = [pid for pid in active if local and _is_stopped(pid)]
    answer.append(f"its server process {stopped[0]} is stopped" if stopped else None)


def _is_stopped(pid: int) -> bool:
    """Whether process ``pid`` of this host is stopped (SIGSTOP, a debugger): state T or t in its stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["T"], ["t"])
