"""The ``refresher`` command: parse, call one library function, render its result.

``--json`` renders the same report object the library returns. Every RefresherError becomes one line on stderr
and exit status 2, here and nowhere else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import errno
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from refresher.errors import RefresherError
from refresher.settings import Settings

EXIT_USER_ERROR = 2


def _common(json_flag: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--engine", choices=("auto", "local", "docker"), default=None, help="server engine")
    common.add_argument(
        "--state-dir", type=Path, default=None, help="where servers keep state ($REFRESHER_STATE_DIR)"
    )
    common.add_argument("--store", type=Path, default=None, help="feature store root ($FEATURE_STORE_PATH)")
    common.add_argument(
        "--profiles-dir",
        type=Path,
        action="append",
        default=None,
        help="extra profile directory ($REFRESHER_PROFILES)",
    )
    if json_flag:
        common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(
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
    refresh.add_argument("--verify", action="store_true", help="also check row counts in the database")
    refresh.add_argument("--as-of", type=dt.date.fromisoformat, default=None, help="end date (YYYY-MM-DD)")
    plan = profile_cmd("plan", "Print what a refresh would fetch, load and prune, touching nothing.")
    plan.add_argument("--verify", action="store_true", help="also check row counts in the database")
    plan.add_argument("--as-of", type=dt.date.fromisoformat, default=None, help="end date (YYYY-MM-DD)")
    profile_cmd("reset", "Bring the profile's database back to its pristine snapshot.")
    profile_cmd("status", "Show running servers.", profile_required=False)
    profile_cmd("url", "Print the profile's DSN, password included.")
    profile_cmd("down", "Stop the profile's server and remove its data (--profile all: every server).")
    sub.add_parser("profiles", parents=[common], help="List the profiles refresher can find.")
    market = sub.add_parser("market", help="Market calendar queries.")
    market_sub = market.add_subparsers(dest="market_command", required=True, metavar="QUERY")
    status = market_sub.add_parser("status", parents=[_common()], help="Is an exchange open, and when next?")
    status.add_argument("--exchange", "-x", required=True, help="XNYS, XNAS, XTKS, XLON or XETR")
    status.add_argument("--at", type=_parse_time, default=None, help="ISO time (default: now)")
    return parser


def _parse_time(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--at: not an ISO time: {text!r}") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env(
        state_dir=args.state_dir.absolute() if args.state_dir else None,
        store_root=args.store.absolute() if args.store else None,
        engine=args.engine,
    )
    if args.profiles_dir:
        from dataclasses import replace

        settings = replace(settings, profiles_dirs=(*args.profiles_dir, *settings.profiles_dirs))
    return settings


def _emit(args: argparse.Namespace, payload: dict[str, Any], render: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, default=str))
    else:
        render()


def run(args: argparse.Namespace) -> int:
    from refresher import calendar, commands, render

    settings = _settings(args)
    calendar.use_cache_dir(settings.cache_dir / "calendars" if settings.cache_dir else None)
    if args.command == "refresh":
        with render.progress(enabled=not args.json and sys.stderr.isatty()) as on_progress:
            report = commands.refresh(
                settings,
                args.profile,
                prune=args.prune,
                verify=args.verify,
                as_of=args.as_of,
                progress=on_progress,
            )
        _emit(args, report.to_json(), lambda: render.refresh_report(report))
    elif args.command == "plan":
        plan = commands.plan(settings, args.profile, verify=args.verify, as_of=args.as_of)
        _emit(args, plan.to_json(), lambda: render.plan_report(plan))
    elif args.command == "reset":
        restored = commands.reset(settings, args.profile)
        _emit(args, restored.to_json(), lambda: render.reset_report(restored))
    elif args.command == "status":
        statuses = commands.status(settings, args.profile)
        _emit(
            args,
            {"servers": [render.status_json(s) for s in statuses]},
            lambda: render.status_table(statuses),
        )
    elif args.command == "url":
        print(commands.url(settings, args.profile))
    elif args.command == "down":
        stopped = commands.down(settings, args.profile)
        _emit(args, {"stopped": stopped}, lambda: render.down_report(stopped))
    elif args.command == "profiles":
        profiles = commands.profiles(settings)
        _emit(
            args,
            {"profiles": [render.profile_json(p) for p in profiles]},
            lambda: render.profiles_table(profiles),
        )
    elif args.command == "market":
        from refresher.calendar import market_status

        state = market_status(args.exchange, args.at)
        _emit(args, state.to_json(), lambda: render.market_status(state))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; the one place errors become exit codes."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except RefresherError as exc:
        print(f"refresher: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("refresher: interrupted; every finished segment is kept, run again to resume", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(
                f"refresher: disk full writing {exc.filename or 'data'}: free space and run again",
                file=sys.stderr,
            )
            return EXIT_USER_ERROR
        raise


if __name__ == "__main__":
    sys.exit(main())
