"""The ``featurestore`` command: thin, each subcommand parses and calls one library function."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from featurestore import gc

_USAGE = "usage: featurestore gc [--cache-root DIR] [--retention-weeks N] [--dry-run] [--verbose] ..."


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``featurestore <command> ...``; bad input is one line on stderr and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help"}:
        print(_USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "gc":
        return gc.main(rest)
    print(f"featurestore: command={command!r}: unknown (known: gc)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
