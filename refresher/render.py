"""Human output of the CLI (rich); the JSON output is the report objects themselves."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from refresher.engines.base import ServerStatus
from refresher.profile import Profile

out = Console()
err = Console(stderr=True)


@contextmanager
def progress(*, enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A progress bar on stderr fed by the refresh's callback; nothing when output is not a terminal."""
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(f"{phase} segments", total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


def refresh_report(report: Any) -> None:
    seg = report.segments
    table = Table(title=f"refresher: {report.profile} on {report.engine}", show_header=False, box=None)
    table.add_row(
        "segments",
        f"{seg.desired} desired, {seg.present} already present, {seg.loaded} loaded"
        + (f", {seg.pruned} pruned" if seg.pruned else "")
        + (f", {seg.stale} stale (use --prune)" if seg.stale else ""),
    )
    table.add_row("rows loaded", f"{report.rows_loaded:,}")
    table.add_row("store", f"{report.store.hits} hits, {report.store.misses} misses")
    feats = report.features
    if feats.desired:
        table.add_row(
            "features", f"{feats.desired} desired, {feats.loaded} loaded, {feats.computed} computed"
        )
    table.add_row("snapshot", report.snapshot)
    table.add_row("time", f"{report.seconds:.2f} s")
    out.print(table)
    for note in report.notes[:20]:
        err.print(f"[yellow]not loaded:[/yellow] {note}")
    if len(report.notes) > 20:
        err.print(f"[yellow]... and {len(report.notes) - 20} more (see --json)[/yellow]")
    out.print(f"DSN: [bold]{report.dsn}[/bold]")
    out.print(f"with password: [bold]refresher url --profile {report.profile}[/bold]")


def plan_report(plan: Any) -> None:
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


def reset_report(report: Any) -> None:
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


def status_table(statuses: list[ServerStatus]) -> None:
    if not statuses:
        out.print("no servers")
        return
    table = Table("profile", "engine", "state", "address", "detail")
    for s in statuses:
        address = f"{s.host}:{s.port}" if s.port else ""
        table.add_row(s.profile, s.engine, "running" if s.running else "stopped", address, s.detail)
    out.print(table)


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
        "features": list(profile.features),
        "reset_target_seconds": profile.reset_target_seconds,
    }


def profiles_table(profiles: list[Profile]) -> None:
    table = Table("profile", "symbols", "range", "timeframes", "features", "reset target")
    for p in profiles:
        table.add_row(
            p.name,
            str(len(p.listings)),
            f"{p.start} .. {p.end}",
            ",".join(p.timeframes),
            ",".join(p.features),
            f"{p.reset_target_seconds:g} s",
        )
    out.print(table)


def market_status(state: Any) -> None:
    payload = state.to_json()
    table = Table(show_header=False, box=None)
    for key, value in payload.items():
        table.add_row(str(key), str(value))
    out.print(table)
