"""A user's own feature function from the profile: loaded like a built-in, or refused in one line."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from featurestore import FeatureStore
from refresher.errors import FeatureError, ProfileError
from refresher.features import cached, modules, refresh_features, registry
from refresher.features.cached import compute_features, daily_frame
from refresher.profile import Profile
from refresher.replay import RefreshWrites
from tests.refresher.test_features_load import conn, run, store, stored_plan, table_rows, write_profile

pytestmark = pytest.mark.postgres
__all__ = ["conn", "store"]  # fixtures, imported to be found

SIGNALS = '''
import datetime as dt
import functools
import pandas as pd

def compute(df, *, window: int = 5, scale: float = 1.0):
    """Close over its mean of the last ``window`` bars, times ``scale``."""
    return pd.DataFrame({"ratio": df["close"] / df["close"].rolling(window).mean() * scale}, index=df.index)

def raises(df):
    raise ZeroDivisionError("no edge in\\nthis market")

def short(df):
    return pd.DataFrame({"x": df["close"].iloc[:-1]})

def text(df):
    return pd.DataFrame({"label": "up"}, index=df.index)

def a_list(df):
    return list(df["close"])

def since(df, *, start: dt.date = dt.date(2024, 5, 1)):
    return pd.DataFrame({"close": df["close"].where(df.index >= pd.Timestamp(start))}, index=df.index)

class Opaque:
    pass

def opaque(df, *, how=Opaque()):
    return pd.DataFrame({"close": df["close"]}, index=df.index)

def infinite(df):
    up = (df["close"] > df["open"]).astype(float)
    return pd.DataFrame({"ratio": up / 0.0}, index=df.index)  # inf where the bar rose, NaN where it did not

def exits(df):
    raise SystemExit(0)

class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("its message cannot be read")

def unprintable(df):
    raise Unprintable()

def verbose(df):
    raise ValueError("x" * 100_000)

def extension(df):
    """Numbers in pandas' extension types: sparse, and nullable integers with a missing value."""
    up = pd.array([None, *(df["close"].diff().iloc[1:] > 0)], dtype="Int64")
    return pd.DataFrame({"close": pd.arrays.SparseArray(df["close"].to_numpy()), "up": up}, index=df.index)

def complex_(df):
    return pd.DataFrame({"z": df["close"] + 1j}, index=df.index)

CALLS = []

def data_dependent(df):
    CALLS.append(1)  # the first symbol gets one column, the others two
    return pd.DataFrame({"a": df["close"], **({"b": df["open"]} if len(CALLS) > 1 else {})}, index=df.index)

def scales_in_place(df):
    df["close"] *= 1000.0
    return pd.DataFrame({"thousands": df["close"]}, index=df.index)

SCALE = 2.0

def _scaled(close):
    return close * SCALE

def scaled(df):
    return pd.DataFrame({"scaled": _scaled(df["close"])}, index=df.index)

def _times(df, *, k):
    return pd.DataFrame({"scaled": _scaled(df["close"]) * k}, index=df.index)

scaled_once = functools.partial(_times, k=1.0)

def from_file(df):
    """Close times the k of k.json beside this module: data the key cannot see."""
    import json, pathlib
    k = json.loads(pathlib.Path(__file__).with_name("k.json").read_text())["k"]
    return pd.DataFrame({"x": df["close"] * k}, index=df.index)

def configured(df):
    """One column per name in $SIGNAL_COLUMNS: what it returns changes with no input of its key changing."""
    import os
    return pd.DataFrame({c: df["close"] for c in os.environ["SIGNAL_COLUMNS"].split(",")}, index=df.index)
'''


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"signals_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(SIGNALS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def profile_of(tmp_path: Path, entries: str) -> Profile:
    return write_profile(tmp_path, "AAA, BBB", features=entries)


def test_a_user_function_loads_with_its_parameters(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    entries = f'dashboard_data, {{name: my_signal, function: "{module}:compute", params: {{window: 3}}, timeframe: 1d}}'
    profile = profile_of(tmp_path, entries)
    counts = run(conn, profile, store)
    assert (counts.loaded, counts.computed) == (4, 4)
    rows = table_rows(conn, "features_my_signal", "AAA")
    assert [r[2] is None for r in rows[:3]] == [True, True, False]
    assert all(0.5 < r[2] < 1.5 for r in rows[2:])
    # Another parameter value reloads that entry only.
    again = run(conn, profile_of(tmp_path, entries.replace("window: 3", "window: 4")), store)
    assert (again.loaded, again.computed) == (2, 2)


def test_a_date_parameter_loads_and_a_new_date_reloads(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    # YAML reads 2024-06-03 as a date; the function's own default is one too.
    for params, first in (("", dt.date(2024, 5, 1)), (", params: {start: 2024-06-03}", dt.date(2024, 6, 3))):
        counts = run(conn, profile_of(tmp_path, f'{{name: mine, function: "{module}:since"{params}}}'), store)
        assert (counts.loaded, counts.computed) == (2, 2)
        rows = table_rows(conn, "features_mine", "AAA")
        assert min(r[1] for r in rows if r[2] is not None) == first


def test_nan_loads_as_null_and_infinity_as_it_is(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    run(conn, profile_of(tmp_path, f'{{name: mine, function: "{module}:infinite"}}'), store)
    values = {r[2] for r in table_rows(conn, "features_mine", "AAA")}
    assert values == {None, math.inf}


def test_numbers_of_pandas_extension_types_load_as_doubles(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    # A sparse column the store's Parquet cannot hold was a traceback (TypeError from pyarrow), not a load.
    profile = profile_of(tmp_path, f'{{name: mine, function: "{module}:extension"}}')
    assert run(conn, profile, store).loaded == 2
    plan = stored_plan(profile, store)
    bars = daily_frame(
        list(store.get_many([plan.keys[s] for s in plan.desired if s.symbol == "AAA"]).values())
    )
    rows = table_rows(conn, "features_mine", "AAA")
    assert [r[2] for r in rows] == list(bars["close"])
    assert rows[0][3] is None and {r[3] for r in rows[1:]} == {0.0, 1.0}


def test_a_parameter_the_store_cannot_key_names_file_field_and_value(tmp_path: Path, module: str) -> None:
    with pytest.raises(ProfileError) as info:
        profile_of(tmp_path, f'{{name: mine, function: "{module}:opaque"}}')
    assert info.value.field == "features.0.params.how"
    assert "type Opaque cannot be part of the feature's key" in str(info.value)


def test_a_function_writing_to_its_input_changes_no_other_features_rows(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    # The user's entry comes first and scales the close it is given in place; the entries after it read the
    # same symbol's bars.
    entries = f'{{name: mine, function: "{module}:scales_in_place"}}, dashboard_data, {{name: again, function: "{module}:compute"}}'
    profile = profile_of(tmp_path, entries)
    plan = stored_plan(profile, store)
    refresh_features(conn, profile, store, plan)
    bars = daily_frame(
        list(store.get_many([plan.keys[s] for s in plan.desired if s.symbol == "AAA"]).values())
    )
    assert [r[2] for r in table_rows(conn, "features_mine", "AAA")] == pytest.approx(
        list(bars["close"] * 1000)
    )
    changes = [r[2] for r in table_rows(conn, "features_dashboard_data", "AAA")]
    assert changes[1:] == pytest.approx(list(bars["close"].diff()[1:]), rel=1e-12)
    ratios = [r[2] for r in table_rows(conn, "features_again", "AAA")][4:]
    assert ratios == pytest.approx(list((bars["close"] / bars["close"].rolling(5).mean())[4:]), rel=1e-12)


def test_built_in_rows_an_older_version_computed_from_a_written_input_are_computed_again(
    tmp_path: Path,
    module: str,
    conn: psycopg.Connection[Any],
    store: FeatureStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before 3a3a0a5 a user's function writing to its input frame changed the rows of the built-in entries after
    it, which were stored and recorded in the ledger under the built-ins' version 1: an upgraded refresher found
    both current and kept the wrong rows. The state is made by hand as that version left it: version 1 (today's
    functions' source is theirs), the user's function given the shared frame."""
    entries = f'{{name: mine, function: "{module}:scales_in_place"}}, dashboard_data'
    with monkeypatch.context() as old:
        old.setattr(
            registry,
            "FEATURES",
            {name: dataclasses.replace(spec, version="1") for name, spec in registry.FEATURES.items()},
        )
        old.setattr(registry.FeatureSpec, "is_user", property(lambda spec: False))  # no copy for anyone
        run(conn, profile_of(tmp_path, entries), store)
    plan = stored_plan(profile_of(tmp_path, entries), store)
    bars = daily_frame(
        list(store.get_many([plan.keys[s] for s in plan.desired if s.symbol == "AAA"]).values())
    )
    assert [r[2] for r in table_rows(conn, "features_dashboard_data", "AAA")][1:] != pytest.approx(
        list(bars["close"].diff()[1:]), rel=1e-12
    )  # what the older version loaded

    run(conn, profile_of(tmp_path, entries), store)

    changes = [r[2] for r in table_rows(conn, "features_dashboard_data", "AAA")]
    assert changes[1:] == pytest.approx(list(bars["close"].diff()[1:]), rel=1e-12)


@pytest.mark.parametrize("function", ["scaled", "scaled_once"])  # a function, a functools.partial of one
def test_editing_a_helper_beside_the_function_recomputes_it(
    tmp_path: Path,
    module: str,
    conn: psycopg.Connection[Any],
    store: FeatureStore,
    monkeypatch: pytest.MonkeyPatch,
    function: str,
) -> None:
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # each run a fresh process: the source as it is now
    entries = f'{{name: mine, function: "{module}:{function}"}}, dashboard_data'
    first = run(conn, profile_of(tmp_path, entries), store)
    assert first.loaded == 4
    closes = [r[2] for r in table_rows(conn, "features_mine", "AAA")]
    # The function's own lines are the same; the constant its helper reads is not.
    source = tmp_path / f"{module}.py"
    source.write_text(source.read_text().replace("SCALE = 2.0", "SCALE = 3.0"))
    monkeypatch.delitem(sys.modules, module)
    importlib.invalidate_caches()
    second = run(conn, profile_of(tmp_path, entries), store)
    assert (second.loaded, second.computed) == (2, 2)
    assert [r[2] for r in table_rows(conn, "features_mine", "AAA")] == pytest.approx(
        [c * 1.5 for c in closes]
    )


def test_an_entrys_version_recomputes_what_its_key_cannot_see(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    # The function reads a data file: editing it changes no source, so nothing recomputes (documented). There was
    # no way to say so but to edit the function or invent a parameter; `version:` is part of the key.
    def profile(version: str = "") -> Profile:
        return profile_of(tmp_path, f'{{name: mine, function: "{module}:from_file"{version}}}')

    (tmp_path / "k.json").write_text('{"k": 2}')
    assert run(conn, profile(), store).computed == 2
    values = [r[2] for r in table_rows(conn, "features_mine", "AAA")]
    (tmp_path / "k.json").write_text('{"k": 3}')
    assert run(conn, profile(), store).computed == 0
    assert run(conn, profile(", version: 2"), store).computed == 2
    assert [r[2] for r in table_rows(conn, "features_mine", "AAA")] == pytest.approx(
        [v * 1.5 for v in values]
    )
    # The same version again: nothing to do; one that cannot be a key's word, in one line.
    assert run(conn, profile(", version: 2"), store).loaded == 0
    for bad in ("2.5", "true", "'a b'", "[1]"):
        with pytest.raises(ProfileError, match=r"features\.0\.version=.*: a version is a whole number"):
            profile(f", version: {bad}")


@pytest.mark.parametrize(
    ("function", "reason"),
    [
        ("raises", "ZeroDivisionError: no edge in"),
        ("short", "returned 82 rows on another index, not one per bar (83, by date)"),
        ("text", "column 'label' is str, not numeric"),
        ("a_list", "returned list, not a pandas DataFrame"),
        ("complex_", "column 'z' is complex128, not real numbers"),
        ("exits", "SystemExit: 0"),
        ("unprintable", "Unprintable (its message could not be read: RuntimeError)"),
        ("verbose", "ValueError: xxxxxxxxxx"),
    ],
)
def test_a_failing_function_is_one_line_and_loads_nothing_of_its_own(
    tmp_path: Path,
    module: str,
    conn: psycopg.Connection[Any],
    store: FeatureStore,
    function: str,
    reason: str,
) -> None:
    profile = profile_of(tmp_path, f'[{{name: bad, function: "{module}:{function}"}}, dashboard_data]'[1:-1])
    with pytest.raises(FeatureError) as info:
        refresh_features(conn, profile, store, stored_plan(profile, store))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message[:400]
    # The entry and where its code is: the table's name alone did not say which function failed.
    assert message.startswith(f"feature bad ({module}:{function}), symbol AAA: ") and reason in message, (
        message
    )
    assert info.value.fields == {"feature": "bad", "symbol": "AAA", "function": f"{module}:{function}"}
    # Nothing of the failing entry; the other feature loaded in full.
    assert conn.execute("SELECT to_regclass('features_bad')").fetchone() == (None,)
    ledger = conn.execute("SELECT feature, count(*) FROM refresher_features GROUP BY 1").fetchall()
    assert ledger == [("dashboard_data", 2)]


def test_a_function_whose_columns_differ_by_symbol_is_one_line_and_loads_nothing_of_its_own(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], store: FeatureStore
) -> None:
    profile = profile_of(tmp_path, f'{{name: bad, function: "{module}:data_dependent"}}, dashboard_data')
    with pytest.raises(FeatureError) as info:
        refresh_features(conn, profile, store, stored_plan(profile, store))
    assert str(info.value) == (
        f"feature bad ({module}:data_dependent), symbol BBB: returned columns ['a', 'b'], AAA ['a']: every "
        "symbol needs the same, in order; "
        "nothing of bad was loaded"
    )
    assert conn.execute("SELECT to_regclass('features_bad')").fetchone() == (None,)
    ledger = conn.execute("SELECT feature, count(*) FROM refresher_features GROUP BY 1").fetchall()
    assert ledger == [("dashboard_data", 2)]


@pytest.mark.parametrize(
    ("entry", "field", "value"),
    [
        ('{name: s, function: "no_such_module_xyz:f"}', "features.0.function", "no_such_module_xyz:f"),
        ('{name: s, function: "{module}:nope"}', "features.0.function", ":nope"),
        ('{name: s, function: "{module}"}', "features.0.function", "signals_"),
        ('{name: s, function: "{module}:compute", params: {windw: 3}}', "features.0.params.windw", "3"),
        ('{name: s, function: "{module}:compute", params: {window: "3"}}', "features.0.params.window", "'3'"),
        ('{name: s, function: "{module}:compute", timeframe: 1m}', "features.0.timeframe", "1m"),
        ('{name: S-1, function: "{module}:compute"}', "features.0.name", "S-1"),
    ],
)
def test_a_bad_function_entry_names_file_field_and_value(
    tmp_path: Path, module: str, entry: str, field: str, value: str
) -> None:
    with pytest.raises(ProfileError) as info:
        profile_of(tmp_path, entry.replace("{module}", module))
    assert info.value.field == field and value in str(info.value) and "\n" not in str(info.value)


def test_a_module_that_exits_when_imported_names_file_field_and_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"script_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import sys\nsys.exit(2)  # a script's argument parsing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ProfileError) as info:
        profile_of(tmp_path, f'{{name: s, function: "{name}:compute"}}')
    assert info.value.field == "features.0.function"
    assert str(info.value).endswith(f"cannot import {name}: SystemExit: 2")


def warm(tmp_path: Path, profile: Profile, *flags: str) -> subprocess.CompletedProcess[str]:
    """``refresher warm`` of ``profile`` in a process of its own, finding the modules written in ``tmp_path``."""
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "FEATURE_STORE_PATH": str(tmp_path / "store")}
    command = ["warm", "--profile", str(profile.path), "--as-of", "2024-06-28", *flags]
    return subprocess.run(
        [sys.executable, "-m", "refresher.cli", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_the_cli_says_it_in_one_line_and_exits_2(tmp_path: Path, module: str) -> None:
    profile = write_profile(tmp_path, "AAA", features=f'{{name: bad, function: "{module}:raises"}}')
    done = warm(tmp_path, profile)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"refresher: feature bad ({module}:raises), symbol AAA: ZeroDivisionError: no edge in; "
        "nothing of bad was loaded"
    ]


@pytest.mark.parametrize("flags", [["--json"], []], ids=["json", "plain"])
def test_what_a_users_module_prints_goes_to_stderr_never_into_the_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str]
) -> None:
    # print(), and below Python's sys.stdout: a write to fd 1, C's buffered printf (a C extension's), a child's echo.
    name = f"chatty_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import ctypes, os\n"
        "import pandas as pd\n"
        'print("imported")\n'
        'os.write(1, b"fd write at import\\n")\n'
        "def compute(df):\n"
        '    print("computed", len(df))\n'
        '    ctypes.CDLL(None).printf(b"c printf %d\\n", len(df))\n'
        '    os.system("echo child echo")\n'
        '    return pd.DataFrame({"x": df["close"]}, index=df.index)\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    profile = write_profile(tmp_path, "AAA", features=f'{{name: chatty, function: "{name}:compute"}}')
    done = warm(tmp_path, profile, *flags)
    assert done.returncode == 0, done.stderr
    for line in ("imported", "computed 83", "fd write at import", "c printf 83", "child echo"):
        assert line in done.stderr and line not in done.stdout, (line, done.stdout)
    if flags:
        assert json.loads(done.stdout)["computed"] == 1


def test_two_threads_run_users_functions_at_once(tmp_path: Path, module: str) -> None:
    # A worker's threads each refresh a profile: neither waits for the other's call into a user's function (each
    # call here waits until both are inside one; a call at a time broke the barrier, a FeatureError).
    source = tmp_path / f"{module}.py"
    source.write_text(
        source.read_text()
        + "\nimport threading\nBOTH = threading.Barrier(2, timeout=30)\n"
        + "def together(df):\n    BOTH.wait()\n    return compute(df)\n"
    )
    runs = []
    for n in range(2):
        (tmp_path / str(n)).mkdir()
        profile = write_profile(
            tmp_path / str(n), "AAA", features=f'{{name: mine, function: "{module}:together"}}'
        )
        runs.append((profile, FeatureStore(tmp_path / str(n) / "store")))
    plans = [stored_plan(profile, store) for profile, store in runs]
    with ThreadPoolExecutor(2) as pool:
        done = [
            pool.submit(lambda p, s, plan: list(compute_features(p, s, plan)), profile, store, plan)
            for (profile, store), plan in zip(runs, plans, strict=True)
        ]
        batches = [future.result() for future in done]
    assert [[part.symbol for b in bs for part in b.parts] for bs in batches] == [["AAA"], ["AAA"]]


def test_each_entrys_version_is_computed_once_per_refresh(
    tmp_path: Path, module: str, store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A user's function is versioned by reading and hashing its modules' source: once per entry, not per use.
    profile = profile_of(tmp_path, f'{{name: mine, function: "{module}:compute"}}, dashboard_data')
    plan = stored_plan(profile, store)
    versioned: list[str] = []
    version = cached._version
    monkeypatch.setattr(
        cached, "_version", lambda spec, *seen: versioned.append(spec.name) or version(spec, *seen)
    )
    assert [batch.use.name for batch in compute_features(profile, store, plan)] == ["mine", "dashboard_data"]
    assert sorted(versioned) == sorted(["dashboard_data", f"{module}:compute"])


def columns_of(conn: psycopg.Connection[Any], table: str) -> list[str]:
    query = (
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position"
    )
    return [name for (name,) in conn.execute(query, (table,))]


def test_new_columns_for_one_new_symbol_reload_every_symbol_into_the_rebuilt_table(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The function now returns two columns; of its inputs only CCC's are new (it joined the profile). Its table is
    # rebuilt for the new columns: every symbol's rows go into it, in the one transaction, AAA and BBB's too.
    entry = f'{{name: mine, function: "{module}:configured"}}'
    monkeypatch.setenv("SIGNAL_COLUMNS", "a")
    run(conn, write_profile(tmp_path, "AAA, BBB", features=entry), FeatureStore(tmp_path / "store"))
    monkeypatch.setenv("SIGNAL_COLUMNS", "a,b")
    # A store without the old rows (another machine's, or collected): computed anew, they have the new columns.
    counts = run(
        conn, write_profile(tmp_path, "AAA, BBB, CCC", features=entry), FeatureStore(tmp_path / "new")
    )
    assert (counts.loaded, counts.computed) == (3, 3)
    assert columns_of(conn, "features_mine") == ["symbol", "date", "a", "b"]
    for symbol in ("AAA", "BBB", "CCC"):
        rows = table_rows(conn, "features_mine", symbol)
        assert len(rows) == 83 and all(r[2] == r[3] for r in rows), symbol
    ledger = conn.execute("SELECT symbol, rows FROM refresher_features ORDER BY 1").fetchall()
    assert ledger == [("AAA", 83), ("BBB", 83), ("CCC", 83)]


def test_new_columns_the_stored_rows_of_other_symbols_lack_load_nothing_and_keep_the_old_table(
    tmp_path: Path,
    module: str,
    conn: psycopg.Connection[Any],
    store: FeatureStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same, with the store still holding AAA and BBB's rows of one column (their key did not change): the
    # table cannot hold every symbol's rows. Nothing of the feature changes, and the error says why.
    entry = f'{{name: mine, function: "{module}:configured"}}'
    monkeypatch.setenv("SIGNAL_COLUMNS", "a")
    run(conn, write_profile(tmp_path, "AAA, BBB", features=entry), store)
    before = conn.execute("SELECT * FROM features_mine ORDER BY symbol, date").fetchall()
    ledger = conn.execute("SELECT * FROM refresher_features ORDER BY symbol").fetchall()
    monkeypatch.setenv("SIGNAL_COLUMNS", "a,b")
    with pytest.raises(FeatureError) as info:
        run(conn, write_profile(tmp_path, "AAA, BBB, CCC", features=entry), store)
    assert str(info.value) == (
        f"feature mine ({module}:configured), symbol CCC: returned columns ['a', 'b'], AAA ['a']: every symbol "
        "needs the same, in order; "
        "nothing of mine was loaded"
    )
    assert conn.execute("SELECT * FROM features_mine ORDER BY symbol, date").fetchall() == before
    assert conn.execute("SELECT * FROM refresher_features ORDER BY symbol").fetchall() == ledger


def test_a_rebuild_replays_into_the_pristine_copy_as_a_rebuild(
    tmp_path: Path, module: str, conn: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``refresher.replay`` writes a refresh's loads again into a clone of the database as it was: a rebuild too,
    # though DDD (gone from the profile, no --prune) has rows in the clone's table that the parts do not replace.
    entry = f'{{name: mine, function: "{module}:configured"}}'
    old, new = write_profile(tmp_path, "AAA, BBB, DDD", features=entry), FeatureStore(tmp_path / "new")
    monkeypatch.setenv("SIGNAL_COLUMNS", "a")
    run(conn, old, FeatureStore(tmp_path / "store"))
    monkeypatch.setenv("SIGNAL_COLUMNS", "a,b")
    profile = write_profile(tmp_path, "AAA, BBB, CCC", features=entry)
    writes = RefreshWrites(profile, base="")
    refresh_features(conn, profile, new, stored_plan(profile, new), on_loaded=writes.loaded_features)
    assert [rebuild for _name, _parts, rebuild in writes.features] == [True]
    after = conn.execute("SELECT * FROM features_mine ORDER BY symbol, date").fetchall()
    # The database as it was (the same rows again: its store has them, of one column), then the replay.
    monkeypatch.setenv("SIGNAL_COLUMNS", "a")
    run(conn, old, FeatureStore(tmp_path / "store"))
    assert conn.execute("SELECT DISTINCT symbol FROM features_mine ORDER BY 1").fetchall() == [
        ("AAA",),
        ("BBB",),
        ("DDD",),
    ]
    writes.apply(conn)
    assert conn.execute("SELECT * FROM features_mine ORDER BY symbol, date").fetchall() == after


# The user's feature module ``mine`` reads ``FACTOR`` of their module ``helpers`` through each way of importing it.
MINE = {
    "from": "from {pkg}.helpers import smooth\n\ndef f(df):\n    return out(df, smooth(df['close']))\n",
    "import_as": "import {pkg}.helpers as h\n\ndef f(df):\n    return out(df, h.smooth(df['close']))\n",
    "dotted": "import {pkg}.helpers\n\ndef f(df):\n    return out(df, {pkg}.helpers.smooth(df['close']))\n",
    "relative": "from . import helpers\n\ndef f(df):\n    return out(df, helpers.smooth(df['close']))\n",
    "relative_as": "from .helpers import smooth as s\n\ndef f(df):\n    return out(df, s(df['close']))\n",
    "constant": "from .helpers import FACTOR\n\ndef f(df):\n    return out(df, df['close'] * FACTOR)\n",
    "in_function": "def f(df):\n    from .helpers import smooth\n    return out(df, smooth(df['close']))\n",
    # mine -> middle -> helpers, and helpers imports middle back: a cycle.
    "transitive": "from .middle import smooth\n\ndef f(df):\n    return out(df, smooth(df['close']))\n",
}
HELPERS = "FACTOR = 2.0\n\ndef smooth(close):\n    return close * FACTOR\n\nfrom . import middle  # noqa\n"


def forget(package: str) -> None:
    """Drop ``package``'s modules from this process, as a new refresher process starts without them."""
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def user_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, style: str, directory: str = "project"
) -> Path:
    """The package of the user's modules ``mine`` (importing ``helpers`` as ``style``), ``middle`` and ``helpers``
    under ``tmp_path / directory``, on the path; its directory (named as the package)."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # each run a fresh process: the source as it is now
    package = f"features_{uuid.uuid4().hex[:8]}"
    root = tmp_path / directory / package
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "middle.py").write_text(f"from {package}.helpers import smooth  # noqa\n")
    helpers = root / "helpers.py"
    helpers.write_text(HELPERS)
    out = "import pandas as pd\n\ndef out(df, values):\n    return pd.DataFrame({'v': values}, index=df.index)\n\n"
    (root / "mine.py").write_text(out + MINE[style].format(pkg=package))
    monkeypatch.syspath_prepend(str(tmp_path / directory))
    return root


def mine_entry(package: str) -> str:
    """The profile's entry of the user's feature ``mine``."""
    return f'{{name: mine, function: "{package}.mine:f"}}'


def edit_factor(root: Path) -> None:
    """The user edits ``helpers.py``: FACTOR 2 becomes 3, so ``mine``'s values are 1.5 times what they were."""
    (root / "helpers.py").write_text(HELPERS.replace("FACTOR = 2.0", "FACTOR = 3.0"))


@pytest.mark.parametrize("style", list(MINE))
def test_editing_a_helper_in_another_of_the_users_modules_recomputes_it(
    tmp_path: Path,
    conn: psycopg.Connection[Any],
    store: FeatureStore,
    monkeypatch: pytest.MonkeyPatch,
    style: str,
) -> None:
    root = user_project(tmp_path, monkeypatch, style)
    package = root.name
    entries = f"{mine_entry(package)}, dashboard_data"
    try:
        assert run(conn, profile_of(tmp_path, entries), store).loaded == 4
        values = [r[2] for r in table_rows(conn, "features_mine", "AAA")]
        forget(package)
        # Nothing changed: the version is the same, nothing is computed or loaded again.
        again = run(conn, profile_of(tmp_path, entries), store)
        assert (again.loaded, again.computed) == (0, 0)
        forget(package)
        edit_factor(root)
        edited = run(conn, profile_of(tmp_path, entries), store)
        assert (edited.loaded, edited.computed) == (2, 2)
        assert [r[2] for r in table_rows(conn, "features_mine", "AAA")] == pytest.approx(
            [v * 1.5 for v in values]
        )
    finally:
        forget(package)


def test_editing_a_helper_of_the_users_package_installed_in_site_packages_recomputes_it(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The user's package installed with ``pip install .``: only the function's own module was read, so reinstalling
    # it with an edited helper kept the version, and the store served the old helper's rows as the new one's.
    root = user_project(tmp_path, monkeypatch, "from", directory="site-packages")
    package = root.name
    modules._not_users.cache_clear()  # site-packages directories on sys.path are asked once per process
    try:
        run(conn, profile_of(tmp_path, mine_entry(package)), store)
        values = [r[2] for r in table_rows(conn, "features_mine", "AAA")]
        edit_factor(root)
        assert_a_new_process_recomputes(tmp_path, conn, store, package, values)
    finally:
        forget(package)
        monkeypatch.undo()
        modules._not_users.cache_clear()


def assert_a_new_process_recomputes(
    tmp_path: Path, conn: psycopg.Connection[Any], store: FeatureStore, package: str, values: list[float]
) -> None:
    """A new process (the new code, FACTOR 3 or the function times 1.5) computes ``mine`` again: 1.5 ``values``."""
    forget(package)
    assert run(conn, profile_of(tmp_path, mine_entry(package)), store).computed == 2
    assert [r[2] for r in table_rows(conn, "features_mine", "AAA")] == pytest.approx(
        [v * 1.5 for v in values]
    )


@pytest.mark.parametrize(
    ("edited", "style"),
    # a module it imports, the function's own; a helper it imports when called, after the first refresh versioned it
    [("helpers", "from"), ("mine", "from"), ("helpers", "in_function")],
)
def test_a_process_that_imported_the_old_code_versions_what_it_runs(
    tmp_path: Path,
    conn: psycopg.Connection[Any],
    store: FeatureStore,
    monkeypatch: pytest.MonkeyPatch,
    edited: str,
    style: str,
) -> None:
    # A worker imports the user's modules once and refreshes again and again: after an edit its function still
    # runs the code it imported, so that is what its rows are keyed by. Keyed by the file as edited, they were the
    # old values under the new version: a later process (the new code) took them from the store, stale.
    root = user_project(tmp_path, monkeypatch, style)
    package = root.name
    entries = mine_entry(package)
    try:
        run(conn, profile_of(tmp_path, entries), store)
        values = [r[2] for r in table_rows(conn, "features_mine", "AAA")]
        if edited == "helpers":
            edit_factor(root)
        else:
            mine = root / "mine.py"
            mine.write_text(mine.read_text().replace("smooth(df['close'])", "smooth(df['close']) * 1.5"))
        # The same process: the code it runs did not change.
        assert run(conn, profile_of(tmp_path, entries), store).loaded == 0
        assert_a_new_process_recomputes(tmp_path, conn, store, package, values)
    finally:
        forget(package)


# Imported by the user's own code (a conftest) before refresher loaded a profile, or by loading it.
@pytest.mark.parametrize("imported_before", [False, True])
def test_a_module_edited_after_the_profile_imported_it_is_versioned_as_imported(
    tmp_path: Path,
    conn: psycopg.Connection[Any],
    store: FeatureStore,
    monkeypatch: pytest.MonkeyPatch,
    imported_before: bool,
) -> None:
    # Loading the profile imports the user's modules (a worker's job context, a CLI refresh before its segments
    # load); the features are versioned at the end. An edit in between is not what this process computes with: its
    # rows keyed by the edited file held the old values, which the next process then served.
    root = user_project(tmp_path, monkeypatch, "from")
    package = root.name
    entries = mine_entry(package)
    try:
        if imported_before:  # in a process that never loaded a profile: refresher records no import yet
            monkeypatch.setattr(
                sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, modules._Recorder)]
            )
            importlib.import_module(f"{package}.mine")
        profile = profile_of(tmp_path, entries)
        edit_factor(root)
        run(conn, profile, store)
        values = [r[2] for r in table_rows(conn, "features_mine", "AAA")]
        assert_a_new_process_recomputes(tmp_path, conn, store, package, values)
    finally:
        forget(package)
