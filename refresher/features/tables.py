"""The database side of features: one table per feature, and the ``refresher_features`` ledger beside it.

Every change to a feature's rows happens in one transaction with its ledger rows, so the ledger can be trusted
by the next refresh: a crash, a failed COPY or a Ctrl-C leaves the feature as it was, never half of it.

The ledger's ``inputs`` says which segments (month, content hash, rows) a symbol's rows came from, so a daily
refresh can replace only the rows from a date on (``FeaturePart.since``) when the older input did not change.
Such a part is applied only if the ledger still holds the input hash it was computed against (``based_on``),
read under the feature's lock inside the transaction; otherwise ``StaleFeature`` and nothing changes.
"""

from __future__ import annotations

import datetime as dt
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg
import pyarrow as pa
from psycopg import sql

from refresher._lazy import LazyModule
from refresher.errors import LoadError
from refresher.fence import SEGMENTS_HELD, Fence, advisory_locked, held_by
from refresher.ledger_counter import ensure_ledger_counter, schema_locked
from refresher.load import SEGMENT_LOCK_WAIT, copy_arrow, server_said

if TYPE_CHECKING:
    import pandas as pd
else:
    pd = LazyModule("pandas")  # imported at the first computation: a no-op refresh computes nothing

FEATURES_DDL = """
CREATE TABLE IF NOT EXISTS refresher_features (
    feature text NOT NULL,
    symbol text NOT NULL,
    input_hash text NOT NULL,
    rows bigint NOT NULL,
    loaded_at timestamptz NOT NULL DEFAULT now(),
    inputs text,
    PRIMARY KEY (feature, symbol)
)
"""


class StaleFeature(LoadError):
    """Rows meant to extend a feature's loaded rows found other rows loaded meanwhile (another refresh)."""


class ColumnsChanged(StaleFeature):
    """A feature's new rows have other columns than its table, which holds rows of symbols they do not cover (or
    that they were to extend): its table is rebuilt only with every symbol's rows at once (``rebuild=True``)."""


@dataclass(frozen=True)
class FeaturePart:
    """One symbol's new rows of a feature (empty when its bars are), and the input hash they came from."""

    symbol: str
    rows: pa.Table
    input_hash: str
    # What the ledger's ``inputs`` records for these rows (None: nothing, the next refresh reloads them whole).
    inputs: str | None = None
    # Set: ``rows`` are the symbol's rows dated ``since`` or later, to replace only those; the older rows stay
    # and must have come from the input hash ``based_on``.
    since: dt.date | None = None
    based_on: str | None = None


def feature_table(name: str) -> str:
    """The database table holding feature ``name``'s rows."""
    return f"features_{name}"


def feature_relation(conn: psycopg.Connection[Any], name: str) -> str:
    """``feature_table(name)`` quoted, as ``to_regclass`` reads it."""
    return sql.Identifier(feature_table(name)).as_string(conn)


def feature_rows(symbol: str, frame: pd.DataFrame) -> pa.Table:
    """One symbol's feature frame as the Arrow rows of its table: symbol, date, then the metrics; NaN -> NULL."""
    dates = pd.DatetimeIndex(frame.index).to_numpy().astype("datetime64[D]")
    columns = {
        "symbol": pa.array([symbol] * len(frame), pa.string()),
        "date": pa.array(dates, pa.date32()),
    }
    for name in frame.columns:
        columns[str(name)] = pa.array(frame[name].to_numpy(dtype="float64"), pa.float64(), from_pandas=True)
    return pa.table(columns)


# Whether the ledger has its ``inputs`` column (a database loaded before it existed has not). The ledger the
# statements resolve (the search path), not any table of the name: a schema of the user's may hold another.
_HAS_INPUTS = (
    "EXISTS (SELECT FROM pg_attribute WHERE attrelid = to_regclass('refresher_features') "
    "AND attname = 'inputs' AND NOT attisdropped)"
)


@dataclass(frozen=True)
class Ledger:
    """What ``refresher_features`` records: (feature, symbol) -> the input hash its rows were loaded from, their
    number, and the ``inputs`` they came from where recorded. Empty before any feature was loaded."""

    hashes: Mapping[tuple[str, str], str]
    rows: Mapping[tuple[str, str], int]
    inputs: Mapping[tuple[str, str], str]


def read_feature_ledger(conn: psycopg.Connection[Any], *, inputs: bool = True) -> Ledger:
    """The ledger as it is now, in two round trips: whether it is there (and has ``inputs``), then its rows.
    ``inputs=False``: without the ``inputs`` (about 1 KB a pair), for a reader of the hashes and rows alone."""
    row = conn.execute(f"SELECT to_regclass('refresher_features') IS NOT NULL, {_HAS_INPUTS}").fetchone()
    if row is None or not row[0]:
        return Ledger({}, {}, {})
    # A database loaded before the column existed has none.
    column = "inputs" if inputs and row[1] else "NULL::text"
    records = conn.execute(f"SELECT feature, symbol, input_hash, rows, {column} FROM refresher_features")
    hashes, rows, recorded = {}, {}, {}
    for feature, symbol, input_hash, count, inputs_text in records:
        hashes[feature, symbol], rows[feature, symbol] = input_hash, count
        if inputs_text is not None:
            recorded[feature, symbol] = inputs_text
    return Ledger(hashes, rows, recorded)


def read_ledger(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], str]:
    """(feature, symbol) -> the input hash its rows were loaded from; empty before any feature was loaded."""
    return dict(read_feature_ledger(conn, inputs=False).hashes)


class FeatureTable(NamedTuple):
    """A feature the ledger records rows of: its name, its table quoted as ``to_regclass`` reads it, and whether
    that table exists (one dropped by hand is missing while the ledger still vouches for its rows)."""

    name: str
    relation: str
    present: bool


# The FeatureTable of each name ``n`` of the relation formatted in.
_FEATURE_TABLES = (
    "SELECT n, quote_ident('features_' || n), to_regclass(quote_ident('features_' || n)) IS NOT NULL "
    "FROM {} ORDER BY n"
)


def feature_tables(conn: psycopg.Connection[Any], ledger: Ledger | None = None) -> list[FeatureTable]:
    """Every feature ``ledger`` records rows of; none before any feature was loaded. One catalog query; ``ledger``
    None: the ledger as it is now, a row a feature (never its (feature, symbol) rows), in two round trips."""
    if ledger is None:
        if conn.execute("SELECT to_regclass('refresher_features')").fetchone() == (None,):
            return []
        found = conn.execute(
            _FEATURE_TABLES.format(
                "(SELECT feature FROM refresher_features GROUP BY feature HAVING sum(rows) > 0) AS f(n)"
            )
        )
    else:
        held: dict[str, int] = {}
        for (feature, _symbol), count in ledger.rows.items():
            held[feature] = held.get(feature, 0) + count
        names = [name for name, count in held.items() if count > 0]
        if not names:
            return []
        found = conn.execute(_FEATURE_TABLES.format("unnest(%s::text[]) AS f(n)"), (names,))
    return [FeatureTable(name, relation, bool(present)) for name, relation, present in found]


def _has_inputs(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(f"SELECT {_HAS_INPUTS}").fetchone()
    return bool(row and row[0])


def _ensure_ledger(conn: psycopg.Connection[Any]) -> None:
    """Create the ledger (or add its ``inputs`` column) when missing, in a transaction of its own under the
    schema lock: CREATE TABLE IF NOT EXISTS is not race-free, and two features' first loads into a new database
    (a refresh beside a worker) each take only their own feature's lock."""
    if not _has_inputs(conn):  # also when the table is missing
        with schema_locked(conn):
            conn.execute(FEATURES_DDL)
            # Only when missing: ALTER TABLE locks the ledger against every reader until the transaction ends.
            if not _has_inputs(conn):
                conn.execute("ALTER TABLE refresher_features ADD COLUMN IF NOT EXISTS inputs text")
    ensure_ledger_counter(conn, "refresher_features")


def doubtful_rows(
    conn: psycopg.Connection[Any], ledger: Ledger, *, verify: bool = False
) -> dict[str, list[str] | None]:
    """Features whose rows are not what ``ledger`` (read just before) says, by name: None when the table is gone
    (dropped by hand) while the ledger records rows in it; with ``verify`` (``refresh --verify``), the symbols
    whose rows in the table do not number what the ledger records (deleted or added by hand). One catalog query
    without."""
    names = feature_tables(conn, ledger)
    doubtful: dict[str, list[str] | None] = {name: None for name, _relation, present in names if not present}
    for name, _relation, present in names if verify else ():
        if not present:
            continue
        counted = sql.SQL(
            "SELECT coalesce(l.symbol, c.symbol) FROM (SELECT symbol, rows FROM refresher_features "
            "WHERE feature = %s) AS l FULL JOIN (SELECT symbol, count(*) AS rows FROM {} GROUP BY symbol) AS c "
            "ON c.symbol = l.symbol WHERE coalesce(l.rows, 0) <> coalesce(c.rows, 0) ORDER BY 1"
        ).format(sql.Identifier(feature_table(name)))
        symbols = [symbol for (symbol,) in conn.execute(counted, (name,))]
        if symbols:
            doubtful[name] = symbols
    return doubtful


def feature_lock_id(name: str) -> int:
    """The advisory lock two loads of feature ``name`` take turns on."""
    return zlib.crc32(f"refresher.features:{name}".encode())


def _lock_feature(conn: psycopg.Connection[Any], name: str) -> None:
    """Take feature ``name``'s advisory lock until the transaction ends.

    Two loads of one feature (two refreshes, a worker beside a refresh) take turns, and the second reads the
    ledger after the first committed: no COPY races another's uncommitted rows.

    Bounded as a segment's lock is (``refresher.load.lock_segments``): a loader stopped in the COPY of the
    feature's rows (SIGSTOP, a suspended machine) held it for as long as it stayed stopped, and a refresh beside
    it waited as long, for ever (a worker's fence covers only a worker's other workers: a refresh claims none).
    Past ``SEGMENT_LOCK_WAIT`` a session holding it inside a COPY that read nothing all along is ended and the lock
    taken; a live load is waited for; a holder idle inside its transaction the whole wait fails the load in one
    line naming it, its cause a lock timeout (transient: a worker tries again)."""
    ids = [feature_lock_id(name)]
    try:
        advisory_locked(
            conn, SEGMENT_LOCK_WAIT, "id", "unnest(%s::bigint[]) AS id", (ids,), SEGMENTS_HELD, (ids,)
        )
    except psycopg.errors.LockNotAvailable as exc:
        raise LoadError(
            f"feature {name}: another load of it held its lock for over {SEGMENT_LOCK_WAIT:g} s "
            f"({held_by(conn, SEGMENTS_HELD, (ids,))}); try again once it is done",
            feature=name,
        ) from exc


def replace_feature_rows(
    conn: psycopg.Connection[Any], name: str, parts: Sequence[FeaturePart], fence: Fence | None = None
) -> int:
    """Replace feature ``name``'s rows of every symbol in ``parts``; returns the rows written.

    One transaction and one binary COPY per feature. A part with no rows (its symbol's bars are empty) deletes
    the symbol's old rows and records the empty load, so the next refresh does not look again.

    Rows with other columns than the table's rebuild it, but only when ``parts`` replace every row it holds,
    whole: ColumnsChanged otherwise, and nothing changes (``rebuild_feature_rows`` loads every symbol's).

    With ``fence`` (a queue run's features stage), only while the fence is still this writer's (``FenceLost``).
    """
    return _load_rows(conn, name, parts, rebuild=False, fence=fence)


def rebuild_feature_rows(
    conn: psycopg.Connection[Any], name: str, parts: Sequence[FeaturePart], fence: Fence | None = None
) -> int:
    """``replace_feature_rows`` of every symbol of the profile (``parts``, whole), rebuilding the table when their
    columns are not its own: it then holds exactly ``parts``' rows, in the same one transaction."""
    return _load_rows(conn, name, parts, rebuild=True, fence=fence)


def _load_rows(
    conn: psycopg.Connection[Any],
    name: str,
    parts: Sequence[FeaturePart],
    *,
    rebuild: bool,
    fence: Fence | None,
) -> int:
    try:
        _ensure_ledger(conn)
        with conn.transaction():
            if fence is not None:  # first: the fence's row, then the feature's lock
                fence.check(conn)
            _lock_feature(conn, name)
            current = _table_columns(conn, name)
            metrics = next((part.rows.column_names[2:] for part in parts if part.rows.num_rows), None)
            rebuilt = bool(current) and metrics is not None and current != metrics
            if rebuilt and not _ours(conn, name):
                raise LoadError(
                    f"feature {name}: table {feature_table(name)} holds rows refresher did not load, of other "
                    "columns: rename or drop it, or give the feature another name (as:)",
                    feature=name,
                )
            if rebuilt and not rebuild and (any(p.since for p in parts) or _rows_beyond(conn, name, parts)):
                raise ColumnsChanged(
                    f"feature {name}: its columns changed; load every symbol's rows at once", feature=name
                )
            if not rebuilt:  # rebuilt, every part loads: the table is new
                parts = _still_needed(conn, name, parts)
            filled = [part.rows for part in parts if part.rows.num_rows]
            if filled:
                data = pa.concat_tables(filled)
                _ensure_feature_table(conn, name, data.column_names[2:], current)
            whole = [part.symbol for part in parts if part.since is None]
            _delete_symbols(conn, name, whole, exists=bool(current) or bool(filled))
            _delete_since(conn, name, [part for part in parts if part.since is not None])
            if filled:
                copy_arrow(conn, feature_table(name), data.column_names, data)
            conn.cursor().executemany(
                "INSERT INTO refresher_features (feature, symbol, input_hash, rows, inputs) "
                "VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (feature, symbol) DO UPDATE SET input_hash = EXCLUDED.input_hash, "
                "rows = EXCLUDED.rows, inputs = EXCLUDED.inputs, loaded_at = now()",
                [(name, p.symbol, p.input_hash, p.rows.num_rows, p.inputs) for p in parts],
            )
            _count_rows(conn, name, [part.symbol for part in parts if part.since is not None])
    except psycopg.Error as exc:
        raise LoadError(f"feature {name}: loading failed: {server_said(exc)}".rstrip(), feature=name) from exc
    return sum(table.num_rows for table in filled)


def _ours(conn: psycopg.Connection[Any], name: str) -> bool:
    """Whether feature ``name``'s table may be dropped: the ledger records the feature, or the table is empty.
    A table of the user's that a feature is named after is not (only tables the ledger records are dropped)."""
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT FROM refresher_features WHERE feature = %s) OR NOT EXISTS (SELECT FROM {})"
        ).format(sql.Identifier(feature_table(name))),
        (name,),
    ).fetchone()
    return bool(row and row[0])


def _rows_beyond(conn: psycopg.Connection[Any], name: str, parts: Sequence[FeaturePart]) -> bool:
    """Whether the ledger records rows of feature ``name`` for a symbol ``parts`` do not replace."""
    row = conn.execute(
        "SELECT EXISTS (SELECT FROM refresher_features WHERE feature = %s AND rows > 0 AND symbol <> ALL(%s))",
        (name, [part.symbol for part in parts]),
    ).fetchone()
    return bool(row and row[0])


def _still_needed(
    conn: psycopg.Connection[Any], name: str, parts: Sequence[FeaturePart]
) -> list[FeaturePart]:
    """``parts`` less those the ledger already holds; StaleFeature if a partial one's base is gone."""
    held = dict(
        conn.execute(
            "SELECT symbol, input_hash FROM refresher_features WHERE feature = %s AND symbol = ANY(%s)",
            (name, [part.symbol for part in parts]),
        ).fetchall()
    )
    needed = [part for part in parts if held.get(part.symbol) != part.input_hash]
    for part in needed:
        if part.since is not None and held.get(part.symbol) != part.based_on:
            raise StaleFeature(
                f"feature {name}, symbol {part.symbol}: other rows were loaded while these were computed",
                feature=name,
                symbol=part.symbol,
            )
    return needed


def _delete_since(conn: psycopg.Connection[Any], name: str, parts: Sequence[FeaturePart]) -> None:
    if not parts:
        return
    conn.execute(
        sql.SQL(
            "DELETE FROM {} AS t USING unnest(%s::text[], %s::date[]) AS u(symbol, since) "
            "WHERE t.symbol = u.symbol AND t.date >= u.since"
        ).format(sql.Identifier(feature_table(name))),
        ([part.symbol for part in parts], [part.since for part in parts]),
    )


def _count_rows(conn: psycopg.Connection[Any], name: str, symbols: Sequence[str]) -> None:
    """Set the ledger's row count of ``symbols``, whose rows were partly kept, from the table itself."""
    if not symbols:
        return
    conn.execute(
        sql.SQL(
            "UPDATE refresher_features AS l SET rows = c.n FROM "
            "(SELECT symbol, count(*) AS n FROM {} WHERE symbol = ANY(%s) GROUP BY symbol) AS c "
            "WHERE l.feature = %s AND l.symbol = c.symbol"
        ).format(sql.Identifier(feature_table(name))),
        (list(symbols), name),
    )


def remove_feature_rows(
    conn: psycopg.Connection[Any],
    name: str,
    symbols: Sequence[str] | None = None,
    fence: Fence | None = None,
) -> int:
    """Forget feature ``name`` for ``symbols`` (rows and ledger), or entirely (its table too) when None.

    Only names the ledger records are ever passed here, so no table refresher did not create is dropped.
    Returns the number of (feature, symbol) pairs forgotten. ``fence``: as ``replace_feature_rows``.
    """
    try:
        with conn.transaction():
            if fence is not None:
                fence.check(conn)
            if symbols is None:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(feature_table(name))))
                cur = conn.execute("DELETE FROM refresher_features WHERE feature = %s", (name,))
            else:
                _delete_symbols(conn, name, symbols)
                cur = conn.execute(
                    "DELETE FROM refresher_features WHERE feature = %s AND symbol = ANY(%s)",
                    (name, list(symbols)),
                )
            return int(cur.rowcount)
    except psycopg.Error as exc:
        reason = server_said(exc)
        raise LoadError(
            f"feature {name}: removing stale rows failed: {reason}".rstrip(), feature=name
        ) from exc


def _delete_symbols(
    conn: psycopg.Connection[Any], name: str, symbols: Sequence[str], *, exists: bool | None = None
) -> None:
    """Delete ``symbols``' rows of feature ``name``; ``exists``: whether its table does (None: ask the catalog)."""
    if exists is None:
        exists = conn.execute("SELECT to_regclass(%s)", (feature_relation(conn, name),)).fetchone() != (None,)
    if not symbols or not exists:
        return
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE symbol = ANY(%s)").format(sql.Identifier(feature_table(name))),
        (list(symbols),),
    )


def _table_columns(conn: psycopg.Connection[Any], name: str) -> list[str]:
    """The metric columns of feature ``name``'s table, in order; none when there is no table. The table its
    statements resolve (the search path): one of the name in another schema is not it."""
    return [
        row[0]
        for row in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
            "AND NOT attisdropped AND attname NOT IN ('symbol', 'date') ORDER BY attnum",
            (feature_relation(conn, name),),
        )
    ]


def _ensure_feature_table(
    conn: psycopg.Connection[Any], name: str, metrics: Sequence[str], current: Sequence[str]
) -> None:
    """Create the feature's table; if its metric columns (``current``, ``_table_columns``) are not ``metrics``,
    rebuild it and forget what was loaded."""
    if list(current) == list(metrics):
        return
    table = feature_table(name)
    if current:
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table)))
        conn.execute("DELETE FROM refresher_features WHERE feature = %s", (name,))
    columns = sql.SQL(", ").join(sql.SQL("{} double precision").format(sql.Identifier(m)) for m in metrics)
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (symbol text NOT NULL, date date NOT NULL, {}, PRIMARY KEY (symbol, date))"
        ).format(sql.Identifier(table), columns)
    )


__all__ = [
    "FEATURES_DDL",
    "ColumnsChanged",
    "FeaturePart",
    "FeatureTable",
    "Ledger",
    "StaleFeature",
    "doubtful_rows",
    "feature_relation",
    "feature_rows",
    "feature_table",
    "feature_tables",
    "read_feature_ledger",
    "read_ledger",
    "rebuild_feature_rows",
    "remove_feature_rows",
    "replace_feature_rows",
]
