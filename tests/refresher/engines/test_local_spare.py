"""New local clusters from a spare copy of the template made in the background, against real embedded servers."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from refresher.engines import _pgctl, _pgtemplate
from refresher.engines.base import ServerInfo
from refresher.engines.local import INIT_PREFIX, LocalEngine
from tests.child_processes import outputs
from tests.fixtures_postgres import world_traversable_tmp
from tests.refresher.engines.test_local_template import _cache_engine, _kill_9_once_copying, _tree
from tests.unprivileged import as_nobody

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(sys.platform != "linux", reason="the template cache is used on Linux only"),
]

# A start in a child process; argv[4] says where it is killed: "" (nowhere), "before" or "after" the claim.
START = """
import os, signal, sys
from pathlib import Path
from refresher.engines import _pgspare
from refresher.engines.local import LocalEngine
claim = _pgspare.claim
def killed(cache, name, target):
    if sys.argv[4] == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    taken = claim(cache, name, target)
    if sys.argv[4] == "after" and taken:
        os.kill(os.getpid(), signal.SIGKILL)
    return taken
_pgspare.claim = killed
print(LocalEngine(Path(sys.argv[1]), template_dir=Path(sys.argv[2])).start(sys.argv[3]).password)
"""


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    return tmp_path / "pg-templates"


@pytest.fixture
def engine(local_state_dir: Path, templates: Path) -> Iterator[LocalEngine]:
    yield from _cache_engine(local_state_dir, templates, spare=True)


@pytest.fixture
def plain(local_state_dir: Path, templates: Path) -> Iterator[LocalEngine]:
    """The same cache without spares: it never claims one nor starts a maker, but sweeps like any start."""
    yield from _cache_engine(local_state_dir, templates, spare=False)


def _template(templates: Path) -> Path:
    [template] = [p for p in templates.iterdir() if p.is_dir() and (p / _pgtemplate.MARKER).is_file()]
    return template


def _wait_for_spare(templates: Path, other_than: int | None = None) -> Path:
    """The spare the background maker renames in (a new one, when ``other_than`` names the last one's inode)."""
    spare = _pgtemplate.spare_of(templates, _template(templates).name)
    deadline = time.monotonic() + 180
    while not spare.is_dir() or spare.stat().st_ino == other_than:
        assert time.monotonic() < deadline, "no spare was made"
        time.sleep(0.05)
    return spare


def _answers(info: ServerInfo) -> bool:
    with psycopg.connect(info.dsn(), connect_timeout=10) as conn:
        return conn.execute("SELECT count(*) > 0 FROM pg_class").fetchone() == (True,)


def _pgdata_inode(engine: LocalEngine, profile: str) -> int:
    return (engine.base / profile / "pgdata").stat().st_ino


def test_the_next_new_cluster_is_the_spare_renamed_and_another_spare_is_made(
    engine: LocalEngine, templates: Path
) -> None:
    first = engine.start("ls_first")  # builds the template, then asks for a spare
    spare = _wait_for_spare(templates)
    assert engine.spare_ready()
    template = _template(templates)
    # Exactly a copy: no password, no port, no configuration of ours.
    assert _tree(spare) == _tree(template / "pgdata")
    assert spare.stat().st_mode & 0o777 == 0o700
    made = spare.stat().st_ino
    second = engine.start("ls_second")
    assert _pgdata_inode(engine, "ls_second") == made
    assert _answers(first) and _answers(second)
    assert first.password != second.password
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(second.dsn().replace(second.password, first.password), connect_timeout=10).close()
    _wait_for_spare(templates, other_than=made)  # the claim asked for the next one


def _maker(templates: Path) -> subprocess.Popen[bytes]:
    user = _pgctl.OsUser.for_server()
    args = [_template(templates).name, user.name, str(user.uid), str(user.gid)]
    return subprocess.Popen([sys.executable, "-m", "refresher.engines._pgspare", str(templates), *args])


def test_kill_9_while_the_spare_is_made_leaves_no_spare_and_the_next_start_sweeps_the_half_copy(
    plain: LocalEngine, templates: Path
) -> None:
    plain.start("ls_makekill_a")  # the template, and no maker
    _kill_9_once_copying(_maker(templates), templates, "*.spare.tmp-*")
    assert not _pgtemplate.spare_of(templates, _template(templates).name).exists()
    assert list(templates.glob("*.spare.tmp-*")) != []

    info = plain.start("ls_makekill_b")  # copies: there is no spare; and sweeps the dead maker's half copy
    assert _answers(info)
    assert list(templates.glob("*.spare.tmp-*")) == []


HOLD = """
import sys, time
from pathlib import Path
from refresher.engines._common import locked
with locked(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_half_copy_is_swept_only_once_no_maker_holds_the_spare_lock(
    plain: LocalEngine, templates: Path
) -> None:
    plain.start("ls_sweep_a")
    name = _template(templates).name
    half = templates / f"{name}.spare.tmp-{secrets.token_hex(4)}"
    (half / "base").mkdir(parents=True)
    lock = _pgtemplate.spare_lock(templates, name)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        plain.start("ls_sweep_b")  # a maker may be copying into it right now
        assert half.is_dir()
    finally:
        holder.kill()
        holder.communicate()
    plain.start("ls_sweep_c")
    assert not half.exists()


@pytest.mark.parametrize("moment", ["before", "after"])
def test_kill_9_while_the_spare_is_claimed_leaves_it_whole_or_the_profiles_leftover(
    engine: LocalEngine, templates: Path, moment: str
) -> None:
    engine.start("ls_claimkill_a")
    spare = _wait_for_spare(templates)
    made = spare.stat().st_ino
    args = [str(engine.base.parent), str(templates), "ls_claimkill", moment]
    child = subprocess.run([sys.executable, "-c", START, *args])
    assert child.returncode == -signal.SIGKILL
    root = engine.base / "ls_claimkill"
    assert not (root / "pgdata").exists() and engine.info("ls_claimkill") is None
    if moment == "before":
        assert spare.stat().st_ino == made  # untouched: the next start takes it
    else:
        assert not spare.exists()
        assert [p.stat().st_ino for p in root.glob(f"{INIT_PREFIX}*")] == [made]

    info = engine.start("ls_claimkill")
    assert _answers(info)
    assert list(root.glob(f"{INIT_PREFIX}*")) == []
    assert (_pgdata_inode(engine, "ls_claimkill") == made) == (moment == "before")


def test_two_starts_at_once_one_takes_the_spare_the_other_copies(
    engine: LocalEngine, templates: Path
) -> None:
    engine.start("ls_race_a")
    made = _wait_for_spare(templates).stat().st_ino
    names = ["ls_race_b", "ls_race_c"]
    children = [
        subprocess.Popen(
            [sys.executable, "-c", START, str(engine.base.parent), str(templates), name, ""],
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    outputs(children, timeout=300)
    assert [child.returncode for child in children] == [0, 0]
    assert sorted(_pgdata_inode(engine, name) == made for name in names) == [False, True]
    for name in names:
        info = engine.info(name)
        assert info is not None and _answers(info)


def test_a_spare_missing_a_file_is_never_used(engine: LocalEngine, templates: Path) -> None:
    engine.start("ls_holed_a")
    spare = _wait_for_spare(templates)
    made = spare.stat().st_ino
    (spare / "base" / "1" / "1259").unlink()  # pg_class of template1: every new database would fail at login
    info = engine.start("ls_holed_b")
    assert _pgdata_inode(engine, "ls_holed_b") != made
    assert _answers(info)


def test_a_spare_goes_with_its_template(engine: LocalEngine, plain: LocalEngine, templates: Path) -> None:
    engine.start("ls_rebuilt_a")
    spare = _wait_for_spare(templates)
    made = spare.stat().st_ino
    template = _template(templates)
    built = _pgtemplate.identity(template / "pgdata")
    (template / "pgdata" / "PG_VERSION").unlink()  # damaged after its spare was made
    # The spare, checked against the marker's listing, is a whole copy of the template as built: it is taken
    # without walking the template; no spare is made of the damaged template.
    info = engine.start("ls_rebuilt_b")
    assert _pgdata_inode(engine, "ls_rebuilt_b") == made
    assert _answers(info)
    # The next start that copies checks the template: built again, never copied.
    info = plain.start("ls_rebuilt_c")
    assert _answers(info)
    assert _pgtemplate.identity(_template(templates) / "pgdata") != built
    assert not spare.exists() or spare.stat().st_ino != made


def test_a_spare_goes_with_a_template_built_again(engine: LocalEngine, templates: Path) -> None:
    engine.start("ls_remade_a")
    spare = _wait_for_spare(templates)
    made = spare.stat().st_ino
    (_template(templates) / _pgtemplate.MARKER).unlink()  # no marker: built again, its spare with it
    info = engine.start("ls_remade_b")
    assert _pgdata_inode(engine, "ls_remade_b") != made
    assert _answers(info)
    assert not spare.exists() or spare.stat().st_ino != made


def test_prune_removes_the_spares_of_builds_gone_and_spares_without_a_template(
    plain: LocalEngine, templates: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain.start("ls_prune_a")
    gone = templates / secrets.token_hex(16)  # a stand-in: pruning reads only the marker
    (gone / "pgdata").mkdir(parents=True)
    marker = {"key": gone.name, "listing": {}, "postgres": ["/nowhere/bin/postgres", 1, 1]}
    (gone / _pgtemplate.MARKER).write_text(json.dumps(marker))
    leftovers = [
        _pgtemplate.spare_of(templates, gone.name),
        templates / f"{gone.name}.spare.tmp-dead",
        _pgtemplate.spare_of(templates, secrets.token_hex(16)),  # its template removed by hand
    ]
    for path in leftovers:
        (path / "base").mkdir(parents=True)
    # A new key: a template built, then a prune.
    monkeypatch.setattr("refresher.engines.local.INITDB_ARGS", ())
    assert _answers(plain.start("ls_prune_b"))
    assert not gone.exists()
    assert [path for path in leftovers if path.exists()] == []


def test_a_cache_this_user_cannot_enter_has_no_spare_ready_not_a_traceback() -> None:
    # A template cache under a directory this user may not enter (another user's 0700 home, a shared
    # XDG_CACHE_HOME), or the cache itself closed: spare_ready raised PermissionError, where a start skips the
    # cache (c37c0f9) and a benchmark waiting for a spare must hear "none".
    root = world_traversable_tmp("refresher-spare-closed-")
    closed = root / "closed"
    closed.mkdir(mode=0o000)  # nobody enters it: not `nobody` under root, not its own user otherwise
    shut = root / "pg-templates"
    shut.mkdir(mode=0o000)
    try:
        for cache in (closed / "pg-templates", shut):
            engine = LocalEngine(root / "state", template_dir=cache)
            assert as_nobody(lambda engine=engine: str(engine.spare_ready())) == "False", cache
    finally:
        closed.chmod(0o700)
        shut.chmod(0o700)
