"""The ``refresher`` command: parse, call one library function, render its result.

``--json`` renders the same report object the library returns. Every RefresherError becomes one line on stderr
and exit status 2, here and nowhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from featurestore.console import end, leave, reader_left
from refresher.errors import USER_ERRORS, SettingError, os_error_message
from refresher.settings import (
    AUTO_POOL,
    DEFAULT_POOL_SIZE,
    ENGINE_NAMES,
    FAST_COPY,
    POOL_SIZE_ENV,
    PoolSize,
    Settings,
    parse_pool_size,
)

EXIT_USER_ERROR = 2


class _UsageError(Exception):
    """argparse's complaint, as one line for ``main`` to print (under ``--json``, on stdout as JSON too)."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the option and the value, not five lines of usage."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _common(json_flag: bool = True) -> _OneLineParser:
    common = _OneLineParser(add_help=False)
    common.add_argument(
        "--engine",
        choices=ENGINE_NAMES,
        default=None,
        help="server engine: auto (default, $REFRESHER_ENGINE), local, docker, or compose (the `make up` Postgres)",
    )
    common.add_argument(
        "--state-dir",
        type=_parse_path,
        default=None,
        help="where servers keep state ($REFRESHER_STATE_DIR; default: found like git finds .git, walking up "
        "to the first .refresher or checkout root; `refresher status` prints it)",
    )
    common.add_argument(
        "--store",
        type=_parse_path,
        default=None,
        help="feature store root ($FEATURE_STORE_PATH, default ~/.feature_cache)",
    )
    common.add_argument(
        "--profiles-dir",
        type=_parse_path,
        action="append",
        default=None,
        help="extra profile directory ($REFRESHER_PROFILES)",
    )
    if json_flag:
        common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = _OneLineParser(
        prog="refresher",
        description="Isolated PostgreSQL databases loaded with exactly the market data a task needs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def profile_cmd(name: str, help_text: str, *, profile_required: bool = True) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        cmd.add_argument("--profile", "-p", required=profile_required, help="profile name or YAML path")
        return cmd

    refresh = profile_cmd("refresh", "Load the profile's data into its isolated Postgres and print the DSN.")
    refresh.add_argument("--prune", action="store_true", help="delete segments the profile no longer wants")
    refresh.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="say on stderr whether the refresh stamp answered a no-op (and why not), and whether it was written",
    )
    refresh.add_argument("--verify", action="store_true", help="also check row counts in the database")
    refresh.add_argument("--as-of", type=_parse_date, default=None, help=AS_OF_HELP)
    refresh.add_argument(
        "--allow-shrink",
        action="store_true",
        default=None,
        help="let a loaded segment become empty when the source now has no rows for it (default: refuse)",
    )
    refresh.add_argument(
        "--pool-size",
        type=_parse_pool_size,
        default=None,
        metavar="N|auto",
        help=f"warm clones to keep for reset, bounded by free disk (each refill leaves a tenth of the filesystem, "
        f"at least 1 GB, free; a reflink clone costs almost none); remembered by the server: a later refresh "
        f"without it (nor ${POOL_SIZE_ENV}, which it overrides) keeps this size. Default ({AUTO_POOL}, which also "
        f"forgets a size chosen before): {DEFAULT_POOL_SIZE}, or none where the server's copies are full copies "
        f"(no reflink, e.g. ext4) and a copy of the database takes at most {FAST_COPY} s there (a reset then "
        "copies it); `refresher status` says which and why",
    )
    plan = profile_cmd(
        "plan",
        "Print what a refresh would fetch and load, and which segments are stale (a refresh --prune deletes "
        "them), touching nothing.",
    )
    plan.add_argument("--verify", action="store_true", help="also check row counts in the database")
    plan.add_argument("--as-of", type=_parse_date, default=None, help=AS_OF_HELP)
    warm = profile_cmd(
        "warm",
        "Fill the store with the profile's segments and features without starting any database (a nightly job: "
        "the next refresh only loads).",
    )
    warm.add_argument("--as-of", type=_parse_date, default=None, help=AS_OF_HELP)
    status_cmd = profile_cmd("status", "Show this state dir's servers.", profile_required=False)
    for cmd in (refresh, plan, status_cmd):
        cmd.add_argument(
            "--on-bad-rows",
            choices=("fail", "skip", "quarantine"),
            default=None,
            help="rows that fail validation: stop (fail), leave out (skip), or leave out and keep in "
            "refresher_rejects (quarantine); default: the profile's source.on_bad_rows, else fail",
        )
    reset = profile_cmd("reset", "Bring the profile's database back to its pristine snapshot.")
    url_cmd = profile_cmd("url", "Print the profile's DSN, password included.")
    for cmd in (refresh, reset):
        cmd.add_argument(
            "--no-wait",
            action="store_true",
            help="fail at once if another refresh or reset of the profile is running (default: wait)",
        )
    url_cmd.add_argument(
        "--no-wait",
        action="store_true",
        help="fail at once while the profile's first refresh is running (default: wait for it; a later refresh "
        "is not waited for)",
    )
    status_cmd.add_argument(
        "--all-checkouts",
        action="store_true",
        help="also list every refresher container on the Docker daemon, whichever checkout made it (read-only)",
    )
    profile_cmd("down", "Stop the profile's server and remove its data (--profile all: every server).")
    sub.add_parser(
        "profiles", parents=[common], help="List the profiles refresher can find, invalid ones too."
    )
    market = sub.add_parser("market", help="Market calendar queries.")
    market_sub = market.add_subparsers(dest="market_command", required=True, metavar="QUERY")
    status = market_sub.add_parser("status", parents=[_common()], help="Is an exchange open, and when next?")
    status.add_argument(
        "--exchange", "-x", required=True, type=str.upper, help="XNYS, XNAS, XTKS, XLON or XETR (any case)"
    )
    status.add_argument(
        "--at",
        type=_parse_time,
        default=None,
        help="ISO time, e.g. 2025-07-03T16:59:00-04:00; without a zone it is UTC (default: now)",
    )
    from refresher.jobs.parser import add_commands

    add_commands(sub, common)
    return parser


AS_OF_HELP = (
    "pin the data window's end date (YYYY-MM-DD); by default the window ends at the last session before today, "
    "so it moves with the date"
)


def _parse_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError as exc:
        # argparse prefixes "argument --as-of: "; the message names only the value.
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from exc


def _parse_path(text: str) -> Path:
    # Path("") is the current directory: `--store ""` made a store of wherever the command ran, `--state-dir ""`
    # kept servers' state there.
    if not text.strip():
        raise argparse.ArgumentTypeError(f"empty, name a path: {text!r}")
    return Path(text)


def _parse_pool_size(text: str) -> PoolSize:
    try:
        return parse_pool_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}: {text!r}") from exc


def _parse_time(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


# The commands that use the pool size: a bad $REFRESHER_POOL_SIZE is their error (exit 2). Every other command
# warns and goes on: one who mistyped the variable can still see the status, get the url, reset and tear down
# (a reset refills the pool to the size the server remembers, whatever the variable says).
_USE_POOL_SIZE = ("refresh",)


def _settings(args: argparse.Namespace) -> Settings:
    def ignored(exc: SettingError) -> None:
        _say(f"warning: {exc} (ignored: `{args.command}` does not use it)")

    settings = Settings.from_env(
        on_bad_pool_size=None if args.command in _USE_POOL_SIZE else ignored,
        state_dir=args.state_dir.absolute() if args.state_dir else None,
        store_root=args.store.absolute() if args.store else None,
        engine=args.engine,
        pool_size=vars(args).get("pool_size"),  # refresh's flag, over $REFRESHER_POOL_SIZE
    )
    if args.profiles_dir:
        from dataclasses import replace

        settings = replace(settings, profiles_dirs=(*args.profiles_dir, *settings.profiles_dirs))
    return settings


def _say(message: str) -> None:
    print(f"refresher: {message}", file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, payload: dict[str, Any], render: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        render()


Emit = Callable[[argparse.Namespace, dict[str, Any], Callable[[], None]], None]


def _prints_as_it_works(args: argparse.Namespace) -> bool:
    """Whether the command writes its answer to stdout while it works (``jobs status --watch``'s live view),
    not once at the end."""
    return bool(getattr(args, "watch", False)) and not getattr(args, "json", False)


@contextlib.contextmanager
def _stdout_on_stderr() -> Iterator[None]:
    """While the command works, what anything writes to stdout goes to stderr: a user's feature module printing
    (``print``, or C code and child processes writing to fd 1), a server tool's chatter. Stdout then carries the
    command's answer alone (``--json``'s one object), written after this, and the work needs no lock around each
    call into a user's code. fd 1 is pointed at stderr too where both are open."""
    sys.stdout.flush()
    saved: int | None = None
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, ValueError):  # no fd 1 or 2 (closed, an embedding host): Python's own stdout only
        if saved is not None:
            os.close(saved)
            saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            if _user_code_ran():
                _flush_c_stdio()  # what C code buffered for fd 1 goes out while it is stderr still
            os.dup2(saved, 1)
            os.close(saved)


def _user_code_ran() -> bool:
    """Whether the command imported a user's feature module (``features.registry.USER_MODULES``), whose C code
    may have buffered output for fd 1. A command that parsed no profile has not even imported the registry."""
    registry = sys.modules.get("refresher.features.registry")
    return bool(registry is not None and registry.USER_MODULES)


def _flush_c_stdio() -> None:
    """The C library's ``fflush(NULL)``: a C extension's ``printf`` into a pipe sits in libc's buffer, which
    would otherwise reach fd 1 at exit, after the answer."""
    # Here, after a user's module ran only: no other command imports ctypes (tests/refresher/test_cli_imports.py).
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)


def _url_hint(args: argparse.Namespace, profile: str) -> str:
    """A `refresher url` command that works in the user's shell, which may not have .venv/bin on its PATH.

    ``profile`` is the name the refresh resolved, not ``--profile`` as given: `url` takes names only, and
    refused the hint of a refresh of ``--profile /path/to/mine.yaml``."""
    where = f" --state-dir {shlex.quote(str(args.state_dir.absolute()))}" if args.state_dir else ""
    tail = f"url --profile {shlex.quote(profile)}{where}"
    if os.environ.get("MAKELEVEL") and not where:
        return f"make url PROFILE={shlex.quote(profile)}"  # run by `make refresh`: stay with make
    script = Path(sys.argv[0])
    if script.name == "refresher" and script.exists():
        import shutil  # here, not for every command: it brings bz2 and lzma

        on_path = shutil.which("refresher")
        if on_path and Path(on_path).resolve() == script.resolve():
            return f"refresher {tail}"
        return f"{shlex.quote(str(script.absolute()))} {tail}"
    return f"{shlex.quote(sys.executable)} -m refresher.cli {tail}"


def run(args: argparse.Namespace) -> int:
    # Imported here, and the command's own modules inside each library function: a command pays only for the
    # imports it uses (tests/refresher/test_cli_imports.py holds each to its list).
    from refresher import calendar, render

    settings = args.settings = _settings(args)  # kept: an unwritable path's message names its setting
    calendar.use_cache_dir(settings.cache_dir / "calendars" if settings.cache_dir else None)
    if args.command == "market":  # a calendar's answer: no profile, no user code, no server
        state = calendar.market_status(args.exchange, args.at)
        _emit(args, state.to_json(), lambda: render.market_status(state))
        return 0
    if _prints_as_it_works(args):
        try:
            return _run(args, settings, _emit)
        except BrokenPipeError:  # `jobs status --watch | head`: the reader stopped watching
            reader_left()
            return 0
    answers: list[Callable[[], None]] = []

    def emit(args: argparse.Namespace, payload: dict[str, Any], render: Callable[[], None]) -> None:
        answers.append(lambda: _emit(args, payload, render))

    with _stdout_on_stderr():
        status = _run(args, settings, emit)
    try:
        for answer in answers:
            answer()
    except BrokenPipeError:  # `refresher profiles | head -1`: the reader left, having read what it wanted
        reader_left()
    return status


def _run(args: argparse.Namespace, settings: Settings, emit: Emit) -> int:
    from refresher import commands, render

    if args.command != "profiles":  # every other command talks to a server through psycopg
        _quiet_psycopg()
    if args.command in ("jobs", "worker"):
        from refresher.jobs import cli as jobs_cli

        return jobs_cli.run(args, settings, emit)
    if args.command == "refresh":
        flags = [
            flag
            for flag, given in (
                ("--prune", args.prune),
                ("--verify", args.verify),
                ("--as-of", args.as_of),
                ("--on-bad-rows", args.on_bad_rows),
                ("--allow-shrink", args.allow_shrink),
            )
            if given
        ]
        said = _say if args.verbose else lambda message: None
        if flags:
            said(f"stamp: not checked: {', '.join(flags)} given")
        else:
            verdict = commands.refresh_if_noop(settings, args.profile)
            noop = verdict.report
            said(f"stamp: {verdict.why}" if noop is not None else f"stamp: not used: {verdict.why}")
            if noop is not None:
                emit(
                    args,
                    noop,
                    lambda: render.refresh_summary(noop, url_hint=_url_hint(args, noop["profile"])),
                )
                return 0
        mode = "off" if args.json else "bar" if sys.stderr.isatty() else "lines"
        with render.progress(mode) as on_progress:
            report = commands.refresh(
                settings,
                args.profile,
                prune=args.prune,
                verify=args.verify,
                as_of=args.as_of,
                progress=on_progress,
                on_bad_rows=args.on_bad_rows,
                wait=not args.no_wait,
                on_wait=_say,
                allow_shrink=args.allow_shrink,
                on_stamp=lambda outcome: said(f"stamp: {outcome}"),
            )
        emit(
            args,
            report.to_json(),
            lambda: render.refresh_report(report, url_hint=_url_hint(args, report.profile)),
        )
    elif args.command == "plan":
        plan = commands.plan(
            settings,
            args.profile,
            verify=args.verify,
            as_of=args.as_of,
            on_bad_rows=args.on_bad_rows,
            on_wait=_say,
        )
        emit(args, plan.to_json(), lambda: render.plan_report(plan))
    elif args.command == "warm":
        warmed = commands.warm(settings, args.profile, as_of=args.as_of, on_wait=_say)
        emit(args, warmed.to_json(), lambda: render.warm_report(warmed))
    elif args.command == "reset":
        restored = commands.reset(settings, args.profile, wait=not args.no_wait, on_wait=_say)
        emit(args, restored.to_json(), lambda: render.reset_report(restored))
    elif args.command == "status":
        statuses = commands.status(settings, args.profile, all_checkouts=args.all_checkouts)
        pools = commands.pools(settings, statuses)
        notes = (
            commands.left_out(settings, args.profile, on_bad_rows=args.on_bad_rows, on_wait=_say)
            if args.profile
            else ()
        )
        emit(
            args,
            {
                "state_dir": str(settings.state_dir),
                "servers": [render.status_json(s, p) for s, p in zip(statuses, pools, strict=True)],
                **({"notes": list(notes)} if args.profile else {}),
            },
            lambda: render.status_table(statuses, settings.state_dir, notes, pools),
        )
    elif args.command == "url":
        dsn = commands.url(settings, args.profile, wait=not args.no_wait, on_wait=_say)
        emit(args, {"profile": args.profile, "dsn": dsn}, lambda: print(dsn))
    elif args.command == "down":
        down = commands.down(settings, args.profile, on_wait=_say)
        emit(
            args,
            {"stopped": down.stopped, "left_alone": down.left_alone},
            lambda: render.down_report(down.stopped, down.left_alone),
        )
    elif args.command == "profiles":
        listing = commands.profiles(settings)
        emit(args, render.profiles_json(listing), lambda: render.profiles_table(listing))
    return 0


def _quiet_psycopg() -> None:
    """psycopg logs what it ignored while an error was on its way out ('error ignored terminating
    <psycopg.Pipeline [BAD]>: ... server closed the connection unexpectedly'), and with no handler configured
    logging's last resort printed those lines on stderr above the error's one line (a `down` beside a
    `reset`). The error says it; they are dropped. (``logging`` is imported by psycopg anyway.)"""
    import logging

    logging.getLogger("psycopg").addHandler(logging.NullHandler())


def _roots(args: argparse.Namespace | None) -> dict[Path, str]:
    """Each directory the command's settings name -> how to move it, for an unwritable path's message."""
    settings: Settings | None = getattr(args, "settings", None)
    if settings is None:
        return {}
    roots = {
        settings.state_dir: "--state-dir or REFRESHER_STATE_DIR",
        settings.store_root: "--store or FEATURE_STORE_PATH",
    }
    if settings.cache_dir is not None:
        roots[settings.cache_dir] = "XDG_CACHE_HOME"
    return roots


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; the one place errors become exit codes. As the console script
    (``argv`` None) it ends the process itself (``featurestore.console.end``)."""
    return end(_main(argv), argv)


def _main(argv: Sequence[str] | None) -> int:
    args: argparse.Namespace | None = None
    try:
        # Inside the try: building the parser imports the jobs package, seconds of work on a busy machine
        # during which a Ctrl-C must still end in one line.
        args = build_parser().parse_args(argv)
        return run(args)
    except _UsageError as exc:
        return _failed(str(exc), EXIT_USER_ERROR, args, argv)
    except USER_ERRORS as exc:
        return _failed(f"refresher: {exc}", exc.exit_code, args, argv)
    except KeyboardInterrupt:
        print(f"refresher: {_interrupted(args)}", file=sys.stderr)
        if argv is None:  # the console script, not a caller in-process: leave now
            leave(130, finalize=False)  # tearing pyarrow, pandas and DuckDB down took ~2 s when busy
        return 130
    except OSError as exc:
        message = os_error_message(exc, _roots(args))
        if message is None:
            raise
        return _failed(f"refresher: {message}", EXIT_USER_ERROR, args, argv)


# What an interrupted command leaves, in its own words: a reset or a down has no segments to resume (they said
# "every finished segment is kept, run again to resume", which sent the user looking for a load).
_INTERRUPTED = {
    "refresh": "every finished segment is kept, run again to resume",
    "warm": "every finished segment is kept, run again to resume",
    "reset": "the database is as it was or already reset; run the reset again",
    "down": "run the down again to finish removing the server",
}


def _interrupted(args: argparse.Namespace | None) -> str:
    """The line for a Ctrl-C: ``interrupted``, and what to do for the commands that leave work to finish."""
    done = _INTERRUPTED.get(getattr(args, "command", ""))
    return f"interrupted; {done}" if done else "interrupted"


def _failed(line: str, status: int, args: argparse.Namespace | None, argv: Sequence[str] | None) -> int:
    """Print the error's one line on stderr and, under ``--json`` (looked for in the words when they did not
    parse), as the one JSON object on stdout too: a script reading stdout alone gets JSON, not nothing."""
    print(line, file=sys.stderr)
    words = sys.argv[1:] if argv is None else argv
    if getattr(args, "json", False) if args is not None else "--json" in words:
        try:
            print(json.dumps({"error": line.removeprefix("refresher: "), "exit_code": status}))
        except OSError:  # stdout itself failed (`> /dev/full`, often the very error): the line above says it
            reader_left()  # what is left in its buffer goes nowhere: no second line at the process's end
    return status


if __name__ == "__main__":
    sys.exit(main())
