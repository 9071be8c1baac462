"""Segment jobs and the executors that run them: in-process, or fanned out to workers through Redis Streams."""

from refresher.jobs.inprocess import InProcessExecutor
from refresher.jobs.segment import SegmentJob, SegmentOutcome, SegmentTotals, jobs_of_plan, run_segment_job

__all__ = [
    "InProcessExecutor",
    "SegmentJob",
    "SegmentOutcome",
    "SegmentTotals",
    "jobs_of_plan",
    "run_segment_job",
]
