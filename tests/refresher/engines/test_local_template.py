"""New local clusters copied from the cached initdb template, against real embedded PostgreSQL servers."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import psycopg
import pytest

from refresher.engines import _pgtemplate, local
from refresher.engines.base import ServerInfo
from refresher.engines.local import LocalEngine
from tests.child_processes import outputs
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.test_stopped_holders import _stopped
from tests.unprivileged import as_nobody, nobody_state

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(sys.platform != "linux", reason="the template cache is used on Linux only"),
]

START = (
    "import sys; from pathlib import Path; from refresher.engines.local import LocalEngine;"
    "print(LocalEngine(Path(sys.argv[1]), template_dir=Path(sys.argv[2]), spare=False).start(sys.argv[3]).password)"
)


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    return tmp_path / "pg-templates"


def _cache_engine(state: Path, templates: Path, *, spare: bool) -> Iterator[LocalEngine]:
    """An engine on the cache ``templates`` that stops the profiles it started once the test is done."""
    engine = LocalEngine(state, template_dir=templates, spare=spare)
    before = {s.profile for s in engine.status()}
    yield engine
    for status in engine.status():
        if status.profile not in before:
            engine.stop(status.profile)


@pytest.fixture
def engine(local_state_dir: Path, templates: Path) -> Iterator[LocalEngine]:
    # Without spares (test_local_spare.py has them): no background copy then appears in the cache these tests list.
    yield from _cache_engine(local_state_dir, templates, spare=False)


def _complete_templates(templates: Path) -> list[Path]:
    return [p for p in templates.iterdir() if p.is_dir() and (p / _pgtemplate.MARKER).is_file()]


def _rejects(info: ServerInfo, password: str) -> bool:
    try:
        psycopg.connect(info.dsn().replace(info.password, password), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        return "password authentication failed" in str(exc)
    return False


def test_two_clusters_from_the_template_each_have_their_own_password(
    engine: LocalEngine, templates: Path
) -> None:
    first = engine.start("lt_first")  # builds the template
    [template] = _complete_templates(templates)
    second = engine.start("lt_second")  # copies it
    assert _complete_templates(templates) == [template]
    assert first.password != second.password
    for info in (first, second):
        with psycopg.connect(info.dsn()) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (info.dbname,)
    assert _rejects(first, second.password) and _rejects(second, first.password)
    # The template's own password was never kept anywhere: nothing in the cache names either cluster's.
    cached = b"".join(p.read_bytes() for p in templates.rglob("*") if p.is_file())
    assert first.password.encode() not in cached and second.password.encode() not in cached


def test_a_damaged_template_is_never_copied(engine: LocalEngine, templates: Path) -> None:
    engine.start("lt_damaged_a")
    [template] = _complete_templates(templates)
    (template / _pgtemplate.MARKER).write_text("half")
    (template / "pgdata" / "global" / "pg_control").unlink()
    info = engine.start("lt_damaged_b")
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert json.loads((template / _pgtemplate.MARKER).read_text())["key"] == template.name
    assert (template / "pgdata" / "global" / "pg_control").is_file()


def test_a_file_in_the_templates_place_is_removed_and_the_template_built(
    engine: LocalEngine, templates: Path
) -> None:
    engine.start("lt_file_a")
    [template] = _complete_templates(templates)
    shutil.rmtree(template)
    template.write_text("not a template")
    (templates / f"{template.name}.tmp-0000").write_text("nor this")
    info = engine.start("lt_file_b")
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert _complete_templates(templates) == [template]
    assert list(templates.glob("*.tmp-*")) == []


def test_without_a_usable_cache_directory_initdb_still_makes_the_cluster(
    local_state_dir: Path, tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    engine = LocalEngine(local_state_dir, template_dir=blocked / "pg-templates")
    try:
        info = engine.start("lt_fallback")
        with psycopg.connect(info.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        engine.stop("lt_fallback")


@pytest.mark.slow
def test_a_cache_directory_this_user_cannot_enter_is_skipped_not_a_failed_start() -> None:
    # A template cache under another user's 0700 directory (a shared XDG_CACHE_HOME, root's cache kept by sudo):
    # the start failed with a bare PermissionError instead of running initdb without the cache.
    root, state = nobody_state("refresher-cache-closed-")
    closed = root / "closed"
    closed.mkdir(mode=0o000)  # nobody enters it: not `nobody` under root, not its own user otherwise
    engine = LocalEngine(state, template_dir=closed / "pg-templates")

    def start() -> str:
        info = engine.start("lt_closed")
        with psycopg.connect(info.dsn()) as conn:
            return str(conn.execute("SELECT current_database()").fetchone())

    try:
        assert as_nobody(start) == "('lt_closed',)"
    finally:
        as_nobody(lambda: str(engine.stop("lt_closed")))
        closed.chmod(0o700)


@pytest.mark.parametrize(
    "moment",
    [
        pytest.param("*.lock", id="during-the-template-initdb"),
        pytest.param("*.tmp-*", id="while-copying-into-the-cache"),
    ],
)
def test_kill_9_while_the_template_is_built_leaves_no_template_or_a_complete_one(
    engine: LocalEngine, templates: Path, moment: str
) -> None:
    state = engine.base.parent
    child = subprocess.Popen([sys.executable, "-c", START, str(state), str(templates), "lt_killed"])
    deadline = time.monotonic() + 120
    while not (templates.is_dir() and any(templates.glob(moment))) and child.poll() is None:
        assert time.monotonic() < deadline, "the template build never began"
        time.sleep(0.002)
    child.send_signal(signal.SIGKILL)
    child.wait()
    for built in _complete_templates(templates):  # the kill came too late: then the template is whole
        assert (built / "pgdata" / "PG_VERSION").is_file()

    info = engine.start("lt_killed")
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("lt_killed",)
    assert len(_complete_templates(templates)) == 1
    assert list(templates.glob("*.tmp-*")) == []
    again = engine.start("lt_after_kill")
    assert _rejects(again, info.password) and _rejects(info, again.password)


@pytest.mark.parametrize("state_dirs", ["one state dir", "two state dirs"])
def test_two_processes_at_once_build_one_template_and_two_clusters(
    engine: LocalEngine, templates: Path, state_dirs: str
) -> None:
    # Two state dirs: two checkouts of one user, nothing shared but the template cache and its locks.
    other = engine if state_dirs == "one state dir" else LocalEngine(world_traversable_tmp("lt-other-"))
    try:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", START, str(owner.base.parent), str(templates), name],
                stdout=subprocess.PIPE,
                text=True,
            )
            for owner, name in ((engine, "lt_race_a"), (other, "lt_race_b"))
        ]
        passwords = [out.strip() for out, _ in outputs(children, timeout=300)]
        assert [child.returncode for child in children] == [0, 0]
        assert len(_complete_templates(templates)) == 1
        assert list(templates.glob("*.tmp-*")) == []
        a, b = engine.info("lt_race_a"), other.info("lt_race_b")
        assert a is not None and b is not None and [a.password, b.password] == passwords
        assert a.password != b.password
        assert _rejects(a, b.password) and _rejects(b, a.password)
    finally:
        if other is not engine:
            other.stop("lt_race_b")
            shutil.rmtree(other.base.parent, ignore_errors=True)


def test_other_initdb_arguments_make_another_template_which_supersedes_the_one_before(
    engine: LocalEngine, templates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = engine.start("lt_args_a")
    [before] = _complete_templates(templates)
    with monkeypatch.context() as other:
        other.setattr(local, "INITDB_ARGS", ())  # e.g. 16 MB WAL segments instead of 1 MB
        second = engine.start("lt_args_b")
    # The same build and owner, other arguments: no new cluster will be copied from the one before (it stayed).
    [after] = _complete_templates(templates)
    assert after != before
    sizes = []
    for info in (first, second):
        with psycopg.connect(info.dsn()) as conn:
            sizes.append(conn.execute("SHOW wal_segment_size").fetchone())
    assert sizes == [("1MB",), ("16MB",)]


def _tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path under ``root``: mode, owner, group and contents (directories: none)."""
    return {
        str(p.relative_to(root)): (
            p.stat().st_mode, p.stat().st_uid, p.stat().st_gid, p.read_bytes() if p.is_file() else b""
        )
        for p in root.rglob("*")
    }  # fmt: skip


def test_a_copy_of_the_template_is_the_template_file_for_file(
    engine: LocalEngine, templates: Path, tmp_path: Path
) -> None:
    engine.start("lt_copy")
    [template] = _complete_templates(templates)
    target = tmp_path / "copy"
    target.mkdir(mode=0o700)
    _pgtemplate.copy_cluster(template / "pgdata", target)
    assert _tree(target) == _tree(template / "pgdata")
    assert len(_tree(target)) > 900


def test_a_copy_that_fails_is_an_oserror_naming_why(
    engine: LocalEngine, templates: Path, tmp_path: Path
) -> None:
    engine.start("lt_copyfail")  # builds the template
    [template] = _complete_templates(templates)
    small = tmp_path / "small"
    small.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with pytest.raises(OSError, match="No space left on device"):  # the caller falls back to initdb
            _pgtemplate.copy_cluster(template / "pgdata", small)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _kill_9_once_copying(child: subprocess.Popen[Any], parent: Path, pattern: str) -> None:
    """SIGKILL ``child`` once its copy of a cluster has begun: a directory ``parent/pattern`` holds ``base``."""
    deadline = time.monotonic() + 120
    while not any((p / "base").is_dir() for p in parent.glob(pattern)):
        assert child.poll() is None, "the copy was done before it could be interrupted"
        assert time.monotonic() < deadline, "the copy never began"
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_kill_9_while_a_cluster_is_copied_from_the_template_leaves_nothing_a_start_trusts(
    engine: LocalEngine, templates: Path
) -> None:
    engine.start("lt_copykill_a")  # builds the template
    state = engine.base.parent
    root = engine.base / "lt_copykill"
    child = subprocess.Popen([sys.executable, "-c", START, str(state), str(templates), "lt_copykill"])
    _kill_9_once_copying(child, root, "pgdata.init-*")
    assert not (root / "pgdata").exists()
    assert engine.info("lt_copykill") is None

    info = engine.start("lt_copykill")
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("lt_copykill",)
    assert list(root.glob("pgdata.init-*")) == []


def test_a_template_missing_a_file_is_built_again_not_copied(engine: LocalEngine, templates: Path) -> None:
    # What a cache cleaner or a half-finished `rm -r` leaves: the marker whole, a catalog of template1 gone.
    # Copied, it made clusters whose every new database failed at login ("could not open file base/.../1259").
    engine.start("lt_holed_a")
    [template] = _complete_templates(templates)
    (template / "pgdata" / "base" / "1" / "1259").unlink()  # pg_class
    info = engine.start("lt_holed_b")
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT count(*) > 0 FROM pg_class").fetchone() == (True,)
    assert _complete_templates(templates) == [template]
    assert (template / "pgdata" / "base" / "1" / "1259").is_file()


def test_a_template_the_server_refuses_is_replaced_not_tried_again(
    engine: LocalEngine, templates: Path
) -> None:
    # A template another major version made (as though copied in under this key): the server refuses its files,
    # the start falls back to initdb, and the template goes, so the next new cluster does not pay both again.
    engine.start("lt_major_a")
    [template] = _complete_templates(templates)
    real = (template / "pgdata" / "PG_VERSION").read_text()
    (template / "pgdata" / "PG_VERSION").write_text("15\n" if real.strip() != "15" else "16\n")
    info = engine.start("lt_major_b")
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert [(t / "pgdata" / "PG_VERSION").read_text() for t in _complete_templates(templates)] in ([], [real])


def test_a_discard_behind_a_stopped_holder_of_the_template_says_so_and_gives_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start whose copy of the template the server refused discards the template under its lock: behind a start
    # stopped (Ctrl-Z) holding that lock, it waited for good, without a word. It waits as a copy does now (told
    # after a second, TEMPLATE_WAIT_SECONDS at most: 3 s here), then leaves the template to a later discard.
    monkeypatch.setattr(_pgtemplate, "TEMPLATE_WAIT_SECONDS", 3.0)
    key = _pgtemplate.TemplateKey(secrets.token_hex(16), ("/nowhere/bin/postgres", 1, 1))
    (tmp_path / key.name / "pgdata").mkdir(parents=True)
    (tmp_path / key.name / _pgtemplate.MARKER).write_text("{}")
    built = _pgtemplate.identity(tmp_path / key.name / "pgdata")
    holder = f"""
        import os, signal
        from pathlib import Path
        from refresher.engines._common import locked
        with locked(Path({str(_pgtemplate.template_lock(tmp_path, key.name))!r})):
            print("held", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
    """
    told: list[str] = []
    with _stopped(holder, {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}):
        with pytest.raises(filelock.Timeout):
            _pgtemplate.discard(tmp_path, key, built, on_wait=told.append)
        assert (tmp_path / key.name).is_dir()
    assert len(told) == 1 and f"template cache {tmp_path}" in told[0] and "waiting for it" in told[0], told
    # Its holder may be building the template (two first starts at once), not only copying it.
    assert "another command holds it (a copy, or its first build;" in told[0], told
    _pgtemplate.discard(tmp_path, key, built)
    assert not (tmp_path / key.name).exists()


# -- pruning: the templates of postgres builds gone from disk go once a new template is made -------------------


def _made_by(templates: Path, build: list[Any] | None) -> Path:
    """A template (a small stand-in: pruning reads only the marker) made by ``build``, or before markers named it."""
    final = templates / secrets.token_hex(16)
    (final / "pgdata").mkdir(parents=True)
    (final / "pgdata" / "PG_VERSION").write_text("17\n")
    marker: dict[str, Any] = {"key": final.name, "listing": {"PG_VERSION": 3}}
    if build is not None:
        marker["postgres"] = build
    (final / _pgtemplate.MARKER).write_text(json.dumps(marker))
    return final


def _build_of(template: Path) -> list[Any]:
    return list(json.loads((template / _pgtemplate.MARKER).read_text())["postgres"])


def _current_and_gone(engine: LocalEngine, templates: Path, profile: str) -> tuple[Path, Path]:
    """The template the start of ``profile`` builds, and one of a build gone from disk."""
    engine.start(profile)
    [current] = _complete_templates(templates)
    return current, _made_by(templates, ["/nowhere/bin/postgres", 1, 1])


def _start_with_a_new_template(
    engine: LocalEngine, profile: str, initdb_args: tuple[str, ...] = ()
) -> ServerInfo:
    """Start ``profile`` with other initdb arguments: a new key, so a new template is built (and the cache pruned)."""
    with pytest.MonkeyPatch.context() as other:
        other.setattr(local, "INITDB_ARGS", initdb_args)
        return engine.start(profile)


def test_templates_of_builds_gone_or_of_older_initdb_arguments_are_pruned_once_a_new_template_is_made(
    engine: LocalEngine, templates: Path
) -> None:
    _start_with_a_new_template(engine, "lt_prune_a")  # initdb as a refresher before this one ran it
    [older] = _complete_templates(templates)
    path, size, mtime = _build_of(older)
    gone = _made_by(templates, ["/nowhere/bin/postgres", size, mtime])  # a removed venv or install
    upgraded = _made_by(templates, [path, size + 1, mtime])  # the same path, now another build
    unnamed = _made_by(templates, None)  # made before markers named their build
    # The build on disk, another OS user's files (root's: under root the server runs as another user): theirs.
    others = [_made_by(templates, [path, size, mtime])] if os.geteuid() == 0 else []
    half = templates / f"{upgraded.name}.tmp-dead"  # what a killed prune or builder left
    (half / "pgdata").mkdir(parents=True)
    strangers = [templates / "notes.txt", templates / "someone-elses"]
    strangers[0].write_text("not ours")
    strangers[1].mkdir()
    _start_with_a_new_template(engine, "lt_prune_b")  # copies the template: no pruning
    assert gone.is_dir() and upgraded.is_dir() and unnamed.is_dir() and older.is_dir()

    info = engine.start("lt_prune_c")  # this refresher's initdb arguments: a new template
    with psycopg.connect(info.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    [new] = [t for t in _complete_templates(templates) if t not in (older, *others)]
    left = {p for p in templates.iterdir() if not p.name.startswith(".")}
    assert left == {new, *others, *strangers}
    assert _build_of(new) == [path, size, mtime]


HOLD = """
import sys, time
from pathlib import Path
from refresher.engines._common import locked
with locked(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_template_another_process_holds_is_not_pruned(engine: LocalEngine, templates: Path) -> None:
    _, held = _current_and_gone(engine, templates, "lt_held_a")
    # Another process copying from it (or building, or checking it) holds its lock, as template_for does.
    lock = templates / f".{held.name}.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        _start_with_a_new_template(engine, "lt_held_b")
        assert (held / "pgdata" / "PG_VERSION").is_file() and (held / _pgtemplate.MARKER).is_file()
    finally:
        holder.kill()
        holder.communicate()
    _start_with_a_new_template(engine, "lt_held_c", ("--wal-segsize=2",))  # released: the next prune takes it
    assert not held.exists()


# The start of a cluster with a new key (so a new template, then a prune), killed once the first stale template is
# renamed away and before its files are removed.
KILLED_PRUNING = """
import os, signal, sys
from pathlib import Path
from refresher.engines import _pgtemplate, local
delete = _pgtemplate._delete
def killed(path):
    if path.name.startswith(sys.argv[4] + ".tmp-"):
        os.kill(os.getpid(), signal.SIGKILL)
    delete(path)
_pgtemplate._delete = killed
local.INITDB_ARGS = ()
local.LocalEngine(Path(sys.argv[1]), template_dir=Path(sys.argv[2]), spare=False).start(sys.argv[3])
"""


def test_kill_9_while_pruning_leaves_the_cache_usable_and_the_next_prune_finishes(
    engine: LocalEngine, templates: Path
) -> None:
    current, stale = _current_and_gone(engine, templates, "lt_prunekill_a")
    args = [str(engine.base.parent), str(templates), "lt_prunekill_b", stale.name]
    child = subprocess.run([sys.executable, "-c", KILLED_PRUNING, *args])
    assert child.returncode == -signal.SIGKILL
    assert not stale.exists() and list(templates.glob(f"{stale.name}.tmp-*")) != []  # renamed, not removed
    # The new template is whole (made before the prune); the stale one's files wait under a .tmp- name.
    [new] = [t for t in _complete_templates(templates) if t != current and ".tmp-" not in t.name]
    # The cache serves new clusters meanwhile, from the template the killed start built.
    from_new = _start_with_a_new_template(engine, "lt_prunekill_c")
    with psycopg.connect(from_new.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert new in _complete_templates(templates)
    _start_with_a_new_template(engine, "lt_prunekill_d", ("--wal-segsize=2",))  # its prune takes the leftover
    assert list(templates.glob("*.tmp-*")) == []
