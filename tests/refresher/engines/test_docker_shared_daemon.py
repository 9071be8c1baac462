"""Several checkouts on one Docker daemon, at the same moment: what one removes, the others may be removing too.

Each test starts real processes that wait for one signal, then call the engine at once against the real daemon.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import psycopg
import pytest

from refresher.engines.docker import PGDATA, PREFIX_LABEL, DockerEngine
from refresher.errors import EngineStateError
from tests.child_processes import outputs, reap
from tests.fixtures_docker import labels_of_a_dead_process

REPO = Path(__file__).resolve().parents[3]

# Each child imports the engine, says it is ready, waits for the go file, then runs its call once and prints
# {"result": ...} or {"error": "..."}: the calls meet in the daemon within a millisecond or two.
CHILD = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from refresher.engines.docker import DockerEngine, remove_abandoned

    go, call, args = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    try:
        if call == "sweep":
            result = remove_abandoned(args["marker"])
        elif call == "start":
            info = DockerEngine(Path(args["state_dir"]), prefix=args["prefix"], image=args["image"]).start(
                args["profile"]
            )
            result = [info.port, info.password]
        else:
            result = DockerEngine(Path(args["state_dir"]), prefix=args["prefix"]).stop(args["profile"])
        print(json.dumps({"result": result}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
    """
)


def at_once(tmp_path: Path, calls: list[tuple[str, dict[str, str]]]) -> list[Any]:
    """Run each (call, args) in its own process, all released together; their results in order."""
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(go), call, json.dumps(args)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for call, args in calls
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        go.touch()
        said = [out for out, _ in outputs(procs, timeout=180)]
    finally:  # a kill and a wait alone left the pipes of those never read to the end open
        reap(*procs)
    answers = [json.loads(out.strip().splitlines()[-1]) for out in said]
    errors = [a["error"] for a in answers if "error" in a]
    assert errors == [], errors
    return [a["result"] for a in answers]


def leftovers(client: docker.DockerClient, marker: str) -> list[str]:
    label = {"label": marker}
    return [c.name or "?" for c in client.containers.list(all=True, filters=label)] + [
        v.name or "?" for v in client.volumes.list(filters=label)
    ]


@pytest.mark.docker
def test_three_checkouts_sweeping_the_same_abandoned_servers_at_once_all_succeed(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    # Every checkout's test run sweeps what killed runs left on the daemon; they may all start together. The
    # later removals of a container meet the daemon's 409 "removal ... already in progress".
    marker = f"io.refresher.test-{docker_prefix}-sweep"
    labels = {marker: "1", PREFIX_LABEL: docker_prefix, **labels_of_a_dead_process()}
    names = [f"{docker_prefix}-abandoned{n}" for n in range(2)]
    for name in names:
        docker_client.volumes.create(f"{name}-data", labels=labels)
        docker_client.containers.run(
            docker_pg_image,
            name=name,
            labels=labels,
            environment={"POSTGRES_PASSWORD": "x"},
            volumes={f"{name}-data": {"bind": PGDATA, "mode": "rw"}},
            detach=True,
        )

    results = at_once(tmp_path, [("sweep", {"marker": marker})] * 3)

    removed = [name for result in results for name in result]
    assert sorted(removed) == sorted([*names, *(f"{n}-data" for n in names)])  # each once, by one of them
    assert leftovers(docker_client, marker) == []


@pytest.mark.docker
def test_a_stop_that_meets_other_checkouts_sweeping_its_server_succeeds_and_leaves_nothing(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    # A run's own sweep stops the servers of its killed runs by their state dir (engine.stop) while other
    # checkouts' sweeps remove the same containers by their labels.
    marker = f"io.refresher.test-{docker_prefix}-stop"
    state_dir = tmp_path / "state"
    engine = DockerEngine(
        state_dir, image=docker_pg_image, client=docker_client, prefix=docker_prefix,
        labels={marker: "1", **labels_of_a_dead_process()},
    )  # fmt: skip
    engine.start("swept")
    stop = {"state_dir": str(state_dir), "prefix": docker_prefix, "profile": "swept"}

    results = at_once(
        tmp_path, [("stop", stop), ("sweep", {"marker": marker}), ("sweep", {"marker": marker})]
    )

    assert results[0] is True
    assert leftovers(docker_client, marker) == []
    assert engine.status() == []
    assert not (state_dir / "docker" / "swept.json").exists()
    # Still a working engine afterwards: the next start makes the server anew.
    try:
        assert engine.start("swept").port > 0
    finally:
        engine.stop("swept")


@pytest.mark.docker
def test_two_image_builds_at_once_take_turns(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    # `make image` in two checkouts at once wrote the same .part files in the cache and built the tag twice (the
    # loser's 151 MB image left dangling). build.sh takes a lock per cache dir: here another build holds it.
    repo = f"refresher/{docker_prefix}-pg"
    docker_client.images.get(docker_pg_image).tag(repo, "15")
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "IMAGE": repo, "REFRESHER_CACHE_DIR": str(cache), "WITH_REDIS": "0"}
    try:
        with open(cache / "build.lock", "w") as other_build:
            fcntl.flock(other_build, fcntl.LOCK_EX)
            build = subprocess.Popen(
                ["bash", str(REPO / "compose" / "image" / "build.sh")],
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                with pytest.raises(subprocess.TimeoutExpired):
                    build.wait(timeout=5)  # on its own it is done in well under a second: it waits its turn
            except BaseException:
                reap(build)
                raise
        [(_, err)] = outputs([build], timeout=120)
        assert build.returncode == 0, err
        assert f"{repo}:15 already exists" in err  # the first build's tag, found once it had its turn
    finally:
        for tag in ("15", "latest"):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(f"{repo}:{tag}")


# -- a container or volume with our name that another checkout made ----------------------------------------------


@pytest.fixture
def engine_at(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str
) -> Callable[[Path], DockerEngine]:
    """A Docker engine of the session's image and prefix over a state dir of the test's."""
    return lambda state_dir: DockerEngine(
        state_dir, image=docker_pg_image, client=docker_client, prefix=docker_prefix
    )


def down_all(state_dir: Path) -> subprocess.CompletedProcess[str]:
    """`refresher down --profile all` of ``state_dir``, which must succeed."""
    down = subprocess.run(
        [sys.executable, "-m", "refresher.cli", "down", "--profile", "all"],
        capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "REFRESHER_STATE_DIR": str(state_dir), "REFRESHER_ENGINE": "auto"},
    )  # fmt: skip
    assert down.returncode == 0, down.stderr
    return down


@pytest.mark.docker
def test_a_checkout_at_the_same_path_elsewhere_never_adopts_or_removes_the_others_server(
    engine_at: Callable[[Path], DockerEngine], tmp_path: Path
) -> None:
    # Two dev containers mounting their checkouts at the same path (/workspaces/<repo>) over one host's Docker
    # socket: same state dir path, same names. The second adopted the first's container (its password read back
    # from the environment), loaded into its database, and `down` removed it with its volume.
    state_dir = tmp_path / "workspace" / ".refresher"
    first = engine_at(state_dir)
    first.hostname = "dev-container-1"  # the other machine; this process and its CLI are the second one
    theirs = first.start("same_path")
    (state_dir / "docker").rename(
        tmp_path / "first-machine"
    )  # what the other machine's checkout has: nothing
    second = engine_at(state_dir)
    try:
        with pytest.raises(EngineStateError, match=r"belongs to another checkout") as refused:
            second.start("same_path")
        assert "\n" not in str(refused.value) and theirs.password not in str(refused.value)
        assert second.info("same_path") is None
        assert second.status() == []
        assert second.stop("same_path") is False
        down_all(state_dir)
        with psycopg.connect(theirs.dsn(), connect_timeout=10) as conn:  # still there, still theirs
            assert conn.execute("SELECT current_database()").fetchone() == ("same_path",)
    finally:
        shutil.rmtree(state_dir / "docker", ignore_errors=True)
        (tmp_path / "first-machine").rename(state_dir / "docker")
        first.stop("same_path")


@pytest.mark.docker
def test_down_all_says_in_one_line_that_another_checkouts_server_under_our_name_was_left_alone(
    docker_client: docker.DockerClient, docker_pg_image: str, tmp_path: Path
) -> None:
    # This checkout started `same_name`, its container and volume were removed behind its back (a reboot's
    # cleanup), then a checkout at the same path on another machine started its own under the same name. `down
    # all` rightly left theirs alone but printed "stopped docker:same_name".
    state_dir = tmp_path / "workspace" / ".refresher"
    ours = DockerEngine(state_dir, image=docker_pg_image, client=docker_client)  # the CLI's prefix: `down`'s
    ours.start("same_name")
    name = f"refresher-{ours.scope}-same_name"
    docker_client.containers.get(name).remove(force=True, v=True)
    docker_client.volumes.get(f"{name}-data").remove(force=True)
    (state_dir / "docker" / "checkout-id").rename(tmp_path / "our-checkout-id")
    other = DockerEngine(state_dir, image=docker_pg_image, client=docker_client)
    other.hostname = "dev-container-1"
    try:
        theirs = other.start("same_name")
        (tmp_path / "our-checkout-id").replace(state_dir / "docker" / "checkout-id")
        down = down_all(state_dir)
        lines = down.stdout.strip().splitlines()
        assert len(lines) == 1, down.stdout
        assert "stopped" not in lines[0]
        assert f"docker:same_name left alone: container {name} " in lines[0]
        assert "belongs to another checkout" in lines[0] and "dev-container-1" in lines[0]
        with psycopg.connect(theirs.dsn(), connect_timeout=10) as conn:  # still there, still theirs
            assert conn.execute("SELECT current_database()").fetchone() == ("same_name",)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.containers.get(name).remove(force=True, v=True)
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.volumes.get(f"{name}-data").remove(force=True)


@pytest.mark.docker
def test_a_state_dir_removed_and_made_again_on_the_same_machine_adopts_its_running_server(
    engine_at: Callable[[Path], DockerEngine], tmp_path: Path
) -> None:
    # `make clean` (rm -rf .refresher) while a server runs, then `make refresh`: the same machine, the same
    # path, a new checkout id; the server is still this checkout's own.
    engine = engine_at(tmp_path / "checkout" / ".refresher")
    try:
        before = engine.start("cleaned")
        shutil.rmtree(engine.state_dir)
        assert [s.profile for s in engine.status()] == ["cleaned"]
        assert engine.start("cleaned") == before
    finally:
        engine.stop("cleaned")
    assert engine.status() == []


@pytest.mark.docker
def test_a_volume_with_our_name_that_we_did_not_make_is_never_removed(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    # No state file and no container: the engine took the volume for one of its own whose password was lost,
    # and removed it, whoever made it.
    engine = DockerEngine(
        tmp_path / "state", image=docker_pg_image, client=docker_client, prefix=docker_prefix
    )
    name = f"{docker_prefix}-{engine.scope}-volume"
    volume = docker_client.volumes.create(f"{name}-data", labels={PREFIX_LABEL: docker_prefix})
    try:
        with pytest.raises(EngineStateError, match=rf"volume {name}-data .*refresher did not make it"):
            engine.start("volume")
        assert engine.stop("volume") is False
        assert docker_client.volumes.get(volume.id).attrs["CreatedAt"] == volume.attrs["CreatedAt"]
        assert docker_client.containers.list(all=True, filters={"name": name}) == []
    finally:
        for container in docker_client.containers.list(all=True, filters={"name": name}):
            container.remove(force=True, v=True)
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.volumes.get(volume.id).remove(force=True)


@pytest.mark.docker
def test_two_starts_of_a_new_profile_at_once_serve_one_container(
    docker_client: docker.DockerClient, docker_pg_image: str, docker_prefix: str, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    start = {
        "state_dir": str(state_dir),
        "prefix": docker_prefix,
        "profile": "twice",
        "image": docker_pg_image,
    }
    engine = DockerEngine(state_dir, image=docker_pg_image, client=docker_client, prefix=docker_prefix)
    try:
        first, second = at_once(tmp_path, [("start", start), ("start", start)])
        assert first == second  # one server: the same port and password
        [status] = engine.status()
        assert status.running and status.port == first[0]
    finally:
        engine.stop("twice")
