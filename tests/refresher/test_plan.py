"""The gap plan is pure: every case is a table of state in, a partition of segments out."""

from __future__ import annotations

import datetime as dt
import hashlib

from hypothesis import assume, given
from hypothesis import strategies as st

from refresher import plan as plan_module
from refresher.plan import (
    SEGMENT_KEY_FORMAT,
    DatabaseSegment,
    LedgerView,
    StoredSegment,
    StoreView,
    digest_parts,
    plan_gaps,
    segment_key,
)
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


# --- Keys: pinned formats and unambiguous encodings -------------------------------------------------------


def test_digest_parts_is_the_documented_length_prefixed_sha256() -> None:
    # Each part is its UTF-8 bytes after an 8-byte big-endian length; spelled out here so a change of the
    # encoding (prefix width, byte order, encoding) fails loudly instead of silently re-keying every segment.
    manual = hashlib.sha256(
        b"\0" * 7 + b"\x02ab" + b"\0" * 7 + b"\x01c" + b"\0" * 7 + b"\x02\xc3\xa9"
    ).hexdigest()
    assert digest_parts("ab", "c", "é") == manual
    assert digest_parts() == hashlib.sha256(b"").hexdigest()


def test_digest_parts_does_not_confuse_part_boundaries() -> None:
    assert digest_parts("ab", "c") != digest_parts("a", "bc")
    assert digest_parts("a", "") != digest_parts("a")
    assert digest_parts("", "a") != digest_parts("a", "")


@given(st.lists(st.text(max_size=6), max_size=5), st.lists(st.text(max_size=6), max_size=5))
def test_different_part_lists_give_different_digests(left: list[str], right: list[str]) -> None:
    assume(left != right)
    assert digest_parts(*left) != digest_parts(*right)


@given(st.text(min_size=2, max_size=12), st.data())
def test_any_split_of_a_string_gives_a_distinct_digest(text: str, data: st.DataObject) -> None:
    cut = data.draw(st.integers(1, len(text) - 1))
    assert digest_parts(text[:cut], text[cut:]) != digest_parts(text)
    other = data.draw(st.integers(1, len(text) - 1).filter(lambda c: c != cut))
    assert digest_parts(text[:cut], text[cut:]) != digest_parts(text[:other], text[other:])


def test_segment_key_is_pinned() -> None:
    # A known-good value: if this fails, the key format changed. Make it deliberate: bump SEGMENT_KEY_FORMAT
    # (every stored segment is then re-fetched) and update the value here in the same commit.
    assert SEGMENT_KEY_FORMAT == "refresher-segment-v1"
    plan_module._key_prefix.cache_clear()  # computed afresh here, not remembered from an earlier test
    key = segment_key(Segment("AAPL", "1m", dt.date(2025, 1, 1)), "synthetic", "seed=1")
    assert key == "seg-1644df9dbe27fc819d6b97f53935a28da7d4e37cb2383f1519d74f7333ede918"
    parts = (SEGMENT_KEY_FORMAT, "synthetic", "AAPL", "1m", "2025-01", "seed=1")
    assert key == "seg-" + digest_parts(*parts)


def test_segment_key_prefix_separates_symbol_from_timeframe() -> None:
    # ("x", "AB") and ("xA", "B") concatenate alike: the pair a missing length prefix would collide.
    assert segment_key(seg(symbol="AB"), "x", "1") != segment_key(seg(symbol="B"), "xA", "1")


def test_segment_keys_of_two_source_kinds_never_mix() -> None:
    # Each source kind's prefix is hashed once and copied: keys made in any order must not leak into each other.
    first = [segment_key(seg(), kind, "v") for kind in ("files", "synthetic", "files")]
    plan_module._key_prefix.cache_clear()
    assert first == [segment_key(seg(), kind, "v") for kind in ("files", "synthetic", "files")]
    assert first[0] == first[2] != first[1]
    assert first[0] == "seg-" + digest_parts(SEGMENT_KEY_FORMAT, "files", "AAA", "1d", "2025-01", "v")


# --- The plan's partition and its reasons -----------------------------------------------------------------


def test_every_reason_is_recorded() -> None:
    fetch, load, changed, rows, present, stale = (seg(symbol=s) for s in ("F", "L", "C", "R", "P", "S"))
    desired = [fetch, load, changed, rows, present]
    keys = keys_for(*desired)
    stored = {keys[s]: StoredSegment(keys[s], "h", 5) for s in desired if s != fetch}
    loaded = {
        changed: DatabaseSegment("other", 5),
        rows: DatabaseSegment("h", 5),
        present: DatabaseSegment("h", 5),
        stale: DatabaseSegment("h", 5),
        fetch: DatabaseSegment("h", 5),
    }
    plan = plan_gaps(desired, keys, stored, loaded, verified_rows={rows: 2, present: 5})
    assert plan.reasons == {
        fetch: "not in store",
        load: "not in database",
        changed: "content changed",
        rows: "row count 2 != recorded 5",
        stale: "no longer desired",
    }
    assert plan.to_fetch == (fetch,)
    assert plan.to_load == (changed, load, rows)  # sorted, like every tuple of the plan
    assert plan.present == (present,)
    assert plan.stale == (stale,)
    assert plan.summary() == {"desired": 5, "present": 1, "to_load": 3, "to_fetch": 1, "stale": 1}


def test_verify_counts_an_unreported_segment_as_empty() -> None:
    a, b = seg(month=JAN), seg(month=FEB)
    keys = keys_for(a, b)
    stored = {keys[a]: StoredSegment(keys[a], "h", 4), keys[b]: StoredSegment(keys[b], "e", 0)}
    loaded = {a: DatabaseSegment("h", 4), b: DatabaseSegment("e", 0)}
    # --verify found no rows at all: the recorded-empty month is fine, the four-row month is reloaded.
    plan = plan_gaps([a, b], keys, stored, loaded, verified_rows={})
    assert plan.to_load == (a,) and plan.present == (b,)
    assert plan.reasons[a] == "row count 0 != recorded 4"


def test_store_beats_database_when_the_key_is_missing() -> None:
    # Loaded with the right hash, but the store lost the key (GC): the source must produce it again.
    a = seg()
    keys = keys_for(a)
    plan = plan_gaps([a], keys, stored={}, loaded={a: DatabaseSegment("h", 1)}, verified_rows={a: 1})
    assert plan.to_fetch == (a,) and not plan.present and plan.reasons[a] == "not in store"


def test_desired_set_is_deduplicated_and_sorted_and_state_is_kept() -> None:
    a, b = seg(symbol="B"), seg(symbol="A")
    keys = keys_for(a, b)
    stored = {keys[a]: StoredSegment(keys[a], "h", 1)}
    loaded = {a: DatabaseSegment("h", 1)}
    plan = plan_gaps(iter([a, b, a]), keys, stored, loaded)
    assert plan.desired == (b, a)
    assert plan.to_fetch == (b,) and plan.present == (a,)
    assert plan.keys == keys and plan.stored == stored and plan.loaded == loaded
    assert plan.reasons == {b: "not in store"}


def test_the_views_of_the_raw_look_ups_plan_as_the_objects_do() -> None:
    a, b, c, d = (seg(symbol=s) for s in "ABCD")
    keys = keys_for(a, b, c, d)
    stored = {keys[s]: StoredSegment(keys[s], h, 3) for s, h in ((a, "h"), (b, "h"), (c, "new"))}
    loaded = {
        a: DatabaseSegment("h", 3),
        c: DatabaseSegment("h", 3),
        seg(symbol="E"): DatabaseSegment("h", 1),
    }
    store_view = StoreView({key: (entry.content_hash, entry.rows) for key, entry in stored.items()})
    ledger_view = LedgerView(
        {(s.symbol, s.timeframe, s.month): (r.content_hash, r.rows) for s, r in loaded.items()}
    )
    assert dict(store_view) == stored and dict(ledger_view) == loaded
    viewed, plain = (
        plan_gaps([a, b, c, d], keys, store_view, ledger_view),
        plan_gaps([a, b, c, d], keys, stored, loaded),
    )
    assert viewed == plain
    assert (viewed.present, viewed.to_load, viewed.to_fetch) == ((a,), (b, c), (d,))
    assert viewed.stored is store_view  # kept as it is: no object per stored segment


def test_is_noop_only_when_nothing_is_to_load_or_fetch() -> None:
    a = seg()
    keys = keys_for(a)
    stored = {keys[a]: StoredSegment(keys[a], "h", 1)}
    assert not plan_gaps([a], keys, stored, loaded={}).is_noop  # only to_load
    assert not plan_gaps([a], keys, {}, loaded={}).is_noop  # only to_fetch
    assert plan_gaps([], {}, {}, loaded={a: DatabaseSegment("h", 1)}).is_noop  # only stale


def test_stale_segments_are_sorted() -> None:
    old = [seg(symbol=s) for s in ("C", "A", "B")]
    plan = plan_gaps([], {}, {}, loaded={s: DatabaseSegment("h", 1) for s in old})
    assert plan.stale == tuple(sorted(old)) and plan.desired == ()
