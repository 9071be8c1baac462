"""``refresher jobs submit``: the same gap plan as ``refresh``, made against the target, enqueued as jobs."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from contextlib import closing
from zoneinfo import ZoneInfo

import psycopg
import redis

from featurestore import FeatureStore
from refresher import database
from refresher import dsn as dsn_check
from refresher.calendar import market_status
from refresher.engines import select_engine
from refresher.engines.base import ServerInfo
from refresher.errors import JobError
from refresher.jobs.eviction import require_noeviction
from refresher.jobs.namespace import namespace_of
from refresher.jobs.queue import TIERS, open_queue, redis_time, unreachable
from refresher.jobs.runs import RunSpec, Submitted, submit_jobs
from refresher.jobs.segment import jobs_of_plan
from refresher.plan import GapPlan
from refresher.profile import Profile, load_profile
from refresher.refresh import compute_plan, exchange_timezones
from refresher.settings import Settings
from refresher.snapshot import connect_target
from refresher.sources import make_source
from refresher.sources.base import Source


def without_password(dsn: str) -> str:
    """The --target DSN as it may travel through Redis: everything but the password (``refresher.dsn``)."""
    return dsn_check.without_password(dsn, "--target", JobError)


def hold_until(exchange: str, now: dt.datetime) -> tuple[float, str] | None:
    """When a run submitted at ``now`` with ``--when-closed exchange`` may start: None if it is closed now."""
    state = market_status(exchange, now)
    if not state.is_open:
        return None
    local = state.next_close.astimezone(ZoneInfo(state.tz))
    return state.next_close.timestamp(), f"{local:%Y-%m-%d %H:%M} {state.tz}"


def _plan_on_target(
    settings: Settings,
    profile: Profile,
    source: Source,
    target: str | None,
    on_wait: Callable[[str], None] | None,
) -> tuple[str, GapPlan]:
    """The target as it may travel (no password) and the profile's gap plan against it: the profile's own server,
    started, when ``target`` is None. ``on_wait`` is told what is waited for: another command starting or
    stopping the server, the store's manifest, a reset's shut door."""
    server: ServerInfo | None = None
    if target is None:
        server = select_engine(settings.engine, settings, profile.name).start(profile.name, on_wait=on_wait)
        public = server.dsn(with_password=False)
    else:
        public = without_password(target)
        server = dsn_check.served_here(settings, profile.name, public)
    store = FeatureStore(settings.store_root, on_wait=on_wait)
    try:
        # A reset killed with the database's door shut left it refusing sessions: the one door opens it.
        conn = connect_target(server, target or public, autocommit=True, on_wait=on_wait)
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(f"--target={public}: cannot connect ({first})", field="target", value=public) from exc
    with conn:
        database.ensure_schema(conn)
        database.upsert_symbols(conn, profile.listings)
        return public, compute_plan(profile, source, store, conn)


def submit_run(
    settings: Settings,
    profile_name: str,
    queue_url: str,
    *,
    target: str | None = None,
    priority: str = "normal",
    when_closed: str | None = None,
    as_of: dt.date | None = None,
    now: dt.datetime | None = None,
    prune: bool = False,
    queue_label: str = "--queue",
    say: Callable[[str], None] | None = None,
) -> Submitted:
    """Plan the profile against the target and enqueue one job per segment to load; returns the run id. ``say``:
    where a warning line goes (a Redis that does not tell its maxmemory-policy), and a line saying what the plan
    waits for (a lock, a reset's shut door)."""
    if priority not in TIERS:
        raise JobError(f"--priority={priority!r}: choose one of {', '.join(TIERS)}", field="priority")
    profile = load_profile(profile_name, settings.profiles_dirs, as_of=as_of)
    client = open_queue(queue_url, queue_label)  # before planning, which can take a while
    try:
        # An evicting Redis would lose the run's jobs and counters without a word.
        require_noeviction(client, queue_url, queue_label, say)
        # Redis's clock, as workers and `jobs prune` read the run's times: this machine's, off by days, made a run
        # submitted now look old to prune (its index score) or a --when-closed hold end at the wrong close.
        now = now or dt.datetime.fromtimestamp(redis_time(client), dt.UTC)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise unreachable(queue_url, exc, queue_label) from exc
    held = hold_until(when_closed, now) if when_closed is not None else None  # '' is no exchange either
    with closing(make_source(profile)) as source:
        # A files source no file matches (its directory empty or wrong) is the one line a refresh gives, before a
        # server starts or a run is recorded: submitted, each job loaded its segment empty and the run completed.
        source.preflight()
        public, plan = _plan_on_target(settings, profile, source, target, say)
    spec = RunSpec(
        profile=profile.name,
        profile_path=str(profile.path),
        # Pinned, so every worker computes the same months whatever day it runs.
        as_of=profile.end.isoformat(),
        target=public,
        own_server=target is None,
        priority=priority,
        when_closed=when_closed,
        held_until=held[1] if held else None,
        prune=prune,
    )
    try:
        return submit_jobs(
            client,
            spec,
            jobs_of_plan(plan, exchange_timezones(profile)),
            now=now,
            held_until_ts=held[0] if held else None,
            ns=namespace_of(queue_url, queue_label),
        )
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise unreachable(queue_url, exc, queue_label) from exc


__all__ = ["hold_until", "submit_run", "without_password"]
