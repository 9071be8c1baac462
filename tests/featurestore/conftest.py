"""Fixtures of the featurestore tests: a store on a fresh root and small market-like frames."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from featurestore import FeatureStore


@pytest.fixture
def store(tmp_path: Path) -> FeatureStore:
    return FeatureStore(tmp_path / "cache")


def link_out(directory: Path, elsewhere: Path) -> Path:
    """``directory`` of a store (``data/<shard>``, ``bodies/<shard>``) moved to ``elsewhere`` and replaced by a
    symbolic link to it, as by hand: a place whose files are not the store's to delete. Returns ``elsewhere``."""
    directory.rename(elsewhere)
    directory.symlink_to(elsewhere)
    return elsewhere


def make_bars(rows: int = 500, *, seed: int = 0, tz: str = "UTC") -> pd.DataFrame:
    """Minute bars with a DatetimeIndex, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    index = pd.date_range("2024-03-01 14:30", periods=rows, freq="min", tz="UTC").tz_convert(tz)
    close = 100 + rng.standard_normal(rows).cumsum()
    return pd.DataFrame({"close": close, "volume": rng.integers(1, 1000, rows)}, index=index)


@pytest.fixture
def bars() -> pd.DataFrame:
    return make_bars()


@pytest.fixture
def read_only_store(tmp_path: Path) -> Iterator[Path]:
    """A filled store reached through a read-only bind mount; skipped where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("a bind mount needs root")
    real, mounted = tmp_path / "real", tmp_path / "read-only"
    store = FeatureStore(real)
    store.put_many([("seg-a", pa.table({"x": [1, 2]}), "A")])
    mounted.mkdir()
    done = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(real), str(mounted)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"mount --bind -o ro is not allowed here: {done.stderr.strip()}")
    try:
        yield mounted
    finally:
        subprocess.run(["umount", "-l", str(mounted)], check=False)
