"""The database side of features: one table per feature, and the ``refresher_features`` ledger beside it.

Every change to a feature's rows happens in one transaction with its ledger rows, so the ledger can be trusted
by the next refresh: a crash, a failed COPY or a Ctrl-C leaves the feature as it was, never half of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import pyarrow as pa
from psycopg import sql

from refresher._lazy import LazyModule
from refresher.errors import LoadError
from refresher.load import copy_arrow

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
    PRIMARY KEY (feature, symbol)
)
"""


@dataclass(frozen=True)
class FeaturePart:
    """One symbol's new rows of a feature (empty when its bars are), and the input hash they came from."""

    symbol: str
    rows: pa.Table
    input_hash: str


def feature_table(name: str) -> str:
    """The database table holding feature ``name``'s rows."""
    return f"features_{name}"


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


def read_ledger(conn: psycopg.Connection[Any]) -> dict[tuple[str, str], str]:
    """(feature, symbol) -> the input hash its rows were loaded from; empty before any feature was loaded."""
    if conn.execute("SELECT to_regclass('refresher_features')").fetchone() == (None,):
        return {}
    rows = conn.execute("SELECT feature, symbol, input_hash FROM refresher_features")
    return {(feature, symbol): input_hash for feature, symbol, input_hash in rows}


def replace_feature_rows(conn: psycopg.Connection[Any], name: str, parts: Sequence[FeaturePart]) -> int:
    """Replace feature ``name``'s rows of every symbol in ``parts``; returns the rows written.

    One transaction and one binary COPY per feature. A part with no rows (its symbol's bars are empty) deletes
    the symbol's old rows and records the empty load, so the next refresh does not look again.
    """
    filled = [part.rows for part in parts if part.rows.num_rows]
    try:
        with conn.transaction():
            conn.execute(FEATURES_DDL)
            if filled:
                data = pa.concat_tables(filled)
                _ensure_feature_table(conn, name, data.column_names[2:])
            _delete_symbols(conn, name, [part.symbol for part in parts])
            if filled:
                copy_arrow(conn, feature_table(name), data.column_names, data)
            conn.cursor().executemany(
                "INSERT INTO refresher_features (feature, symbol, input_hash, rows) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (feature, symbol) DO UPDATE SET input_hash = EXCLUDED.input_hash, "
                "rows = EXCLUDED.rows, loaded_at = now()",
                [(name, part.symbol, part.input_hash, part.rows.num_rows) for part in parts],
            )
    except psycopg.Error as exc:
        raise LoadError(f"feature {name}: loading failed: {exc}".rstrip(), feature=name) from exc
    return sum(table.num_rows for table in filled)


def remove_feature_rows(
    conn: psycopg.Connection[Any], name: str, symbols: Sequence[str] | None = None
) -> int:
    """Forget feature ``name`` for ``symbols`` (rows and ledger), or entirely (its table too) when None.

    Only names the ledger records are ever passed here, so no table refresher did not create is dropped.
    Returns the number of (feature, symbol) pairs forgotten.
    """
    try:
        with conn.transaction():
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
        raise LoadError(f"feature {name}: removing stale rows failed: {exc}".rstrip(), feature=name) from exc


def _delete_symbols(conn: psycopg.Connection[Any], name: str, symbols: Sequence[str]) -> None:
    table = feature_table(name)
    if conn.execute("SELECT to_regclass(%s)", (sql.Identifier(table).as_string(conn),)).fetchone() == (None,):
        return
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE symbol = ANY(%s)").format(sql.Identifier(table)), (list(symbols),)
    )


def _ensure_feature_table(conn: psycopg.Connection[Any], name: str, metrics: Sequence[str]) -> None:
    """Create the feature's table; if its metric columns changed, rebuild it and forget what was loaded."""
    table = feature_table(name)
    current = [
        row[0]
        for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "AND column_name NOT IN ('symbol', 'date') ORDER BY ordinal_position",
            (table,),
        )
    ]
    if current == list(metrics):
        return
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
    "FeaturePart",
    "feature_rows",
    "feature_table",
    "read_ledger",
    "remove_feature_rows",
    "replace_feature_rows",
]
