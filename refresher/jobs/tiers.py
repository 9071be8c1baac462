"""The queue's priority tiers, apart from the queue so the CLI's parser can name them without importing redis."""

from __future__ import annotations

TIERS = ("critical", "high", "normal", "low")
# Reads per tier in one round of the weighted round robin: a critical backlog goes first, low still moves.
WEIGHTS = {"critical": 10, "high": 5, "normal": 2, "low": 1}

__all__ = ["TIERS", "WEIGHTS"]
