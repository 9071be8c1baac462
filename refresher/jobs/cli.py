"""``refresher jobs ...`` and ``refresher worker``: parse, call the library, render (rich, or ``--json``)."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from refresher.cli import _parse_time
from refresher.errors import JobError
from refresher.jobs.queue import TIERS, connect, unreachable
from refresher.jobs.runs import RunStatus, cancel_run, list_runs, retry_dead, run_status
from refresher.settings import Settings

out = Console()


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``jobs`` and ``worker`` on the main parser's subcommands."""
    queue_help = "Redis URL, e.g. redis://HOST:6379/0 ($REFRESHER_QUEUE; default: the Redis of `make up`)"

    def queue_arg(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--queue", default=None, help=queue_help)
        # The clock, injectable so tests can say "the market is open now" (--when-closed).
        cmd.add_argument("--now", type=_parse_time, default=None, help=argparse.SUPPRESS)

    jobs = sub.add_parser("jobs", help="Segment jobs on Redis Streams: submit, status, list, retry, cancel.")
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
        type=str.upper,
        default=None,
        metavar="EXCHANGE",
        help="hold the jobs until that exchange is closed, e.g. XNYS",
    )
    submit.add_argument("--as-of", type=dt.date.fromisoformat, default=None, help="pin the data window's end")
    queue_arg(submit)
    status = jobs_sub.add_parser("status", parents=[common], help="Progress of a run, in milliseconds.")
    status.add_argument("run_id", metavar="RUN_ID")
    status.add_argument("--watch", action="store_true", help="a live view until the run completes")
    queue_arg(status)
    for name, text in (
        ("list", "Recent runs."),
        ("retry-dead", "Put a run's dead-lettered jobs back on the queue."),
        ("cancel", "Stop a run; loaded segments stay."),
    ):
        cmd = jobs_sub.add_parser(name, parents=[common], help=text)
        if name != "list":
            cmd.add_argument("run_id", metavar="RUN_ID")
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


def run(args: argparse.Namespace, settings: Settings, emit: Callable[..., None]) -> int:
    """Run a ``jobs``/``worker`` command; errors are RefresherErrors, which the CLI prints as one line."""
    if not args.queue:
        from refresher.engines.compose import default_queue_url

        args.queue = default_queue_url(settings)  # $REFRESHER_QUEUE, else the Redis of `make up`
    if not args.queue:
        raise JobError(
            "--queue: give the Redis URL (or set REFRESHER_QUEUE, or run `make up`)", field="queue"
        )
    try:
        if args.command == "worker":
            return _worker(args, settings, emit)
        return _jobs(args, settings, emit)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise unreachable(args.queue, exc) from exc


def _jobs(args: argparse.Namespace, settings: Settings, emit: Callable[..., None]) -> int:
    action = args.jobs_command
    if action == "submit":
        from refresher.jobs.submit import submit_run

        done = submit_run(
            settings,
            args.profile,
            args.queue,
            target=args.target,
            priority=args.priority,
            when_closed=args.when_closed,
            as_of=args.as_of,
            now=args.now,
        )
        hold = f", held until {done.held_until}" if done.held_until else ""
        emit(args, done.to_json(), lambda: print(f"{done.run_id}  ({done.jobs} jobs, {done.priority}{hold})"))
        return 0
    client = connect(args.queue)
    if action == "status":
        if args.watch and not args.json:
            _watch(client, args.run_id)
            return 0
        state = run_status(client, args.run_id)
        emit(args, state.to_json(), lambda: _print_status(state))
    elif action == "list":
        runs = list_runs(client)
        emit(args, {"runs": [r.to_json() for r in runs]}, lambda: out.print(_list_table(runs)))
    elif action == "retry-dead":
        moved = retry_dead(client, args.run_id)
        emit(
            args,
            {"run_id": args.run_id, "requeued": moved},
            lambda: print(f"{args.run_id}: {moved} dead job(s) back on the queue"),
        )
    elif action == "cancel":
        state = cancel_run(client, args.run_id)
        emit(args, state.to_json(), lambda: print(f"{args.run_id}: cancelled ({state.done} done)"))
    return 0


def _worker(args: argparse.Namespace, settings: Settings, emit: Callable[..., None]) -> int:
    from refresher.jobs.worker import Worker, WorkerOptions

    if args.concurrency < 1:
        raise JobError(f"--concurrency={args.concurrency}: must be at least 1", field="concurrency")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()  # finish the job in hand (its transaction commits or rolls back), then exit 0

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    options = WorkerOptions(
        name=args.name,
        concurrency=args.concurrency,
        burst=args.burst,
        visibility_timeout=args.visibility_timeout,
        max_attempts=args.max_attempts,
    )
    clock = (lambda: args.now.timestamp()) if args.now else time.time
    report = Worker(args.queue, settings, options, clock=clock, stop=stop).run()
    emit(args, report.to_json(), lambda: print(json.dumps(report.to_json())))
    return 0


def _print_status(state: RunStatus) -> None:
    # The one-line summary is plain text, so a narrow terminal never wraps "held until ..." apart.
    held = f" until {state.held_until}" if state.held_until else ""
    print(f"{state.run_id}: {state.state}{held}, {state.done}/{state.total} done, {state.dead} dead")
    out.print(_status_table(state))


def _status_table(state: RunStatus) -> Table:
    table = Table(title=f"run {state.run_id}  {state.profile} -> {state.target}", show_header=False)
    rate = f"{state.rows_per_second:,.0f} rows/s" if state.rows_per_second else "-"
    eta = f"{state.eta_seconds:,.0f} s" if state.eta_seconds is not None else "-"
    held = f" until {state.held_until}" if state.held_until else ""
    rows = [
        ("state", f"{state.state}{held}"),
        ("priority", state.priority),
        ("done", f"{state.done} / {state.total}"),
        ("pending / in flight", f"{state.pending} / {state.in_flight}"),
        ("retrying / dead / held", f"{state.retrying} / {state.dead} / {state.held}"),
        ("rows loaded", f"{state.rows_loaded:,}  ({rate}, ETA {eta})"),
        ("features", json.dumps(state.features) if state.features else "-"),
        (
            "queues (weight: queued/in flight)",
            "  ".join(f"{t.tier} {t.weight}: {t.queued}/{t.in_flight}" for t in state.tiers),
        ),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _list_table(runs: list[RunStatus]) -> Table:
    table = Table("run", "profile", "priority", "state", "done", "dead", "rows")
    for r in runs:
        table.add_row(
            r.run_id, r.profile, r.priority, r.state, f"{r.done}/{r.total}", str(r.dead), f"{r.rows_loaded:,}"
        )
    return table


def _watch(client: redis.Redis, run_id: str) -> None:
    with Live(_status_table(run_status(client, run_id)), console=out, refresh_per_second=4) as live:
        while True:
            state = run_status(client, run_id)
            live.update(_status_table(state))
            if state.state in ("complete", "cancelled"):
                return
            time.sleep(0.5)


__all__ = ["add_commands", "run"]
