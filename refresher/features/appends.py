"""Which of a feature's loaded rows a refresh may keep: the daily case, where the bars only grew at the end.

The ledger's ``inputs`` (``inputs_record``) lists the segments a symbol's rows came from: month, content hash,
rows, and a digest of the entry, feature version and parameters. Against the new list:

- a daily feature keeps its first ``kept_rows`` rows when every old segment but the last is unchanged and the
  last one's old content is the first rows of its new content (hashed as the store hashed it, the way
  ``refresher.load`` decides a segment append), and every new bar is later than every old one. The registered
  daily features are causal (a row reads only its own and earlier bars, see ``compute``), so a full recompute
  of the grown history equals the old rows followed by the new ones; only those new rows are loaded. A user's
  function promises no such thing and is reloaded whole, as are universe features (every symbol moves them).
- an intraday feature is per session, so it keeps the rows of the months before the first changed one
  (``first_changed``): only the changed months' minute bars are read, computed and loaded.

Anything else (months dropped or reordered, another version or parameter, a back-fill) reloads the symbol.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from featurestore.fingerprint import fingerprint_table
from refresher.plan import digest_parts
from refresher.segments import Segment


def inputs_record(config: Sequence[str], segments: Sequence[Segment], entries: Sequence[Any]) -> str:
    """The ledger's ``inputs`` for rows computed by ``config`` (name, feature, version, parameters) from
    ``segments`` with their store ``entries``."""
    return json.dumps(
        {
            "config": digest_parts(*config),
            "segments": [
                [str(s.month), e.content_hash, e.rows] for s, e in zip(segments, entries, strict=True)
            ],
        },
        separators=(",", ":"),
    )


def _segments(old: str | None, new: str) -> tuple[list[Any], list[Any]] | None:
    """The old and new segment lists when the same computation made both, and the old months lead the new."""
    if old is None:
        return None
    before, after = json.loads(old), json.loads(new)
    if before["config"] != after["config"]:
        return None
    was, now = before["segments"], after["segments"]
    if not was or len(was) > len(now) or [s[0] for s in was] != [s[0] for s in now[: len(was)]]:
        return None
    return was, now


def kept_rows(old: str | None, new: str, tables: Sequence[pa.Table], time_column: str = "date") -> int:
    """How many leading bars of the new input (``tables``, one per segment of ``new``) the loaded rows were
    computed from, unchanged, with only later bars after them; 0 when the rows must be reloaded whole."""
    lists = _segments(old, new)
    if lists is None:
        return 0
    was, now = lists
    last = len(was) - 1
    if was[:last] != now[:last]:
        return 0
    _month, content_hash, rows = was[last]
    table = tables[last]
    if content_hash != now[last][1]:
        # Only an xxh3 hash covers every row; the old content must be a strict prefix of the new.
        if not (0 < rows < table.num_rows and content_hash.startswith("xxh3:")):
            return 0
        if fingerprint_table(table.slice(0, rows)) != content_hash:
            return 0
        old_times, new_times = table.column(time_column)[:rows], table.column(time_column)[rows:]
        if pc.greater_equal(pc.max(old_times), pc.min(new_times)).as_py():
            return 0  # a row added before an old one: a back-fill, not an append
    kept = sum(int(segment[2]) for segment in was)
    total = sum(t.num_rows for t in tables)
    return kept if 0 < kept < total else 0


def first_changed(old: str | None, new: str) -> int:
    """The index of the first of ``new``'s segments whose rows must be recomputed (0: all of them)."""
    lists = _segments(old, new)
    if lists is None:
        return 0
    was, now = lists
    return next((i for i, (a, b) in enumerate(zip(was, now, strict=False)) if a != b), len(was))


__all__ = ["first_changed", "inputs_record", "kept_rows"]
