"""Features computed through the feature store: which (feature, symbol) pairs need rows, and their rows.

A pair is recomputed only when its inputs changed: its input hash covers the entry's name, the feature's
version and parameters, and the content hashes of the symbol's daily segments, all known from the store's
manifest without reading data. Computed rows are cached in the store under a key of the bars' fingerprint, the
feature and its parameters, so a database that lost them, a second checkout or ``refresher warm`` finds them.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from featurestore import FeatureStore
from featurestore.keys import feature_key, function_identity
from refresher._lazy import LazyModule
from refresher.calendar import get_calendar
from refresher.errors import FeatureError, exception_line
from refresher.features.appends import first_changed, inputs_record, kept_rows
from refresher.features.compute import equal_weight_index
from refresher.features.registry import FeatureSpec, FeatureUse
from refresher.features.tables import FeaturePart, feature_rows
from refresher.plan import GapPlan, StoredSegment, digest_parts
from refresher.profile import Profile
from refresher.segments import Segment

if TYPE_CHECKING:
    import pandas as pd

    from refresher.features.modules import Seen
else:
    pd = LazyModule("pandas")  # imported at the first computation: a no-op refresh computes nothing

# Metric columns become column names next to ``symbol`` and ``date``.
COLUMN_RE = re.compile(r"^(?!symbol$|date$)[a-z_][a-z0-9_]{0,62}$")
# Minute bars per store request of an intraday feature: about 60 MB of frames, 20 symbols x 3 months of a
# 390-minute session.
INTRADAY_GROUP_ROWS = 500_000


@dataclass(frozen=True)
class FeatureBatch:
    """One entry's new rows for every symbol whose inputs changed (empty rows where its bars are empty), and
    how many of them the store did not have and had to compute."""

    use: FeatureUse
    parts: list[FeaturePart]
    computed: int


class _Compute:
    """Adapts a feature use to the store's ``compute_func(raw, config)`` calling convention; ``config`` (part of
    the store key) names the feature and its parameters, so the key covers what the computation reads.

    A function that raises or returns anything but one row of float columns per bar becomes a ``FeatureError``
    naming the entry and the symbol (``symbols`` maps each raw frame, by identity, to its symbol).
    """

    def __init__(
        self, use: FeatureUse, symbols: Mapping[int, str], frames: Sequence[pd.DataFrame] | None = None
    ) -> None:
        self.use = use
        self.symbols = symbols
        self.calls = 0
        # A registered daily feature computes every frame of ``frames`` in one pass at its first miss (see
        # ``bulk``); the store then asks for them one by one and gets the same rows the per-symbol path makes.
        self._pending = list(frames) if frames is not None and use.feature in _bulk().BULK else []
        self._bulk: dict[int, pd.DataFrame] = {}

    def config(self) -> dict[str, Any]:
        return {"feature": self.use.feature, "params": dict(self.use.params)}

    def __call__(self, raw: pd.DataFrame, config: Any) -> pd.DataFrame:
        self.calls += 1
        symbol = self.symbols.get(id(raw), "?")
        if self._pending and not self._bulk:
            frames, self._pending = self._pending, []
            names = [self.symbols.get(id(frame), "?") for frame in frames]
            results = _bulk().compute_bulk(self.use.feature, dict(self.use.params), names, frames)
            self._bulk = {id(frame): result for frame, result in zip(frames, results, strict=True)}
        try:
            if id(raw) in self._bulk:
                result = self._bulk[id(raw)]
            elif self.use.spec.is_user:
                # Its own copy: the frame is every entry's input, and one that writes to it (a column scaled in
                # place, a ``dropna(inplace=True)``) would change what the entries after it read.
                result = self.use.compute(raw.copy())
            else:
                result = self.use.compute(raw)
        # A user's function: whatever it raises is reported, in one line; a sys.exit() in it too, which would
        # otherwise end the refresh with its status (0: success) and the other entries not loaded.
        except (Exception, SystemExit) as exc:
            raise _failure(self.use, symbol, exception_line(exc)) from exc
        problem = _shape_problem(raw, result)
        if problem:
            raise _failure(self.use, symbol, problem)
        return _doubles(result) if self.use.spec.is_user else result


def _failure(use: FeatureUse, symbol: str, reason: str) -> FeatureError:
    """The error of ``use``'s rows of ``symbol``, naming a user's ``module:function`` too."""
    return FeatureError(use.name, symbol, reason, use.feature if use.spec.is_user else None)


def _doubles(result: pd.DataFrame) -> pd.DataFrame:
    """A user's rows as plain double columns, what its table holds (``feature_rows``): numbers of a pandas
    extension type (sparse, nullable, Arrow-backed; a missing value becomes NaN) are no column the store's
    Parquet can write, nor one it reads back as it was written."""
    columns = {name: result[name].to_numpy(dtype="float64", na_value=np.nan) for name in result.columns}
    return pd.DataFrame(columns, index=result.index)


def _bulk() -> Any:
    """``refresher.features.bulk``, imported at the first computation: it needs pandas, a no-op refresh does not."""
    # its source is recorded as it is imported, for its version (``_version``)
    from refresher.features import bulk

    return bulk


def _shape_problem(raw: pd.DataFrame, result: Any) -> str | None:
    """Why ``result`` cannot be a feature's rows for ``raw``: None when it is one float row per bar."""
    if not isinstance(result, pd.DataFrame):
        return f"returned {type(result).__name__}, not a pandas DataFrame"
    if "session" in raw.columns:  # intraday: one row per session
        sessions = pd.DatetimeIndex(raw["session"].unique())
        if not (result.index.is_unique and result.index.isin(sessions).all()):
            return "returned rows that are not one per session of the bars"
    elif not result.index.equals(raw.index):
        return f"returned {len(result)} rows on another index, not one per bar ({len(raw)}, by date)"
    if result.columns.empty:
        return "returned no columns"
    for column in result.columns:
        if not isinstance(column, str) or not COLUMN_RE.match(column):
            return f"column {column!r} is not a lower-case name (letters, digits, _)"
        if not pd.api.types.is_numeric_dtype(result[column]):
            return f"column {column!r} is {result[column].dtype}, not numeric"
        if pd.api.types.is_complex_dtype(
            result[column]
        ):  # numeric to pandas; a double column holds no such value
            return f"column {column!r} is {result[column].dtype}, not real numbers"
    if result.columns.has_duplicates:
        return "returned a column name twice"
    return None


def _other_columns(use: FeatureUse, parts: Sequence[FeaturePart]) -> FeatureError | None:
    """The error naming the first symbol whose rows have other columns than the first symbol's (a user's function
    whose columns depend on the data): one table holds every symbol's rows."""
    filled = [part for part in parts if part.rows.num_rows]
    for part in filled[1:]:
        if part.rows.column_names != filled[0].rows.column_names:
            theirs, first = part.rows.column_names[2:], filled[0].rows.column_names[2:]
            reason = f"returned columns {theirs}, {filled[0].symbol} {first}: every symbol needs the same, in order"
            return _failure(use, part.symbol, reason)
    return None


def _version(spec: FeatureSpec, seen: Seen | None = None) -> str:
    """The declared version plus a hash of the function's source: editing a feature recomputes it. A user's
    function is versioned by the source of the user's modules too (see ``modules``): the one the profile names,
    the one defining it and those they import, transitively: a helper or a constant beside it or in another of
    the user's modules is part of what it computes, and no version number is bumped when one is edited.
    ``seen``: the modules an earlier entry of the same refresh read."""
    if not spec.is_user:
        # ``compute``'s source as imported (``_built_in_code``) covers the function's own lines, which ``inspect``
        # reads from the file as it is now: a worker whose checkout moved on keyed the old code's rows by the new.
        return f"{spec.version}/{function_identity(spec.compute, 'its module')[1]}/{_built_in_code()}"
    modules = _modules_digest(spec, seen)
    # The modules' source as this process imported it covers the function's own lines, which ``inspect`` reads from
    # the file as it is now (edited since, in a worker): only a function without a file is versioned by them.
    identity = function_identity(spec.compute, None if modules == "none" else "its modules")[1]
    return f"{spec.version}/{identity}/{modules}"


def _entry_version(use: FeatureUse, seen: Seen | None = None) -> str:
    """The version of ``use``'s rows: its feature's (``_version``), and the profile's ``version:`` when given (an
    entry without one keeps the key it always had)."""
    version = _version(use.spec, seen)
    return version if use.version is None else f"{version}/entry:{use.version}"


# The modules whose code computes a built-in feature's rows: its function (``compute``), its helpers there, and the
# one-pass implementation a miss runs (``bulk``). Only a function's own lines versioned it: a fix in a helper
# (``_rsi``) or in ``bulk`` left the key as it was, and the store and the ledger kept serving the rows of the old
# code.
_BUILT_IN_MODULES = ("refresher.features.compute", "refresher.features.bulk")


def _built_in_code() -> str:
    """A hash of the source of ``_BUILT_IN_MODULES`` as this process runs them (see ``modules.module_source``)."""
    from refresher.features.modules import module_source

    digest = hashlib.sha256()
    for name in _BUILT_IN_MODULES:
        source = module_source(name) or b""
        digest.update(len(source).to_bytes(8, "big") + source)
    return digest.hexdigest()[:32]


def _modules_digest(spec: FeatureSpec, seen: Seen | None) -> str:
    """A hash of the names and source files of the user's modules ``spec``'s function comes from; "none" when
    none has a file (a module built in memory)."""
    from refresher.features.modules import user_modules  # a profile of built-in features never asks

    target = inspect.unwrap(spec.compute)
    if isinstance(target, functools.partial):
        target = inspect.unwrap(target.func)
    named = sys.modules.get(spec.name.partition(":")[0])
    found = user_modules([m for m in (named, inspect.getmodule(target)) if m is not None], seen)
    digest = hashlib.sha256()
    for module in found:
        for part in (module.name.encode(), module.source):
            digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:32] if found else "none"


def store_key(store: FeatureStore, use: FeatureUse, symbol: str, raw: pd.DataFrame) -> str:
    """The key under which ``store`` caches ``use``'s rows of ``symbol`` computed from the bars ``raw``."""
    compute = _Compute(use, {})
    version = _entry_version(use)
    return feature_key(
        symbol, raw, compute.config(), compute, version=version, hash_method=store.hash_method
    ).key


def _daily_tables(
    store: FeatureStore,
    plan: GapPlan,
    known: Mapping[Segment, pa.Table],
    segments: Mapping[str, Sequence[Segment]],
) -> dict[str, list[pa.Table]]:
    """Each symbol's daily tables: those ``known`` holds in memory, the others from the store in one request;
    a key the store cannot serve is asked of ``known`` again (a refresh's mapping fetches it from the source)."""
    wanted = [s for segs in segments.values() for s in segs if s not in known]
    read = store.get_many([plan.keys[s] for s in wanted])
    return {
        symbol: [known[s] if s in known or plan.keys[s] not in read else read[plan.keys[s]] for s in segs]
        for symbol, segs in segments.items()
    }


def _config(use: FeatureUse, version: str) -> tuple[str, ...]:
    """What, besides its input bars, a feature's rows depend on."""
    return (use.name, use.feature, version, use.params_json)


def _input_hash(use: FeatureUse, version: str, content_hashes: Sequence[str]) -> str:
    return digest_parts(*_config(use, version), *content_hashes)


def daily_frame(tables: Sequence[pa.Table]) -> pd.DataFrame:
    """A symbol's daily bars as the frame feature functions take: DatetimeIndex of session dates."""
    frame: pd.DataFrame = pa.concat_tables(tables).to_pandas()
    frame = frame.drop(columns=["symbol"]).sort_values("date")
    frame.index = pd.DatetimeIndex(pd.to_datetime(frame.pop("date")), name="date")
    return frame


def daily_frames(tables: Mapping[str, Sequence[pa.Table]]) -> dict[str, pd.DataFrame]:
    """``daily_frame`` of every symbol in ``tables``, from one Arrow -> pandas conversion: one per symbol cost
    about 0.35 s of a backtesting daily refresh (100 symbols, pandas' metadata handling each time)."""
    symbols = [symbol for symbol in tables if any(t.num_rows for t in tables[symbol])]
    frames = {symbol: daily_frame(tables[symbol]) for symbol in tables if symbol not in symbols}
    if not symbols:
        return frames
    lengths = np.array([sum(t.num_rows for t in tables[symbol]) for symbol in symbols], dtype=np.int64)
    whole: pd.DataFrame = pa.concat_tables([t for symbol in symbols for t in tables[symbol]]).to_pandas()
    whole = whole.drop(columns=["symbol"])
    dates = pd.to_datetime(whole.pop("date")).to_numpy()
    # By symbol (as concatenated), then date: each symbol's rows in daily_frame's order (dates are unique).
    order = np.lexsort((dates, np.repeat(np.arange(len(symbols)), lengths)))
    whole = whole.take(order)
    whole.index = pd.DatetimeIndex(dates[order], name="date")
    ends = np.cumsum(lengths)
    for symbol, end, length in zip(symbols, ends, lengths, strict=True):
        frames[symbol] = whole.iloc[
            end - length : end
        ].copy()  # its own frame: a user function may write to it
    return frames


def daily_segments(profile: Profile, plan: GapPlan, timeframe: str = "1d") -> dict[str, list[Segment]]:
    """Each symbol's desired segments of ``timeframe``: the input of every feature of that timeframe."""
    segments: dict[str, list[Segment]] = {}
    if timeframe in profile.timeframes:
        for segment in plan.desired:
            if segment.timeframe == timeframe:
                segments.setdefault(segment.symbol, []).append(segment)
    for months in segments.values():
        months.sort(key=lambda segment: segment.month)
    return segments


def minute_frame(table: pa.Table, tz: str) -> pd.DataFrame:
    """One month of a symbol's minute bars as intraday features take them: indexed by UTC bar start, with the
    exchange-local ``session`` date (the exchanges refresher knows hold each session within one local day)."""
    frame: pd.DataFrame = table.to_pandas().drop(columns=["symbol"]).sort_values("ts")
    index = pd.DatetimeIndex(frame.pop("ts"), name="ts")
    frame.index = index
    frame["session"] = index.tz_convert(tz).tz_localize(None).normalize()
    return frame


def compute_features(
    profile: Profile,
    store: FeatureStore,
    plan: GapPlan,
    known: Mapping[Segment, pa.Table] | None = None,
    loaded: Mapping[tuple[str, str], str] | None = None,
    inputs: Mapping[tuple[str, str], str] | None = None,
) -> Iterator[FeatureBatch]:
    """The rows of every (entry, symbol) of the profile whose input hash differs from ``loaded``'s, one batch per
    entry; the profile's daily segments must be in the store (or in ``known``, tables already in memory).

    ``inputs``: the ledger's record of what the loaded rows came from; where the new input only extends it
    (see ``appends``), a part carries only the rows from the first new date on."""
    if not profile.features:
        return
    daily = daily_segments(profile, plan)
    minute = (
        daily_segments(profile, plan, "1m") if any(u.spec.timeframe == "1m" for u in profile.features) else {}
    )
    if not (daily or minute):
        return
    loaded = loaded or {}
    wanted = [plan.keys[s] for segs in (*daily.values(), *minute.values()) for s in segs]
    entries = {
        key: StoredSegment(key, content_hash, rows)
        for key, (content_hash, rows) in store.lookup_hashes(sorted(set(wanted))).items()
    }
    hashes = {
        symbol: [entries[plan.keys[s]].content_hash for s in segments] for symbol, segments in daily.items()
    }
    universe_hashes = [h for symbol in sorted(hashes) for h in (symbol, *hashes[symbol])]
    frames: dict[str, pd.DataFrame] = {}
    tables: dict[str, list[pa.Table]] = {}
    # Once per entry: a user's function is versioned by reading and hashing its modules' source.
    seen: Seen = {}
    versions = {use.name: _entry_version(use, seen) for use in profile.features}

    def input_hash_of(use: FeatureUse, symbol: str) -> str:
        # A universe feature (correlation to the equal-weight index) depends on every symbol's bars.
        content = [symbol, *universe_hashes] if use.spec.needs_universe else hashes[symbol]
        return _input_hash(use, versions[use.name], content)

    stale = {
        (use, symbol)
        for use in profile.features
        if use.spec.timeframe == "1d"
        for symbol in daily
        if loaded.get((use.name, symbol)) != input_hash_of(use, symbol)
    }
    needed = sorted(
        set(daily) if any(use.spec.needs_universe for use, _symbol in stale) else {sym for _use, sym in stale}
    )

    def tables_of(symbol: str) -> list[pa.Table]:
        if symbol not in tables:
            # Every symbol a daily entry will compute, in one store request: a request opens the manifest.
            symbols = [sym for sym in needed if sym not in tables] or [symbol]
            tables.update(_daily_tables(store, plan, known or {}, {sym: daily[sym] for sym in symbols}))
        return tables[symbol]

    def frame_of(symbol: str) -> pd.DataFrame:
        if symbol not in frames:
            # Every symbol a daily entry will compute, in one conversion, as ``tables_of`` reads them.
            symbols = [sym for sym in needed if sym not in frames] or [symbol]
            frames.update(daily_frames({sym: tables_of(sym) for sym in symbols}))
        return frames[symbol]

    failures: list[FeatureError] = []
    for use in profile.features:
        spec = use.spec
        if spec.timeframe == "1m":
            try:
                batch = _intraday_batch(
                    use, versions[use.name], profile, store, plan, minute, entries, loaded, inputs or {}
                )
            except FeatureError as exc:
                failures.append(exc)
                continue
            if batch.parts:
                yield batch
            continue
        benchmark: pd.Series | None = None
        version = versions[use.name]
        todo: list[tuple[str, pd.DataFrame, str]] = []
        empty: list[FeaturePart] = []
        # Only a registered feature is known to be causal, and a universe feature moves with every symbol.
        appendable = not spec.needs_universe and not spec.is_user
        records: dict[str, tuple[str | None, int]] = {}
        for symbol in sorted(daily):
            input_hash = input_hash_of(use, symbol)
            if (use, symbol) not in stale:
                continue
            raw = frame_of(symbol)
            if raw.empty:
                empty.append(FeaturePart(symbol, pa.table({}), input_hash))
                continue
            if spec.needs_universe:
                if benchmark is None:
                    benchmark = equal_weight_index({sym: frame_of(sym) for sym in sorted(daily)})
                raw = raw.assign(benchmark=benchmark.reindex(raw.index))
            todo.append((symbol, raw, input_hash))
            if appendable and use.feature in _bulk().BULK:  # asked here: ``bulk`` imports pandas
                record = inputs_record(
                    _config(use, version), daily[symbol], [entries[plan.keys[s]] for s in daily[symbol]]
                )
                before = (inputs or {}).get((use.name, symbol))
                records[symbol] = (record, kept_rows(before, record, tables_of(symbol)))
        if not todo and not empty:
            continue
        # Rows that extend loaded ones are computed here, in one bulk pass, and not cached: a store entry would
        # hold the symbol's whole history under a fingerprint of all its bars, and keying, writing and reading
        # back 200 of them cost about 1 s of a backtesting daily refresh, against a bulk pass of some 50 ms.
        # The pass is the one the store path runs on a miss, so the rows are the same, bit for bit.
        extend = [job for job in todo if records.get(job[0], (None, 0))[1]]
        whole = [job for job in todo if not records.get(job[0], (None, 0))[1]]
        # One batch per feature: the store records every miss in one manifest transaction.
        compute = _Compute(
            use, {id(raw): symbol for symbol, raw, _hash in whole}, [raw for _s, raw, _h in whole]
        )
        jobs = [(symbol, raw, compute.config()) for symbol, raw, _hash in whole]
        try:
            results = store.get_or_compute_many(jobs, compute, version=version) if jobs else []
        except FeatureError as exc:
            # This entry loads nothing; the others still load, then the first failure is reported.
            failures.append(exc)
            continue
        parts = []
        for (symbol, _raw, h), result in zip(whole, results, strict=True):
            frame = result if isinstance(result, pd.DataFrame) else result.to_pandas()
            parts.append(
                FeaturePart(symbol, feature_rows(symbol, frame), h, records.get(symbol, (None, 0))[0])
            )
        if extend:
            computed_rows = _bulk().compute_bulk(
                use.feature, dict(use.params), [s for s, _r, _h in extend], [r for _s, r, _h in extend]
            )
            for (symbol, raw, h), frame in zip(extend, computed_rows, strict=True):
                recorded, kept = records[symbol]
                since, based_on = raw.index[kept].date(), loaded.get((use.name, symbol))
                rows = feature_rows(symbol, frame.iloc[kept:])
                parts.append(FeaturePart(symbol, rows, h, recorded, since, based_on))
        mismatch = _other_columns(use, parts)
        if mismatch is not None:
            failures.append(mismatch)  # the entry's table cannot hold them all; the other entries still load
            continue
        yield FeatureBatch(use, parts + empty, compute.calls + len(extend))
    if failures:
        raise failures[0]


def _intraday_batch(
    use: FeatureUse,
    version: str,
    profile: Profile,
    store: FeatureStore,
    plan: GapPlan,
    minute: Mapping[str, list[Segment]],
    entries: Mapping[str, StoredSegment],
    loaded: Mapping[tuple[str, str], str],
    inputs: Mapping[tuple[str, str], str],
) -> FeatureBatch:
    """An intraday entry's rows: computed per (symbol, month), so a month whose bars did not change is a store
    hit, and loaded per symbol (a handful of rows per session). Months before the first one whose bars changed
    since the rows were loaded (``appends.first_changed``) are not read at all: their rows stay.

    Symbols go to the store in groups of up to ``INTRADAY_GROUP_ROWS`` minute bars, one request per group: the
    misses of a group are recorded in one manifest transaction (about 20 ms each, once per symbol before), and
    memory holds one group's bars, not the profile's. ``version``: the entry's ``_version``."""
    parts: list[FeaturePart] = []
    computed = 0
    group: list[tuple[FeaturePart, list[Segment]]] = []
    held = 0

    def flush() -> None:
        nonlocal computed, held
        # One store request for the group's minute bars and one for its features: each opens the manifest.
        read = store.get_many([plan.keys[s] for _part, segments in group for s in segments])
        months = [
            [minute_frame(read[plan.keys[s]], tz_of[part.symbol]) for s in segments]
            for part, segments in group
        ]
        months = [[frame for frame in frames if not frame.empty] for frames in months]
        symbol_of = {
            id(f): part.symbol for (part, _s), frames in zip(group, months, strict=True) for f in frames
        }
        compute = _Compute(use, symbol_of)
        jobs = [(symbol_of[id(frame)], frame, compute.config()) for frames in months for frame in frames]
        results = iter(store.get_or_compute_many(jobs, compute, version=version) if jobs else [])
        for (part, _segments), frames in zip(group, months, strict=True):
            done = [r if isinstance(r, pd.DataFrame) else r.to_pandas() for r in islice(results, len(frames))]
            rows = feature_rows(part.symbol, pd.concat(done)) if done else pa.table({})
            parts.append(replace(part, rows=rows))
        computed += compute.calls
        group.clear()
        held = 0

    tz_of = {symbol: str(get_calendar(profile.listing(symbol).exchange).tz) for symbol in minute}
    for symbol in sorted(minute):
        segments = minute[symbol]
        input_hash = _input_hash(use, version, [entries[plan.keys[s]].content_hash for s in segments])
        if loaded.get((use.name, symbol)) == input_hash:
            continue
        record = inputs_record(_config(use, version), segments, [entries[plan.keys[s]] for s in segments])
        start = first_changed(inputs.get((use.name, symbol)), record)
        part = FeaturePart(symbol, pa.table({}), input_hash, record)
        if start:
            part = replace(part, since=segments[start].month, based_on=loaded.get((use.name, symbol)))
        group.append((part, segments[start:]))
        held += sum(entries[plan.keys[s]].rows for s in segments[start:])
        if held >= INTRADAY_GROUP_ROWS:
            flush()
    flush()
    return FeatureBatch(use, parts, computed)


__all__ = ["FeatureBatch", "compute_features", "daily_frame", "daily_frames", "daily_segments", "store_key"]
