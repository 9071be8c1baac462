"""The bulk plan (batched versions and keys, the ledger compared by SegmentId) equals the per-segment plan it
replaced, on a profile that varies everything a segment's key and state depend on."""

from __future__ import annotations

import datetime as dt
import operator
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import cast

import hypothesis
import pytest
from hypothesis import strategies as st

from featurestore import FeatureStore
from refresher.plan import (
    DatabaseSegment,
    GapPlan,
    LedgerView,
    StoredSegment,
    StoreView,
    plan_gaps,
    segment_key,
    segment_keys,
)
from refresher.profile import Profile, load_profile
from refresher.refresh import compute_plan
from refresher.segments import Segment, desired_segments
from refresher.sources import make_source
from refresher.sources.base import Source

_ORDER = operator.attrgetter("symbol", "timeframe", "month")


def reference_plan_gaps(
    desired: Iterable[Segment],
    keys: Mapping[Segment, str],
    stored: Mapping[str, StoredSegment],
    loaded: Mapping[Segment, DatabaseSegment],
    *,
    verified_rows: Mapping[Segment, int] | None = None,
) -> GapPlan:
    """``plan_gaps`` as it was before the bulk version: one segment at a time, kept here as the definition."""
    wanted = sorted(set(desired), key=_ORDER)
    present: list[Segment] = []
    to_load: list[Segment] = []
    to_fetch: list[Segment] = []
    reasons: dict[Segment, str] = {}
    for segment in wanted:
        in_store = stored.get(keys[segment])
        in_db = loaded.get(segment)
        if in_store is None:
            to_fetch.append(segment)
            reasons[segment] = "not in store"
        elif in_db is None:
            to_load.append(segment)
            reasons[segment] = "not in database"
        elif in_db.content_hash != in_store.content_hash:
            to_load.append(segment)
            reasons[segment] = "content changed"
        elif verified_rows is not None and verified_rows.get(segment, 0) != in_db.rows:
            to_load.append(segment)
            reasons[segment] = f"row count {verified_rows.get(segment, 0)} != recorded {in_db.rows}"
        else:
            present.append(segment)
    wanted_set = set(wanted)
    stale = sorted((s for s in loaded if s not in wanted_set), key=_ORDER)
    for segment in stale:
        reasons[segment] = "no longer desired"
    partition = (tuple(wanted), dict(keys), tuple(present), tuple(to_load), tuple(to_fetch), tuple(stale))
    return GapPlan(*partition, reasons, dict(stored), dict(loaded))


# Five exchanges (Tokyo's lunch break, London's and Frankfurt's holidays), both timeframes, a range that starts
# and ends mid-month (partial first and last months) across a year end (holidays at both ends).
VARIED = """\
universe:
  symbols: [AAPL, KO, "7203", VOD, SAP, MSFT]
  exchanges: {{"7203": XTKS, VOD: XLON, SAP: XETR, MSFT: XNAS}}
start: {start}
end: 2024-01-17
timeframes: [1d, 1m]
seeds: {{KO: 7}}
"""


def varied_profile(tmp_path: Path, start: str) -> Profile:
    path = tmp_path / f"varied_{start.replace('-', '')}.yaml"
    path.write_text(VARIED.format(start=start))
    return load_profile(str(path), [])


class _Manifest:
    """The store's lookup answered from a dict: the plan's only question to the store."""

    def __init__(self, entries: Mapping[str, StoredSegment]) -> None:
        self.entries = entries

    def lookup_hashes(self, keys: Sequence[str], *, count: bool = False) -> dict[str, tuple[str, int]]:
        return {
            key: (self.entries[key].content_hash, self.entries[key].rows)
            for key in keys
            if key in self.entries
        }


def reference_keys(source: Source, desired: Sequence[Segment]) -> dict[Segment, str]:
    return {s: segment_key(s, source.kind, source.version(s)) for s in desired}


def test_batched_versions_and_keys_equal_one_segment_at_a_time(tmp_path: Path) -> None:
    profile = varied_profile(tmp_path, "2023-10-18")
    desired = desired_segments(profile)
    assert len({s.symbol for s in desired}) == 6 and {s.timeframe for s in desired} == {"1d", "1m"}
    shuffled = random.Random(3).sample(desired, len(desired))  # no reliance on the desired order
    with make_source(profile) as source:
        assert source.versions(shuffled) == [source.version(s) for s in shuffled]
        assert len(set(source.versions(desired))) == 6 * 4  # per symbol and month, the same for 1d and 1m
        expected = reference_keys(source, shuffled)
        assert segment_keys(shuffled, source.kind, source.versions(shuffled)) == [
            expected[s] for s in shuffled
        ]
        assert segment_keys(shuffled, "files", ["v"] * len(shuffled)) == [
            segment_key(s, "files", "v") for s in shuffled
        ]


@pytest.mark.parametrize("seed", range(8))
def test_the_bulk_plan_equals_the_per_segment_plan(tmp_path: Path, seed: int) -> None:
    """A back-fill (the range now starts two months earlier) over a database loaded for the later range, with
    some segments stored, some loaded with other content, some with other row counts, some stale."""
    rng = random.Random(seed)
    earlier, later = varied_profile(tmp_path, "2023-08-09"), varied_profile(tmp_path, "2023-10-18")
    with make_source(earlier) as source, make_source(later) as before:
        desired = desired_segments(earlier)
        keys = reference_keys(source, desired)
        old_keys = reference_keys(before, desired_segments(later))
    hashes = {key: f"h{rng.randrange(3)}" for key in (*keys.values(), *old_keys.values())}
    stored = {k: StoredSegment(k, hashes[k], rng.randrange(30)) for k in keys.values() if rng.random() < 0.8}
    loaded: dict[Segment, DatabaseSegment] = {
        s: DatabaseSegment(hashes[k] if rng.random() < 0.8 else "other", rng.randrange(30))
        for s, k in old_keys.items()
        if rng.random() < 0.9
    }
    for symbol in ("GONE", "AAPL"):  # a symbol the profile dropped; a month before the range
        loaded[Segment(symbol, "1d", dt.date(2022, 1, 1))] = DatabaseSegment("h0", 3)
    verified = {s: row.rows if rng.random() < 0.9 else row.rows + 1 for s, row in loaded.items()}
    ledger = LedgerView(
        {(s.symbol, s.timeframe, s.month): (r.content_hash, r.rows) for s, r in loaded.items()}
    )

    for verify in (None, verified):
        expected = reference_plan_gaps(desired, keys, stored, loaded, verified_rows=verify)
        assert expected.to_fetch and expected.to_load and expected.present and expected.stale  # varied enough
        for given in (loaded, ledger):
            assert plan_gaps(desired, keys, stored, given, verified_rows=verify) == expected
        shuffled = rng.sample(desired, len(desired)) + desired[:5]  # unsorted, with repeats
        assert plan_gaps(shuffled, keys, stored, ledger, verified_rows=verify) == expected

    with make_source(earlier) as source:
        store = cast(FeatureStore, _Manifest(stored))
        assert compute_plan(earlier, source, store, None) == reference_plan_gaps(desired, keys, stored, {})


_STATE = st.sampled_from([None, ("h", 1), ("h", 2), ("g", 1)])  # (content hash, rows), or absent
_MONTHS = st.sampled_from([dt.date(2024, m, 1) for m in (1, 2, 3)])


@hypothesis.given(
    st.lists(st.tuples(st.sampled_from("ABC"), _MONTHS, _STATE, _STATE), max_size=9),
    st.lists(st.tuples(st.sampled_from("DE"), _MONTHS), max_size=3),
    st.booleans(),
)
@hypothesis.example(
    [("A", dt.date(2024, 1, 1), ("h", 2), ("h", 2)), ("B", dt.date(2024, 1, 1), ("h", 1), ("h", 1))], [], True
)
@hypothesis.example(
    [("A", dt.date(2024, 1, 1), ("h", 2), ("h", 1)), ("B", dt.date(2024, 1, 1), ("h", 1), ("h", 1))],
    [],
    False,
)
def test_the_bulk_shortcuts_equal_the_per_segment_plan(
    rows: list[tuple[str, dt.date, tuple[str, int] | None, tuple[str, int] | None]],
    undesired: list[tuple[str, dt.date]],
    verify: bool,
) -> None:
    """The no-op compared as whole lists, and the stale scan skipped when the ledger holds only desired segments:
    never an answer the per-segment plan would not give, with or without --verify (each segment counted 1 row)."""
    states = {Segment(s, "1d", m): (store, ledger) for s, m, store, ledger in rows}
    keys = {s: segment_key(s, "synthetic", "v") for s in states}
    stored = {keys[s]: StoredSegment(keys[s], *store) for s, (store, _) in states.items() if store}
    loaded = {s: DatabaseSegment(*ledger) for s, (_, ledger) in states.items() if ledger}
    loaded |= {Segment(s, "1d", m): DatabaseSegment("h", 1) for s, m in undesired}
    counted = dict.fromkeys(loaded, 1) if verify else None
    store_view = StoreView({key: (entry.content_hash, entry.rows) for key, entry in stored.items()})
    ledger = LedgerView(
        {(s.symbol, s.timeframe, s.month): (r.content_hash, r.rows) for s, r in loaded.items()}
    )
    expected = reference_plan_gaps(states, keys, stored, loaded, verified_rows=counted)
    assert plan_gaps(list(states), keys, store_view, ledger, verified_rows=counted) == expected
    assert plan_gaps(list(states), keys, stored, loaded, verified_rows=counted) == expected


def test_a_ledger_view_is_the_mapping_of_segments_it_stands_for() -> None:
    a, b = Segment("A", "1d", dt.date(2024, 1, 1)), Segment("B", "1m", dt.date(2024, 2, 1))
    view = LedgerView({("A", "1d", a.month): ("h", 3), ("B", "1m", b.month): ("g", 0)})
    assert dict(view) == {a: DatabaseSegment("h", 3), b: DatabaseSegment("g", 0)}
    assert view == {a: DatabaseSegment("h", 3), b: DatabaseSegment("g", 0)} and len(view) == 2
    assert view.get(Segment("A", "1m", a.month)) is None and b in view
    with pytest.raises(KeyError):
        view[Segment("C", "1d", a.month)]


def test_the_views_get_answers_as_a_mapping_would() -> None:
    month = dt.date(2025, 1, 1)
    ledger = LedgerView({("AAPL", "1d", month): ("h1", 21)})
    store = StoreView({"seg-a": ("h2", 20)})
    here, absent = Segment("AAPL", "1d", month), Segment("KO", "1d", month)
    assert ledger.get(here) == Mapping.get(ledger, here) == DatabaseSegment("h1", 21)
    assert ledger.get(absent) is None and ledger.get(absent, "none") == "none"
    assert store.get("seg-a") == Mapping.get(store, "seg-a") == StoredSegment("seg-a", "h2", 20)
    assert store.get("seg-b") is None and store.get("seg-b", 0) == 0
