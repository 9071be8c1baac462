"""Garbage collection of a feature store, and its command line (``featurestore gc``, ``python -m featurestore.gc``).

It removes entries not accessed for the retention period (access comes from the store's own journal, never from
file atimes), rows whose file is missing or fails the footer-and-size check, files without a row (orphans), COPY
bodies whose content no row holds (``featurestore._bodies``) and abandoned temporaries: found from a read of the
manifest with files checked under no lock, then removed in one short exclusive transaction if the manifest still
shows them as found (``collect_garbage``), so writers do not wait out the checks. Rows go first, files after
COMMIT. Orphans and temporaries younger than the grace period are left alone, and so are the
temporaries of a process still running on this machine whatever their age, so a write in flight in another
process is never deleted. A pack (many keys in one file) is removed only when none of its keys is
left: packs are not rewritten to drop dead keys, because a pack holds one batch of a refresh, whose keys are
written, read and expire together (a pack with some keys expired is rare and small). Afterwards, if an entry went, a
CHECKPOINT compacts the manifest (DuckDB's VACUUM reclaims nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from featurestore import _bodies, _files, _packs, maintenance
from featurestore._cli import OneLineParser, add_root_option, open_store, path_argument
from featurestore._duckdb import duckdb
from featurestore.console import say
from featurestore.errors import FeatureStoreError, StoreFileUnreadable
from featurestore.manifest import Entry, utc_now
from featurestore.render import render_stats
from featurestore.store import FeatureStore

T = TypeVar("T", int, float)

DEFAULT_GRACE = dt.timedelta(hours=1)


@dataclasses.dataclass(frozen=True)
class GCReport:
    """What a collection removed (or, with ``dry_run``, would remove), in counts and bytes."""

    root: str
    dry_run: bool
    retention_days: float
    expired: int
    expired_bytes: int
    missing: int
    corrupt: int
    corrupt_bytes: int
    orphans: int
    orphan_bytes: int
    temporaries: int
    temporary_bytes: int
    entries_before: int
    entries_after: int
    manifest_bytes_before: int
    manifest_bytes_after: int
    # One line per stored file GC left, entries and all, because it cannot open it (StoreFileUnreadable's
    # message: the file and the remedy).
    unreadable: tuple[str, ...] = ()

    @property
    def bytes_freed(self) -> int:
        return self.expired_bytes + self.corrupt_bytes + self.orphan_bytes + self.temporary_bytes

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bytes_freed": self.bytes_freed}


def collect_garbage(
    store: FeatureStore,
    *,
    retention: dt.timedelta,
    grace: dt.timedelta = DEFAULT_GRACE,
    dry_run: bool = False,
    log: Callable[[str], None] | None = None,
) -> GCReport:
    """Remove expired entries, broken rows, orphan files and stale temporaries; then compact the manifest.

    In two steps, so that writers are not kept waiting: what to remove is found from a read of the manifest
    (files checked, strays listed, with no lock held), then one short exclusive transaction removes those
    candidates the manifest still shows as found (a row unchanged and, if expired, not accessed since; a stray
    that no row names). Everything under one exclusive transaction held the store's writers for the whole
    check (2-3 s a run at 12,000 entries): a loop of gc starved them (measured: put median 103 ms alone,
    2.7 s beside a gc loop, 7 puts in 20 s instead of 121)."""
    say = log or (lambda _line: None)
    now = utc_now()
    try:
        cutoff = now - retention
    except OverflowError:  # a retention reaching before year 1 (--retention-weeks 200000): nothing expires
        cutoff = dt.datetime.min.replace(tzinfo=dt.UTC)
    stray_cutoff = time.time() - grace.total_seconds()
    manifest_before = _size(store.manifest.path)
    with store.manifest.read() as con:  # folds the access journal: last access times are current
        entries = store.manifest.select(con)
    expired, missing, corrupt = [], [], []
    sound: dict[Path, bool | None] = {}  # per file: a pack is checked once for all its keys
    unreadable: dict[Path, str] = {}
    for entry in entries.values():
        if entry.path not in sound and entry.path not in unreadable:
            try:
                sound[entry.path] = _sound(entry, entry.pack_bytes or entry.file_size_bytes)
            except StoreFileUnreadable as exc:
                unreadable[entry.path] = str(exc)
        if entry.path in unreadable:
            # Another user's file or a directory made by hand: never removed (it is no damage, and GC cannot
            # tell), nor may it stop the collection of every other entry until someone acts.
            continue
        if entry.last_accessed_ts < cutoff:
            expired.append(entry)
        elif sound[entry.path] is None:
            missing.append(entry)
        elif not sound[entry.path]:
            corrupt.append(entry)
    strays = maintenance.find_strays(store.root, entries)
    orphans = [p for p in strays.orphans if _mtime(p) < stray_cutoff]
    temporaries = [p for p in strays.temporaries if _mtime(p) < stray_cutoff and not _files.writer_alive(p)]
    sizes = {path: _size(path, follow=False) for path in orphans + temporaries}
    if not dry_run and (expired or missing or corrupt or orphans or temporaries):
        with store.manifest.write() as txn:
            held = store.manifest.select(txn.con, [entry.key for entry in expired + missing + corrupt])
            expired = [e for e in expired if _unchanged(held, e) and held[e.key].last_accessed_ts < cutoff]
            missing = [e for e in missing if _unchanged(held, e)]
            corrupt = [e for e in corrupt if _unchanged(held, e)]
            orphans = _still_orphans(store, txn.con, orphans)
            doomed = expired + missing + corrupt
            store.manifest.delete(txn.con, [entry.key for entry in doomed])
            released = store.manifest.unreferenced(txn.con, {entry.path for entry in expired + corrupt})
            # The COPY bodies of the contents no entry holds now go with them (any other's is an orphan above).
            released += _bodies.released(store.root, txn.con, (entry.content_hash for entry in doomed))
            for path in maintenance.in_store(released) + orphans + temporaries:
                txn.after_commit(functools.partial(path.unlink, missing_ok=True))
    doomed = expired + missing + corrupt
    for entry in doomed:
        say(f"{'would remove' if dry_run else 'remove'} entry {entry.key} ({entry.path})")
    for path in orphans + temporaries:
        say(f"{'would remove' if dry_run else 'remove'} stray file {path}")
    if not dry_run and doomed:
        store.manifest.checkpoint()
    return GCReport(
        root=str(store.root),
        dry_run=dry_run,
        retention_days=retention.total_seconds() / 86400,
        expired=len(expired),
        expired_bytes=sum(entry.file_size_bytes for entry in expired),
        missing=len(missing),
        corrupt=len(corrupt),
        corrupt_bytes=sum(_size(entry.path) for entry in corrupt),
        orphans=len(orphans),
        orphan_bytes=sum(sizes[p] for p in orphans),
        temporaries=len(temporaries),
        temporary_bytes=sum(sizes[p] for p in temporaries),
        entries_before=len(entries),
        entries_after=len(entries) - (0 if dry_run else len(doomed)),
        manifest_bytes_before=manifest_before,
        manifest_bytes_after=_size(store.manifest.path),
        unreadable=tuple(unreadable.values()),
    )


def _unchanged(held: dict[str, Entry], seen: Entry) -> bool:
    """Whether the manifest still holds ``seen``'s row as GC checked it (no put replaced it meanwhile)."""
    now = held.get(seen.key)
    return now is not None and (now.path, now.content_hash, now.created_ts, now.pack_offset) == (
        seen.path,
        seen.content_hash,
        seen.created_ts,
        seen.pack_offset,
    )


def _still_orphans(store: FeatureStore, con: duckdb.DuckDBPyConnection, orphans: list[Path]) -> list[Path]:
    """Those ``orphans`` that no row names nor, for a COPY body, holds the content of: a put may have
    published since GC listed them (its row goes in before its file is visible)."""
    bodies = {path: _bodies.hash_of(path) for path in orphans if path.suffix == _bodies.SUFFIX}
    data = store.manifest.unreferenced(con, [path for path in orphans if path not in bodies])
    hashes = {content_hash for content_hash in bodies.values() if content_hash is not None}
    held = _bodies.held(con, hashes) if hashes else set()
    return data + [path for path, content_hash in bodies.items() if content_hash not in held]


def _sound(entry: Entry, expected_size: int) -> bool | None:
    """Cheap check of ``entry``'s file (footer parses, names the key if it is the key's own, size matches the
    row): GC must not read every byte under the lock.

    None when the file is missing; StoreFileUnreadable when something in the way makes it unreadable (a
    symbolic link that loops: ``Path.exists`` answered False, so GC took it for missing and deleted its row)."""
    path = entry.path
    try:
        if _packs.is_pack(path):
            _packs.read_footer_index(path)
        else:
            _files.read_footer_meta(path, entry.key)
        return path.stat().st_size == expected_size
    except FileNotFoundError:
        return None
    except _files.CorruptFile:
        return False


def _size(path: Path, *, follow: bool = True) -> int:
    try:
        return path.stat(follow_symlinks=follow).st_size
    except FileNotFoundError:
        return 0


def _mtime(path: Path) -> float:
    """A stray's own time: a symbolic link's, not its target's (what GC removes is the link; a looping one was
    an OSError traceback here, at every run)."""
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return time.time()


# -- command line ---------------------------------------------------------------------------------------------


def _non_negative(flag: str, kind: Callable[[str], T], noun: str, unit: str) -> Callable[[str], T]:
    """An argparse type: ``kind(text)`` that must be >= 0 and a span of ``unit`` a timedelta holds, else one
    line naming the flag and the value."""

    def parse(text: str) -> T:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}={text!r}: not {noun}") from None
        if value < 0:  # type: ignore[operator]
            raise argparse.ArgumentTypeError(f"{flag}={text!r}: must be >= 0")
        try:
            dt.timedelta(**{unit: value})
        except (OverflowError, ValueError):  # nan, 1e30: a traceback when the collection began, before
            raise argparse.ArgumentTypeError(
                f"{flag}={text!r}: not a number of {unit} up to 2.7 million years"
            ) from None
        return value

    return parse


_weeks = _non_negative("--retention-weeks", int, "an integer", "weeks")
_hours = _non_negative("--grace-hours", float, "a number", "hours")


DESCRIPTION = (
    "Remove entries not accessed for N weeks, rows whose file is missing or broken, orphan files and abandoned"
    " temporaries, in one exclusive manifest transaction; then compact the manifest."
)


def build_parser(prog: str = "featurestore gc") -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``featurestore gc`` (shared by ``python -m featurestore.gc``)."""
    add_root_option(parser)
    parser.add_argument(
        "--retention-weeks", type=_weeks, default=4, help="remove entries not accessed for N weeks"
    )
    parser.add_argument(
        "--grace-hours", type=_hours, default=1.0, help="leave orphans/temporaries younger than this"
    )
    parser.add_argument("--dry-run", action="store_true", help="report what would be removed, remove nothing")
    parser.add_argument("--verbose", action="store_true", help="print every removal")
    parser.add_argument(
        "--output-json",
        type=path_argument("--output-json"),
        default=None,
        help="also write the report as JSON to FILE",
    )
    parser.add_argument(
        "--overview-only", action="store_true", help="print the store's overview, collect nothing"
    )


def main(argv: Sequence[str] | None = None, prog: str = "featurestore gc") -> int:
    """Entry point: parse, call the library, print. Returns the exit status."""
    return run(build_parser(prog).parse_args(argv), prog)


def run(args: argparse.Namespace, prog: str = "featurestore gc") -> int:
    """Run a parsed ``gc`` command line; bad input is one line on stderr and exit status 2."""
    try:
        if args.output_json is not None and not args.output_json.parent.expanduser().absolute().is_dir():
            raise FeatureStoreError(f"--output-json={str(args.output_json)!r}: its directory does not exist")
        store = open_store(args.cache_root)
        result: dict[str, Any]
        if args.overview_only:
            stats = store.get_cache_stats()
            result = stats.to_json()
            say(render_stats(stats))
        else:
            report = collect_garbage(
                store,
                retention=dt.timedelta(weeks=args.retention_weeks),
                grace=dt.timedelta(hours=args.grace_hours),
                dry_run=args.dry_run,
                log=say if args.verbose else None,
            )
            result = report.to_json()
            say(_render(result, "gc (dry run)" if args.dry_run else "gc"))
            for line in report.unreadable:
                print(f"{prog}: left {line}", file=sys.stderr)
        if args.output_json is not None:
            args.output_json.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    except FeatureStoreError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _render(result: dict[str, Any], title: str) -> str:
    lines = [f"featurestore {title}: {result.get('root')}"]
    lines += [
        f"  {name:<22} {len(value) if isinstance(value, (list, tuple)) else value}"
        for name, value in result.items()
        if name != "root"
    ]
    return "\n".join(lines)


__all__ = ["DEFAULT_GRACE", "GCReport", "add_arguments", "build_parser", "collect_garbage", "main", "run"]
