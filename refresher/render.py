"""Human output of the CLI: plain aligned text; the JSON output is the report objects themselves.

Plain ``print`` rather than rich: rich costs 30-60 ms of imports, a third of what `market status` or a stamped
no-op refresh may take in all (issue 13). Only the progress bar of a refresh on a terminal imports it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from refresher.calendar import MarketStatus
    from refresher.commands import ProfileListing
    from refresher.engines.base import ServerStatus
    from refresher.pool import PoolStatus
    from refresher.profile import Profile
    from refresher.refresh import PlanReport, ProgressCallback, RefreshReport
    from refresher.snapshot import RestoreReport
    from refresher.warm import WarmReport


def _out(line: str = "") -> None:
    print(line, file=sys.stdout)


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _columns(rows: Sequence[Sequence[str]], *, header: Sequence[str] | None = None, indent: str = "") -> None:
    """Rows as left-aligned columns two spaces apart (the last column unpadded); never truncated or wrapped,
    so a name can be copied from any terminal width."""
    lines = [list(header)] if header else []
    lines += [list(row) for row in rows]
    if not lines:
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)] + line[len(widths) :]
        _out(indent + "  ".join(cells).rstrip())


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
        yield ProgressLines(sys.stderr)
    else:
        yield None


@contextmanager
def _bar() -> Iterator[ProgressCallback]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
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

    def __init__(self, stream: TextIO, every: float = 2.0) -> None:
        self.stream = stream
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
        print(
            f"refresher: {phase} {done}/{total} segments{percent}, {rows:,} rows{rate}, {elapsed:.0f} s",
            file=self.stream,
            flush=True,
        )


def refresh_report(report: RefreshReport, *, url_hint: str) -> None:
    refresh_summary(report.to_json(), url_hint=url_hint)


def refresh_summary(report: dict[str, Any], *, url_hint: str) -> None:
    """A refresh report in its JSON form: what ``--json`` prints, whichever path (full, or the stamp) made it."""
    seg, store, feats = report["segments"], report["store"], report["features"]
    rows = [
        (
            "segments",
            f"{seg['desired']} desired, {seg['present']} already present, {seg['loaded']} loaded"
            + (f", {seg['pruned']} pruned" if seg["pruned"] else "")
            + (f", {seg['stale']} stale (use --prune)" if seg["stale"] else ""),
        ),
        ("rows loaded", f"{report['rows_loaded']:,}"),
        ("store", f"{store['hits']} hits, {store['misses']} misses"),
    ]
    if feats["desired"]:
        rows.append(
            (
                "features",
                f"{feats['desired']} desired, {feats['loaded']} loaded, {feats['computed']} computed"
                + (f", {feats['pruned']} pruned" if feats["pruned"] else ""),
            )
        )
    # per reason: dropped / rejected / quarantined
    rows += [("rows left out", f"{count:,} {reason}") for reason, count in report["left_out"].items()]
    rows += [
        ("snapshot", report["snapshot"]),
        (
            "pool",
            _pool_size_line(report["pool_size"])
            + (f"; {report['pool_disk']}" if report.get("pool_disk") else ""),
        ),
        ("time", f"{report['seconds']:.2f} s"),
    ]
    _out(f"refresher: {report['profile']} on {report['engine']}")
    _columns(rows, indent="  ")
    _notes(report["notes"])
    _out(f"DSN: {report['dsn']}")
    _out(f"with password: {url_hint}")
    # The DSN above has no password, so psql given it asks for one the user never saw: this line works as is.
    _out(f'psql: psql "$({url_hint})"')


def warm_report(report: WarmReport) -> None:
    _out(
        f"warmed {report.profile}: {report.segments} segments ({report.fetched} fetched), "
        f"{report.features} (feature, symbol) pairs ({report.computed} computed) in {report.seconds:.2f} s; "
        "no database touched"
    )


def plan_report(plan: PlanReport) -> None:
    summary = plan.plan.summary()
    where = "running server" if plan.server_running else "no server yet"
    _out(f"plan for {plan.profile} ({plan.engine}, {where}):")
    columns = ("desired", "present", "to_load", "to_fetch", "stale")
    _columns([[str(summary[c]) for c in columns]], header=columns, indent="  ")
    for label, segments in (
        ("fetch", plan.plan.to_fetch),
        ("load", plan.plan.to_load),
        ("stale", plan.plan.stale),
    ):
        shown = ", ".join(str(s) for s in segments[:8])
        if segments:
            more = f" (+{len(segments) - 8} more)" if len(segments) > 8 else ""
            _out(f"  {label}: {shown}{more}")
    _notes(plan.notes)


def _notes(notes: Sequence[str], shown: int = 20) -> None:
    """What the source left out of segments, on stderr (the first ``shown``; ``--json`` has them all)."""
    for note in notes[:shown]:
        _err(f"not loaded: {note}")
    if len(notes) > shown:
        _err(f"... and {len(notes) - shown} more (see --json)")


def reset_report(report: RestoreReport) -> None:
    _out(f"reset in {report.seconds * 1000:.0f} ms ({report.method})")


def _pool_size_line(size: int) -> str:
    if size == 0:
        return "no warm clones: a reset copies the database (--pool-size, $REFRESHER_POOL_SIZE)"
    return f"{size} warm clone{'s' if size > 1 else ''}: a reset renames one into place"


def status_json(status: ServerStatus, pool: PoolStatus | None = None) -> dict[str, Any]:
    return {
        "engine": status.engine,
        "profile": status.profile,
        "running": status.running,
        "host": status.host,
        "port": status.port,
        "detail": status.detail,
        "pool": pool.to_json() if pool is not None and pool.pristine else None,
    }


def _pool_cell(pool: PoolStatus | None) -> str:
    if pool is None:
        return ""
    if not pool.pristine:
        return "no snapshot"
    return f"{len(pool.ready)}/{pool.target} ready, reset: {pool.reset}"


def status_table(
    statuses: list[ServerStatus],
    state_dir: Path,
    notes: Sequence[str] = (),
    pools: Sequence[PoolStatus | None] = (),
) -> None:
    """``pools``: each server's warm pool (None where it is not running or not ours to ask)."""
    _out(f"state dir: {state_dir}")
    if not statuses:
        _out("no servers")
    else:
        shown = [*pools, *[None] * (len(statuses) - len(pools))]
        _columns(
            [
                (
                    s.profile,
                    s.engine,
                    "running" if s.running else "stopped",
                    f"{s.host}:{s.port}" if s.port else "",
                    _pool_cell(pool),
                    s.detail,
                )
                for s, pool in zip(statuses, shown, strict=True)
            ],
            header=("profile", "engine", "state", "address", "pool", "detail"),
        )
        for s, pool in zip(statuses, shown, strict=True):
            if pool is not None and pool.why:
                _out(f"{s.profile}: {pool.why}")
            if pool is not None and pool.failed:
                _out(f"{s.profile}: {pool.failed}")
            if pool is not None and pool.refilling:
                _out(f"{s.profile}: {pool.refilling}")
            if pool is not None and pool.bodies:
                _out(f"{s.profile}: {pool.bodies}")
    _notes(notes)


def down_report(stopped: list[str], left_alone: list[str]) -> None:
    if stopped or not left_alone:
        _out("stopped " + ", ".join(stopped) if stopped else "nothing to stop")
    for line in left_alone:
        _out(line)


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
    _columns(
        [
            (
                p.name,
                str(len(p.listings)),
                f"{p.start} .. {p.end}",
                ",".join(p.timeframes),
                ",".join(use.name for use in p.features),
                f"{p.reset_target_seconds:g} s",
            )
            for p in listing.profiles
        ],
        header=("profile", "symbols", "range", "timeframes", "features", "reset target"),
    )
    for error in listing.invalid:
        _out(f"invalid: {error.message}")


def market_status(state: MarketStatus) -> None:
    _columns([(key, str(value)) for key, value in state.to_json().items()])
