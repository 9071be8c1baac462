"""Human output of the CLI (rich); the JSON output is the report objects themselves."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from rich.progress import TaskID

    from refresher.calendar import MarketStatus
    from refresher.commands import ProfileListing
    from refresher.engines.base import ServerStatus
    from refresher.profile import Profile
    from refresher.refresh import PlanReport, ProgressCallback, RefreshReport
    from refresher.snapshot import RestoreReport
    from refresher.warm import WarmReport

out = Console()
err = Console(stderr=True)


@contextmanager
def progress(mode: str) -> Iterator[ProgressCallback | None]:
    """Refresh progress on stderr: a bar on a terminal ("bar"), periodic plain lines otherwise ("lines").

    Piped and CI runs used to show nothing for the whole load; a line every few seconds (phase, done/total,
    rows/s) tells them it is alive and how far it got, without the bar's control characters in a log.
    """
    if mode == "bar":
        with _bar() as update:
            yield update
    elif mode == "lines":
        yield ProgressLines(err)
    else:
        yield None


@contextmanager
def _bar() -> Iterator[ProgressCallback]:
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def update(phase: str, done: int, total: int, rows: int = 0) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{phase} segments", total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


class ProgressLines:
    """A progress callback printing one plain line per phase start, every ``every`` seconds, and at the end."""

    def __init__(self, console: Console, every: float = 2.0) -> None:
        self.console = console
        self.every = every
        self.phase = ""
        self.started = self.last = 0.0

    def __call__(self, phase: str, done: int, total: int, rows: int = 0) -> None:
        now = time.monotonic()
        if phase != self.phase:
            self.phase, self.started, self.last = phase, now, float("-inf")
        if now - self.last < self.every and done < total:
            return
        self.last = now
        elapsed = now - self.started
        percent = f" ({100 * done // total}%)" if total else ""
        # A rate over the first few milliseconds says nothing (one segment in 1 ms is not 21M rows/s).
        rate = f", {rows / elapsed:,.0f} rows/s" if elapsed >= 1 else ""
        self.console.print(
            f"refresher: {phase} {done}/{total} segments{percent}, {rows:,} rows{rate}, {elapsed:.0f} s",
            highlight=False,
            soft_wrap=True,
        )


def refresh_report(report: RefreshReport, *, url_hint: str) -> None:
    refresh_summary(report.to_json(), url_hint=url_hint)


def refresh_summary(report: dict[str, Any], *, url_hint: str) -> None:
    """A refresh report in its JSON form: what ``--json`` prints, whichever path (full, or the stamp) made it."""
    seg, store, feats = report["segments"], report["store"], report["features"]
    table = Table(title=f"refresher: {report['profile']} on {report['engine']}", show_header=False, box=None)
    table.add_row(
        "segments",
        f"{seg['desired']} desired, {seg['present']} already present, {seg['loaded']} loaded"
        + (f", {seg['pruned']} pruned" if seg["pruned"] else "")
        + (f", {seg['stale']} stale (use --prune)" if seg["stale"] else ""),
    )
    table.add_row("rows loaded", f"{report['rows_loaded']:,}")
    table.add_row("store", f"{store['hits']} hits, {store['misses']} misses")
    if feats["desired"]:
        table.add_row(
            "features",
            f"{feats['desired']} desired, {feats['loaded']} loaded, {feats['computed']} computed"
            + (f", {feats['pruned']} pruned" if feats["pruned"] else ""),
        )
    for reason, rows in report["left_out"].items():  # per reason: dropped / rejected / quarantined
        table.add_row("rows left out", f"{rows:,} {escape(reason)}")
    table.add_row("snapshot", report["snapshot"])
    table.add_row("time", f"{report['seconds']:.2f} s")
    out.print(table)
    _notes(report["notes"])
    out.print(f"DSN: [bold]{report['dsn']}[/bold]")
    out.print(f"with password: [bold]{escape(url_hint)}[/bold]", soft_wrap=True)


def warm_report(report: WarmReport) -> None:
    out.print(
        f"warmed [bold]{report.profile}[/bold]: {report.segments} segments ({report.fetched} fetched), "
        f"{report.features} (feature, symbol) pairs ({report.computed} computed) in {report.seconds:.2f} s; "
        "no database touched"
    )


def plan_report(plan: PlanReport) -> None:
    summary = plan.plan.summary()
    where = "running server" if plan.server_running else "no server yet"
    out.print(f"plan for [bold]{plan.profile}[/bold] ({plan.engine}, {where}):")
    table = Table(show_header=True)
    for column in ("desired", "present", "to_load", "to_fetch", "stale"):
        table.add_column(column, justify="right")
    table.add_row(*(str(summary[c]) for c in ("desired", "present", "to_load", "to_fetch", "stale")))
    out.print(table)
    for label, segments in (
        ("fetch", plan.plan.to_fetch),
        ("load", plan.plan.to_load),
        ("stale", plan.plan.stale),
    ):
        shown = ", ".join(str(s) for s in segments[:8])
        if segments:
            more = f" (+{len(segments) - 8} more)" if len(segments) > 8 else ""
            out.print(f"  {label}: {shown}{more}")
    _notes(plan.notes)


def _notes(notes: Sequence[str], shown: int = 20) -> None:
    """What the source left out of segments, on stderr (the first ``shown``; ``--json`` has them all)."""
    for note in notes[:shown]:
        err.print(f"[yellow]not loaded:[/yellow] {escape(note)}", highlight=False, soft_wrap=True)
    if len(notes) > shown:
        err.print(f"[yellow]... and {len(notes) - shown} more (see --json)[/yellow]")


def reset_report(report: RestoreReport) -> None:
    out.print(f"reset in {report.seconds * 1000:.0f} ms ({report.method})")


def status_json(status: ServerStatus) -> dict[str, Any]:
    return {
        "engine": status.engine,
        "profile": status.profile,
        "running": status.running,
        "host": status.host,
        "port": status.port,
        "detail": status.detail,
    }


def status_table(statuses: list[ServerStatus], state_dir: Path, notes: Sequence[str] = ()) -> None:
    out.print(f"state dir: {state_dir}", highlight=False, soft_wrap=True)
    if not statuses:
        out.print("no servers")
    else:
        table = Table("profile", "engine", "state", "address", "detail")
        for s in statuses:
            address = f"{s.host}:{s.port}" if s.port else ""
            table.add_row(s.profile, s.engine, "running" if s.running else "stopped", address, s.detail)
        out.print(table)
    _notes(notes)


def down_report(stopped: list[str]) -> None:
    out.print("stopped " + ", ".join(stopped) if stopped else "nothing to stop")


def profile_json(profile: Profile) -> dict[str, Any]:
    return {
        "name": profile.name,
        "path": str(profile.path),
        "description": profile.description,
        "symbols": len(profile.listings),
        "start": str(profile.start),
        "end": str(profile.end),
        "months": len(profile.months),
        "timeframes": list(profile.timeframes),
        "features": [use.name for use in profile.features],
        "reset_target_seconds": profile.reset_target_seconds,
    }


def profiles_json(listing: ProfileListing) -> dict[str, Any]:
    return {
        "profiles": [profile_json(p) for p in listing.profiles],
        "invalid": [{"path": e.file, "error": e.message} for e in listing.invalid],
    }


def profiles_table(listing: ProfileListing) -> None:
    table = Table("profile", "symbols", "range", "timeframes", "features", "reset target")
    # Names are what the user types next: never truncate or wrap them, however narrow the terminal.
    table.columns[0].no_wrap = True
    table.columns[0].min_width = max((len(p.name) for p in listing.profiles), default=7)
    for p in listing.profiles:
        table.add_row(
            p.name,
            str(len(p.listings)),
            f"{p.start} .. {p.end}",
            ",".join(p.timeframes),
            ",".join(use.name for use in p.features),
            f"{p.reset_target_seconds:g} s",
        )
    out.print(table)
    for error in listing.invalid:
        out.print(f"[red]invalid:[/red] {escape(error.message)}", soft_wrap=True)


def market_status(state: MarketStatus) -> None:
    payload = state.to_json()
    table = Table(show_header=False, box=None)
    for key, value in payload.items():
        table.add_row(str(key), str(value))
    out.print(table)
