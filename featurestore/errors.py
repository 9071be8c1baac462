"""Errors of the feature store: one small tree of its own, so the store installs and imports without refresher.

Every error a caller can fix carries a one-line message naming the argument and the value at fault, the fields as
attributes, and the exit status a command line should use (2). refresher prints these as one line too: it lists
``FeatureStoreError`` among the errors its CLI reports (``refresher.errors.USER_ERRORS``).
"""

from __future__ import annotations

import shutil
from typing import Any


class FeatureStoreError(Exception):
    """The feature store was asked something it cannot do (bad argument, unsupported input)."""

    #: The exit status a command line uses for it: the caller can fix the input.
    exit_code = 2

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)  # str(error) is the one line
        self.message, self.fields = message, fields


class ComputeError(FeatureStoreError):
    """A ``compute_func`` raised or returned something that is not a DataFrame or an Arrow table."""

    def __init__(self, func: str, key: str, reason: str) -> None:
        super().__init__(
            f"compute_func={func}: {reason} (key {key[:16]}..., nothing cached)", func=func, key=key
        )
        self.func = func
        self.key = key
        self.reason = reason


class StoreLockTimeout(FeatureStoreError):
    """A store lock was not acquired in time (another process holds it)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(f"lock={path}: not acquired within {timeout:g}s", path=path, timeout=timeout)


class ManifestBusy(FeatureStoreError):
    """Something outside the store (a DuckDB shell, another tool) holds the manifest file open."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(
            f"manifest={path}: held open by another program ({detail}); close it and run again",
            path=path,
        )


class StoreNotWritable(FeatureStoreError):
    """The store's directory cannot be written (a read-only mount, another user's directory): even a read takes
    a lock file there. Also something else where a lock file goes (a directory made by hand), with its own
    ``remedy``; and a manifest (``what``) a write needs and this user may not write (0444, a teammate's)."""

    NOT_WRITABLE = (
        "the store needs a directory this user can write: point the store elsewhere "
        "(--store, FEATURE_STORE_PATH, --cache-root)"
    )

    def __init__(
        self, path: str, reason: str, remedy: str = NOT_WRITABLE, *, what: str = "store lock"
    ) -> None:
        super().__init__(
            f"{what}={path}: cannot be opened for writing ({reason}); {remedy}", path=path, reason=reason
        )


class StoreFileUnreadable(FeatureStoreError):
    """A stored file cannot be opened for reading: something in the way (a directory made where it goes, a file
    where its directory goes, a symbolic link that loops), or a file this user may not read (another user's, 0600, in a shared store). Neither is damage to evict: GC took the second for corrupt
    and removed another user's file, and both were tracebacks from every read, verify and gc."""

    def __init__(self, path: str, reason: str, in_the_way: bool) -> None:
        remedy = (
            "move it out of the way and run again"
            if in_the_way
            else "give this user read access to it, or remove it (the store fetches it again)"
        )
        super().__init__(f"stored file={path}: cannot be read ({reason}); {remedy}", path=path, reason=reason)


class StoreDiskFull(FeatureStoreError):
    """The store's disk (or the user's quota there) is full where the manifest had to be written."""

    def __init__(self, root: str, free: int, detail: str) -> None:
        super().__init__(
            f"disk full: {root} has {free / 2**20:,.0f} MB free, not enough to write to the store "
            f"({detail}); free some space and run again",
            path=root,
            free=free,
        )

    @classmethod
    def at(cls, root: str, detail: str) -> StoreDiskFull:
        """The error for ``root``, with the space free there now."""
        try:
            free = shutil.disk_usage(root).free
        except OSError:
            free = 0
        return cls(root, free, detail)


class StoreFormatNewer(FeatureStoreError):
    """The manifest records a store format newer than this featurestore writes: a newer version filled the store,
    and this one would misread its files (and, writing, record its own older format over the newer one). Also a
    manifest in a storage version this DuckDB cannot read (``upgrade`` then names duckdb)."""

    def __init__(
        self, path: str, reason: str, upgrade: str = "refresher/featurestore", **fields: Any
    ) -> None:
        super().__init__(
            f"manifest={path}: {reason}; upgrade {upgrade}, or point the store elsewhere (--store, "
            "FEATURE_STORE_PATH, --cache-root)",
            path=path,
            **fields,
        )

    @classmethod
    def store_format(cls, path: str, found: int, known: int) -> StoreFormatNewer:
        return cls(
            path,
            f"store format {found} was written by a newer featurestore (this one knows formats up to {known})",
            found=found,
            known=known,
        )


def bad_value(field: str, value: Any, reason: str) -> FeatureStoreError:
    """One-line error naming the argument and the value at fault."""
    return FeatureStoreError(f"{field}={value!r}: {reason}", field=field, value=value)


__all__ = [
    "ComputeError",
    "FeatureStoreError",
    "ManifestBusy",
    "StoreDiskFull",
    "StoreFileUnreadable",
    "StoreFormatNewer",
    "StoreLockTimeout",
    "StoreNotWritable",
    "bad_value",
]
