"""A batch of synthetic segments is, segment for segment, exactly what the generator produces one call at a
time: pinned content hashes (the store's keys and every stored file depend on them), and a batch equal to its
segments fetched alone, across exchanges, timeframes, partial months and empty ones."""

from __future__ import annotations

import hashlib
import random

import pyarrow as pa

from featurestore.fingerprint import fingerprint_table
from refresher.segments import Segment, desired_segments
from refresher.sources import make_source
from refresher.sources.synthetic import BATCH_MINUTES, GENERATOR_VERSION

from .conftest import MakeProfile

# Five exchanges (Tokyo's lunch break, holidays at both year ends), both timeframes, partial first and last months.
VARIED = """\
universe:
  symbols: [AAPL, KO, "7203", VOD, SAP, MSFT]
  exchanges: {"7203": XTKS, VOD: XLON, SAP: XETR, MSFT: XNAS}
start: 2023-11-15
end: 2024-01-17
timeframes: [1d, 1m]
seeds: {KO: 7}
"""
# Many daily months: 30 symbols on four exchanges, 14 months ending mid-month.
MANY = """\
universe:
  symbols: [{symbols}]
  exchanges: {{S001: XTKS, S002: XLON, S003: XETR}}
months: 14
as_of: 2025-03-12
timeframes: [1d]
seed: 5
"""
# sha256 over the segments' fingerprints in desired order, computed one segment per call (``fetch``) with
# GENERATOR_VERSION 2 (daily bars drawn directly, minutes fitted to them): a change here changes every stored
# synthetic segment, so it goes with a new GENERATOR_VERSION.
PINNED = {
    "varied": (36, "553358cadbafd64537194c65cdf817a543df8f5cc6478ddceaae4056be760043"),
    "many": (420, "5b2fc741fcd68e3c162aaa4f6cae550bf629f29e666759e7e6ed91d2feebafef"),
}


def _digest(tables: list[pa.Table]) -> str:
    return hashlib.sha256("\n".join(fingerprint_table(t) for t in tables).encode()).hexdigest()


def test_a_batch_holds_the_pinned_content_of_every_segment(make_profile: MakeProfile) -> None:
    bodies = {"varied": VARIED, "many": MANY.format(symbols=", ".join(f"S{i:03d}" for i in range(30)))}
    for name, body in bodies.items():
        profile = make_profile(body)
        segments = desired_segments(profile)
        with make_source(profile) as source:
            assert (len(segments), _digest(source.fetch_many(segments))) == PINNED[name], name
    assert GENERATOR_VERSION == "2"  # new pins go with a new version: stores must not mix the two


def test_a_batch_equals_its_segments_fetched_alone_in_any_order(make_profile: MakeProfile) -> None:
    profile = make_profile(VARIED.replace("start: 2023-11-15", "start: 2023-10-02"))
    segments = desired_segments(profile)
    # A month outside the range (empty), a repeat, and a shuffled order: each answer still belongs to its slot.
    segments += [Segment("AAPL", "1d", segments[0].month.replace(year=2022)), segments[3]]
    random.Random(1).shuffle(segments)
    with make_source(profile) as source:
        batch = source.fetch_many(segments)
        alone = [source.fetch(s) for s in segments]
    assert [t.num_rows == 0 for t in batch].count(True) == 1
    for segment, got, expected in zip(segments, batch, alone, strict=True):
        assert got.equals(expected), segment
        assert fingerprint_table(got) == fingerprint_table(expected), segment


def test_a_batch_larger_than_one_chunk_is_cut_and_still_exact(make_profile: MakeProfile) -> None:
    profile = make_profile(MANY.format(symbols=", ".join(f"S{i:03d}" for i in range(30))))
    segments = [s for s in desired_segments(profile) if s.month.month in (1, 2)]
    minutes = sum(t.num_rows for t in make_source(profile).fetch_many(segments)) * 390
    assert minutes > 2 * BATCH_MINUTES  # three chunks at least
    with make_source(profile) as source:
        assert _digest(source.fetch_many(segments)) == _digest([source.fetch(s) for s in segments])
