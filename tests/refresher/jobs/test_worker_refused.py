"""A target that refuses the worker (a wrong password, a role or a database that does not exist) is no transient
failure: every job is dead-lettered at its first attempt with one line naming the DSN, never its password.
Real redis-server, a real embedded Postgres, the worker in-process."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from refresher.engines.base import ServerInfo
from refresher.jobs import worker as worker_module
from refresher.jobs.queue import DEAD, connect, text
from refresher.jobs.runs import RunSpec, run_status, submit_jobs
from refresher.jobs.segment import SegmentJob
from refresher.jobs.submit import without_password
from refresher.jobs.worker import Worker, WorkerOptions
from refresher.segments import Segment
from refresher.settings import Settings
from tests.redis_server import RedisServer
from tests.refresher.test_refresh_e2e import AS_OF, Workspace

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


@pytest.mark.parametrize(
    ("case", "change", "password"),
    [
        ("wrong password", {}, "not-the-password"),
        ("no such role", {"user": "no_such_role_x"}, None),
        ("no such database", {"dbname": "no_such_db_x"}, None),
    ],
)
def test_a_target_refusing_the_worker_dead_letters_each_job_at_once(
    case: str,
    change: dict[str, str],
    password: str | None,
    pg_server: ServerInfo,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ws = Workspace(tmp_path, "local", "refused")
    ws.write_profile(symbols=["AAPL"], months=1)
    # The DSN as `jobs submit --target` passes it through Redis: no password; the worker's libpq takes it
    # from PGPASSWORD, here wrong, or right for a role or a database that does not exist.
    target = without_password(make_conninfo(pg_server.dsn(), **change))
    monkeypatch.setenv("PGPASSWORD", password or pg_server.password)
    spec = RunSpec("refused", str(tmp_path / "profiles" / "refused.yaml"), AS_OF.isoformat(), target, False)
    month = AS_OF.replace(day=1)
    jobs = [SegmentJob(Segment("AAPL", tf, month), f"key-{tf}", "America/New_York") for tf in ("1d", "1m")]
    client = connect(redis_server.url)
    run = submit_jobs(client, spec, jobs, now=dt.datetime.now(dt.UTC))

    settings = Settings.from_env(ws.env, engine="local")
    options = WorkerOptions("refused", burst=True, backoff_base=0.01, backoff_cap=0.02)
    logins: list[str] = []
    opened = worker_module._RunContext

    class Counted(opened):  # type: ignore[valid-type,misc]  # the real context, its logins counted
        def __init__(self, settings: Settings, spec: dict[str, object], *rest: object) -> None:
            logins.append(str(spec["target"]))
            super().__init__(settings, spec, *rest)

    monkeypatch.setattr(worker_module, "_RunContext", Counted)
    report = Worker(redis_server.url, settings, options).run()
    # One login refused for the batch of two: each job retried alone logged in again, to be refused again.
    assert logins == [target], (case, logins)

    # Transient before: six attempts each, with their backoff, before the dead letter.
    assert (report.retried, report.dead, report.done) == (0, 2, 0), case
    state = run_status(client, run.run_id)
    assert (state.state, state.dead) == ("incomplete", 2)
    letters = [{text(k): text(v) for k, v in fields.items()} for _id, fields in client.xrange(DEAD)]
    assert len(letters) == 2
    for letter in letters:
        assert letter["attempts"] == "1", (case, letter)
        error = letter["error"]
        assert "\n" not in error and error.startswith(f"permanent: target {target}: cannot connect"), error
        assert pg_server.password not in error and "not-the-password" not in error
        assert json.loads(letter["job"])["run"] == run.run_id
    assert conninfo_to_dict(target).get("password") is None
