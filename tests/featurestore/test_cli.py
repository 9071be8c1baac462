"""The ``featurestore`` command through its console script: subcommands, help, JSON, exit codes, one-line errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from featurestore import FeatureStore, StoreFileUnreadable, StoreNotWritable
from featurestore.cli import main as cli_main
from tests.featurestore.test_gc import FEATURESTORE, REPO
from tests.unprivileged import as_nobody, nobody_ids

COMMANDS = ["gc", "stats", "verify", "rebuild"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FEATURESTORE, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def rolling(raw: pd.DataFrame, config: dict[str, int]) -> pd.DataFrame:
    return raw.rolling(config["w"]).mean()


@pytest.fixture
def used(store: FeatureStore, bars: pd.DataFrame) -> FeatureStore:
    """Two segments and one feature; 2 hits and 2 misses by the definition in ``AccessCounts``."""
    store.put_many([("seg-a", pa.table({"x": [1, 2]}), "A"), ("seg-b", pa.table({"x": [3]}), "B")])
    store.lookup(["seg-a", "seg-c"], count=True)  # 1 hit, 1 miss
    store.get_or_compute("AAPL", bars, {"w": 3}, rolling)  # 1 miss
    store.get_or_compute("AAPL", bars, {"w": 3}, rolling)  # 1 hit
    return store


def test_help_lists_every_subcommand_and_each_has_its_own_help() -> None:
    top = cli("--help")
    assert top.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in top.stdout
        sub = cli(command, "--help")
        assert (
            sub.returncode == 0 and "--cache-root" in sub.stdout and f"featurestore {command}" in sub.stdout
        )


def test_stats_json_has_hits_misses_rate_bytes_and_entries_per_kind(used: FeatureStore) -> None:
    done = cli("stats", "--cache-root", str(used.root), "--json")
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (2, 2, 0.5)
    assert stats["kinds"]["segment"]["entries"] == 2 and stats["kinds"]["feature"]["entries"] == 1
    assert stats["entries"] == 3 and stats["bytes"] == sum(k["bytes"] for k in stats["kinds"].values())
    assert stats["bytes"] == sum(p.stat().st_size for p in (used.root / "data").glob("*/*.parquet"))
    text = cli("stats", "--cache-root", str(used.root)).stdout
    assert "hit rate  50.0%" in text and "segment 2" in text and "feature 1" in text


def test_session_counts_are_what_stats_adds(used: FeatureStore) -> None:
    session = used.session_counts()
    stats = used.get_cache_stats()
    assert (session.hits, session.misses) == (stats.hits, stats.misses) == (2, 2)
    other = FeatureStore(used.root)
    other.get_many(["seg-a", "seg-b", "nope"])
    assert (other.session_counts().hits, other.session_counts().misses) == (2, 1)
    assert (used.get_cache_stats().hits, used.get_cache_stats().misses) == (4, 3)
    other.get_many(["seg-a"], count=False)
    other.lookup(["seg-a"])  # manifest-only lookups count nothing
    assert used.get_cache_stats().hits == 4


def test_verify_exits_0_when_sound_and_1_naming_the_damaged_keys(used: FeatureStore) -> None:
    sound = cli("verify", "--cache-root", str(used.root), "--json")
    assert sound.returncode == 0 and json.loads(sound.stdout)["ok"] is True
    path = next(e.path for e in used.lookup(["seg-b"]).values())
    path.write_bytes(path.read_bytes()[:50])
    damaged = cli("verify", "--cache-root", str(used.root))
    assert damaged.returncode == 1 and "corrupt file: seg-b" in damaged.stdout
    assert cli("verify", "--quick", "--cache-root", str(used.root)).returncode == 1


def test_rebuild_restores_the_rows_from_the_files(used: FeatureStore) -> None:
    (used.root / "manifest.duckdb").write_bytes(b"garbage" * 100)
    done = cli("rebuild", "--cache-root", str(used.root), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entries"] == 3
    # One warning line for the damaged manifest, never a traceback.
    assert len(done.stderr.strip().splitlines()) == 1 and "rebuilt from the data files" in done.stderr


@pytest.mark.parametrize("command", ["stats", "verify", "rebuild", "gc"])
def test_bad_input_is_one_line_naming_the_value_and_exit_2(command: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-store")
    done = cli(command, "--cache-root", missing)
    assert done.returncode == 2
    assert done.stderr.strip() == f"featurestore {command}: --cache-root={missing!r}: no such directory"
    assert not Path(missing).exists()  # nothing created by a typo
    unknown = cli(command, "--bogus", "1")
    assert (
        unknown.returncode == 2
        and len(unknown.stderr.strip().splitlines()) == 1
        and "--bogus" in unknown.stderr
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_an_empty_path_is_one_line_and_exit_2_not_the_current_directory(command: str, tmp_path: Path) -> None:
    """``--cache-root ""`` was ``Path("")``, the current directory: the command made a store there (manifest,
    lock files, key-locks/, data/), in a checkout as anywhere."""
    done = subprocess.run(
        [FEATURESTORE, command, "--cache-root", ""], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 2, done  # fails before: 0, a store made in tmp_path
    assert done.stderr.strip() == f"featurestore {command}: --cache-root='': empty; name a path"
    assert list(tmp_path.iterdir()) == []
    if command == "gc":  # its report's file: '' was the current directory, a traceback (IsADirectoryError)
        done = subprocess.run(
            [FEATURESTORE, "gc", "--cache-root", str(tmp_path), "--output-json", ""],
            capture_output=True,
            text=True,
        )
        assert (done.returncode, done.stderr.strip()) == (
            2,
            "featurestore gc: --output-json='': empty; name a path",
        )


def test_a_read_only_store_is_one_line_and_exit_2(read_only_store: Path) -> None:
    # Even a read takes a lock file in the store: every command was an OSError traceback, exit 1.
    with pytest.raises(StoreNotWritable, match="Read-only file system"):
        FeatureStore(read_only_store).get("seg-a")
    for command in ("stats", "verify"):
        done = cli(command, "--cache-root", str(read_only_store))
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert (
            f"store lock={read_only_store}/" in done.stderr and "cannot be opened for writing" in done.stderr
        )


def _nobodys_closed_store(shared: Path, closed: str) -> tuple[FeatureStore, Path]:
    """A store of two keys under ``shared`` owned by nobody, its ``closed`` ("manifest": 0444, else the store's
    directory: 0555) standing in the way of writes; and its manifest."""
    os.chmod(shared, 0o755)
    store = FeatureStore(shared / "cache")
    store.put_many([("seg-a", pa.table({"x": [1, 2]}), "A"), ("seg-b", pa.table({"x": [3]}), "B")])
    # A hit in the journal (the next stats folds it, a write); a closed directory could not make the journal.
    store.get("seg-a")
    for each in [store.root, *store.root.rglob("*")]:
        os.chown(each, *nobody_ids())  # nobody's own store: only the mode below stands in its way
    if closed == "manifest":
        store.manifest.path.chmod(0o444)
    else:
        store.root.chmod(0o555)
    return store, store.manifest.path


@pytest.mark.parametrize("closed", ["manifest", "store directory"])
def test_a_manifest_this_user_may_not_write_is_read_and_never_set_aside(closed: str) -> None:
    """A teammate's shared store whose manifest (0444) or directory (0555) this user may not write. DuckDB's
    "Permission denied" was taken for damage: the manifest set aside and rebuilt (every access time lost) with a
    line calling it unreadable, by any read that had a journal to fold; a closed directory was a traceback. Now
    reads open it read-only and a write is one line naming what it cannot write, exit 2."""
    # Not under tmp_path: pytest's base directory is closed to nobody.
    with tempfile.TemporaryDirectory() as shared:
        store, manifest = _nobodys_closed_store(Path(shared), closed)
        before = manifest.read_bytes()

        def run(*args: str) -> str:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = cli_main([*args, "--cache-root", str(store.root)])
            return f"{code} {err.getvalue().strip()} {out.getvalue()}"

        def as_user() -> str:
            stats = run("stats", "--json")
            gc = run("gc", "--retention-weeks", "0")  # every entry expired: a write
            try:
                FeatureStore(store.root).put("seg-c", pa.table({"x": [4]}))
            except StoreNotWritable as exc:
                return json.dumps([stats, gc, f"put: {exc}"])
            return json.dumps([stats, gc, "put: written"])

        answer = as_nobody(as_user)
        assert answer.startswith("["), answer
        stats, gc, put = json.loads(answer)
        assert stats.startswith("0  {") and json.loads(stats[3:])["kinds"]["segment"]["entries"] == 2, stats
        where = manifest if closed == "manifest" else store.root
        refused = (
            f"{closed}={where}: cannot be opened for writing (Permission denied); reads work, writes need write"
            " access to it: ask its owner, or point the store elsewhere (--store, FEATURE_STORE_PATH, --cache-root)"
        )
        assert gc.strip() == f"2 featurestore gc: {refused}"
        assert put == f"put: {refused}"
        store.root.chmod(0o755)
        assert sorted(path.name for path in store.root.glob("manifest.duckdb*")) == ["manifest.duckdb"]
        assert manifest.read_bytes() == before  # neither set aside nor rebuilt


@pytest.mark.parametrize("closed", ["manifest", "store directory"])
def test_reads_past_the_journals_limit_on_a_manifest_this_user_may_not_write_are_served(closed: str) -> None:
    """Past ``_JOURNAL_FOLD_BYTES`` a read folds the journal into the manifest, a write it may leave to the next
    reader: one it may not write raised StoreNotWritable from every get and lookup (a plan of 60,000 keys journals
    5 MB at once), "reads work" said the very line."""
    import featurestore.manifest

    with tempfile.TemporaryDirectory() as shared:
        store, manifest = _nobodys_closed_store(Path(shared), closed)
        before = manifest.read_bytes()

        def as_user() -> str:
            featurestore.manifest._JOURNAL_FOLD_BYTES = 1  # in the forked child only: every read is past it
            reader = FeatureStore(store.root)
            served = [reader.get("seg-a").num_rows for _ in range(3)]
            found = reader.lookup(["seg-a", "seg-b", "seg-c"], count=True)
            return json.dumps([served, sorted(found)])

        answer = as_nobody(as_user)
        assert answer.startswith("["), answer
        assert json.loads(answer) == [[2, 2, 2], ["seg-a", "seg-b"]]
        store.root.chmod(0o755)
        assert manifest.read_bytes() == before


@pytest.mark.parametrize("name", ["manifest.lock", "access.journal.lock", "access.journal"])
def test_a_directory_where_a_lock_file_goes_is_one_line_and_exit_2(used: FeatureStore, name: str) -> None:
    # os.open of a directory for writing: IsADirectoryError, a traceback from every command, exit 1.
    lock = used.root / name
    lock.unlink(missing_ok=True)
    lock.mkdir()
    for command in COMMANDS:
        done = cli(command, "--cache-root", str(used.root))
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"store lock={lock}: " in done.stderr and "is a directory" in done.stderr, done.stderr
    assert lock.is_dir() and not any(lock.iterdir())  # left as the user left it


@pytest.mark.parametrize("what", ["own file", "pack", "looping link"])
def test_a_directory_where_a_stored_file_goes_is_one_line_and_exit_2(used: FeatureStore, what: str) -> None:
    """A directory made by hand where a key's file or a pack goes was an IsADirectoryError traceback from every
    read, verify and gc (gc's after its commit, having deleted the rows, and again at every run); a symbolic link
    that loops, an OSError (ELOOP) traceback from a read and verify. gc leaves the directory's entries, says so,
    and collects the rest (it stopped, exit 2, collecting nothing until someone moved the directory)."""
    entries = used.lookup(["seg-a"] if what == "pack" else [])
    path = entries["seg-a"].path if what == "pack" else next((used.root / "data").glob("??/*.parquet"))
    path.unlink()
    if what == "looping link":
        path.symlink_to(path)
        reason = "too many levels of symbolic links"
        done = cli("verify", "--cache-root", str(used.root))
        assert (done.returncode, done.stderr.strip()) == (  # fails before: 1, a traceback
            2,
            f"featurestore verify: stored file={path}: cannot be read ({reason}); move it out of the way and run"
            " again",
        )
        with pytest.raises(StoreFileUnreadable, match=reason):
            used.get(path.stem)
        return
    path.mkdir()
    unreadable = f"stored file={path}: cannot be read (is a directory); move it out of the way and run again"
    done = cli("verify", "--cache-root", str(used.root))
    assert (done.returncode, done.stderr.strip()) == (2, f"featurestore verify: {unreadable}")
    key = "seg-a" if what == "pack" else path.stem
    with pytest.raises(StoreFileUnreadable, match="is a directory"):
        used.get_many([key, "seg-b"])
    held = 2 if what == "pack" else 1  # the pack holds seg-a and seg-b
    done = cli("gc", "--cache-root", str(used.root), "--retention-weeks", "0")  # every entry expired
    assert (done.returncode, done.stderr.strip()) == (0, f"featurestore gc: left {unreadable}")  # before: 2
    assert path.is_dir() and used.get_cache_stats().entries == held  # the rest collected
    assert "unreadable             1" in done.stdout, done.stdout
    # A manifest rebuilt (healed) goes on without it rather than stop on it.
    assert used.rebuild_manifest() == 0


def test_a_stored_file_this_user_may_not_read_is_one_line_and_gc_keeps_it() -> None:
    """Another user's file (0600) in a shared store: every read and verify was a PermissionError traceback, and
    gc took it for corrupt and removed it; then gc stopped at it, exit 2, collecting nothing (expired entries
    included) until someone acted. Now gc leaves it, says so, and collects the rest."""
    # Not under tmp_path: pytest's base directory is closed to nobody.
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o755)
        store = FeatureStore(Path(shared) / "cache")
        store.put("seg-a", pa.table({"x": [1, 2]}))
        store.put("seg-b", pa.table({"x": [3]}))
        path = store.lookup(["seg-a"])["seg-a"].path
        path.chmod(0o000)
        if os.geteuid() == 0:  # the store nobody's (as_nobody runs the commands as nobody), the file root's
            nobody = pwd.getpwnam("nobody")
            for each in [store.root, *store.root.rglob("*")]:
                if each != path:
                    os.chown(each, nobody.pw_uid, nobody.pw_gid)

        def run(command: str, *options: str) -> str:
            # In the forked child (the console script's interpreter may be closed to nobody), as the script runs.
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = cli_main([command, "--cache-root", str(store.root), *options])
            return f"{code} {err.getvalue().strip()}"

        expected = (
            f"stored file={path}: cannot be read (permission denied); give this user read access to it, or"
            " remove it (the store fetches it again)"
        )
        # fails before 7fb7677: verify 1 and a traceback
        assert as_nobody(lambda: run("verify")) == f"2 featurestore verify: {expected}"
        other = store.lookup(["seg-b"])["seg-b"].path
        # every entry expired; fails before: 2 and the line, seg-b kept
        assert as_nobody(lambda: run("gc", "--retention-weeks", "0")) == f"0 featurestore gc: left {expected}"
        assert path.exists() and not other.exists()
        assert set(store.lookup(["seg-a", "seg-b"])) == {"seg-a"}
