"""The fast paths of planning at scale compute exactly what the plain definitions say."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from refresher.plan import SEGMENT_KEY_FORMAT, digest_parts, plan_gaps, segment_key
from refresher.profile import load_profile
from refresher.segments import Segment, desired_segments


def test_a_segment_key_is_the_digest_of_all_its_parts() -> None:
    segment = Segment("BRK.B", "1m", dt.date(2024, 2, 1))
    for kind, version in (("synthetic", "v1"), ("files", ""), ("postgres", "x" * 300)):
        parts = (SEGMENT_KEY_FORMAT, kind, "BRK.B", "1m", "2024-02", version)
        assert segment_key(segment, kind, version) == f"seg-{digest_parts(*parts)}"
    assert segment_key(segment, "synthetic", "v1") != segment_key(segment, "synthetic", "v2")


def test_desired_segments_are_every_combination_sorted_once(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("universe:\n  symbols: [MSFT, AAPL, KO]\nmonths: 14\nas_of: 2024-02-10\n")
    profile = load_profile(str(path), [])
    desired = desired_segments(profile)
    assert desired == sorted(
        Segment(s, tf, m) for s in ("AAPL", "KO", "MSFT") for tf in ("1d", "1m") for m in profile.months
    )
    assert len(desired) == len(set(desired)) == 3 * 2 * 14
    assert Segment("AAPL", "1d", dt.date(2023, 1, 1)).month_label == "2023-01"


def test_plan_gaps_orders_whatever_order_it_is_given() -> None:
    segments = [Segment(s, "1d", dt.date(2024, m, 1)) for s in ("B", "A") for m in (3, 1, 2)]
    keys = {s: str(s) for s in segments}
    plan = plan_gaps(list(reversed(segments)), keys, {}, {})
    assert list(plan.desired) == sorted(segments) and list(plan.to_fetch) == sorted(segments)
