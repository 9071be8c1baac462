"""The ``featurestore`` command: thin, each subcommand parses, calls one library function and renders its result.

Bad input is one line on stderr and exit status 2; ``verify`` exits 1 when it finds damage (like ``fsck``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any

from featurestore import gc
from featurestore._cli import OneLineParser, add_root_option, open_store
from featurestore.console import end, say
from featurestore.errors import FeatureStoreError
from featurestore.render import render_integrity, render_stats

PROG = "featurestore"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=PROG,
        description="A content-addressed cache of Arrow tables and computed features (see docs/featurestore.md).",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=OneLineParser
    )
    collect = commands.add_parser(
        "gc", help="remove expired entries, broken rows and stray files", description=gc.DESCRIPTION
    )
    gc.add_arguments(collect)
    stats = commands.add_parser(
        "stats",
        help="entries and bytes per kind, hits, misses and hit rate",
        description="What the store holds (entries and bytes, per kind: segment or feature) and how it has been"
        " used: hits and misses of every process since the manifest was created (see docs/featurestore.md).",
    )
    verify = commands.add_parser(
        "verify",
        help="check every entry's file; exit 1 if any is missing or corrupt",
        description="Read every entry's file and check its content hash (--quick: footer and size only)."
        " Exit 0 when sound, 1 when a file is missing or corrupt (a later read evicts and re-fetches it).",
    )
    verify.add_argument("--quick", action="store_true", help="check footers and sizes, not content hashes")
    rebuild = commands.add_parser(
        "rebuild",
        help="recreate the manifest from the data files",
        description="Recreate every manifest row from the data files' own metadata; access times of known"
        " entries are kept. The store does this by itself when its manifest is lost or unreadable.",
    )
    for sub in (stats, verify, rebuild):
        add_root_option(sub)
        sub.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; the one place store errors become exit codes. As the console script
    (``argv`` None) it ends the process itself (``featurestore.console.end``)."""
    return end(_main(argv), argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "gc":
        return gc.run(args, f"{PROG} gc")
    try:
        return _run(args)
    except FeatureStoreError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code


def _run(args: argparse.Namespace) -> int:
    store = open_store(args.cache_root)
    if args.command == "stats":
        stats = store.get_cache_stats()
        _emit(args, stats.to_json(), lambda: render_stats(stats))
        return 0
    if args.command == "verify":
        report = store.validate_cache_integrity(deep=not args.quick)
        as_json = {**dataclasses.asdict(report), "ok": report.ok}
        _emit(args, as_json, lambda: render_integrity(report, deep=not args.quick))
        return 0 if report.ok else 1
    entries = store.rebuild_manifest()
    _emit(
        args,
        {"root": str(store.root), "entries": entries},
        lambda: f"featurestore rebuild: {entries:,} entries",
    )
    return 0


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: Any) -> None:
    """Print the command's answer (``say``). A reader gone (`featurestore verify | head -1`) read what it wanted:
    the command's status stands (a damaged store's 1 was 0 when the whole command was what caught it)."""
    say(json.dumps(payload, indent=2, sort_keys=True, default=str) if args.json else text())


if __name__ == "__main__":
    sys.exit(main())
