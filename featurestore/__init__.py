"""featurestore: a content-addressed, multi-process-safe cache of Arrow tables and computed features."""

from featurestore.errors import ComputeError, FeatureStoreError, ManifestBusy, StoreLockTimeout
from featurestore.fingerprint import HASH_METHODS, HashMethod
from featurestore.gc import GCReport, collect_garbage
from featurestore.keys import FeatureKey, config_hash, feature_key, fingerprint_table
from featurestore.maintenance import IntegrityReport
from featurestore.manifest import Entry
from featurestore.store import AccessCounts, CacheStats, FeatureStore, KindStats, WarmReport

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
