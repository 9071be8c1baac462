"""Pieces every ``featurestore`` subcommand shares: the one-line parser and the store root option."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from featurestore.errors import FeatureStoreError
from featurestore.store import DEFAULT_ROOT, ROOT_ENV, FeatureStore


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input as one line and exit status 2, never usage text or a traceback."""

    def error(self, message: str) -> NoReturn:
        # Our type checkers already name the option and value; drop argparse's "argument --x: " in front.
        message = re.sub(r"^argument [^:]+: (?=--)", "", message)
        unknown_command = r"^argument COMMAND: invalid choice: '([^']*)' \(choose from (.*)\)$"
        message = re.sub(unknown_command, r"command='\1': unknown (known: \2)", message)
        self.exit(2, f"{self.prog}: {message}\n")


def path_argument(option: str) -> Callable[[str], Path]:
    """An argparse type for ``option``'s path: an empty one is bad input, not the current directory (``Path("")``
    is ``.``: `--cache-root ""` made a store of whatever directory the command ran in)."""

    def parse(text: str) -> Path:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{option}={text!r}: empty; name a path")
        return Path(text)

    return parse


def add_root_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-root",
        type=path_argument("--cache-root"),
        default=None,
        metavar="DIR",
        help=f"store root (default ${ROOT_ENV}, else {DEFAULT_ROOT})",
    )


def open_store(cache_root: Path | None) -> FeatureStore:
    """The store at ``--cache-root`` (or the default): an existing directory, never created by a typo."""
    root = cache_root or Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT).expanduser()
    if not root.is_dir():
        raise FeatureStoreError(f"--cache-root={str(root)!r}: no such directory")
    return FeatureStore(root, on_wait=lambda line: print(line, file=sys.stderr, flush=True))


__all__ = ["OneLineParser", "add_root_option", "open_store", "path_argument"]
