"""The shape of the data: Arrow schemas of segments and the DDL of the target database.

Bar-labelling convention (one rule for both timeframes): a bar is labelled by the *start* of the interval it
covers. A minute bar stamped 09:30 New York covers [09:30, 09:31); ``ts`` is stored in UTC (timestamptz). A daily
bar is labelled by its session date (the exchange-local calendar date of the session), and aggregates exactly
the minute bars of that session.
"""

from __future__ import annotations

import pyarrow as pa

from refresher.segments import Timeframe

_PRICES = [
    pa.field("open", pa.float64(), nullable=False),
    pa.field("high", pa.float64(), nullable=False),
    pa.field("low", pa.float64(), nullable=False),
    pa.field("close", pa.float64(), nullable=False),
    pa.field("volume", pa.int64(), nullable=False),
]

DAILY_SCHEMA = pa.schema(
    [pa.field("symbol", pa.string(), nullable=False), pa.field("date", pa.date32(), nullable=False), *_PRICES]
)
MINUTE_SCHEMA = pa.schema(
    [
        pa.field("symbol", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        *_PRICES,
    ]
)
SCHEMA_OF: dict[Timeframe, pa.Schema] = {"1d": DAILY_SCHEMA, "1m": MINUTE_SCHEMA}


def empty_table(timeframe: Timeframe) -> pa.Table:
    """A zero-row table of the timeframe's schema: what a source returns when it has no data."""
    return SCHEMA_OF[timeframe].empty_table()
