"""Segment jobs and the executors that run them: in-process, or fanned out to workers through Redis Streams.

The names below are imported on first use (PEP 562): the CLI's parser imports ``refresher.jobs.parser`` for
every command, and the executors bring pyarrow, pandas and psycopg with them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refresher._lazy import lazy_attributes

if TYPE_CHECKING:
    from refresher.jobs.inprocess import InProcessExecutor
    from refresher.jobs.segment import (
        SegmentJob,
        SegmentOutcome,
        SegmentTotals,
        jobs_of_plan,
        run_segment_job,
    )

__getattr__ = lazy_attributes(
    __name__,
    {
        "inprocess": ("InProcessExecutor",),
        "segment": ("SegmentJob", "SegmentOutcome", "SegmentTotals", "jobs_of_plan", "run_segment_job"),
    },
)


__all__ = [
    "InProcessExecutor",
    "SegmentJob",
    "SegmentOutcome",
    "SegmentTotals",
    "jobs_of_plan",
    "run_segment_job",
]
