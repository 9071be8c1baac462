"""The refresh stamp (``refresher.stamp``): a CLI ``refresh`` with nothing to do answers from it, and anything
that makes work falls through to the full refresh. Through the real CLI against a real local server.

Which path answered is in the report: the stamp's has the single phase ``stamp``, the full path ``plan`` etc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest

from featurestore import FeatureStore, collect_garbage
from featurestore.generation import read_generation
from refresher import database, stamp
from refresher._snapshot_sql import PRIVATE_SLOTS
from refresher.engines import make_engine
from refresher.engines.base import ServerInfo
from refresher.errors import EngineUnavailable
from refresher.settings import AUTO_POOL, PoolSize, Settings
from refresher.snapshot import MAINTENANCE_DB, pristine_name
from tests.child_processes import outputs, reap
from tests.featurestore.test_generation import REPO, STOPPED_REMOVER
from tests.fixtures_postgres import refillers, refills_gone
from tests.refresher.engines.test_local import tiny_disk
from tests.refresher.test_refresh_e2e import AS_OF, Workspace
from tests.refresher.test_snapshot import _mark

__all__ = ["tiny_disk"]  # the fixture, shared


@pytest.fixture
def ws(checkout: Workspace) -> Workspace:
    return checkout


def stamped(report: dict[str, Any]) -> bool:
    return set(report["phases"]) == {"stamp"}


def stamp_file(ws: Workspace) -> Path:
    return stamp.stamp_path(ws.root / "state", ws.profile, ws.engine)


def settle(ws: Workspace) -> dict[str, Any]:
    """Refresh until the stamp answers through psql (at most one full run, then a check through psycopg records
    the rows of an analysis finished since), so each test starts from a stamped state the probe vouches for. The
    refresh's detached refill is waited for each time: it may still change the pristine copy's mark after the
    probe answered, and the next refresh's probe would then not (it answers through psycopg)."""
    report = ws.refresh()
    refills_gone(ws.profile)
    deadline = time.monotonic() + 120
    while not (stamped(report) and probe_answers(ws)):
        assert time.monotonic() < deadline, report
        report = ws.refresh()
        refills_gone(ws.profile)
    return report


def refresh_saying(ws: Workspace, *extra: str) -> tuple[dict[str, Any], list[str]]:
    """A refresh with ``-v``: its report, and what it said of the stamp (``refresher: stamp: ...`` lines)."""
    done = ws.run("refresh", "--profile", ws.profile, "--json", "-v", *extra)
    prefix = "refresher: stamp: "
    said = [line.removeprefix(prefix) for line in done.stderr.splitlines() if line.startswith(prefix)]
    return json.loads(done.stdout.strip().splitlines()[-1]), said


def store_of(ws: Workspace) -> list[Any]:
    """The workspace's store as a refresh beginning now records it (for ``stamp.write`` in-process)."""
    return stamp.store_state(ws.root / "store")


def ws_profile(ws: Workspace) -> Any:
    """The workspace's profile as a refresh reads it (for ``stamp.write`` in-process)."""
    from refresher.profile import load_profile

    return load_profile(ws.profile, [ws.root / "profiles"])


def local_server(ws: Workspace) -> ServerInfo:
    """The profile's server as the local engine describes it, its psql included."""
    server = make_engine("local", Settings.from_env(ws.env)).info(ws.profile)
    assert server is not None and server.psql is not None
    return server


def probe_answers(ws: Workspace, server: ServerInfo | None = None, pool_size: PoolSize | None = None) -> bool:
    """Whether the stamp's psql probe (``stamp._probed``) says nothing to do, psycopg not asked."""
    return stamp._probed(json.loads(stamp_file(ws).read_text()), server or local_server(ws), pool_size)


def execute(ws: Workspace, query: str, dbname: str | None = None) -> None:
    dsn = ws.dsn()
    if dbname is not None:
        dsn = dsn.rsplit("/", 1)[0] + "/" + dbname
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query)


def test_a_noop_refresh_answers_from_the_stamp_with_the_full_paths_report(ws: Workspace) -> None:
    fast = settle(ws)
    assert refresh_saying(ws)[1] == ["answered through psql"]
    stamp_file(ws).unlink()
    full, said = refresh_saying(ws)
    assert not stamped(full) and full["segments"]["loaded"] == 0  # the full path's own no-op
    assert said == [
        f"not used: no stamp at {stamp_file(ws)} (the last refresh wrote none, or one cleared it before loading and did not finish)",
        "written",
    ]
    assert stamped(ws.refresh())  # and it stamped again
    for report in (fast, full):
        report.pop("seconds"), report.pop("phases"), report.pop("store")
    assert fast == full


def test_a_stamp_with_fields_a_newer_refresher_adds_still_answers(ws: Workspace) -> None:
    settle(ws)
    recorded = json.loads(stamp_file(ws).read_text())
    stamp_file(ws).write_text(json.dumps({**recorded, "newer": {"field": 1}}))
    assert refresh_saying(ws)[1] == ["answered through psql"]  # already so before: unknown keys are not read


def test_the_human_output_is_the_same_summary(ws: Workspace) -> None:
    settle(ws)
    text = ws.run("refresh", "--profile", ws.profile).stdout
    assert "4 desired, 4 already present, 0 loaded" in text, text
    assert re.search(r"DSN: postgresql://\S+/" + ws.profile, text), text


@pytest.mark.parametrize(
    "change",
    [
        "profile",
        "ledger",
        "dropped table",
        "dropped feature table",
        "snapshot",
        "disarmed counter",
        "session close",
        "store",
        "code",
        "torn stamp",
        "symbols",
        "format",
        "malformed",
        "profile file",
        "dsn",
        "engine",
        "shut database",
    ],
)
def test_anything_that_makes_work_falls_through_to_the_full_refresh(ws: Workspace, change: str) -> None:
    settle(ws)
    dbname = ws.profile
    in_database = change in (
        "ledger",
        "dropped table",
        "dropped feature table",
        "snapshot",
        "disarmed counter",
        "symbols",
        "shut database",
    )
    if change == "profile":  # another seed for KO: its segments must be fetched and loaded again
        ws.write_profile(symbols=["AAPL", "KO"], months=1, seeds="seeds: {KO: 5}\n")
    elif change == "ledger":
        execute(
            ws,
            "UPDATE refresher_segments SET content_hash = 'edited' WHERE symbol = 'AAPL' AND timeframe = '1d'",
        )
    elif change == "dropped table":
        execute(ws, "DROP TABLE refresher_rejects")
        assert stamp.write(ws.root / "state", store_of(ws), ws_profile(ws), local_server(ws), {}) == (
            "a table is missing from the database"
        )
    elif change == "symbols":
        execute(ws, "UPDATE symbols SET asset_class = asset_class || '-edited' WHERE symbol = 'KO'")
    elif change == "shut database":  # what a reset killed with its door shut leaves: the full path opens it
        execute(ws, f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false', MAINTENANCE_DB)
    elif change == "dropped feature table":
        execute(ws, "DROP TABLE features_dashboard_data")
    elif change == "snapshot":
        execute(ws, f'ALTER DATABASE "{pristine_name(dbname)}" IS_TEMPLATE false', MAINTENANCE_DB)
        execute(ws, f'DROP DATABASE "{pristine_name(dbname)}" WITH (FORCE)', MAINTENANCE_DB)
        assert stamp.write(ws.root / "state", store_of(ws), ws_profile(ws), local_server(ws), {}) == (
            "the pristine copy is not of the database's ledger"
        )
    elif (
        change == "disarmed counter"
    ):  # a ledger write the counter does not see: only the full digest can tell
        execute(ws, "ALTER TABLE refresher_segments DISABLE TRIGGER USER")
        execute(ws, "UPDATE refresher_segments SET rows = rows WHERE symbol = 'AAPL' AND timeframe = '1d'")
    else:
        path = stamp_file(ws)
        if change == "torn stamp":
            path.write_text(path.read_text()[:40])
        elif change == "store":  # another run removed a key from the shared store: the full path fetches it
            assert FeatureStore(ws.root / "store").clear_cache("KO") >= 1
        else:
            field, value = {
                "session close": ("valid_until", "2000-01-01T00:00:00+00:00"),
                "code": ("code", "old"),
                "format": ("format", stamp.STAMP_FORMAT - 1),
                "malformed": ("inputs", 7),
                "profile file": ("inputs", [[str(ws.root / "elsewhere.yaml"), None]]),
                "dsn": ("dsn", "postgresql://someone@127.0.0.1:1/elsewhere"),
                "engine": ("engine", "docker"),
            }[change]
            path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    if in_database:  # the server's answer differs: psql's probe must not say nothing to do
        assert not probe_answers(ws), change
    report, said = refresh_saying(ws)
    assert not stamped(report), change
    because = {
        "profile": f"{ws.root / 'profiles' / ws.profile}.yaml changed since the load",
        "ledger": "the ledger was written (or its tables made again) since the stamp",
        "dropped table": "a table is missing (one of symbols, ",
        "dropped feature table": "a table is missing (one of symbols, ",
        "snapshot": "no pristine copy",
        "disarmed counter": "the ledger was written (or its tables made again) since the stamp",
        "session close": "the session close it answered until passed (2000-01-01T00:00:00+00:00)",
        "store": "the store is of another generation (a key may have left it or changed)",
        "code": "the code changed",
        "torn stamp": "is not JSON (torn or edited)",
        "symbols": "the symbols table changed since the stamp",
        "format": f"is of format {stamp.STAMP_FORMAT - 1}, this refresher's is {stamp.STAMP_FORMAT}",
        "malformed": "malformed stamp (TypeError",
        "profile file": f"the stamp's from {ws.root / 'elsewhere.yaml'}",
        "dsn": "the dsn is another: stamped 'postgresql://someone@127.0.0.1:1/elsewhere'",
        "engine": "the engine is another: stamped 'docker', now 'local'",
        "shut database": "the server's answer: ",
    }[change]
    assert len(said) == 2 and said[0].startswith("not used: ") and because in said[0], (change, said)
    if in_database:  # psql's probe was asked first, and said why it did not answer
        probe = (
            "(psql: psql failed (exit 2: " if change == "shut database" else "(psql: the server's rows differ"
        )
        assert probe in said[0], (change, said)
    assert said[1] == "written", said
    if change in ("profile", "ledger"):
        assert report["segments"]["loaded"] >= 1
    if change == "store":
        assert report["segments"]["fetched"] >= 1 and report["segments"]["loaded"] == 0
    if change == "dropped table":
        with psycopg.connect(ws.dsn()) as conn:
            assert database.schema_exists(conn)
            assert conn.execute("SELECT to_regclass('refresher_rejects') IS NOT NULL").fetchone() == (True,)
    if change == "dropped feature table":
        assert report["features"]["loaded"] == 2
        with psycopg.connect(ws.dsn()) as conn:
            count = conn.execute("SELECT count(DISTINCT symbol) FROM features_dashboard_data").fetchone()
            assert count == (2,)
    if change == "snapshot":
        assert report["snapshot"] == "saved"
    assert stamped(ws.refresh())  # the full run stamped what it did
    if change == "profile":
        ws.write_profile(symbols=["AAPL", "KO"], months=1)


def test_another_runs_additions_to_the_shared_store_leave_the_stamp_answering(ws: Workspace) -> None:
    """Issue 13: the stamp recorded the manifest file's (inode, size, time), so a write to the shared store by
    another profile, checkout or jobs worker voided it and the next no-op paid a full run. Additions cannot
    make its answer wrong (keys are content-addressed): they leave the store's generation as it was."""
    settle(ws)
    store = FeatureStore(ws.root / "store")
    store.put_many([(f"seg-elsewhere-{n}", pa.table({"x": [n]}), "XOM") for n in range(3)])
    store.put("seg-elsewhere-own", pa.table({"x": list(range(10_000))}), symbol="XOM")
    store.get_many(["seg-elsewhere-0", "seg-elsewhere-own"])
    collect_garbage(store, retention=dt.timedelta(weeks=4))  # a collection that finds nothing to remove
    assert refresh_saying(ws)[1] == ["answered through psql"]


@pytest.mark.parametrize("removal", ["gc", "clear_cache", "rebuild", "corrupt files"])
def test_a_removal_from_the_store_falls_through_to_the_full_refresh(ws: Workspace, removal: str) -> None:
    settle(ws)
    store = FeatureStore(ws.root / "store")
    before = read_generation(store.root)
    if removal == "gc":
        collect_garbage(store, retention=dt.timedelta(0))
    elif removal == "clear_cache":
        store.clear_cache("AAPL")
    elif removal == "rebuild":
        store.rebuild_manifest()
    else:  # every file cut short: a collection removes their rows as corrupt
        for path in (ws.root / "store" / "data").glob("*/*.parquet"):
            path.write_bytes(path.read_bytes()[:-100])
        assert not store.validate_cache_integrity(deep=False).ok
        collect_garbage(store, retention=dt.timedelta(weeks=4))
    assert read_generation(store.root) not in (before, None)
    report, said = refresh_saying(ws)
    assert not stamped(report) and "the store is of another generation" in said[0], said
    assert said[1] == "written"
    assert stamped(ws.refresh())  # the full run stamped the new generation


def test_a_removal_while_a_refresh_runs_leaves_its_stamp_not_answering(ws: Workspace) -> None:
    """The stamp records the generation as the refresh began, before its plan read the store."""
    report = settle(ws)
    began = store_of(ws)
    FeatureStore(ws.root / "store").clear_cache("KO")  # after the refresh's plan, before its stamp
    assert stamp.write(ws.root / "state", began, ws_profile(ws), local_server(ws), report) is None
    report, said = refresh_saying(ws)
    assert not stamped(report) and "the store is of another generation" in said[0], said
    assert report["segments"]["fetched"] >= 1


@pytest.mark.parametrize("step", ["moved", "committed"])
def test_a_remover_killed_between_its_steps_leaves_the_stamp_not_answering(ws: Workspace, step: str) -> None:
    settle(ws)
    marker = ws.root / f"stopped-{step}"
    marker.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", STOPPED_REMOVER, str(ws.root / "store"), step, str(marker), "AAPL"], cwd=REPO
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    report, said = refresh_saying(ws)
    assert not stamped(report) and "the store is of another generation" in said[0], said
    # rolled back (nothing to fetch), or committed (AAPL's segments fetched again)
    assert (report["segments"]["fetched"] > 0) == (step == "committed"), report


def test_without_the_probe_the_check_asks_through_psycopg_and_records_the_probe_again(ws: Workspace) -> None:
    settle(ws)
    server = local_server(ws)
    args = (ws.root / "state", ws.root / "store", ws.root / "profiles" / f"{ws.profile}.yaml")
    not_rows = ws.root / "psql-not-rows"
    not_rows.write_text("#!/bin/sh\necho '[1]'\n")
    not_rows.chmod(0o755)
    # No psql (a Docker server), one that is gone or fails, one that answers no JSON or other JSON: psycopg
    # answers, and says why psql did not.
    for psql, doubt in (
        (None, "no psql for the local engine"),
        (str(ws.root / "no-such-psql"), "psql did not run ("),
        ("/bin/false", "psql failed (exit 1: nothing said)"),
        ("/bin/echo", "psql's answer is not the probe's JSON"),
        (str(not_rows), "psql's answer is not the probe's rows"),
    ):
        said = stamp._probe_doubt(json.loads(stamp_file(ws).read_text()), replace(server, psql=psql), None)
        assert said is not None and said.startswith(doubt), (psql, said)
        found = stamp.verdict(*args, replace(server, psql=psql), pool_size=None)
        assert found.report is not None and found.why == f"answered through psycopg (psql: {said})", psql
    # A pool size other than the recorded user's choice is work (the mark records the default: not chosen).
    size = json.loads(stamp_file(ws).read_text())["pool"][0]
    assert not probe_answers(ws, pool_size=size)
    said = stamp._probe_doubt(json.loads(stamp_file(ws).read_text()), server, size)
    assert said == f"pool size {size} asked, the recorded mark says [{size}, False] (size, chosen)"
    # A stamp whose rows did not vouch for it when written carries no probe.
    recorded = json.loads(stamp_file(ws).read_text())
    bare = {k: v for k, v in recorded.items() if k not in ("probe", "fingerprint", "pool")}
    said = stamp._probe_doubt(bare, server, None)
    assert said == "no probe recorded (its rows did not vouch for the stamp when written)"
    # Rows recorded for another state (the mark of an analysis since finished, say): psycopg's check answers and
    # records the server's rows again, and psql answers the next time.
    recorded = json.loads(stamp_file(ws).read_text())
    stamp_file(ws).write_text(json.dumps({**recorded, "fingerprint": [*recorded["fingerprint"][:3], []]}))
    assert not probe_answers(ws)
    assert stamp._probe_doubt(json.loads(stamp_file(ws).read_text()), server, None) == (
        "the server's rows differ from the recorded ones (server's system identifier)"
    )
    assert stamp.check(*args, server, pool_size=None) is not None
    assert json.loads(stamp_file(ws).read_text()) == recorded
    assert probe_answers(ws)


def test_rows_that_do_not_vouch_for_the_stamp_are_not_recorded(ws: Workspace) -> None:
    settle(ws)
    recorded = json.loads(stamp_file(ws).read_text())
    with psycopg.connect(ws.dsn(), autocommit=True) as conn:
        rows = conn.execute(recorded["probe"]).fetchone()[0]  # type: ignore[index]
        assert stamp._vouched(rows, recorded) == recorded["pool"]
        # Another ledger or symbols than stamped, a mark on another ledger, an unarmed counter, a missing table
        # or pristine copy: nothing recorded, and psql's probe can never answer for such a state.
        assert stamp._vouched(rows, {**recorded, "database": [recorded["database"][0], "0" * 32]}) is None
        state, version, comment, unfinished, ident = rows
        for changed in (
            [[{**state[0], "f1": 1}], version, comment, unfinished, ident],
            [state, [{**version[0], "f4": False}], comment, unfinished, ident],
            [state, [{**version[0], "f3": version[0]["f3"] + 1}], comment, unfinished, ident],
            [state, version, [], unfinished, ident],
            [state, version, [{**comment[0], "f1": False}], unfinished, ident],
        ):
            assert stamp._vouched(changed, recorded) is None, changed


def test_any_flag_falls_through(ws: Workspace) -> None:
    for flags in (["--as-of", AS_OF.isoformat()], ["--verify"], ["--prune"], ["--on-bad-rows", "fail"]):
        settle(ws)
        report, said = refresh_saying(ws, *flags)
        assert not stamped(report), flags
        assert said == [f"not checked: {flags[0]} given", "written"], said
    settle(ws)
    report, said = refresh_saying(ws, "--verify", "--allow-shrink")
    assert said == ["not checked: --verify, --allow-shrink given", "written"], said


def test_reset_brings_back_what_the_stamp_vouches_for(ws: Workspace) -> None:
    settle(ws)
    before = ws.checksums()
    # A test run dirties the data (not the ledger, which reset would refuse to overwrite); reset restores it
    # from the pristine copy, whose ledger is the stamped one: the stamp holds again, rightly.
    execute(ws, "DELETE FROM ohlcv_daily WHERE symbol = 'KO'")
    ws.run("reset", "--profile", ws.profile)
    report = ws.refresh()
    assert stamped(report)  # the pristine copy is what the stamped refresh left
    assert ws.checksums() == before
    execute(ws, "DELETE FROM refresher_segments WHERE symbol = 'KO' AND timeframe = '1d'")
    report = ws.refresh()
    assert not stamped(report) and report["segments"]["loaded"] == 1
    assert ws.checksums() == before


def test_two_noop_refreshes_at_once_both_answer(ws: Workspace) -> None:
    settle(ws)
    runs = [
        subprocess.Popen(
            ws.command("refresh", "--profile", ws.profile, "--json"),
            env=ws.env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _err in outputs(runs, timeout=300)]
    assert all(run.returncode == 0 for run in runs)
    assert all(stamped(r) and r["segments"]["loaded"] == 0 for r in reports)


def test_a_refresh_killed_midway_leaves_no_stamp_behind(ws: Workspace) -> None:
    settle(ws)
    ws.write_profile(symbols=["AAPL", "KO", "MSFT", "IBM"], months=3)
    run = subprocess.Popen(
        ws.command("refresh", "--profile", ws.profile, "--json"),
        env=ws.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while stamp_file(ws).exists() and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.01)
        assert not stamp_file(ws).exists()  # cleared before the first load
        os.kill(run.pid, signal.SIGKILL)
    finally:
        reap(run)
    report = ws.refresh()
    assert not stamped(report) and report["segments"]["desired"] == 4 * 2 * 3
    assert stamped(ws.refresh())
    ws.write_profile(symbols=["AAPL", "KO"], months=1)
    ws.refresh("--prune")


def test_the_names_the_stamp_keeps_are_those_of_the_modules_it_avoids_importing() -> None:
    from featurestore.manifest import MANIFEST_FILE

    created = {
        m.group(1) for m in (re.search(r"CREATE TABLE IF NOT EXISTS (\w+)", ddl) for ddl in database.DDL) if m
    }
    assert set(stamp.TABLES) == created
    assert stamp.MANIFEST_FILE == MANIFEST_FILE


def test_the_code_fingerprint_follows_the_libraries_that_decide_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = stamp.code_fingerprint()
    real = stamp.installed_version
    for library in ("exchange_calendars", "numpy", "pydantic", "pyyaml"):
        # exchange_calendars may move holidays, numpy the generator's numbers, pydantic or PyYAML what the
        # profile's unchanged bytes resolve to: the stamp must not answer after an upgrade of any.
        monkeypatch.setattr(
            stamp, "installed_version", lambda name, lib=library: "9.9" if name == lib else real(name)
        )
        assert stamp.code_fingerprint() != before, library


def test_installed_versions_are_those_importlib_metadata_reads() -> None:
    from importlib.metadata import version

    from refresher._installed import installed_version

    for library in (
        "exchange_calendars",
        "numpy",
        "pydantic",
        "pydantic_core",
        "pyyaml",
        "PyYAML",
        "psycopg",
    ):
        assert installed_version(library) == version(library), library


def _with_universe_file(ws: Workspace, file: str) -> None:
    path = ws.root / "profiles" / f"{ws.profile}.yaml"
    path.write_text(path.read_text().replace("  symbols: [AAPL, KO]", f"  file: {file}\n  count: 2"))


@pytest.mark.parametrize("change", ["universe file edited", "universe file shadowed", "another file"])
def test_every_file_the_profile_was_read_from_is_checked(ws: Workspace, change: str) -> None:
    """The check compares bytes, not the parsed profile: each file resolution read must be the same."""
    profiles = ws.root / "profiles"
    try:
        if change == "universe file edited":
            (profiles / "mine.csv").write_text("symbol\nAAPL\nKO\n")
            _with_universe_file(ws, "mine.csv")
            settle(ws)
            (profiles / "mine.csv").write_text("symbol\nAAPL\nMSFT\n")  # another symbol, same profile file
            report = ws.refresh()
        elif change == "universe file shadowed":
            _with_universe_file(ws, "us_equities.csv")  # found in refresher/data until one appears next to it
            settle(ws)
            (profiles / "us_equities.csv").write_text("symbol\nKO\nMSFT\n")
            report = ws.refresh()
        else:  # the same bytes in another directory: its universe file would be looked for there
            settle(ws)
            copy = ws.root / "elsewhere" / f"{ws.profile}.yaml"
            copy.parent.mkdir()
            copy.write_bytes((profiles / f"{ws.profile}.yaml").read_bytes())
            report = ws.refresh(profile=str(copy))
            assert not stamped(report) and report["segments"]["loaded"] == 0
            assert stamped(ws.refresh(profile=str(copy)))
            report = ws.refresh()  # the stamp now names the copy, not the file the name finds
            assert not stamped(report) and report["segments"]["loaded"] == 0
            return
        assert not stamped(report) and report["segments"]["loaded"] >= 1, change
        assert stamped(ws.refresh())
    finally:
        for leftover in ("mine.csv", "us_equities.csv"):
            (profiles / leftover).unlink(missing_ok=True)
        ws.write_profile(symbols=["AAPL", "KO"], months=1)
        ws.refresh("--prune")


def pool_databases(ws: Workspace) -> list[str]:
    """The pool's slots that hold a database (not the private ones: a copy on its way elsewhere, such as the
    template's analysis copy)."""
    with psycopg.connect(ws.dsn()) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE starts_with(datname, %s) ORDER BY datname",
            (f"{ws.profile}__pool_",),
        ).fetchall()
    return [r[0] for r in rows if int(r[0].rsplit("_", 1)[1]) < PRIVATE_SLOTS.start]


def wait_for_pool_databases(ws: Workspace, count: int, timeout: float = 120) -> list[str]:
    """The pool's databases once the detached refill made ``count`` of them."""
    deadline = time.monotonic() + timeout
    while len(names := pool_databases(ws)) != count:
        assert time.monotonic() < deadline, names
        time.sleep(0.2)
    return names


CHOSEN = "pool {}: chosen (--pool-size, $REFRESHER_POOL_SIZE), kept until another is given"


def test_a_changed_pool_size_is_work_the_stamp_never_hides(ws: Workspace) -> None:
    settle(ws)
    before = ws.checksums()
    try:
        report = ws.refresh("--pool-size", "0")
        assert not stamped(report) and report["pool_size"] == 0
        assert report["segments"]["loaded"] == 0 and report["snapshot"] == "unchanged"
        assert pool_databases(ws) == []  # dropped before the refresh returned
        assert stamped(ws.refresh("--pool-size", "0"))  # the same size again: nothing to do
        refills_gone(ws.profile)  # one still running says so (refill_running)
        status = json.loads(ws.run("status", "--json").stdout)["servers"]
        assert [s["pool"] for s in status] == [
            {
                "size": 0,
                "ready": 0,
                "reset": "copy",
                "why": CHOSEN.format(0),
                "refill_failed": None,
                "refill_running": None,
                "bodies_not_made": None,
            }
        ]
        assert "0/0 ready, reset: copy" in ws.run("status").stdout
        execute(ws, "DELETE FROM ohlcv_daily")
        reset = json.loads(ws.run("reset", "--profile", ws.profile, "--json").stdout)
        assert reset["method"] == "template" and ws.checksums() == before

        one = {**ws.env, "REFRESHER_POOL_SIZE": "1"}
        done = subprocess.run(
            ws.command("refresh", "--profile", ws.profile, "--json"), env=one, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout.strip().splitlines()[-1])
        assert not stamped(report) and report["pool_size"] == 1
        assert wait_for_pool_databases(ws, 1) == [f"{ws.profile}__pool_0"]
        flag_wins = {**ws.env, "REFRESHER_POOL_SIZE": "not a number"}
        done = subprocess.run(
            ws.command("refresh", "--profile", ws.profile, "--json", "--pool-size", "1"),
            env=flag_wins,
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0 and stamped(json.loads(done.stdout.strip().splitlines()[-1])), done.stderr
        refills_gone(ws.profile)
        status = json.loads(ws.run("status", "--json").stdout)["servers"]
        assert [s["pool"] for s in status] == [
            {
                "size": 1,
                "ready": 1,
                "reset": "rename",
                "why": CHOSEN.format(1),
                "refill_failed": None,
                "refill_running": None,
                "bodies_not_made": None,
            }
        ]
    finally:
        report = ws.refresh("--pool-size", "2")  # two clones again (remembered)
    assert not stamped(report) and report["pool_size"] == 2
    wait_for_pool_databases(ws, 2)
    assert stamped(ws.refresh())
    assert ws.checksums() == before


def test_a_pool_size_given_once_sticks_and_the_flag_then_the_variable_win_over_it(ws: Workspace) -> None:
    settle(ws)
    before = ws.checksums()
    try:
        assert ws.refresh("--pool-size", "1")["pool_size"] == 1
        assert wait_for_pool_databases(ws, 1) == [f"{ws.profile}__pool_0"]
        # Neither the flag nor $REFRESHER_POOL_SIZE: the stamped no-op and the full path keep the size...
        report = ws.refresh()
        assert stamped(report) and report["pool_size"] == 1
        stamp_file(ws).unlink()
        report = ws.refresh()
        assert not stamped(report) and report["pool_size"] == 1
        # ...and so does a refresh that loads and takes a new snapshot.
        execute(ws, "DELETE FROM ohlcv_daily WHERE symbol = 'KO'")
        report = ws.refresh("--verify")
        assert report["segments"]["loaded"] > 0 and report["snapshot"] == "saved" and report["pool_size"] == 1
        assert wait_for_pool_databases(ws, 1) == [f"{ws.profile}__pool_0"]
        status = json.loads(ws.run("status", "--json").stdout)["servers"]
        assert [s["pool"]["size"] for s in status] == [1]

        # The variable wins over the remembered size, the flag over both; each is then remembered.
        env = {**ws.env, "REFRESHER_POOL_SIZE": "0"}
        refresh = ws.command("refresh", "--profile", ws.profile, "--json")
        done = subprocess.run(refresh, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["pool_size"] == 0
        assert ws.refresh()["pool_size"] == 0 and pool_databases(ws) == []
        done = subprocess.run([*refresh, "--pool-size", "1"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.strip().splitlines()[-1])["pool_size"] == 1
        assert ws.refresh()["pool_size"] == 1
    finally:
        ws.refresh("--pool-size", "2")
    wait_for_pool_databases(ws, 2)
    assert ws.checksums() == before


def test_pool_size_auto_forgets_a_chosen_size_and_the_stamp_compares_it(ws: Workspace) -> None:
    """``--pool-size auto`` (and $REFRESHER_POOL_SIZE=auto): the default's size, nobody's choice, where a size
    given once stuck for good. Asked again it is nothing to do (the stamp answers: the mark says auto); a number
    asked then is work, as a number is after auto."""
    settle(ws)
    before = ws.checksums()
    try:
        assert ws.refresh("--pool-size", "1")["pool_size"] == 1
        report = ws.refresh("--pool-size", "auto")
        assert not stamped(report) and report["snapshot"] == "unchanged", report
        [pool] = [s["pool"] for s in json.loads(ws.run("status", "--json").stdout)["servers"]]
        assert pool["size"] == report["pool_size"] and not str(pool["why"]).startswith(CHOSEN[:8]), pool
        assert f"pool_size={report['pool_size']} auto" in _mark(local_server(ws))
        refills_gone(ws.profile)
        report, said = refresh_saying(ws, "--pool-size", "auto")
        assert stamped(report) and said[0].startswith("answered"), said
        env = {**ws.env, "REFRESHER_POOL_SIZE": "auto"}
        done = subprocess.run(
            ws.command("refresh", "--profile", ws.profile, "--json"), env=env, capture_output=True, text=True
        )
        assert done.returncode == 0 and stamped(json.loads(done.stdout.strip().splitlines()[-1])), done.stderr
        # The stamp tells auto from the same number chosen.
        size = report["pool_size"]
        assert probe_answers(ws, pool_size=AUTO_POOL) and not probe_answers(ws, pool_size=size)
        report = ws.refresh("--pool-size", str(size))
        assert not stamped(report) and report["pool_size"] == size
        assert not probe_answers(ws, pool_size=AUTO_POOL)
        assert not stamped(ws.refresh("--pool-size", "auto"))
    finally:
        ws.refresh("--pool-size", "2")
    wait_for_pool_databases(ws, 2)
    assert ws.checksums() == before


def _analysis_left(dsn: str) -> tuple[bool, int]:
    """Whether the working database still carries the record of a pending analysis of ``ohlcv_daily``, and how many
    times ``ohlcv_daily`` was analyzed."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = current_database() AND 'refresher.analyze_pending=ohlcv_daily' = ANY(s.setconfig)), "
            "(SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'ohlcv_daily')"
        ).fetchone()
    assert row is not None
    return bool(row[0]), int(row[1])


def test_a_refresh_with_nothing_to_do_finishes_an_analysis_a_killed_analyzer_left(ws: Workspace) -> None:
    settle(ws)
    dsn = ws.dsn()
    for full in (False, True):
        # What a reset from a copy not analyzed leaves when its detached analyzer is killed: the record.
        execute(
            ws,
            f"ALTER DATABASE \"{ws.profile}\" SET refresher.analyze_pending = 'ohlcv_daily'",
            MAINTENANCE_DB,
        )
        recorded, before = _analysis_left(dsn)
        assert recorded
        assert not probe_answers(ws)  # psql's probe leaves the analysis to the check that starts one
        said = stamp._probe_doubt(json.loads(stamp_file(ws).read_text()), local_server(ws), None)
        assert said == "an analysis of a pool database is unfinished"
        if full:
            stamp_file(ws).unlink()
        assert stamped(ws.refresh()) is not full
        deadline = time.monotonic() + 60
        while _analysis_left(dsn) != (False, before + 1):
            assert time.monotonic() < deadline, (
                f"the analysis the record names was never finished: {_analysis_left(dsn)}"
            )
            time.sleep(0.1)


def test_a_stamp_is_not_written_for_what_it_cannot_check(ws: Workspace, tmp_path: Path) -> None:
    """``stamp.write`` says why it wrote nothing (``refresh -v``: 'stamp: not written: ...')."""
    from refresher.profile import load_profile

    server = local_server(ws)
    mine = tmp_path / "files_source.yaml"
    mine.write_text(
        "universe:\n  symbols: [AAPL]\nexchange: XNYS\nmonths: 1\ntimeframes: [1d]\nfeatures: []\n"
        f"source: {{kind: files, path: {tmp_path}}}\n"
    )
    files = load_profile(str(mine), [tmp_path])
    assert stamp.write(ws.root / "state", store_of(ws), files, server, {}) == (
        "a files or Postgres source, or a feature of a user's module, changes outside what a stamp checks"
    )
    unread = dataclasses.replace(ws_profile(ws), inputs=())
    assert stamp.write(ws.root / "state", store_of(ws), unread, server, {}) == (
        "the profile was not read from a file"
    )


@pytest.mark.docker
@pytest.mark.slow
def test_a_profiles_servers_on_two_engines_keep_a_stamp_each(
    ws: Workspace, docker_client: Any, docker_pg_image: str
) -> None:
    """A state dir may hold a profile's server on the local engine and on Docker (`make refresh` passed --engine
    auto over $REFRESHER_ENGINE): the stamp was one file per profile, so each engine's refresh voided the
    other's ('the engine is another') and every refresh of either ran in full."""
    settle(ws)
    on_docker = replace(ws, engine="docker")
    try:
        report, said = refresh_saying(on_docker)
        assert not stamped(report) and report["engine"] == "docker"
        assert said == [f"not used: no running server of profile {ws.profile} (docker engine)", "written"]
        for _ in range(2):
            report, said = refresh_saying(ws)
            assert stamped(report) and report["engine"] == "local", said
            report, said = refresh_saying(on_docker)
            assert stamped(report) and report["engine"] == "docker", said
            assert said == ["answered through psycopg (psql: no psql for the docker engine)"]
    finally:
        subprocess.run(
            on_docker.command("down", "--profile", ws.profile), env=ws.env, timeout=300, check=False
        )


@pytest.mark.parametrize("target", ["refresh", "plan"])
def test_make_leaves_the_engine_to_the_cli_unless_told(target: str) -> None:
    """`make refresh` passed --engine auto, over $REFRESHER_ENGINE: `make refresh` and `refresher refresh` then
    refreshed two servers of one profile (auto keeps a profile on the engine already serving it)."""
    from refresher.settings import CHECKOUT

    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")

    def command(*variables: str) -> str:
        env = {**os.environ, "REFRESHER_ENGINE": "local"}
        env.pop("ENGINE", None)
        done = subprocess.run(
            [make, "-n", "--no-print-directory", "-C", str(CHECKOUT), target, "PROFILE=mine", *variables],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        [line] = [line for line in done.stdout.splitlines() if f"refresher {target} " in line]
        return line

    assert "--engine" not in command()
    assert "--engine docker" in command("ENGINE=docker")


def test_a_stamp_that_does_not_fit_on_the_disk_leaves_no_temporary_file(tiny_disk: Path) -> None:
    """The stamp's write (after each refresh) and its probe's record again (a no-op refresh) on a full disk: the
    write fails (the callers let it: no stamp only costs the next no-op its speed), and left an empty temporary
    file in the stamps directory every time, which nothing removed."""
    path = stamp.stamp_path(tiny_disk, "full", "local")
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 0}')
    with (tiny_disk / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(bytes(4096))
    with pytest.raises(EngineUnavailable, match="disk full"):  # what the callers let go
        stamp._save(path, {"report": "x" * 10_000})
    stamp._record_again(path, '{"format": 0}', {"report": "x" * 10_000})  # says nothing: fast path lost
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert path.read_text() == '{"format": 0}'


def test_a_noop_refresh_the_stamp_answers_hands_a_left_list_of_bodies_to_a_refill(ws: Workspace) -> None:
    """A refill killed before it made the COPY bodies (a reboot, SIGKILL) left its list; the next refresh has
    nothing to load and the stamp answers it: it spawns a refill without clones for the list, detached, which
    makes them. Before: the stamp's path spawned none, and the bodies waited for the next refresh that loads, or
    `refresher warm`. A list a refill holds gets none (``body_keys.unheld``)."""
    from contextlib import closing

    from refresher import body_keys
    from refresher.bodies import layout
    from refresher.refresh import compute_plan
    from refresher.sources import make_source

    settle(ws)
    store = FeatureStore(ws.root / "store")
    with closing(make_source(ws_profile(ws))) as source:
        plan = compute_plan(ws_profile(ws), source, store, None)
    wanted = [
        body_keys.Wanted(key, segment.symbol, segment.month_label, "America/New_York")
        for segment, key in plan.keys.items()
        if segment.timeframe == "1m"
    ]
    assert len(store.read_bodies([each.key for each in wanted], layout())) == len(wanted) > 0
    for body in (store.root / "bodies").glob("*/*.body"):  # as if the refill was killed before making them
        body.unlink()
    keys = body_keys.keys_path(ws.root / "state", ws.profile)
    body_keys.add(keys, wanted)
    holder = body_keys.hold(keys)  # a stand-in for a refill still at the list: no other is spawned for it
    assert holder is not None and body_keys.pending(keys)
    try:
        assert stamped(ws.refresh())
        assert refillers(str(keys)) == [] and body_keys.read(keys)[0] == wanted
    finally:
        os.close(holder)
    assert keys.exists() and not body_keys.pending(keys)  # left, and no refill holds it
    assert stamped(ws.refresh())
    deadline = time.monotonic() + 120
    while keys.exists():
        assert time.monotonic() < deadline, (
            f"the list a killed refill left was never made: {keys.read_text()}"
        )
        time.sleep(0.1)
    assert len(store.read_bodies([each.key for each in wanted], layout())) == len(wanted)
    refills_gone(ws.profile)
