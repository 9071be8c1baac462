"""A run's times are Redis's: a submitter whose own clock is off does not make its run look old to `jobs prune`.
Real redis-server, a real embedded Postgres."""

from __future__ import annotations

import datetime as dt
import types

import pytest

from refresher.jobs import submit as submit_module
from refresher.jobs.queue import RUNS, connect
from refresher.jobs.runs import prune_runs
from refresher.settings import Settings
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_prune import redis_now
from tests.refresher.jobs.test_worker import workspace  # noqa: F401  (the fixture)
from tests.refresher.test_refresh_e2e import Workspace

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]


class _Behind(dt.datetime):
    """This machine's clock, 30 days behind."""

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> _Behind:
        return cls.fromtimestamp((dt.datetime.now(tz) - dt.timedelta(days=30)).timestamp(), tz)


def test_a_submitter_whose_clock_is_behind_indexes_its_run_by_redis_time(
    workspace: Workspace,  # noqa: F811
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The run index's score (what prune's cutoff compares) was the submitter's clock: a run submitted now by a
    # machine 30 days behind was pruned with `--older-than 7d --force` as soon as it was submitted.
    skewed = types.SimpleNamespace(**{**vars(dt), "datetime": _Behind})
    monkeypatch.setattr(submit_module, "dt", skewed)
    settings = Settings.from_env(workspace.env, engine="local")
    run = submit_module.submit_run(settings, workspace.profile, redis_server.url).run_id
    client = connect(redis_server.url)
    score = client.zscore(RUNS, run)
    assert score is not None and abs(score - redis_now(client)) < 600, score
    assert prune_runs(client, 7 * 86400, force=True).deleted == []
