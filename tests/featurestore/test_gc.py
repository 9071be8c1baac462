"""Garbage collection: expiry by last access, orphans, broken rows, dry runs and the command line."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import psutil
import pyarrow as pa
import pytest

from featurestore import FeatureStore, collect_garbage
from featurestore import gc as gc_module
from featurestore.manifest import Entry

REPO = Path(__file__).resolve().parents[2]
FEATURESTORE = str(Path(sys.executable).with_name("featurestore"))


def table(n: int = 100, offset: int = 0) -> pa.Table:
    ts = pa.array(range(offset, offset + n), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    return pa.table({"ts": ts, "v": [float(i) for i in range(n)]})


def age(store: FeatureStore, key: str, weeks: int) -> None:
    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute(
            "UPDATE entries SET last_accessed_ts = last_accessed_ts - to_weeks(?) WHERE key = ?", [weeks, key]
        )


def make_old(path: Path, hours: float = 2) -> None:
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def test_expired_entries_go_fresh_ones_stay(store: FeatureStore) -> None:
    old = store.put("old", table())
    fresh = store.put("fresh", table(offset=1))
    age(store, "old", 5)
    report = collect_garbage(store, retention=dt.timedelta(weeks=4))
    assert report.expired == 1 and report.expired_bytes == old.file_size_bytes
    assert report.bytes_freed == old.file_size_bytes
    assert set(store.lookup(["old", "fresh"])) == {"fresh"}
    assert not old.path.exists() and fresh.path.exists()
    assert store.validate_cache_integrity().ok


def test_recent_access_saves_an_old_entry(store: FeatureStore) -> None:
    store.put("k", table())
    age(store, "k", 5)
    assert store.get("k") is not None  # journaled, folded by GC's own transaction before it decides
    assert collect_garbage(store, retention=dt.timedelta(weeks=4)).expired == 0
    assert "k" in store.lookup(["k"])


def test_orphans_and_temporaries_respect_the_grace_period(store: FeatureStore) -> None:
    shard = store.root / "data" / "ab"
    shard.mkdir()
    old_orphan, young_orphan = shard / "abold.parquet", shard / "abyoung.parquet"
    old_temp, young_temp = shard / ".abx.parquet.99999999.aa.tmp", shard / ".aby.parquet.2.bb.tmp"
    for path in (old_orphan, young_orphan, old_temp, young_temp):
        path.write_bytes(b"x" * 10)
    make_old(old_orphan)
    make_old(old_temp)
    report = collect_garbage(store, retention=dt.timedelta(weeks=4))
    assert (report.orphans, report.temporaries, report.orphan_bytes) == (1, 1, 10)
    assert not old_orphan.exists() and not old_temp.exists()
    assert young_orphan.exists() and young_temp.exists()


def test_a_write_in_flight_keeps_its_temporaries_whatever_the_grace(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``featurestore gc --grace-hours 0`` (or a batch slower than the grace) while a refresh wrote: GC removed the
    # temporaries the writer was about to publish, and the put ended in a FileNotFoundError traceback.
    from featurestore import _writes

    write = _writes.write

    def write_then_collect(*args: object, **kwargs: object) -> None:
        write(*args, **kwargs)  # type: ignore[arg-type]
        temps = list((store.root / "data").rglob("*.tmp"))
        assert len(temps) == 2  # the pack and the large table's own file, not yet published
        for temp in temps:  # as old as a temporary of this process can be: written as it started
            started = psutil.Process().create_time()
            os.utime(temp, (started, started))
        assert collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0)).temporaries == 0

    monkeypatch.setattr(_writes, "write", write_then_collect)
    items = [("a1", table(5), "S"), ("a2", table(5, 1), "S"), ("big", table(20_000), "S")]
    store.put_many(items)
    assert store.get_many(["a1", "a2", "big"]) == {key: t for key, t, _s in items}
    # A temporary whose writer has ended is removed as before (once older than the grace).
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    left = store.root / "data" / "ab" / f".abz.parquet.{int(ended.stdout)}.cc.tmp"
    left.parent.mkdir(exist_ok=True)
    left.write_bytes(b"x")
    monkeypatch.undo()
    assert collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0)).temporaries == 1
    assert not left.exists()


def test_a_temporary_whose_pid_a_newer_process_took_is_collected(store: FeatureStore) -> None:
    # A writer killed two hours ago, its pid since taken by a process that still runs (a reused pid, or the
    # init of a container started later): that process was taken for the writer and the temporary never went.
    newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        left = store.root / "data" / "ab" / f".abz.parquet.{newer.pid}.cc.tmp"
        left.parent.mkdir(parents=True, exist_ok=True)
        left.write_bytes(b"x")
        make_old(left)
        assert collect_garbage(store, retention=dt.timedelta(weeks=4)).temporaries == 1
        assert not left.exists()
        # Its own temporary, written after it started, stays: that process may be writing it.
        own = left.with_name(f".aby.parquet.{newer.pid}.dd.tmp")
        own.write_bytes(b"x")
        assert collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0)).temporaries == 0
        assert own.exists()
    finally:
        newer.kill()
        newer.wait()


def test_rows_with_missing_or_corrupt_files_are_removed(store: FeatureStore) -> None:
    gone = store.put("gone", table())
    bad = store.put("bad", table(offset=5))
    good = store.put("good", table(offset=9))
    gone.path.unlink()
    bad.path.write_bytes(bad.path.read_bytes()[:50])
    report = collect_garbage(store, retention=dt.timedelta(weeks=4))
    assert (report.missing, report.corrupt, report.entries_after) == (1, 1, 1)
    assert set(store.lookup(["gone", "bad", "good"])) == {"good"} and not bad.path.exists()
    assert good.path.exists()


def test_a_stored_file_that_is_a_looping_link_keeps_its_row_and_gc_goes_on(store: FeatureStore) -> None:
    """Path.exists answers False for a link that loops: GC took it for missing and deleted its row (while a read
    says "move it out of the way"), and the next GC, finding the link an orphan, was an OSError traceback."""
    store.put("a", table())
    store.put("b", table(offset=100))
    path = store.lookup(["a"])["a"].path
    path.unlink()
    path.symlink_to(path)
    for _ in range(2):
        report = collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0))
        assert (report.missing, report.orphans) == (0, 0)  # fails before: missing 1, then the traceback
        assert len(report.unreadable) == 1 and "too many levels of symbolic links" in report.unreadable[0]
        assert set(store.lookup(["a", "b"])) == {"a", "b"} and path.is_symlink()


def test_gc_never_deletes_through_a_directory_linked_out_of_the_store(
    store: FeatureStore, tmp_path: Path
) -> None:
    """A directory of the store replaced by a symbolic link to another place (by hand): GC removed the files it
    found there as orphans, and an expired key's file through its row. Those files are not the store's to
    delete; the rows of expired keys still go."""
    store.put("a", table())
    path = store.lookup(["a"])["a"].path
    elsewhere = tmp_path / "elsewhere"
    path.parent.rename(elsewhere)
    path.parent.symlink_to(elsewhere)
    stray = elsewhere / "stray.parquet"
    stray.write_bytes(b"someone else's")
    make_old(stray)
    bodies = store.root / "bodies"
    bodies.mkdir(exist_ok=True)
    (bodies / "zz").symlink_to(elsewhere)  # a body-like name there too
    body = elsewhere / "xxh3-0123456789abcdef.copy.body"
    body.write_bytes(b"not ours")
    make_old(body)
    age(store, "a", weeks=10)
    report = collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0))
    assert report.expired == 1 and store.lookup(["a"]) == {}
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(
        [path.name, stray.name, body.name]
    )  # before: []
    assert report.orphans == 0


_PUT = (
    "import sys, pyarrow as pa; from featurestore import FeatureStore;"
    " FeatureStore(sys.argv[1], lock_timeout=0).put('c', pa.table({'x': [1]}))"
)


def test_gc_checks_the_files_without_keeping_writers_waiting(
    store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GC checked every file under the exclusive manifest lock, so a loop of gc starved the store's writers
    (put median 103 ms alone, 2.7 s beside the loop). Now a put gets in while GC checks the files, and what
    changed meanwhile is judged as it is at removal: an expired key read again stays, a put's new key stays."""
    store.put("a", table())
    store.put("b", table(offset=100))
    age(store, "a", weeks=10)
    age(store, "b", weeks=10)
    puts: list[subprocess.CompletedProcess[str]] = []
    check = gc_module._sound

    def checked_while_another_process_writes(entry: Entry, expected_size: int) -> bool | None:
        if not puts:
            puts.append(
                subprocess.run(
                    [sys.executable, "-c", _PUT, str(store.root)],
                    capture_output=True,
                    text=True,
                    cwd=REPO,
                    timeout=120,
                )
            )
            assert store.get("b") is not None  # a hit: b is no longer expired
        return check(entry, expected_size)

    monkeypatch.setattr(gc_module, "_sound", checked_while_another_process_writes)
    report = collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0))
    assert puts[0].returncode == 0, puts[0].stderr  # fails before: StoreLockTimeout, the lock held by GC
    assert report.expired == 1 and set(store.lookup(["a", "b", "c"])) == {"b", "c"}


def test_dry_run_removes_nothing(store: FeatureStore) -> None:
    entry = store.put("old", table())
    age(store, "old", 10)
    report = collect_garbage(store, retention=dt.timedelta(weeks=4), dry_run=True)
    assert report.expired == 1 and report.dry_run
    assert entry.path.exists() and "old" in store.lookup(["old"])


def test_cleanup_old_entries_in_days(store: FeatureStore) -> None:
    store.put("k", table())
    age(store, "k", 2)
    assert store.cleanup_old_entries(20).expired == 0
    assert store.cleanup_old_entries(7).expired == 1


def run_cli(*args: str, command: tuple[str, ...] = (FEATURESTORE, "gc")) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_cli_collects_and_writes_json(store: FeatureStore, tmp_path: Path) -> None:
    store.put("old", table())
    store.put("new", table(offset=3))
    age(store, "old", 9)
    out = tmp_path / "report.json"
    result = run_cli(
        "--cache-root", str(store.root), "--retention-weeks", "8", "--verbose", "--output-json", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "remove entry old" in result.stdout
    report = json.loads(out.read_text())
    assert report["expired"] == 1 and report["bytes_freed"] > 0 and report["entries_after"] == 1
    assert set(store.lookup(["old", "new"])) == {"new"}


def test_module_entry_point_overview_only(store: FeatureStore, tmp_path: Path) -> None:
    store.put("k", table())
    age(store, "k", 9)
    out = tmp_path / "o.json"
    module = (sys.executable, "-m", "featurestore.gc")
    result = run_cli(
        "--cache-root", str(store.root), "--overview-only", "--output-json", str(out), command=module
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["entries"] == 1 and "k" in store.lookup(["k"])


def test_a_retention_reaching_before_year_one_expires_nothing(store: FeatureStore) -> None:
    store.put("k", table())
    result = run_cli("--cache-root", str(store.root), "--retention-weeks", "200000")
    assert result.returncode == 0, result.stderr  # an OverflowError traceback before
    assert "k" in store.lookup(["k"])


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--retention-weeks", "abc"], "--retention-weeks='abc'"),
        (["--retention-weeks", "-1"], "--retention-weeks='-1'"),
        (["--retention-weeks", "99999999999"], "--retention-weeks='99999999999'"),
        (["--grace-hours", "nan"], "--grace-hours='nan'"),
        (["--grace-hours", "1e30"], "--grace-hours='1e30'"),
        (["--cache-root", "/no/such/dir"], "--cache-root='/no/such/dir'"),
        (["--output-json", "/no/such/dir/x.json"], "--output-json='/no/such/dir/x.json'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(store: FeatureStore, args: list[str], field: str) -> None:
    if "--cache-root" not in args:
        args = ["--cache-root", str(store.root), *args]
    result = run_cli(*args)
    assert result.returncode == 2
    assert field in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_cli_unknown_command(store: FeatureStore) -> None:
    result = run_cli(command=(FEATURESTORE, "frobnicate"))
    assert result.returncode == 2 and "command='frobnicate'" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.4, 1.0, 2.0])
def test_gc_killed_mid_sweep_leaves_a_store_the_next_process_uses(tmp_path: Path, delay: float) -> None:
    # SIGKILL at some point of a collection (before its commit, between commit and unlinks, in its checkpoint):
    # rows are gone before their files, so what is left is at worst orphans; live keys read back whole.
    store = FeatureStore(tmp_path / "cache")
    live = {f"live-{i:03d}": table(5, i) for i in range(150)}
    store.put_many([(key, t, "S") for key, t in live.items()])
    store.put_many([(f"old-{i:03d}", table(5, i), "S") for i in range(300)])
    for i in range(10):
        store.put(f"old-own-{i}", table(3000, i))
        store.put(f"live-own-{i}", table(3000, i))
        live[f"live-own-{i}"] = table(3000, i)
    with duckdb.connect(str(store.manifest.path)) as con:
        con.execute(
            "UPDATE entries SET last_accessed_ts = last_accessed_ts - to_weeks(10) WHERE key LIKE 'old-%'"
        )
    gc = subprocess.Popen(
        [sys.executable, "-m", "featurestore.gc", "--cache-root", str(store.root), "--grace-hours", "0"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(delay)
    gc.kill()
    _out, err = gc.communicate()
    assert gc.returncode in (0, -9), err
    store = FeatureStore(store.root)  # a new process would start here
    report = store.validate_cache_integrity()
    assert report.ok and report.temporaries == ()
    assert store.get_many(list(live)) == live
    collect_garbage(store, retention=dt.timedelta(weeks=4), grace=dt.timedelta(0))
    report = store.validate_cache_integrity()
    assert report.ok and report.orphans == () and report.checked == len(live)
