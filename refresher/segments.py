"""A segment is the unit of caching and loading: one symbol, one timeframe, one calendar month."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from refresher.profile import Profile

Timeframe = Literal["1d", "1m"]
TIMEFRAMES: tuple[Timeframe, ...] = get_args(Timeframe)

# The table each timeframe lands in; the loader and the plan agree on this one mapping.
TABLE_OF: dict[Timeframe, str] = {"1d": "ohlcv_daily", "1m": "ohlcv_1min"}


@dataclass(frozen=True, order=True, slots=True)
class Segment:
    """(symbol, timeframe, month); ``month`` is always the first day of the month."""

    symbol: str
    timeframe: Timeframe
    month: dt.date

    def __post_init__(self) -> None:
        if self.month.day != 1:
            raise ValueError(f"Segment.month must be the first of a month, got {self.month}")
        if self.timeframe not in TIMEFRAMES:
            raise ValueError(f"unknown timeframe {self.timeframe!r}")

    @property
    def month_label(self) -> str:
        return f"{self.month.year:04d}-{self.month.month:02d}"  # strftime measured 3x slower

    @property
    def table(self) -> str:
        return TABLE_OF[self.timeframe]

    def month_bounds(self) -> tuple[dt.date, dt.date]:
        """First day of the month and first day of the next month (half-open)."""
        nxt = dt.date(self.month.year + (self.month.month == 12), self.month.month % 12 + 1, 1)
        return self.month, nxt

    def __str__(self) -> str:
        return f"{self.symbol}/{self.timeframe}/{self.month_label}"


def desired_segments(profile: Profile) -> list[Segment]:
    """Every (symbol, timeframe, month) a profile wants, sorted; months without data are still desired."""
    # Built in order rather than sorted afterwards: sorting 120,000 dataclasses cost about 1 s of comparisons.
    months, timeframes = sorted(set(profile.months)), sorted(set(profile.timeframes))
    return [
        Segment(symbol, timeframe, month)
        for symbol in sorted({listing.symbol for listing in profile.listings})
        for timeframe in timeframes
        for month in months
    ]
