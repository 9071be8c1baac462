"""Queue namespaces: two checkouts (or teams) on one Redis database, each in its own namespace, share no key, no
job and no run; the default namespace is the layout of every queue before namespaces. Real redis-server."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import redis

from refresher.errors import JobError
from refresher.jobs.namespace import DEFAULT, Namespace, namespace_of, split_queue_url
from refresher.jobs.queue import TIERS, JobQueue, connect, text
from refresher.jobs.runs import delete_run, retry_dead, run_status, submit_jobs
from tests.redis_server import RedisServer
from tests.refresher.jobs.test_cli_queue import one_line, refresher
from tests.refresher.jobs.test_queue import jobs, spec

pytestmark = pytest.mark.redis

A, B = Namespace("teamA"), Namespace("team-b.2")
DAY = 86400.0


def submitted(client: redis.Redis, ns: Namespace, symbol: str, count: int, days_ago: float = 0) -> str:
    seconds, micros = client.time()
    when = dt.datetime.fromtimestamp(seconds + micros / 1e6 - days_ago * DAY, dt.UTC)
    return submit_jobs(client, spec("normal"), jobs(symbol, count), now=when, ns=ns).run_id


def url_in(url: str, ns: Namespace) -> str:
    return f"{url}?namespace={ns.name}"


def test_split_queue_url_takes_the_namespace_out_and_keeps_the_rest() -> None:
    url = "redis://:pw@host:6379/2?socket_keepalive=true&namespace=teamA&health_check_interval=3"
    assert split_queue_url(url) == (
        "redis://:pw@host:6379/2?socket_keepalive=true&health_check_interval=3",
        Namespace("teamA"),
    )
    assert split_queue_url("redis://host:6379/0") == ("redis://host:6379/0", None)
    for bad in ("", "a b", "a:b", "team*", "-x", "x" * 65, "é"):
        with pytest.raises(JobError, match="not a usable name"):
            split_queue_url(f"redis://host/0?namespace={bad}")
    with pytest.raises(JobError, match="two namespaces"):
        split_queue_url("redis://host/0?namespace=a&namespace=b")


def test_the_default_namespace_is_the_layout_before_namespaces(redis_server: RedisServer) -> None:
    """Workers on many machines share the default, and runs submitted before namespaces are in it: its keys
    are those every queue had (``refresher:...``), so nothing of an existing queue is orphaned."""
    client = connect(redis_server.url)
    run = submitted(client, DEFAULT, "OLD", 2)
    keys = {text(k) for k in client.scan_iter("*")}
    assert {f"refresher:run:{run}", "refresher:runs", "refresher:jobs:normal"} <= keys
    assert all(k.startswith("refresher:") for k in keys), keys
    # ?namespace=refresher names the same queue as no namespace
    assert namespace_of(url_in(redis_server.url, DEFAULT)) == DEFAULT == namespace_of(redis_server.url)


def test_two_namespaces_on_one_database_share_no_key_and_no_job(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    run_a, run_b = submitted(client, A, "AAA", 5), submitted(client, B, "BBB", 3)
    old = submitted(client, DEFAULT, "OLD", 2)
    keys = {text(k) for k in client.scan_iter("*")}
    assert {k for k in keys if run_a in k} == {k for k in keys if k.startswith("teamA:run:")}
    assert not any(run_a in k for k in keys if not k.startswith("teamA:"))

    queue_a, queue_b = JobQueue(client, ns=A), JobQueue(client, ns=B)
    taken = queue_a.read("a-1", block_ms=0, count=100)
    assert sorted(d.job["seg"] for d in taken) == sorted(str(j.segment) for j in jobs("AAA", 5))
    assert {d.job["run"] for d in taken} == {run_a}
    # B's consumer reclaims nothing of A's pending jobs, however idle (a worker of another namespace that
    # reclaimed them dead-lettered them: it had no password for A's target).
    assert queue_b.reclaim("b-1", min_idle_ms=0) == []
    for delivery in taken:
        queue_a.finish(delivery, rows=1, loaded=True, now=0)
    assert queue_a.read("a-1", block_ms=0, count=100) == []
    assert {d.job["run"] for d in queue_b.read("b-1", block_ms=0, count=100)} == {run_b}
    assert run_status(client, run_a, ns=A).state == "loaded"
    assert run_status(client, run_b, ns=B).done == 0
    assert run_status(client, old).pending == 2  # the default namespace's jobs: nobody took them
    for ns, other in ((A, run_b), (B, run_a), (DEFAULT, run_a)):
        said = f"no such run in namespace '{ns.name}'" if ns != DEFAULT else "no such run \\(see"
        with pytest.raises(JobError, match=said):
            run_status(client, other, ns=ns)


def test_retry_dead_and_delete_stay_in_their_namespace(redis_server: RedisServer) -> None:
    client = connect(redis_server.url)
    runs = {ns: submitted(client, ns, f"D{i}", 2) for i, ns in enumerate((A, B))}
    for ns in (A, B):
        queue = JobQueue(client, ns=ns)
        for delivery in queue.read("w", block_ms=0, count=2):
            queue.dead_letter(delivery, "permanent: bad row", 1)
    assert retry_dead(client, runs[A], ns=A) == 2
    assert client.xlen(B.dead) == 2 and run_status(client, runs[B], ns=B).dead == 2
    with pytest.raises(JobError, match="no such run in namespace 'teamA'"):
        retry_dead(client, runs[B], ns=A)
    with pytest.raises(JobError, match="no such run in namespace 'teamA'"):
        delete_run(client, runs[B], ns=A, force=True)
    gone = delete_run(client, runs[B], ns=B, force=True)
    assert gone.deleted == [runs[B]] and gone.entries == 2  # its two dead letters
    assert run_status(client, runs[A], ns=A).pending == 2  # A's jobs back on A's stream, untouched


def test_list_status_and_prune_commands_look_at_their_namespace_only(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect(redis_server.url)
    url = redis_server.url
    run_a, run_b = submitted(client, A, "AAA", 1, days_ago=10), submitted(client, B, "BBB", 1, days_ago=10)
    old = submitted(client, DEFAULT, "OLD", 1, days_ago=10)

    listed = json.loads(refresher(tmp_path, "jobs", "list", "--queue", url_in(url, A), "--json").stdout)
    assert listed["namespace"] == "teamA" and [r["run_id"] for r in listed["runs"]] == [run_a]
    assert listed["runs_in_default"] == 1
    # $REFRESHER_QUEUE_NAMESPACE for a URL that names none (the one $REFRESHER_QUEUE two checkouts share)
    by_env = refresher(tmp_path, "jobs", "list", queue=url, env={"REFRESHER_QUEUE_NAMESPACE": B.name})
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout.startswith(f"namespace {B.name} at {url}: 1 run(s)\n"), by_env.stdout
    assert run_b in by_env.stdout and run_a not in by_env.stdout and old not in by_env.stdout
    assert "1 run(s) in the default namespace" in by_env.stdout
    plain = refresher(tmp_path, "jobs", "list", "--queue", url)
    assert plain.stdout.startswith(f"namespace refresher at {url}: 1 run(s)\n"), plain.stdout
    assert old in plain.stdout and run_a not in plain.stdout and "default namespace" not in plain.stdout

    status = json.loads(
        refresher(tmp_path, "jobs", "status", run_a, "--queue", url_in(url, A), "--json").stdout
    )
    assert status["namespace"] == "teamA" and status["total"] == 1
    one_line(
        refresher(tmp_path, "jobs", "status", run_a, "--queue", url_in(url, B)),
        f"run '{run_a}': no such run in namespace '{B.name}'",
    )

    pruned = refresher(tmp_path, "jobs", "prune", "--older-than", "1d", "--force", "--queue", url_in(url, A))
    assert pruned.returncode == 0, pruned.stderr
    assert f"deleted 1 run(s) (1 stream entries, dead letters and retries): {run_a}" in pruned.stdout
    # nothing of A's left but its four streams (empty) and their group
    assert {text(k) for k in client.scan_iter("teamA:*")} == {A.stream(t) for t in TIERS}
    assert run_status(client, run_b, ns=B).pending == 1 and run_status(client, old).pending == 1


@pytest.mark.parametrize("makelevel", [None, "1"])
@pytest.mark.parametrize(
    ("command", "env", "named"),
    [
        (["jobs", "list", "--queue", "{url}?namespace=team%20a"], {}, ["--queue", "'team a'"]),
        (["jobs", "status", "r1", "--queue", "{url}?namespace=a:b"], {}, ["--queue", "'a:b'"]),
        (["worker", "--burst", "--queue", "{url}?namespace=*"], {}, ["--queue", "'*'"]),
        (
            ["jobs", "prune", "--older-than", "1d"],
            {"REFRESHER_QUEUE_NAMESPACE": "a b"},
            ["REFRESHER_QUEUE_NAMESPACE", "'a b'"],
        ),
        (["jobs", "list", "--queue", "{url}?namespace=a&namespace=b"], {}, ["--queue", "two namespaces"]),
        # a URL urlsplit refuses (an unclosed IPv6 bracket) was a ValueError traceback; its password not shown
        (
            ["jobs", "list", "--queue", "redis://:s3cret@[::1:6379/0"],
            {},
            ["--queue", "not a Redis URL", ":***@"],
        ),
    ],
)
def test_a_bad_namespace_is_one_line_and_exit_2_before_anything_is_touched(
    redis_server: RedisServer,
    tmp_path: Path,
    command: list[str],
    env: dict[str, str],
    named: list[str],
    makelevel: str | None,
) -> None:
    client = connect(redis_server.url)
    when = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    run = submit_jobs(client, spec("normal"), jobs("OLD", 1), now=when).run_id  # in the default namespace
    args = [part.format(url=redis_server.url) for part in command]
    more = {**env, **({"MAKELEVEL": makelevel} if makelevel else {})}
    one_line(refresher(tmp_path, *args, queue=redis_server.url, env=more), *named)
    assert run_status(client, run).pending == 1  # nothing pruned, nothing taken
