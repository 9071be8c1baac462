"""The one error tree of refresher: every failure a user can cause or fix says so in one line.

The CLI turns a ``RefresherError`` into ``refresher: <message>`` and exit status 2 in exactly one place
(``refresher.cli.main``); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from featurestore.errors import FeatureStoreError

_MAX_SHOWN = 120


# The most of a user's exception message a line shows: a message holding a whole array or file stays readable.
EXCEPTION_LINE_CHARS = 200


def exception_line(exc: BaseException) -> str:
    """What a user's code raised, in one line: ``Type: first line of its message`` (cut at ``EXCEPTION_LINE_CHARS``),
    or ``Type`` alone; an exception whose message cannot be read (its ``__str__`` raises) says so."""
    name = type(exc).__name__
    try:
        text = str(exc).strip()
    except Exception as failure:  # the user's __str__: its own error names it, once (no recursion)
        return f"{name} (its message could not be read: {type(failure).__name__})"
    line = text.splitlines()[0] if text else ""
    if len(line) > EXCEPTION_LINE_CHARS:
        line = line[:EXCEPTION_LINE_CHARS] + "..."
    return f"{name}: {line}" if line else name


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line (libpq's and Redis's span several), or its type's name."""
    return " ".join(str(exc).split()) or type(exc).__name__


class RefresherError(Exception):
    """Base of every error refresher raises on purpose."""

    exit_code = 2

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields

    def __str__(self) -> str:
        return self.message


class ProfileError(RefresherError):
    """A profile file is missing, unreadable or invalid."""

    def __init__(self, file: Path | str, field: str, value: Any, reason: str) -> None:
        shown = repr(value)
        if len(shown) > _MAX_SHOWN:  # one line, and never a whole document pasted back at the user
            shown = f"{shown[: _MAX_SHOWN - 3]}..."
        super().__init__(f"{file}: {field}={shown}: {reason}", file=str(file), field=field, value=value)
        self.file = str(file)
        self.field = field
        self.value = value
        self.reason = reason

    @classmethod
    def unknown(cls, name: str, searched: list[Path], known: list[str]) -> ProfileError:
        where = ", ".join(str(p) for p in searched) or "(no profile directory)"
        choices = ", ".join(sorted(known)) or "none"
        return cls(where, "profile", name, f"no such profile (known: {choices})")


class SettingError(RefresherError):
    """An environment variable holds a value refresher cannot use."""

    def __init__(self, name: str, value: str, reason: str) -> None:
        super().__init__(f"{name}={value!r}: {reason}", name=name, value=value)
        self.name = name
        self.value = value


class CalendarError(RefresherError):
    """An exchange or a time the calendar cannot answer for."""


class SourceError(RefresherError):
    """A data source cannot produce a segment (missing file, bad column, unreachable upstream)."""


class EngineUnavailable(RefresherError):
    """No server can be started or reached with the chosen engine."""


class EngineStateError(RefresherError):
    """The engine's recorded state disagrees with reality (container gone, data dir removed...)."""


class LoadError(RefresherError):
    """A segment could not be loaded into the target database."""


class FeatureError(RefresherError):
    """A feature function raised, or returned something that is not one float row per bar."""

    def __init__(self, feature: str, symbol: str, reason: str, function: str | None = None) -> None:
        # A user's function is named beside its entry: the profile's `name` is the table, not where the code is.
        named = feature if function is None else f"{feature} ({function})"
        fields = {"feature": feature, "symbol": symbol} | ({} if function is None else {"function": function})
        super().__init__(
            f"feature {named}, symbol {symbol}: {reason}; nothing of {feature} was loaded", **fields
        )


class SnapshotError(RefresherError):
    """No pristine snapshot exists, or it cannot be restored."""


class DiskFull(RefresherError):
    """The disk under the server or the state dir filled up; nothing was half-written."""


class ProfileBusy(RefresherError):
    """Another refresh or reset of the same profile holds its lock, or another command its server's start and
    stop lock (and the caller chose not to wait)."""

    @classmethod
    def held(cls, profile: str, lock: Path) -> ProfileBusy:
        return cls(
            f"profile {profile}: another refresh or reset is running (lock {lock}); "
            "run again without --no-wait to wait for it",
            profile=profile,
            lock=str(lock),
        )

    @classmethod
    def starting(cls, profile: str, engine: str, lock: Path) -> ProfileBusy:
        return cls(
            f"profile {profile}: another command is starting or stopping its {engine} server (lock {lock}); "
            "run again without --no-wait to wait for it",
            profile=profile,
            lock=str(lock),
        )


class JobError(RefresherError):
    """The distributed job queue failed in a way the user can act on."""


# The feature store stands alone (it never imports refresher), so its errors are not RefresherErrors; this is the
# one list of errors a user can fix, each printed by the CLI as one line with its ``exit_code``.
USER_ERRORS: tuple[type[RefresherError] | type[FeatureStoreError], ...] = (RefresherError, FeatureStoreError)


def os_error_message(exc: OSError, roots: Mapping[Path, str] | None = None) -> str | None:
    """The one line for an OSError the user can fix (a full disk; a read-only mount or another user's directory,
    named), or None: anything else is a bug and keeps its traceback. ``roots`` (a directory -> the setting that
    moves it) names the setting to change for a path under one of them."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full writing {exc.filename or 'data'}: free space and run again"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and exc.filename:
        # A state dir or store on a read-only mount, or another user's: the first lock file was a traceback.
        # The store's path said "point REFRESHER_STATE_DIR", which does not move the store.
        path = Path(os.fsdecode(exc.filename)).absolute()
        under = [(root, name) for root, name in (roots or {}).items() if path.is_relative_to(root)]
        setting = max(under, key=lambda item: len(item[0].parts))[1] if under else "REFRESHER_STATE_DIR"
        return f"{exc.filename}: {exc.strerror}; point {setting} (or the path named) at a directory this user can write"
    return None


# A password in text about to be shown: a URL's (``scheme://user:PASSWORD@``) and a key=value DSN's
# (``password=PASSWORD``, or ``password = 'with spaces'``).
_URL_PASSWORD = re.compile(r"(://[^/@\s]*?:)[^/\s]*@")
_KEY_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE)


def without_secrets(text: str) -> str:
    """``text`` with every password it spells shown as ``***`` (a line of a profile, a URL that did not parse)."""
    return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


__all__ = [
    "USER_ERRORS",
    "CalendarError",
    "DiskFull",
    "EngineStateError",
    "EngineUnavailable",
    "FeatureError",
    "JobError",
    "LoadError",
    "ProfileBusy",
    "ProfileError",
    "RefresherError",
    "SettingError",
    "SnapshotError",
    "SourceError",
    "exception_line",
    "one_line",
    "os_error_message",
    "without_secrets",
]
