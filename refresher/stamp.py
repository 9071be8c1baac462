"""The refresh stamp: the proof, checked with the server's psql (or psycopg), that a CLI ``refresh`` has nothing
to do.

A no-op ``refresh`` through the full path imports pyarrow and DuckDB (about a second) to re-plan what nothing
changed. After each refresh that finished, the CLI writes a stamp into the state dir (atomically): the digest
of every file the profile was resolved from (the profile's own bytes, and its universe file's, found or not),
the code's (the source files' sizes and times, and the versions of the libraries that decide values or parse
the profile), until when the as-of stays the answer (the next session close of the profile's exchanges, so the
dates a profile resolves to cannot have moved before it), where the data went (engine, DSN, and the store's
generation as the refresh began: ``featurestore.generation``, which moves only when a key may have left the store
or changed content, so other profiles' and workers' additions to a shared store leave the stamp answering) and
what the database held then (the ledger version the pristine snapshot records, a digest of
``symbols``, every table present), and the report. The pool size asked for is compared with the one the
pristine snapshot's mark records (a changed ``--pool-size`` or $REFRESHER_POOL_SIZE is work to do; neither
given asks for the recorded size). A later ``refresh`` without flags checks each of them
against the running server and answers with that report, or falls through to the full refresh on any
difference or doubt: a changed profile file or code, an edited ledger, a dropped table, a missing snapshot, a
store another run removed from (gc, an eviction, a rebuild) or made anew, a passed session close, any error.

The check reads the profile's bytes, never parses them: the same bytes, code and libraries before the same
session close resolve to the same profile, and parsing costs pydantic, YAML and the feature registry (about as
long as the rest of the check).

Only synthetic sources are stamped: files and Postgres sources change outside anything checked here.

The server's answer, without psycopg: importing psycopg is about 0.2 s of CPU, two thirds of a stamped no-op
(issue 13). Whenever the server's state has been checked against the stamp with psycopg (the stamp's write, a
check through psycopg), one statement (``_probe_sql``: the very queries the check runs, their parameters merged
by psycopg, each query's rows as JSON) is run on the same connection, the stamp's own fields are checked against
its rows alone (``_vouched``), and the statement and those rows are kept in the stamp. A later check runs the
statement through the server's own psql (``ServerInfo.psql``, the local engine's), a process of a few
milliseconds, and answers when the rows are the same, no analysis is left unfinished and the pool asked for is
the one recorded: the same rows the psycopg check would read, which vouched for the stamp. Any difference, no
psql (Docker, compose), a psql that fails or an older stamp: the check through psycopg, which records the
statement's rows again when it answers (an analysis finished since, say).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featurestore.generation import MANIFEST_FILE, read_generation
from refresher._installed import installed_version
from refresher.calendar import next_close
from refresher.engines import sweep_private_tmps, write_private_json
from refresher.engines.base import ServerInfo
from refresher.errors import RefresherError
from refresher.settings import PoolSize, pool_as_asked

if TYPE_CHECKING:
    # At call time only, past the psql probe: psycopg and the snapshot and pool modules (which import it).
    import psycopg

    from refresher.profile import Profile

# Bump when a field is added or its meaning changes: an older stamp then proves nothing.
STAMP_FORMAT = 7
# What ``refresher.database.DDL`` creates (a test holds them equal): a table dropped by hand is work to do.
TABLES = ("symbols", "ohlcv_daily", "ohlcv_1min", "refresher_segments", "refresher_rejects")
# exchange_calendars: holidays, hence which bars exist; numpy: the generator's arithmetic; pydantic and PyYAML:
# what the profile's bytes resolve to, which the check takes on trust from the stamp.
_VALUE_LIBRARIES = ("exchange_calendars", "numpy", "pydantic", "pydantic_core", "pyyaml")
_PACKAGES = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "featurestore")

# How many of the tables named are missing, and the digest of ``symbols`` (UndefinedTable when it is missing).
_STATE_QUERY = (
    "SELECT (SELECT count(*) FROM unnest(%s::text[]) AS t(name) WHERE to_regclass(t.name) IS NULL), "
    "(SELECT md5(coalesce(string_agg(concat_ws('|', symbol, exchange, asset_class), E'\\n' ORDER BY symbol), ''))"
    " FROM symbols)"
)


def stamp_path(state_dir: Path, profile: str, engine: str) -> Path:
    """The stamp of ``profile``'s server on ``engine``: one per server, as a state dir may hold a profile's
    server on each engine (``--engine local`` and ``docker``, or `make refresh` and a CLI of another
    $REFRESHER_ENGINE), and a refresh of one must not void the other's stamp."""
    return state_dir / "stamps" / engine / f"{profile}.json"


def stampable(profile: Profile) -> bool:
    """Whether what the stamp checks decides the profile's data: not a files or Postgres source (they change
    outside anything checked here), nor a user's feature function (its module may change)."""
    from refresher.profile import SyntheticSourceSpec

    return isinstance(profile.source, SyntheticSourceSpec) and not any(
        ":" in use.spec.name for use in profile.features
    )


def _file_digest(path: Path) -> str | None:
    """The sha256 of the file's bytes; None when no file is there. An unreadable one raises OSError."""
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def input_digests(paths: Iterable[Path]) -> list[list[str | None]]:
    """[path, digest or None] of each file now, as ``Profile.inputs`` recorded them when the profile was read."""
    return [[str(path), _file_digest(path)] for path in paths]


def unchanged(inputs: Iterable[Sequence[str | None]], until: str | None, now: dt.datetime) -> bool:
    """Whether every input still holds the bytes recorded as [path, digest] (or is still absent) and, unless
    None, ``until`` (ISO; the next session close after the load) has not passed at ``now``."""
    return changed(inputs, until, now) is None


def changed(inputs: Iterable[Sequence[str | None]], until: str | None, now: dt.datetime) -> str | None:
    """What makes ``unchanged`` false, in words (``refresh -v``): ``until`` passed, or an input that appeared, is
    gone or changed since the load; None when nothing did. An unreadable input raises OSError."""
    if until is not None and now >= (close := dt.datetime.fromisoformat(until)):
        return f"the session close it answered until passed ({close.isoformat()}): the data window moves"
    recorded = [[str(path), digest] for path, digest in inputs]
    for (name, digest), (_, now_digest) in zip(
        recorded, input_digests(Path(str(path)) for path, _ in recorded), strict=True
    ):
        if now_digest != digest:
            what = "appeared" if digest is None else "is gone" if now_digest is None else "changed"
            return f"{name} {what} since the load"
    return None


def code_fingerprint() -> str:
    """Size and modification time of every source file of refresher and featurestore (about 1 ms), and the
    versions of the libraries that decide values or how a profile parses (``_VALUE_LIBRARIES``): an edit or an
    upgrade must not be answered by a stamp the old code wrote."""
    digest = hashlib.sha256()
    for library in _VALUE_LIBRARIES:
        digest.update(f"{library}=={installed_version(library)}\n".encode())
    for package in _PACKAGES:
        for path in sorted(package.rglob("*.py")):
            status = path.stat()
            digest.update(f"{path}:{status.st_size}:{status.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def store_state(store_root: Path) -> list[Any]:
    """[root, generation] of the store (``featurestore.generation``): read when a refresh begins, before its
    plan asks the store, and recorded by its stamp. The generation moves only when a key may have left the
    store or changed content, so another profile's (or checkout's, or worker's) additions leave the stamp
    answering. None (no store, no manifest, a store from before generations) answers nothing."""
    generation = read_generation(store_root) if (store_root / MANIFEST_FILE).is_file() else None
    return [str(store_root), generation]


def _database_state(conn: psycopg.Connection[Any], features: Sequence[str]) -> list[str | None] | None:
    """[ledger version, symbols digest] of the database; None when a table is missing: one of ``TABLES`` or of
    ``features``, the feature tables the ledger records rows in (``features.tables.feature_tables``, which the
    stamp records when written: an equal ledger version then means the same ledger). Two round trips."""
    import psycopg

    from refresher import snapshot

    try:
        row = conn.execute(_STATE_QUERY, ([*TABLES, *features],)).fetchone()
    except psycopg.errors.UndefinedTable:
        return None  # ``symbols``
    if row is None or row[0]:
        return None
    return [snapshot.ledger_version(conn), row[1]]


def _probe_sql(conn: psycopg.Connection[Any], server: ServerInfo, features: Sequence[str]) -> str:
    """One statement of the queries the check runs on ``conn`` (``_database_state``'s, ``ledger_version``'s,
    the pristine mark's and ``pool.unfinished_analyses``'), their parameters merged by psycopg, and the server's
    system identifier (a new cluster is another server): a JSON array of each query's rows."""
    from psycopg import ClientCursor

    from refresher import _planner_stats, _snapshot_sql, snapshot

    merge = ClientCursor(conn).mogrify
    queries = (
        merge(_STATE_QUERY, ([*TABLES, *features],)),
        snapshot._VERSION_QUERY.as_string(conn),
        merge(_snapshot_sql._COMMENT, (_snapshot_sql.pristine_name(server.dbname),)),
        merge(*_planner_stats.recorded_query(unattended=True)),
        "SELECT system_identifier FROM pg_control_system()",
    )
    rows = ", ".join(
        f"(SELECT coalesce(json_agg(row_to_json(ROW(q.*))), '[]') FROM ({q}) q)" for q in queries
    )
    return f"SELECT json_build_array({rows})"


def _vouched(rows: Any, stamp: dict[str, Any]) -> list[Any] | None:
    """The pool (size, chosen) the mark in ``_probe_sql``'s ``rows`` records, when those rows alone say what
    the check through psycopg would of ``stamp``: every table there, the counter armed, the ledger version and
    ``symbols`` as stamped, the pristine copy's mark on that version. None otherwise."""
    from refresher import _snapshot_sql, snapshot

    try:
        (state,), (version,), (comment,), _unfinished, _server = rows
        segments, features, writes, armed = (version[f"f{n}"] for n in range(1, 5))
        if state["f1"] != 0 or segments is None or not armed:
            return None
        ledger = snapshot.counter_version(segments, features, writes)
        mark = _snapshot_sql._mark_of((bool(comment["f1"]), str(comment["f2"])))
    except (TypeError, ValueError, KeyError):
        return None  # no row where one is expected (a missing pristine copy), or another shape
    if mark is None or mark.ledger != ledger or stamp.get("database") != [ledger, state["f2"]]:
        return None
    return [mark.pool.size, mark.pool.chosen]


def _record_probe(conn: psycopg.Connection[Any], server: ServerInfo, stamp: dict[str, Any]) -> dict[str, Any]:
    """The probe fields of ``stamp`` (``probe``, ``fingerprint``, ``pool``) from ``conn``'s server now; none
    when its rows do not vouch for the stamp (``_vouched``) or the statement fails."""
    import psycopg

    try:
        probe = _probe_sql(conn, server, [str(table) for table in stamp["feature_tables"]])
        row = conn.execute(probe).fetchone()
    except psycopg.Error:
        return {}
    if row is None or (pool_sizing := _vouched(row[0], stamp)) is None:
        return {}
    return {"probe": probe, "fingerprint": _fingerprint(row[0]), "pool": pool_sizing}


# What each of ``_fingerprint``'s rows is, for a message naming those that differ.
_PROBED = ("tables and symbols", "ledger version", "pristine copy's mark", "server's system identifier")


def _fingerprint(rows: list[Any]) -> list[Any]:
    """What of ``_probe_sql``'s rows must be as recorded: all but the unfinished analyses (a side job's)."""
    return [rows[0], rows[1], rows[2], rows[4]]


def _probed(stamp: dict[str, Any], server: ServerInfo, pool_size: PoolSize | None) -> bool:
    """Whether the server's psql reads the rows the stamp recorded (``_record_probe``), no analysis unfinished,
    and the recorded mark's pool is the one ``pool_size`` asks for (``pool_as_asked``). False on any doubt."""
    return _probe_doubt(stamp, server, pool_size) is None


def _probe_doubt(stamp: dict[str, Any], server: ServerInfo, pool_size: PoolSize | None) -> str | None:
    """Why the server's psql does not vouch for the stamp (``_probed``); None when it does."""
    probe, recorded, pool_sizing = stamp.get("probe"), stamp.get("fingerprint"), stamp.get("pool")
    if server.psql is None:
        return f"no psql for the {server.engine} engine"
    if not isinstance(probe, str) or recorded is None:
        return "no probe recorded (its rows did not vouch for the stamp when written)"
    if pool_size is not None and not (
        isinstance(pool_sizing, list) and len(pool_sizing) == 2 and pool_as_asked(pool_size, *pool_sizing)
    ):
        return f"pool size {pool_size} asked, the recorded mark says {pool_sizing} (size, chosen)"
    argv = [
        server.psql,
        "-X",
        "-q",
        "-w",
        "-A",
        "-t",
        "-h",
        server.host,
        "-p",
        str(server.port),
        "-U",
        server.user,
    ]
    # The password in the environment (a command line is readable by every user); libpq reads the rest of the
    # environment as psycopg's connect does.
    env = {**os.environ, "PGPASSWORD": server.password, "PGCONNECT_TIMEOUT": "10", "PGCLIENTENCODING": "UTF8"}
    try:
        done = subprocess.run(
            [*argv, "-d", server.dbname, "-c", probe],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"psql did not run ({exc})"
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        return f"psql failed (exit {done.returncode}: {said[0] if said else 'nothing said'})"
    try:
        rows = json.loads(done.stdout)
    except ValueError:
        return "psql's answer is not the probe's JSON"
    if not isinstance(rows, list) or len(rows) != 5:
        return "psql's answer is not the probe's rows"
    if rows[3]:
        return "an analysis of a pool database is unfinished"
    differ = [
        name for name, now, then in zip(_PROBED, _fingerprint(rows), recorded, strict=False) if now != then
    ]
    if differ or len(recorded) != len(_PROBED):
        return f"the server's rows differ from the recorded ones ({', '.join(differ) or 'recorded rows'})"
    return None


def _stamped_state(conn: psycopg.Connection[Any]) -> tuple[list[str], list[str | None] | None]:
    """What ``write`` records of the database: the feature tables the ledger records rows in (quoted) and
    ``_database_state`` (None when one of them is missing). Four round trips, each of a row, or a row a feature."""
    # Here only: the full refresh that just ran has imported what ``features.tables`` needs (pyarrow).
    from refresher.features.tables import feature_tables

    features = feature_tables(conn)
    tables = [table.relation for table in features]
    return tables, _database_state(conn, tables) if all(table.present for table in features) else None


def valid_until(profile: Profile, now: dt.datetime) -> dt.datetime:
    """Until when ``profile`` resolves as it does at ``now``: the next session close of its exchanges (its last
    completed session, the default end, moves then)."""
    exchanges = {profile.exchange, *(listing.exchange for listing in profile.listings)}
    return min(next_close(exchange, now) for exchange in sorted(exchanges))


def clear(state_dir: Path, profile: str, engine: str) -> None:
    """Forget the stamp of ``profile``'s server on ``engine``: a refresh is about to change its database."""
    stamp_path(state_dir, profile, engine).unlink(missing_ok=True)


def write(
    state_dir: Path, store: list[Any], profile: Profile, server: ServerInfo, report: dict[str, Any]
) -> str | None:
    """Stamp a refresh that just finished (under the profile lock); why not when it cannot be stamped.
    ``store``: ``store_state`` as the refresh began (a removal since then leaves a stamp that does not answer)."""
    if not stampable(profile):
        return (
            "a files or Postgres source, or a feature of a user's module, changes outside what a stamp checks"
        )
    if not profile.inputs:
        return "the profile was not read from a file"
    if store[1] is None:
        return f"the store at {store[0]} had no generation when the refresh began"
    import psycopg

    from refresher import snapshot

    inputs = [[str(path), digest] for path, digest in profile.inputs]
    now = dt.datetime.now(dt.UTC)
    with psycopg.connect(server.dsn(), autocommit=True, connect_timeout=10) as conn:
        tables, state = _stamped_state(conn)
        pristine = snapshot.pristine_ledger(server, conn)
        # no consistent snapshot of what the database holds: nothing to vouch for
        if state is None or state[0] is None:
            return "a table is missing from the database"
        if pristine != state[0]:
            return "the pristine copy is not of the database's ledger"
        stamp = {
            "format": STAMP_FORMAT,
            "profile": profile.name,
            "inputs": inputs,
            "code": code_fingerprint(),
            "valid_until": valid_until(profile, now).isoformat(),
            "engine": server.engine,
            "dsn": server.dsn(with_password=False),
            "store": store,
            "database": state,
            "feature_tables": tables,
            "report": report,
        }
        if server.psql is not None:  # no psql, no probe to record (Docker, compose)
            stamp.update(_record_probe(conn, server, stamp))
    path = stamp_path(state_dir, profile.name, server.engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, stamp)
    return None


def _save(path: Path, stamp: dict[str, Any]) -> None:
    """Write ``stamp`` atomically (a reader sees the old stamp, the new one, or none); a failed write (a full
    disk, Ctrl-C) leaves no temporary file, and one a killed writer left is swept by a later save."""
    sweep_private_tmps(path.parent, path.name)
    write_private_json(path, stamp)


@dataclass(frozen=True)
class Verdict:
    """What ``verdict`` found: the no-op's report (None: refresh in full) and, in words, how the stamp answered
    or why it did not (``refresh -v`` prints it)."""

    report: dict[str, Any] | None
    why: str


class _Void(Exception):
    """The stamp does not answer, for the reason given."""


def check(
    state_dir: Path, store_root: Path, profile_file: Path, server: ServerInfo, *, pool_size: PoolSize | None
) -> dict[str, Any] | None:
    """The report of a refresh with nothing to do, when the stamp proves it; None: refresh in full
    (``verdict``'s report)."""
    return verdict(state_dir, store_root, profile_file, server, pool_size=pool_size).report


def verdict(
    state_dir: Path, store_root: Path, profile_file: Path, server: ServerInfo, *, pool_size: PoolSize | None
) -> Verdict:
    """Whether the stamp proves a refresh has nothing to do (its report then), and how or why not.

    ``profile_file`` is the file the command's ``--profile`` names (``profile_files.find_profile_file``); the
    profile is ``server``'s, named after the file. ``pool_size``: the pool the refresh asks for; another than
    the pristine copy's mark records as the user's choice is work (``pool.resize_pool``). None asks for what the
    mark records.
    """
    started = time.perf_counter()
    path = stamp_path(state_dir, profile_file.stem, server.engine)
    try:
        text, stamp = _read(path)
        features = _check_inputs(stamp, profile_file)
        _check_target(stamp, store_root, server, profile_file.stem)
    except _Void as void:
        return Verdict(None, str(void))
    dsn = server.dsn(with_password=False)
    doubt = _probe_doubt(stamp, server, pool_size)
    if doubt is None:
        return Verdict(
            _noop_report(stamp["report"], dsn, time.perf_counter() - started), "answered through psql"
        )
    try:
        _check_database(path, text, stamp, server, features, pool_size)
    except _Void as void:
        return Verdict(None, f"{void} (psql: {doubt})")
    return Verdict(
        _noop_report(stamp["report"], dsn, time.perf_counter() - started),
        f"answered through psycopg (psql: {doubt})",
    )


def _read(path: Path) -> tuple[str, dict[str, Any]]:
    """The stamp's text and fields; _Void when there is none of this format."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise _Void(
            f"no stamp at {path} (the last refresh wrote none, or one cleared it before loading and did not finish)"
        ) from None
    except OSError as exc:
        raise _Void(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        stamp = json.loads(text)
    except ValueError:
        raise _Void(f"{path} is not JSON (torn or edited)") from None
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT:
        found = stamp.get("format") if isinstance(stamp, dict) else None
        raise _Void(f"{path} is of format {found!r}, this refresher's is {STAMP_FORMAT}")
    return text, stamp


def _check_inputs(stamp: dict[str, Any], profile_file: Path) -> list[str]:
    """The feature tables the stamp records; _Void unless the file the name finds now is the one the stamped
    profile was read from, every input holds the same bytes (or is still absent), and the session close the
    stamp was valid until has not passed."""
    try:
        inputs = [[str(path), digest] for path, digest in stamp["inputs"]]
        features = [str(table) for table in stamp["feature_tables"]]
        if inputs[0][0] != str(profile_file.absolute()):
            raise _Void(
                f"the profile is now read from {profile_file.absolute()}, the stamp's from {inputs[0][0]}"
            )
        why = changed(inputs, str(stamp["valid_until"]), dt.datetime.now(dt.UTC))
        if why is not None:
            raise _Void(why)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise _Void(f"malformed stamp ({type(exc).__name__}: {exc})") from None
    except OSError as exc:
        raise _Void(f"cannot read an input of the profile: {exc}") from None
    return features


def _check_target(stamp: dict[str, Any], store_root: Path, server: ServerInfo, profile: str) -> None:
    """_Void unless the stamp is of ``profile``, its server (engine, DSN), store and code."""
    expected = {
        "profile": profile,
        "engine": server.engine,
        "dsn": server.dsn(with_password=False),
        "store": store_state(store_root),
    }
    for key, value in expected.items():
        if stamp.get(key) != value or (key == "store" and value[1] is None):
            said = (
                "of another generation (a key may have left it or changed)" if key == "store" else "another"
            )
            raise _Void(f"the {key} is {said}: stamped {stamp.get(key)!r}, now {value!r}")
    if stamp.get("code") != code_fingerprint():
        raise _Void("the code changed (a source file of refresher or featurestore, or a library's version)")


def _check_database(
    path: Path,
    text: str,
    stamp: dict[str, Any],
    server: ServerInfo,
    features: list[str],
    pool_size: PoolSize | None,
) -> None:
    """The check through psycopg: _Void unless the database holds what the stamp vouches for, its pristine
    copy is of that ledger and the pool asked for is the recorded one; then records the probe's rows again."""
    import psycopg

    from refresher import pool, snapshot
    from refresher.errors import SnapshotError

    try:
        with psycopg.connect(server.dsn(), autocommit=True, connect_timeout=10) as conn:
            state = _database_state(conn, features)
            pristine = snapshot.pristine_ledger(server, conn)
            recorded = pool.recorded_pool(server, conn)
            unfinished = pool.unfinished_analyses(conn)
            probe = _record_probe(conn, server, stamp) if server.psql is not None else {}
    except (psycopg.Error, SnapshotError) as exc:
        # whatever it is, the full refresh meets it and says it properly
        first = str(exc).strip().splitlines()
        raise _Void(f"the server's answer: {first[0] if first else type(exc).__name__}") from None
    if state is None:
        raise _Void(f"a table is missing (one of {', '.join([*TABLES, *features])})")
    stamped = stamp.get("database")
    if not isinstance(stamped, list) or state[0] != stamped[0]:
        raise _Void("the ledger was written (or its tables made again) since the stamp")
    if state[1] != stamped[1]:
        raise _Void("the symbols table changed since the stamp")
    if pristine != state[0]:
        raise _Void("the pristine copy is missing or of another ledger" if pristine else "no pristine copy")
    if pool_size is not None and (
        recorded is None or not pool_as_asked(pool_size, recorded.size, recorded.chosen)
    ):
        chosen = (
            None if recorded is None else f"{recorded.size} ({'chosen' if recorded.chosen else 'default'})"
        )
        raise _Void(f"pool size {pool_size} asked, the pristine copy records {chosen}")
    if unfinished:  # a reset's analyzer was killed (or is still at it): the next command finishes it
        pool.spawn_refill(server, fill=False)
    if probe and any(stamp.get(k) != v for k, v in probe.items()):
        _record_again(path, text, {**stamp, **probe})


def _record_again(path: Path, text: str, stamp: dict[str, Any]) -> None:
    """Save ``stamp`` (read as ``text``, its probe fields recorded again) unless another command replaced or
    cleared it meanwhile. A stamp a refresh replaced in the instant between is lost, never wrong: the recorded
    rows vouch for what the server held (``_record_probe``), and a later change makes them differ."""
    try:
        if path.read_text() == text:
            _save(path, stamp)
    except (OSError, RefresherError):
        pass  # a read-only state dir, a full disk: the check through psycopg answers next time too


def _noop_report(stamped: dict[str, Any], dsn: str, seconds: float) -> dict[str, Any]:
    """The stamped refresh's report as the full path would give it for a run that does nothing."""
    segments, features = dict(stamped["segments"]), dict(stamped["features"])
    segments.update(present=segments["desired"], loaded=0, pruned=0, fetched=0)
    features.update(loaded=0, computed=0, rows_loaded=0, pruned=0)
    return {
        **stamped,
        "dsn": dsn,
        "segments": segments,
        "rows_loaded": 0,
        "seconds": round(seconds, 3),
        "store": {"hits": 0, "misses": 0},  # the store was not asked
        "features": features,
        "snapshot": "unchanged",
        "phases": {"stamp": round(seconds, 4)},
        "notes": [note for note in stamped.get("notes", []) if not note.startswith("store:")],
        "pool_disk": None,  # no refill spawned: nothing to say of the disk (a stamp's was of its run's)
    }


__all__ = [
    "MANIFEST_FILE",
    "STAMP_FORMAT",
    "TABLES",
    "Verdict",
    "changed",
    "check",
    "clear",
    "code_fingerprint",
    "input_digests",
    "stampable",
    "store_state",
    "unchanged",
    "verdict",
    "write",
]
