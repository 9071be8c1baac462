"""Errors of the feature store, under refresher's one error tree so a CLI prints them as one line."""

from __future__ import annotations

from typing import Any

from refresher.errors import RefresherError


class FeatureStoreError(RefresherError):
    """The feature store was asked something it cannot do (bad argument, unsupported input)."""


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


def bad_value(field: str, value: Any, reason: str) -> FeatureStoreError:
    """One-line error naming the argument and the value at fault."""
    return FeatureStoreError(f"{field}={value!r}: {reason}", field=field, value=value)


__all__ = ["ComputeError", "FeatureStoreError", "StoreLockTimeout", "bad_value"]
