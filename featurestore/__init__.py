"""featurestore: a content-addressed, multi-process-safe cache of Arrow tables and computed features.

The public names are imported on first use (PEP 562 ``__getattr__``): ``featurestore.errors`` is imported by
every ``refresher`` command, and the store itself pulls in pyarrow, pandas and DuckDB, about a second of imports
on this 2-core machine that ``refresher market status`` or ``refresher url`` never use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from featurestore.errors import ComputeError, FeatureStoreError, ManifestBusy, StoreLockTimeout

if TYPE_CHECKING:
    from featurestore.fingerprint import HASH_METHODS, HashMethod
    from featurestore.gc import GCReport, collect_garbage
    from featurestore.keys import FeatureKey, config_hash, feature_key, fingerprint_table
    from featurestore.maintenance import IntegrityReport
    from featurestore.manifest import Entry
    from featurestore.store import AccessCounts, CacheStats, FeatureStore, KindStats, WarmReport

# name -> the module that defines it
_LAZY = {
    "HASH_METHODS": "fingerprint",
    "HashMethod": "fingerprint",
    "GCReport": "gc",
    "collect_garbage": "gc",
    "FeatureKey": "keys",
    "config_hash": "keys",
    "feature_key": "keys",
    "fingerprint_table": "keys",
    "IntegrityReport": "maintenance",
    "Entry": "manifest",
    "AccessCounts": "store",
    "CacheStats": "store",
    "FeatureStore": "store",
    "KindStats": "store",
    "WarmReport": "store",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'featurestore' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"featurestore.{_LAZY[name]}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


__all__ = [
    "HASH_METHODS",
    "AccessCounts",
    "CacheStats",
    "ComputeError",
    "Entry",
    "FeatureKey",
    "FeatureStore",
    "FeatureStoreError",
    "GCReport",
    "HashMethod",
    "IntegrityReport",
    "KindStats",
    "ManifestBusy",
    "StoreLockTimeout",
    "WarmReport",
    "collect_garbage",
    "config_hash",
    "feature_key",
    "fingerprint_table",
]
