"""``plan`` at production scale: 1,000 symbols x 60 months x 2 timeframes = 120,000 segments, in under 2 s.

Measured in-process (profile load -> desired set -> source versions -> keys -> store lookup -> gap plan)
against an empty store and no server, as ``refresher plan`` does before a first refresh.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from featurestore import FeatureStore
from refresher.profile import load_profile
from refresher.refresh import compute_plan
from refresher.sources import make_source

SYMBOLS, MONTHS = 1000, 60
TARGET_SECONDS = 2.0


def _profile_file(root: Path) -> Path:
    symbols = ", ".join(f"S{i:04d}" for i in range(SYMBOLS))
    path = root / "production_scale.yaml"
    path.write_text(
        f"universe:\n  symbols: [{symbols}]\nmonths: {MONTHS}\nas_of: 2025-03-31\ntimeframes: [1d, 1m]\n"
    )
    return path


def _plan_seconds(path: Path, store: FeatureStore) -> tuple[float, int]:
    started = time.perf_counter()
    profile = load_profile(str(path), [])
    with make_source(profile) as source:
        plan = compute_plan(profile, source, store, None)
    return time.perf_counter() - started, len(plan.desired)


def run(quick: bool = False) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="refresher-bench-plan-") as tmp:
        root = Path(tmp)
        path, store = _profile_file(root), FeatureStore(root / "store")
        _plan_seconds(path, store)  # warm: imports, calendars, the manifest's first open
        runs = [_plan_seconds(path, store) for _ in range(1 if quick else 3)]
    seconds = statistics.median(s for s, _ in runs)
    return [
        {
            "benchmark": f"plan, {runs[0][1]:,} segments ({SYMBOLS} symbols x {MONTHS} months x 2 timeframes)",
            "ours": seconds,
            "baseline": TARGET_SECONDS,
            "unit": "s",
            "ratio": TARGET_SECONDS / seconds,
            "note": "baseline = the 2 s target; empty store, no server; median of 3 (1 in --quick)",
        }
    ]


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv), indent=2, default=str))
