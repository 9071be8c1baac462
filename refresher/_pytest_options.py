"""The plugin's options: each one a command-line flag and an ini key, resolved once into ``PluginOptions``.

Precedence is command line, then ini file, then the environment (through ``Settings.from_env``, the one place
the environment is read), then the built-in default.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from refresher.errors import ProfileError, RefresherError
from refresher.profile_files import find_profile_file
from refresher.settings import PoolSize, Settings, parse_pool_size

DEFAULT_PROFILE = "ui_testing"
ENGINES = ("auto", "docker", "local")
MARKER = "refresher_profile"


@dataclass(frozen=True)
class _Option:
    name: str  # the flag without dashes; the ini key is the same with underscores
    help: str
    multiple: bool = False
    switch: bool = False  # a flag without a value; its ini key is a bool

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def ini(self) -> str:
        return self.name.replace("-", "_")


OPTIONS = (
    _Option(
        "refresher-profile", f"profile name or YAML path loaded for refresher_db (default {DEFAULT_PROFILE})"
    ),
    _Option("refresher-engine", "server engine: auto (docker when it answers, else local), docker or local"),
    _Option("refresher-store", "feature store root (default $FEATURE_STORE_PATH or ~/.feature_cache)"),
    _Option("refresher-as-of", "fixed as_of date YYYY-MM-DD for reproducible data (default: the profile's)"),
    _Option("refresher-profiles-dir", "extra directory searched for profile YAML files", multiple=True),
    _Option(
        "refresher-state-dir", "where local-engine servers live (default $REFRESHER_STATE_DIR or .refresher)"
    ),
    _Option(
        "refresher-pool-size",
        "warm clones kept per loaded server (default $REFRESHER_POOL_SIZE, else one per xdist worker plus one, "
        "at least 2; auto: the same); 0 keeps none: each refresher_db is then a copy of the database, not a rename",
    ),
    _Option(
        "refresher-reuse",
        "keep the loaded server running after the run for the next one (per checkout; not for CI)",
        switch=True,
    ),
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("refresher", "refresher: PostgreSQL loaded with market data")
    for opt in OPTIONS:
        if opt.multiple:
            group.addoption(opt.flag, action="append", dest=opt.ini, default=None, help=opt.help)
            parser.addini(opt.ini, opt.help, type="paths")
        elif opt.switch:
            group.addoption(opt.flag, action="store_true", dest=opt.ini, default=None, help=opt.help)
            parser.addini(opt.ini, opt.help, type="bool", default=False)
        else:
            group.addoption(opt.flag, action="store", dest=opt.ini, default=None, help=opt.help)
            parser.addini(opt.ini, opt.help, default=None)


@dataclass(frozen=True)
class PluginOptions:
    """Everything the fixtures need to know, resolved from flags, ini, environment and defaults."""

    profile: str
    engine: str
    as_of: dt.date | None
    settings: Settings
    reuse: bool = False

    @classmethod
    def from_config(cls, config: pytest.Config) -> PluginOptions:
        def value(ini: str) -> str | None:
            flag = config.getoption(ini)
            if flag is not None:
                return str(flag)
            from_ini = config.getini(ini)
            return str(from_ini) if from_ini else None

        extra_dirs = [Path(p).absolute() for p in config.getoption("refresher_profiles_dir") or []]
        extra_dirs += [Path(p) for p in config.getini("refresher_profiles_dir") or []]
        state_dir, store = value("refresher_state_dir"), value("refresher_store")
        base = Settings.from_env(
            state_dir=Path(state_dir).expanduser().absolute() if state_dir else None,
            store_root=Path(store).expanduser().absolute() if store else None,
            pool_size=_pool_size(value("refresher_pool_size")),
        )
        settings = Settings(
            state_dir=base.state_dir,
            store_root=base.store_root,
            # User directories first: the first directory holding a name wins over the built-in profiles.
            profiles_dirs=(*extra_dirs, *base.profiles_dirs),
            engine=value("refresher_engine") or base.engine,
            pg_image_override=base.pg_image_override,
            require_docker=base.require_docker,
            pool_size=base.pool_size,
        )
        if settings.engine not in ENGINES:
            raise RefresherError(
                f"--refresher-engine={settings.engine!r}: choose one of {', '.join(ENGINES)}",
                field="refresher_engine",
                value=settings.engine,
            )
        return cls(
            profile=value("refresher_profile") or DEFAULT_PROFILE,
            engine=settings.engine,
            as_of=parse_as_of(value("refresher_as_of")),
            settings=settings,
            reuse=bool(config.getoption("refresher_reuse") or config.getini("refresher_reuse")),
        )


def options_given(config: pytest.Config) -> bool:
    """Whether any refresher option is set by a flag or an ini key (the environment alone does not count)."""
    return any(config.getoption(opt.ini) is not None or config.getini(opt.ini) for opt in OPTIONS)


def check_options(config: pytest.Config, options: Callable[[], PluginOptions]) -> None:
    """Bad refresher options are pytest's one-line usage error, before any test runs.

    Only when a flag or ini key is set: a project that merely has refresher installed must not fail over an
    environment variable meant for the CLI (its fixtures, if used, then fail with the same one line).
    """
    if not options_given(config) or config.getoption("help", False):
        return
    try:
        resolved = options()
        find_profile_file(resolved.profile, resolved.settings.profiles_dirs)  # the file only: no YAML read
    except RefresherError as exc:
        raise pytest.UsageError(f"refresher: {exc}") from None


# The engines' messages name the CLI's flag ("... or use --engine local"): in a pytest run that flag is an
# "unrecognized arguments" error, and the same choice is this plugin's option.
_CLI_ENGINE_FLAG = re.compile(r"(?<![\w-])--engine(?:[ =](auto|docker|local)\b|\b)")


def in_plugin_terms(message: str) -> str:
    """``message`` with the CLI's ``--engine NAME`` spelled as the plugin's ``--refresher-engine=NAME``."""
    return _CLI_ENGINE_FLAG.sub(
        lambda m: f"--refresher-engine={m[1]}" if m[1] else "--refresher-engine", message
    )


def parse_as_of(text: str | None) -> dt.date | None:
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ProfileError("--refresher-as-of", "as_of", text, "not a date (want YYYY-MM-DD)") from None


def _pool_size(text: str | None) -> PoolSize | None:
    if text is None:
        return None
    try:
        return parse_pool_size(text)
    except ValueError as exc:
        raise RefresherError(f"--refresher-pool-size={text!r}: {exc}") from None


def marker_profile(item: pytest.Item) -> str | None:
    """The profile named by the closest ``@pytest.mark.refresher_profile("name")``, if any."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    args = [*marker.args, *marker.kwargs.values()]
    if len(args) != 1 or not isinstance(args[0], str | os.PathLike):
        raise ProfileError(
            f"{item.nodeid}", f"@pytest.mark.{MARKER}", args, "takes exactly one profile name or path"
        )
    return os.fspath(args[0])


__all__ = [
    "DEFAULT_PROFILE",
    "ENGINES",
    "MARKER",
    "PluginOptions",
    "add_options",
    "check_options",
    "in_plugin_terms",
    "marker_profile",
    "options_given",
]
