"""Fingerprints: one changed cell in any column type changes it; layout, chunking and bytes under nulls do not."""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurestore import FeatureStoreError, fingerprint_table
from featurestore import fingerprint as fp

# (type, three distinct non-null values) for every kind of column the fingerprint feeds differently.
KINDS: dict[str, tuple[pa.DataType, list[Any]]] = {
    "int8": (pa.int8(), [1, -2, 3]),
    "int64": (pa.int64(), [1, -2, 3]),
    "uint16": (pa.uint16(), [1, 2, 65535]),
    "float32": (pa.float32(), [0.5, -1.5, 2.25]),
    "float64": (pa.float64(), [0.1, -0.0, 1e300]),
    "bool": (pa.bool_(), [True, False, True]),
    "string": (pa.string(), ["a", "", "ab"]),
    "large_string": (pa.large_string(), ["a", "", "ab"]),
    "binary": (pa.binary(), [b"a", b"", b"\x00b"]),
    "large_binary": (pa.large_binary(), [b"a", b"", b"\x00b"]),
    "fixed_binary": (pa.binary(2), [b"ab", b"\x00\x00", b"zz"]),
    "decimal": (
        pa.decimal128(10, 2),
        [decimal.Decimal("1.50"), decimal.Decimal("-2.00"), decimal.Decimal("0.01")],
    ),
    "date32": (pa.date32(), [dt.date(2025, 1, 1), dt.date(1970, 1, 1), dt.date(2000, 2, 29)]),
    "date64": (pa.date64(), [dt.date(2025, 1, 1), dt.date(1970, 1, 1), dt.date(2000, 2, 29)]),
    "timestamp": (pa.timestamp("ns", tz="UTC"), [1, 0, 1_700_000_000_000_000_000]),
    "time": (pa.time64("us"), [dt.time(9, 30), dt.time(0, 0), dt.time(16, 0, 0, 1)]),
    "duration": (pa.duration("s"), [dt.timedelta(seconds=1), dt.timedelta(0), dt.timedelta(days=2)]),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), ["buy", "sell", "hold"]),
    "list": (pa.list_(pa.int64()), [[1, 2], [], [3]]),
    "struct": (
        pa.struct([("a", pa.int64()), ("b", pa.string())]),
        [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}],
    ),
}


def column(name: str, values: list[Any]) -> pa.Array:
    kind, _ = KINDS[name]
    if pa.types.is_dictionary(kind):
        return pa.array(values, pa.string()).dictionary_encode().cast(kind)
    return pa.array(values, kind)


def every_kind_table() -> pa.Table:
    """Each kind with a value, a null and another value, plus an all-null column."""
    columns = {name: column(name, [values[0], None, values[2]]) for name, (_, values) in KINDS.items()}
    return pa.table({**columns, "nothing": pa.nulls(3)})


def test_fingerprint_is_pinned() -> None:
    # Known-good values: if this fails, the hashed byte stream changed and every stored content hash with it.
    # Make it deliberate: bump _FINGERPRINT_FORMAT and update these values in the same commit.
    assert fp._FINGERPRINT_FORMAT == b"featurestore-fingerprint-v1"
    table = every_kind_table()
    assert fingerprint_table(table) == "xxh3:7c2e0be0f1114f3003cda75a06cec8f5"
    assert (
        fingerprint_table(table, "footer")
        == "footer:db4b605d101d3d5a274cf5e73bd5ec2637d5fc93c101e06fb4401b4e7942db9b"
    )


# --- One changed cell, in any column type, changes the fingerprint -------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(sorted(KINDS)),
    st.lists(st.integers(0, 3), min_size=1, max_size=8),
    st.data(),
)
def test_any_single_cell_change_changes_the_fingerprint(
    name: str, picks: list[int], data: st.DataObject
) -> None:
    # A column of values drawn from the kind's three values or null (pick 3), then one cell changed.
    values = KINDS[name][1]
    cells = [None if pick == 3 else values[pick] for pick in picks]
    row = data.draw(st.integers(0, len(cells) - 1))
    new = data.draw(
        st.sampled_from([*values, None]).filter(
            lambda v: v != cells[row] or (v is None) != (cells[row] is None)
        )
    )
    changed = [*cells]
    changed[row] = new
    filler = pa.array(range(len(cells)), pa.int64())
    before = pa.table({"i": filler, "x": column(name, cells)})
    after = pa.table({"i": filler, "x": column(name, changed)})
    assert fingerprint_table(before) != fingerprint_table(after)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(KINDS)),
    st.lists(st.integers(0, 3), min_size=0, max_size=10),
    st.lists(st.integers(0, 10), max_size=4),
)
def test_chunking_never_changes_the_fingerprint(name: str, picks: list[int], cuts: list[int]) -> None:
    values = KINDS[name][1]
    cells = [None if pick == 3 else values[pick] for pick in picks]
    whole = column(name, cells)
    # Repeated cuts make empty chunks, which must be skipped, never end the hash.
    edges = [0, *sorted(min(c, len(cells)) for c in cuts), len(cells)]
    pieces = [column(name, cells[lo:hi]) for lo, hi in itertools.pairwise(edges)]
    chunked = pa.chunked_array(pieces, whole.type)
    assert fingerprint_table(pa.table({"x": chunked})) == fingerprint_table(pa.table({"x": whole}))


def test_an_empty_first_chunk_does_not_end_the_hash() -> None:
    kind = pa.int64()
    one = pa.table({"x": pa.chunked_array([pa.array([], kind), pa.array([1, None, 3], kind)])})
    two = pa.table({"x": pa.chunked_array([pa.array([], kind), pa.array([1, None, 4], kind)])})
    assert fingerprint_table(one) != fingerprint_table(two)


def test_null_positions_are_counted_across_chunks() -> None:
    kind = pa.int64()
    first = pa.chunked_array([pa.array([1, 2], kind), pa.array([None, 0], kind)])
    second = pa.chunked_array([pa.array([1, 2], kind), pa.array([0, None], kind)])
    assert fingerprint_table(pa.table({"x": first})) != fingerprint_table(pa.table({"x": second}))
    plain = pa.chunked_array([pa.array([1, 2, None, 0], kind)])
    assert fingerprint_table(pa.table({"x": first})) == fingerprint_table(pa.table({"x": plain}))


@pytest.mark.parametrize("name", sorted(set(KINDS) - {"dictionary", "list", "struct"}))
def test_bytes_under_nulls_do_not_matter(name: str) -> None:
    kind, values = KINDS[name]

    def masked(under: Any) -> pa.Array:
        # Same validity (middle slot null) over different bytes in the null slot.
        full = pa.array([values[0], under, values[2]], kind)
        validity = pa.py_buffer(bytes([0b101]))
        return pa.Array.from_buffers(kind, 3, [validity, *full.buffers()[1:]])

    one, two = masked(values[0]), masked(values[1])
    clean = pa.array([values[0], None, values[2]], kind)
    assert one.to_pylist() == two.to_pylist() == clean.to_pylist()
    assert one.buffers()[1:] != two.buffers()[1:]  # the hidden bytes do differ
    assert fingerprint_table(pa.table({"x": one})) == fingerprint_table(pa.table({"x": two}))
    assert fingerprint_table(pa.table({"x": one})) == fingerprint_table(pa.table({"x": clean}))


def test_dictionary_columns_hash_their_values_not_their_codes() -> None:
    kind = pa.dictionary(pa.int32(), pa.string())
    one = pa.DictionaryArray.from_arrays(pa.array([0, 1, None], pa.int32()), pa.array(["buy", "sell"]))
    two = pa.DictionaryArray.from_arrays(pa.array([1, 0, None], pa.int32()), pa.array(["sell", "buy"]))
    assert one.type == two.type == kind
    assert fingerprint_table(pa.table({"x": one})) == fingerprint_table(pa.table({"x": two}))
    three = pa.DictionaryArray.from_arrays(pa.array([0, 0, None], pa.int32()), pa.array(["buy", "sell"]))
    assert fingerprint_table(pa.table({"x": one})) != fingerprint_table(pa.table({"x": three}))
    # Without nulls too (the chunk then reaches the feeder still encoded).
    full_one, full_two = one.slice(0, 2), two.slice(0, 2)
    assert full_one.null_count == full_two.null_count == 0
    assert fingerprint_table(pa.table({"x": full_one})) == fingerprint_table(pa.table({"x": full_two}))
    plain = pa.table({"x": pa.array(["buy", "sell"]).dictionary_encode().cast(kind)})
    assert fingerprint_table(pa.table({"x": full_one})) == fingerprint_table(plain)


def test_slices_hash_as_their_values() -> None:
    for name in KINDS:
        values = KINDS[name][1]
        long = column(name, [values[1], values[0], None, values[2], values[1]])
        short = column(name, [values[0], None, values[2]])
        assert fingerprint_table(pa.table({"x": long.slice(1, 3)})) == fingerprint_table(
            pa.table({"x": short})
        ), name


def test_big_buffers_are_fed_in_pieces_without_changing_the_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    table = pa.table(
        {
            "x": pa.array(np.arange(1000, dtype=np.int64)).slice(3, 990),
            "s": pa.array([f"v{i}" for i in range(1000)]).slice(5, 990),
        }
    )
    whole = fingerprint_table(table)
    monkeypatch.setattr(fp, "_PIECE", 7)
    assert fingerprint_table(table) == whole


def test_empty_strings_and_empty_tables() -> None:
    assert fingerprint_table(pa.table({"s": ["", ""]})) != fingerprint_table(pa.table({"s": ["", "", ""]}))
    assert fingerprint_table(pa.table({"s": [""]})) != fingerprint_table(pa.table({"s": [None]}))
    empty = pa.table({"s": pa.array([], pa.string())})
    assert fingerprint_table(empty) != fingerprint_table(pa.table({"s": pa.array([], pa.large_string())}))


def test_all_null_columns_hash_their_length_and_type() -> None:
    three, four = pa.table({"n": pa.nulls(3)}), pa.table({"n": pa.nulls(4)})
    assert fingerprint_table(three) != fingerprint_table(four)
    assert fingerprint_table(three) != fingerprint_table(pa.table({"n": pa.nulls(3, pa.int64())}))


def test_byte_width_of_types() -> None:
    assert fp._byte_width(pa.int64()) == 8
    assert fp._byte_width(pa.int8()) == 1
    assert fp._byte_width(pa.decimal128(10, 2)) == 16
    assert fp._byte_width(pa.binary(3)) == 3
    assert fp._byte_width(pa.bool_()) == 0
    assert fp._byte_width(pa.string()) == 0
    assert fp._byte_width(pa.list_(pa.int64())) == 0


# --- The footer method: schema, row count, head and tail -----------------------------------------------------

EDGE = 1024


def footer(values: np.ndarray, name: str = "x") -> str:  # type: ignore[type-arg]
    return fingerprint_table(pa.table({name: values}), "footer")


def test_footer_covers_schema_row_count_head_and_tail() -> None:
    rows = 3 * EDGE
    base = np.arange(rows, dtype=np.float64)
    reference = footer(base)
    assert reference.startswith("footer:") and reference != fingerprint_table(pa.table({"x": base}))
    assert footer(base, "y") != reference  # schema
    assert footer(base.astype(np.float32)) != reference  # schema: type
    # Row count: one row more in the middle, the same first and last EDGE rows.
    longer = np.concatenate([base[: rows // 2], [-1.0], base[rows // 2 :]])
    assert footer(longer) != reference
    for row in (0, EDGE - 1, rows - EDGE, rows - 1):  # the edges are hashed in full
        changed = base.copy()
        changed[row] = -1
        assert footer(changed) != reference, row
    for row in (EDGE, rows - EDGE - 1):  # just inside the unhashed middle: the documented blind spot
        changed = base.copy()
        changed[row] = -1
        assert footer(changed) == reference, row


def test_footer_of_a_short_table_sees_every_row() -> None:
    base = np.arange(10, dtype=np.float64)
    for row in range(10):
        changed = base.copy()
        changed[row] = -1
        assert footer(changed) != footer(base)


def test_unknown_method_names_the_choices() -> None:
    with pytest.raises(FeatureStoreError, match=r"hash_method='md5': unknown \(choose one of xxh3, footer\)"):
        fingerprint_table(pa.table({"x": [1]}), "md5")  # type: ignore[arg-type]


def test_names_of_list_items_are_layout_not_content() -> None:
    """What Parquet gives back (``element``) hashes as what went in (``item``); a changed value still shows."""
    values = [[1, 2], [], None]
    arrow = pa.table({"x": pa.array(values, pa.list_(pa.int64()))})
    parquet = arrow.cast(pa.schema([("x", pa.list_(pa.field("element", pa.int64())))]))
    assert str(parquet.schema) != str(arrow.schema)
    assert fingerprint_table(parquet) == fingerprint_table(arrow)
    assert fingerprint_table(pa.table({"x": pa.array([[1, 3], [], None], pa.list_(pa.int64()))})) != (
        fingerprint_table(arrow)
    )
    assert fingerprint_table(pa.table({"x": pa.array(values, pa.large_list(pa.int64()))})) != (
        fingerprint_table(arrow)
    )


def test_a_batch_hashes_each_table_exactly_as_alone() -> None:
    # Batchable kinds (fixed-width, strings, binaries), sliced, chunked, empty; beside them tables the batch path
    # leaves to fingerprint_table: nulls, booleans and nested types, a schema seen once, one of no rows.
    names = [n for n in KINDS if n not in ("bool", "dictionary", "list", "struct")]
    whole = pa.table({n: column(n, [KINDS[n][1][i % 3] for i in range(40)]) for n in names})
    chunked = pa.concat_tables([whole.slice(0, 7), whole.slice(7, 0), whole.slice(7, 13)])
    tables = [whole.slice(3, 10), chunked, whole.slice(40), whole.slice(1, 1), whole.slice(5, 30)]
    tables += [every_kind_table(), every_kind_table().slice(1), pa.table({"x": [1, None, 3]})]
    tables += [pa.table({"x": [1, 2, 3]}), whole.select(names[:3]).slice(2, 5)]
    assert fp.fingerprint_many(tables) == [fingerprint_table(t) for t in tables]
    with_null = pa.table({"s": pa.array(["a", None], pa.string())})
    batch = [pa.table({"s": pa.array(["a", "b"], pa.string())}), with_null]
    assert fp.fingerprint_many(batch) == [fingerprint_table(t) for t in batch]
    assert fp.fingerprint_many(tables, "footer") == [fingerprint_table(t, "footer") for t in tables]


def test_large_tables_of_a_batch_are_hashed_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above ``_BATCH_MAX_MEAN_ROWS`` rows a table on average the batch is not concatenated; the strings are the
    same either way (sliced and chunked tables included)."""
    whole = pa.table(
        {"p": pa.array(range(40), pa.float64()), "s": pa.array([f"s{i % 3}" for i in range(40)])}
    )
    tables = [
        whole.slice(0, 20),
        pa.concat_tables([whole.slice(20, 5), whole.slice(25, 15)]),
        whole.slice(3, 30),
    ]
    batched = fp.fingerprint_many(tables)
    calls: list[int] = []
    batch_digests = fp._batch_digests

    def counted(*args: Any) -> list[str] | None:
        calls.append(1)
        return batch_digests(*args)

    monkeypatch.setattr(fp, "_batch_digests", counted)
    monkeypatch.setattr(fp, "_BATCH_MAX_MEAN_ROWS", 8)
    assert fp.fingerprint_many(tables) == batched == [fingerprint_table(t) for t in tables]
    assert not calls
    monkeypatch.setattr(fp, "_BATCH_MAX_MEAN_ROWS", 1024)
    assert fp.fingerprint_many(tables) == batched
    assert calls


def test_a_batch_concatenation_is_made_once_for_hashes_time_ranges_and_packs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Concatenated`` hands the concatenation the content hashes made to the time ranges (and the pack); the
    strings and ranges are the same as without it, and another list of tables is concatenated afresh."""
    from featurestore.keys import time_range, time_ranges

    stamps = pa.array(range(0, 40 * 86_400_000_000, 86_400_000_000), pa.timestamp("us", tz="UTC"))
    whole = pa.table({"ts": stamps, "p": pa.array(range(40), pa.float64())})
    tables = [
        whole.slice(0, 20),
        pa.concat_tables([whole.slice(20, 5), whole.slice(25, 15)]),
        whole.slice(3, 9),
    ]
    made: list[int] = []
    concat = pa.concat_tables

    def counted(parts: Any, *args: Any, **kwargs: Any) -> pa.Table:
        made.append(len(parts))
        return concat(parts, *args, **kwargs)

    monkeypatch.setattr(pa, "concat_tables", counted)
    concatenated = fp.Concatenated()
    assert fp.fingerprint_many(tables, concatenated=concatenated) == [fingerprint_table(t) for t in tables]
    assert time_ranges(tables, concatenated=concatenated) == [time_range(t) for t in tables]
    assert concatenated(tables) is concatenated.cached(tables) and made == [3]
    assert concatenated.cached(tables[:2]) is None and concatenated.cached([*tables[:2], whole]) is None
    assert concatenated(tables[1:]).equals(concat(tables[1:]).combine_chunks()) and made == [3, 2]
