"""Redis's ``maxmemory-policy``, asked when a worker starts and when a run is submitted: only ``noeviction`` keeps
the queue whole at Redis's memory limit.

Under any other policy Redis at its ``maxmemory`` deletes keys to make room, without a word to any client: with
``allkeys-*`` a tier's stream (its jobs), a run's hash (its counters) or the dead letters; with ``volatile-*`` the
keys that carry a TTL, and ours do: a run's features lock and its failed attempt's backoff, `jobs requeue`'s lock
and a submit's in-progress marker (``runs.submit_jobs``). Evicted, the locks let two workers or two requeues in at
once and the marker shows a run still being submitted as having lost jobs. So ``volatile-*`` is refused too, and
whatever ``maxmemory`` is now: 0 (no limit) makes no policy evict, but a ``CONFIG SET maxmemory`` later starts it
under running workers. Under ``noeviction`` Redis refuses a write instead, which workers and commands handle
(docs/jobs.md, "Redis out of memory").
"""

from __future__ import annotations

from collections.abc import Callable

import redis

from refresher.errors import JobError, one_line
from refresher.jobs.queue import public_url, text

NO_EVICTION = "noeviction"


def require_noeviction(
    client: redis.Redis, url: str, label: str = "--queue", say: Callable[[str], None] | None = None
) -> None:
    """Refuse (JobError, one line: exit status 2) a Redis whose ``maxmemory-policy`` is not ``noeviction``. A Redis
    that does not let us read it (a managed Redis refusing CONFIG, an ACL without it) is one line to ``say``, and
    the command goes on: it may well be ``noeviction``, and refusing every managed Redis would refuse most."""
    shown = public_url(url)
    try:
        reply = client.config_get("maxmemory-policy")
    except redis.ResponseError as exc:  # unknown or renamed command, NOPERM
        policy = None
        why = one_line(exc)
    else:
        values = [text(v) for k, v in reply.items() if text(k) == "maxmemory-policy"]
        policy = values[0] if values else None
        why = "CONFIG GET answered nothing for it"
    if policy is None:
        if say is not None:
            say(
                f"{label}={shown}: cannot read Redis's maxmemory-policy ({why}); make sure it is {NO_EVICTION}: "
                "an evicting policy silently drops the queue's jobs, run counters and locks"
            )
        return
    if policy == NO_EVICTION:
        return
    what = (
        "the queue's keys with a TTL (its locks, a submit's in-progress marker)"
        if policy.startswith("volatile-")
        else "the queue's keys (its jobs, run counters, locks)"
    )
    raise JobError(
        f"{label}={shown}: Redis's maxmemory-policy is {policy}: at its maxmemory it silently deletes {what}; set "
        f"it to {NO_EVICTION} (`CONFIG SET maxmemory-policy {NO_EVICTION}`, and `maxmemory-policy {NO_EVICTION}` "
        "in its redis.conf)",
        field="queue",
        value=shown,
    )


__all__ = ["NO_EVICTION", "require_noeviction"]
