"""``refresher jobs ...`` and ``refresher worker``: call the library, render (rich, or ``--json``).

Their arguments are declared in ``refresher.jobs.parser``, which the main parser imports without redis or rich.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table

from refresher.cli import _say
from refresher.errors import JobError, one_line
from refresher.jobs.namespace import Namespace, in_namespace, namespace_of, split_queue_url
from refresher.jobs.queue import open_queue, out_of_memory, public_url, unreachable, wait_for_queue
from refresher.jobs.runs import (
    Deleted,
    RunStatus,
    cancel_run,
    delete_run,
    list_runs,
    prune_runs,
    requeue_lost,
    retry_dead,
    run_status,
    runs_in_default,
)
from refresher.settings import QUEUE_NAMESPACE_ENV, Settings

out = Console()


def run(args: argparse.Namespace, settings: Settings, emit: Callable[..., None]) -> int:
    """Run a ``jobs``/``worker`` command; errors are RefresherErrors, which the CLI prints as one line."""
    # Where the URL came from, for its errors: a bad $REFRESHER_QUEUE was reported as --queue.
    args.queue_label = "--queue" if args.queue or not settings.queue_url else "REFRESHER_QUEUE"
    if not args.queue:
        from refresher.engines.compose import default_queue_url

        args.queue = default_queue_url(settings)  # $REFRESHER_QUEUE, else the Redis of `make up`
    if not args.queue:
        raise JobError(
            "--queue: give the Redis URL (or set REFRESHER_QUEUE, or run `make up`)", field="queue"
        )
    # The namespace in the URL from here on, $REFRESHER_QUEUE_NAMESPACE's when the URL names none: a worker and
    # every library call take it from there. Checked before Redis is asked: a bad name is one line, exit 2.
    args.queue = in_namespace(args.queue, settings.queue_namespace, args.queue_label, QUEUE_NAMESPACE_ENV)
    try:
        if args.command == "worker":
            return _worker(args, settings, emit)
        if args.jobs_command == "submit":
            return _submit(args, settings, emit)
        ns = namespace_of(args.queue, args.queue_label)
        return _jobs(args, open_queue(args.queue, args.queue_label), ns, emit, settings)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise unreachable(args.queue, exc, args.queue_label) from exc
    except redis.OutOfMemoryError as exc:  # at its maxmemory: a submit, cancel or requeue was a traceback
        raise out_of_memory(args.queue, exc, args.queue_label) from exc


def _submit(args: argparse.Namespace, settings: Settings, emit: Callable[..., None]) -> int:
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
        prune=args.prune,
        queue_label=args.queue_label,
        say=_say,
    )
    hold = f", held until {done.held_until}" if done.held_until else ""
    line = f"{done.run_id}  ({done.jobs} jobs, {done.priority}{hold}, namespace {done.namespace})"
    emit(args, done.to_json(), lambda: print(line))
    return 0


def _jobs(
    args: argparse.Namespace,
    client: redis.Redis,
    ns: Namespace,
    emit: Callable[..., None],
    settings: Settings,
) -> int:
    """Each action within namespace ``ns``: no run of another is seen, moved or removed."""
    action = args.jobs_command
    if action == "status":
        if args.watch and not args.json:
            # a run that ends with dead-lettered jobs fails the command, so a script waiting on it can tell
            return 1 if _watch(client, args.run_id, ns) == "incomplete" else 0
        state = run_status(client, args.run_id, ns=ns)
        emit(args, state.to_json(), lambda: _print_status(state))
    elif action == "list":
        runs, default = list_runs(client, ns=ns), runs_in_default(client, ns)
        listed = {"namespace": ns.name, "runs": [r.to_json() for r in runs], "runs_in_default": default}
        emit(args, listed, lambda: _print_list(args.queue, ns, runs, default))
    elif action in ("retry-dead", "requeue"):
        # the dead-lettered jobs, or those lost with their stream
        which, again = ("dead", retry_dead) if action == "retry-dead" else ("lost", requeue_lost)
        moved = again(client, args.run_id, ns=ns)
        emit(
            args,
            {"run_id": args.run_id, "requeued": moved},
            lambda: print(f"{args.run_id}: {moved} {which} job(s) back on the queue"),
        )
    elif action == "cancel":
        state = cancel_run(client, args.run_id, ns=ns)
        emit(args, state.to_json(), lambda: print(f"{args.run_id}: cancelled ({state.done} done)"))
    elif action == "delete":
        gone = delete_run(client, args.run_id, force=args.force, settings=settings, ns=ns)
        emit(args, gone.to_json(), lambda: _print_deleted(gone))
    elif action == "prune":
        age = parse_age(args.older_than)
        gone = prune_runs(client, age, force=args.force, dry_run=args.dry_run, settings=settings, ns=ns)
        emit(args, gone.to_json(), lambda: _print_deleted(gone))
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(value: str) -> float:
    """``--older-than``: a number and a unit (s, m, h, d, w), e.g. 7d, 12h, 1.5h."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if match is None:
        raise JobError(
            f"--older-than={value!r}: give a number and a unit (s, m, h, d, w), e.g. 7d or 12h",
            field="older_than",
            value=value,
        )
    return float(match[1]) * _UNITS[match[2]]


def _print_deleted(gone: Deleted) -> None:
    verb = "would delete" if gone.dry_run else "deleted"
    extra = "" if gone.dry_run else f" ({gone.entries} stream entries, dead letters and retries)"
    print(f"{verb} {len(gone.deleted)} run(s){extra}: {' '.join(gone.deleted) or '-'}")
    if gone.fences:
        print(f"removed {gone.fences} fence row(s) of theirs from their targets (refresher_fences)")
    for target, why in gone.fences_left.items():
        # Redis is pruned all the same: a target down or refusing us keeps nothing there.
        print(f"fence rows left in {target} (refresher_fences), {why}", file=sys.stderr)
    if gone.running:
        left = ", ".join(f"{run} ({state})" for run, state in gone.running.items())
        print(f"left {len(gone.running)} running run(s): {left}; --force removes them too")


def _worker(args: argparse.Namespace, settings: Settings, emit: Callable[..., None]) -> int:
    from refresher.jobs.eviction import require_noeviction
    from refresher.jobs.worker import Worker, WorkerOptions, WorkerReport

    if args.concurrency < 1:
        raise JobError(f"--concurrency={args.concurrency}: must be at least 1", field="concurrency")
    if not args.name.strip():  # an empty consumer name: its jobs pending under "-0", its lines unnamed
        raise JobError(f"--name={args.name!r}: give the worker a name", field="name", value=args.name)
    if args.max_attempts < 1:
        raise JobError(f"--max-attempts={args.max_attempts}: must be at least 1", field="max_attempts")
    if not 0 < args.visibility_timeout < math.inf:  # nan too: a negative timeout was a traceback
        raise JobError(
            f"--visibility-timeout={args.visibility_timeout}: must be a number of seconds above 0",
            field="visibility_timeout",
        )
    timeout = settings.connect_timeout(args.connect_timeout)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()  # finish the job in hand (its transaction commits or rolls back), then exit 0

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    # A Redis not up yet (started beside the worker, restarting, loading its data) is waited for, up to
    # --connect-timeout, one line saying so; past it, or not a Redis, or refusing us: one line and exit 2, rather
    # than a worker backing off in silence for good. Once it runs, a Redis that goes away is waited for (a restart).
    client = wait_for_queue(args.queue, args.queue_label, timeout, stop, _say)
    # `kill -USR1 PID`: every thread's stack on stderr, and the worker goes on; what a worker that went quiet is
    # waiting on, without a debugger on the machine.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    options = WorkerOptions(
        name=args.name,
        concurrency=args.concurrency,
        burst=args.burst,
        visibility_timeout=args.visibility_timeout,
        max_attempts=args.max_attempts,
    )
    clock = (lambda: args.now.timestamp()) if args.now else None  # None: Redis's clock
    report = WorkerReport(name=args.name)  # stopped while waiting for Redis: nothing done, exit 0
    failure: BaseException | None = None
    if client is not None:
        try:
            # An evicting Redis loses jobs and counters without a word: refused before the first job is taken.
            require_noeviction(client, args.queue, args.queue_label, _say)
            worker = Worker(args.queue, settings, options, clock=clock, stop=stop, client=client)
            report, failure = worker.run(), worker.failure
        finally:
            client.close()
    emit(args, report.to_json(), lambda: print(json.dumps(report.to_json())))
    if failure is not None:
        _say(f"worker {args.name}: stopped, a thread of it failed (its traceback above): {one_line(failure)}")
        return 1
    return 0


def _print_status(state: RunStatus) -> None:
    # The one-line summary is plain text, so a narrow terminal never wraps "held until ..." apart.
    held = f" until {state.held_until}" if state.held_until else ""
    error = f" ({state.error})" if state.error else ""
    lost = f"; {_lost(state)}" if state.lost else ""
    print(
        f"{state.run_id}: {state.state}{held}, {state.done}/{state.total} done, {state.dead} dead{error}{lost}"
    )
    out.print(_status_table(state))


def _status_table(state: RunStatus) -> Table:
    title = f"run {state.run_id}  {state.profile} -> {state.target}  (namespace {state.namespace})"
    table = Table(title=title, show_header=False)
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


def _print_list(url: str, ns: Namespace, runs: list[RunStatus], default: int) -> None:
    """``jobs list``: which namespace it looked at first (two on one Redis database show two lists), its runs,
    and the default namespace's when this is another: the runs submitted before a namespace was set."""
    print(f"namespace {ns.name} at {public_url(split_queue_url(url)[0])}: {len(runs)} run(s)")
    if runs:
        out.print(_list_table(runs))
    if default:
        print(
            f"{default} run(s) in the default namespace ({ns.name!r} is another): "
            "--queue without ?namespace= (and no $REFRESHER_QUEUE_NAMESPACE) shows them"
        )


def _list_table(runs: list[RunStatus]) -> Table:
    table = Table("run", "profile", "priority", "state", "done", "dead", "rows")
    for r in runs:
        table.add_row(
            r.run_id, r.profile, r.priority, r.state, f"{r.done}/{r.total}", str(r.dead), f"{r.rows_loaded:,}"
        )
    return table


def _lost(state: RunStatus) -> str:
    return (
        f"{state.lost} job(s) lost: counted submitted but neither in the {state.priority} stream nor done, dead "
        f"or retrying (the stream trimmed or deleted by hand); `refresher jobs requeue {state.run_id}` puts them "
        "back"
    )


def _watch(client: redis.Redis, run_id: str, ns: Namespace) -> str:
    """Show the run until nothing of it is left to run; its final state. A run that lost jobs never ends: one
    line and exit status 2 rather than waiting for good."""
    with Live(_status_table(run_status(client, run_id, ns=ns)), console=out, refresh_per_second=4) as live:
        while True:
            state = run_status(client, run_id, ns=ns)
            live.update(_status_table(state))
            if state.state in ("complete", "cancelled", "incomplete"):
                return state.state
            if state.lost:
                raise JobError(f"run {run_id}: {_lost(state)}", field="run", value=run_id)
            time.sleep(0.5)


__all__ = ["run"]
