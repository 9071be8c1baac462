"""featurestore: a content-addressed, multi-process-safe cache of Arrow tables and computed features.

The public names are imported on first use (PEP 562 ``__getattr__``): ``featurestore.errors`` is imported by
every ``refresher`` command, and the store itself pulls in pyarrow, pandas and DuckDB, about a second of imports
on this 2-core machine that ``refresher market status`` or ``refresher url`` never use.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

from featurestore.errors import (
    ComputeError,
    FeatureStoreError,
    ManifestBusy,
    StoreDiskFull,
    StoreFileUnreadable,
    StoreFormatNewer,
    StoreLockTimeout,
    StoreNotWritable,
)

# Arrow's memory pool for every process that runs the store or refresher (whose errors import ours, so this runs
# before any refresher module imports pyarrow: the CLI, the library, the jobs workers, the pytest plugin). Set
# here because pyarrow reads the variable once, at its import; nothing is imported for it. On Linux, pyarrow's
# default (mimalloc) maps its arena with MADV_HUGEPAGE, and a warm-store refresh kept faulting in fresh 2 MB
# pages: the kernel clearing them was ~10% of the machine's samples, the client's kernel time 1.5-2.6 s against
# 0.8 s with glibc malloc ("system"), whose peak RSS is also lower (docs/engines.md, "Arrow's memory pool"). A
# user's own ARROW_DEFAULT_MEMORY_POOL wins (a blank one is no choice: pyarrow reads it as unset), and so does a
# pyarrow imported before us (its pool is fixed then).
if (
    sys.platform == "linux"
    and "pyarrow" not in sys.modules
    and not os.environ.get("ARROW_DEFAULT_MEMORY_POOL")
):
    os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"

if TYPE_CHECKING:
    from featurestore._bodies import CopyBody
    from featurestore.fingerprint import HASH_METHODS, HashMethod
    from featurestore.gc import GCReport, collect_garbage
    from featurestore.keys import FeatureKey, config_hash, feature_key, fingerprint_table
    from featurestore.maintenance import IntegrityReport
    from featurestore.manifest import Entry
    from featurestore.store import AccessCounts, CacheStats, FeatureStore, KindStats, WarmReport

# name -> the module that defines it
_LAZY = {
    "CopyBody": "_bodies",
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
    "CopyBody",
    "Entry",
    "FeatureKey",
    "FeatureStore",
    "FeatureStoreError",
    "GCReport",
    "HashMethod",
    "IntegrityReport",
    "KindStats",
    "ManifestBusy",
    "StoreDiskFull",
    "StoreFileUnreadable",
    "StoreFormatNewer",
    "StoreLockTimeout",
    "StoreNotWritable",
    "WarmReport",
    "collect_garbage",
    "config_hash",
    "feature_key",
    "fingerprint_table",
]
