"""The gap plan is pure: every case is a table of state in, a partition of segments out."""

from __future__ import annotations

import datetime as dt

from refresher.plan import DatabaseSegment, StoredSegment, plan_gaps, segment_key
from refresher.segments import Segment

JAN, FEB, MAR = (dt.date(2025, m, 1) for m in (1, 2, 3))


def seg(symbol: str = "AAA", month: dt.date = JAN, timeframe: str = "1d") -> Segment:
    return Segment(symbol, timeframe, month)  # type: ignore[arg-type]


def keys_for(*segments: Segment, version: str = "v") -> dict[Segment, str]:
    return {s: segment_key(s, "synthetic", version) for s in segments}


def test_segment_key_changes_with_every_part() -> None:
    base = segment_key(seg(), "synthetic", "seed=1")
    variants = {
        segment_key(seg(symbol="AAB"), "synthetic", "seed=1"),
        segment_key(seg(month=FEB), "synthetic", "seed=1"),
        segment_key(seg(timeframe="1m"), "synthetic", "seed=1"),
        segment_key(seg(), "files", "seed=1"),
        segment_key(seg(), "synthetic", "seed=2"),
    }
    assert base not in variants and len(variants) == 5
    assert segment_key(seg(), "synthetic", "seed=1") == base


def test_segment_key_is_unambiguous_across_field_boundaries() -> None:
    # Plain concatenation would make ("AB", "C...") and ("A", "BC...") collide; length prefixes do not.
    assert segment_key(seg(symbol="AB"), "x", "1") != segment_key(seg(symbol="A"), "Bx", "1")


def test_empty_state_fetches_everything() -> None:
    desired = [seg(month=m) for m in (JAN, FEB)]
    plan = plan_gaps(desired, keys_for(*desired), stored={}, loaded={})
    assert plan.to_fetch == tuple(desired)
    assert not plan.to_load and not plan.present and not plan.is_noop


def test_stored_but_not_loaded_is_loaded_and_matching_is_present() -> None:
    a, b = seg(month=JAN), seg(month=FEB)
    keys = keys_for(a, b)
    stored = {keys[a]: StoredSegment(keys[a], "h1", 10), keys[b]: StoredSegment(keys[b], "h2", 12)}
    plan = plan_gaps([a, b], keys, stored, loaded={a: DatabaseSegment("h1", 10)})
    assert plan.present == (a,)
    assert plan.to_load == (b,)
    assert plan.reasons[b] == "not in database"


def test_changed_content_hash_reloads_only_that_segment() -> None:
    a, b = seg(month=JAN), seg(month=FEB)
    keys = keys_for(a, b)
    stored = {keys[a]: StoredSegment(keys[a], "new", 10), keys[b]: StoredSegment(keys[b], "h2", 12)}
    loaded = {a: DatabaseSegment("old", 10), b: DatabaseSegment("h2", 12)}
    plan = plan_gaps([a, b], keys, stored, loaded)
    assert plan.to_load == (a,) and plan.present == (b,)
    assert plan.reasons[a] == "content changed"


def test_verify_catches_rows_deleted_by_hand() -> None:
    a, b = seg(month=JAN), seg(month=FEB)
    keys = keys_for(a, b)
    stored = {keys[s]: StoredSegment(keys[s], "h", 10) for s in (a, b)}
    loaded = {a: DatabaseSegment("h", 10), b: DatabaseSegment("h", 10)}
    assert plan_gaps([a, b], keys, stored, loaded).is_noop
    plan = plan_gaps([a, b], keys, stored, loaded, verified_rows={a: 10, b: 3})
    assert plan.to_load == (b,) and plan.present == (a,)


def test_undesired_loaded_segments_are_stale() -> None:
    a, old = seg(month=FEB), seg(month=JAN)
    keys = keys_for(a)
    stored = {keys[a]: StoredSegment(keys[a], "h", 1)}
    plan = plan_gaps([a], keys, stored, {a: DatabaseSegment("h", 1), old: DatabaseSegment("h0", 1)})
    assert plan.stale == (old,) and plan.is_noop
    assert plan.summary() == {"desired": 1, "present": 1, "to_load": 0, "to_fetch": 0, "stale": 1}


def test_empty_segments_are_present_once_recorded() -> None:
    # A month before a listing: stored as a zero-row table and recorded with rows=0, never fetched again.
    a = seg(month=MAR)
    keys = keys_for(a)
    stored = {keys[a]: StoredSegment(keys[a], "empty", 0)}
    plan = plan_gaps([a], keys, stored, {a: DatabaseSegment("empty", 0)}, verified_rows={})
    assert plan.present == (a,) and plan.is_noop
