"""The arguments of ``refresher jobs ...`` and ``refresher worker``, declared without importing redis or rich.

Every ``refresher`` command builds the whole parser; the commands themselves live in ``refresher.jobs.cli``.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

from refresher.cli import _parse_date, _parse_time
from refresher.jobs.tiers import TIERS
from refresher.settings import CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT, parse_connect_timeout


def _parse_exchange(text: str) -> str:
    """An exchange code in any case, checked here: a bad one was only refused after Redis had been asked (with
    Redis down, the user heard of Redis and not of the typo)."""
    from refresher.calendar import check_exchange
    from refresher.errors import CalendarError

    try:
        return check_exchange(text.strip().upper())
    except CalendarError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parse_connect_timeout(text: str) -> float:
    try:
        return parse_connect_timeout(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: {text!r}") from exc


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``jobs`` and ``worker`` on the main parser's subcommands."""
    queue_help = (
        "Redis URL, e.g. redis://HOST:6379/0, or redis://HOST:6379/0?namespace=NAME for a queue of its own on a "
        "shared database ($REFRESHER_QUEUE, $REFRESHER_QUEUE_NAMESPACE; default: the Redis of `make up`)"
    )

    def queue_arg(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--queue", default=None, help=queue_help)
        # The clock, injectable so tests can say "the market is open now" (--when-closed).
        cmd.add_argument("--now", type=_parse_time, default=None, help=argparse.SUPPRESS)

    jobs = sub.add_parser(
        "jobs",
        help="Segment jobs on Redis Streams: submit, status, list, retry, requeue, cancel, delete, prune.",
    )
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    submit = jobs_sub.add_parser(
        "submit",
        parents=[common],
        help="Plan the profile against the target and enqueue one job per segment.",
    )
    submit.add_argument("--profile", "-p", required=True, help="profile name or YAML path")
    submit.add_argument("--target", default=None, help="DSN to load (default: the profile's own server)")
    submit.add_argument("--priority", choices=TIERS, default="normal", help="queue tier (default normal)")
    submit.add_argument(
        "--when-closed",
        type=_parse_exchange,
        default=None,
        metavar="EXCHANGE",
        help="hold the jobs until that exchange is closed, e.g. XNYS",
    )
    submit.add_argument("--as-of", type=_parse_date, default=None, help="pin the data window's end")
    submit.add_argument(
        "--prune",
        action="store_true",
        help="when the run's segments are loaded, delete its stale segments and their feature rows (as refresh)",
    )
    queue_arg(submit)
    status = jobs_sub.add_parser("status", parents=[common], help="Progress of a run, in milliseconds.")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--watch", action="store_true", help="a live view until the run completes")
    queue_arg(status)
    for name, text in (
        ("list", "Recent runs."),
        ("retry-dead", "Put a run's dead-lettered jobs back on the queue."),
        ("requeue", "Put a run's lost jobs (its stream trimmed or deleted by hand) back on the queue."),
        ("cancel", "Stop a run; loaded segments stay."),
    ):
        cmd = jobs_sub.add_parser(name, parents=[common], help=text)
        if name != "list":
            cmd.add_argument("run_id", metavar="RUN_ID")
        queue_arg(cmd)

    delete = jobs_sub.add_parser(
        "delete", parents=[common], help="Remove a finished run from Redis: its counters, dead letters, jobs."
    )
    delete.add_argument("run_id", metavar="RUN_ID")
    prune = jobs_sub.add_parser(
        "prune", parents=[common], help="Remove the finished runs idle longer than --older-than from Redis."
    )
    prune.add_argument(
        "--older-than",
        required=True,
        metavar="AGE",
        help="last activity (submit, start, last segment loaded) at least this long ago: 7d, 12h, 30m, 90s",
    )
    prune.add_argument("--dry-run", action="store_true", help="name the runs that would go; remove nothing")
    for cmd in (delete, prune):
        cmd.add_argument(
            "--force", action="store_true", help="remove running (queued, held, loaded) runs too"
        )
        queue_arg(cmd)

    worker = sub.add_parser("worker", parents=[common], help="Run segment jobs from Redis until stopped.")
    queue_arg(worker)
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at once (threads; default 1)")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    worker.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}", help="consumer name")
    worker.add_argument(
        "--visibility-timeout",
        type=float,
        default=60.0,
        help="seconds a silent worker keeps its job before others reclaim it (default 60)",
    )
    worker.add_argument("--max-attempts", type=int, default=6, help="attempts before a dead letter")
    worker.add_argument(
        "--connect-timeout",
        type=_parse_connect_timeout,
        default=None,
        metavar="SECONDS",
        help=f"at its start, wait up to this long for a Redis not up yet (refusing connections, or loading its "
        f"data), with jittered backoff; 0 asks once (${CONNECT_TIMEOUT_ENV}; default {DEFAULT_CONNECT_TIMEOUT:g})",
    )


__all__ = ["add_commands"]
