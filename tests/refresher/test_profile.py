"""Profiles: the shipped four load; every bad field is one line naming file, field and value."""

from __future__ import annotations

import datetime as dt
import functools
import re
from pathlib import Path

import pytest

from refresher import profile
from refresher.calendar import first_unclosed_session, last_completed_session, sessions_between
from refresher.errors import ProfileError
from refresher.profile import FilesSourceSpec, list_profiles, load_profile
from refresher.settings import BUILTIN_PROFILES

AS_OF = dt.date(2025, 6, 13)
DIRS = [BUILTIN_PROFILES]

GOOD = """\
description: test profile
universe:
  symbols: [AAPL, MSFT, "7203"]
  exchanges: {"7203": XTKS}
exchange: XNYS
months: 2
timeframes: [1d, 1m]
features: [dashboard_data]
seed: 3
seeds: {MSFT: 9}
reset_target_seconds: 5
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("name", "count", "months", "features", "target"),
    [
        ("patterns", 50, 6, ("high_low_detection", "trend_analysis"), 25.0),
        ("backtesting", 100, 12, ("full_analysis", "performance_metrics"), 45.0),
        ("ui_testing", 20, 3, ("websocket_testing", "dashboard_data"), 15.0),
        ("etf_analysis", 40, 12, ("etf_metadata", "correlation_analysis"), 30.0),
    ],
)
def test_shipped_profiles_load(
    name: str, count: int, months: int, features: tuple[str, ...], target: float
) -> None:
    p = load_profile(name, DIRS, as_of=AS_OF)
    assert p.name == name
    assert len(p.listings) == count == len({lst.symbol for lst in p.listings})
    assert len(p.months) == months
    assert p.months[-1] == dt.date(2025, 6, 1) and p.end == AS_OF and p.start == p.months[0]
    assert tuple(use.name for use in p.features) == features
    assert p.timeframes == ("1d", "1m")
    assert p.reset_target_seconds == target
    assert p.source.kind == "synthetic"
    assert all(lst.exchange in ("XNYS", "XNAS") for lst in p.listings)


def test_etf_profile_holds_only_etfs() -> None:
    p = load_profile("etf_analysis", DIRS, as_of=AS_OF)
    assert {lst.asset_class for lst in p.listings} == {"etf"}


def test_list_profiles_finds_the_four() -> None:
    names = [p.name for p in list_profiles(DIRS, as_of=AS_OF)]
    assert names == ["backtesting", "etf_analysis", "patterns", "ui_testing"]


def test_as_of_defaults_to_last_completed_session() -> None:
    p = load_profile("ui_testing", DIRS)
    assert p.end <= dt.date.today()
    assert p.end.weekday() < 5


def test_user_dir_shadows_builtin_and_adds_profiles(tmp_path: Path) -> None:
    write(tmp_path, "patterns", GOOD)
    write(tmp_path, "mine", GOOD)
    assert load_profile("patterns", [tmp_path, *DIRS], as_of=AS_OF).description == "test profile"
    assert load_profile("patterns", [*DIRS, tmp_path], as_of=AS_OF).description != "test profile"
    names = {p.name for p in list_profiles([tmp_path, *DIRS], as_of=AS_OF)}
    assert {"mine", "patterns", "ui_testing"} <= names


def test_per_symbol_seeds_and_exchanges(tmp_path: Path) -> None:
    p = load_profile(str(write(tmp_path, "mine", GOOD)), [], as_of=AS_OF)
    assert [(lst.symbol, lst.exchange, lst.seed) for lst in p.listings] == [
        ("AAPL", "XNYS", 3),
        ("MSFT", "XNYS", 9),
        ("7203", "XTKS", 3),
    ]
    assert p.listing("7203").exchange == "XTKS"
    with pytest.raises(ProfileError, match="NOPE"):
        p.listing("NOPE")


def test_explicit_start_end(tmp_path: Path) -> None:
    text = GOOD.replace("months: 2", "start: 2024-11-15\nend: 2025-01-10")
    p = load_profile(str(write(tmp_path, "mine", text)), [])
    assert (p.start, p.end) == (dt.date(2024, 11, 15), dt.date(2025, 1, 10))
    assert p.months == (dt.date(2024, 11, 1), dt.date(2024, 12, 1), dt.date(2025, 1, 1))


def test_universe_file_next_to_profile_with_exchange_column(tmp_path: Path) -> None:
    (tmp_path / "u.csv").write_text(
        "Symbol,Exchange,Asset_Class\nSAP,XETR,equity\nVOD,XLON,equity\nX,XNYS,etf\n"
    )
    text = GOOD.replace(
        'universe:\n  symbols: [AAPL, MSFT, "7203"]\n  exchanges: {"7203": XTKS}',
        "universe:\n  file: u.csv\n  asset_class: equity",
    )
    text = text.replace("seeds: {MSFT: 9}", "seeds: {VOD: 1}")
    p = load_profile(str(write(tmp_path, "mine", text)), [], as_of=AS_OF)
    assert [(lst.symbol, lst.exchange) for lst in p.listings] == [("SAP", "XETR"), ("VOD", "XLON")]


@pytest.mark.parametrize(
    ("old", "new", "field", "value"),
    [
        ("months: 2", "months: 0", "months", "0"),
        ("exchange: XNYS", "exchange: XPAR", "exchange", "XPAR"),
        ("timeframes: [1d, 1m]", "timeframes: [1d, 5m]", "timeframes.1", "5m"),
        ("features: [dashboard_data]", "features: [dashbord_data]", "features.0", "dashbord_data"),
        ("seed: 3", "seed: three", "seed", "three"),
        ("seed: 3", "sede: 3", "sede", "3"),
        ("seeds: {MSFT: 9}", "seeds: {TSLA: 9}", "seeds.TSLA", "9"),
        ('exchanges: {"7203": XTKS}', 'exchanges: {"7203": TYO}', "universe.exchanges.7203", "TYO"),
        ("[AAPL, MSFT", "[AAPL, 'MS FT'", "universe.symbols.1", "MS FT"),
        ("reset_target_seconds: 5", "reset_target_seconds: -1", "reset_target_seconds", "-1"),
        ("reset_target_seconds: 5", "reset_target_seconds: 5\nsource: {kind: ftp}", "source.kind", "ftp"),
        ("reset_target_seconds: 5", "reset_target_seconds: 5\nsource: {kind: files}", "source.path", "None"),
        ("reset_target_seconds: 5", "reset_target_seconds: 5\nsource: {dsn: x}", "source.dsn", "x"),
        ("months: 2", "months: 2\nstart: 2024-01-01", "start", "2024-01-01"),
        ("description: test profile", "name: other", "name", "other"),
    ],
)
def test_bad_field_is_one_line_naming_file_field_value(
    tmp_path: Path, old: str, new: str, field: str, value: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, "mine", GOOD.replace(old, new))
    with pytest.raises(ProfileError) as info:
        load_profile(str(path), [], as_of=AS_OF)
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert str(path) in message
    assert err.field == field
    assert f"{field}=" in message and value in message


def test_unsafe_profile_names_rejected(tmp_path: Path) -> None:
    write(tmp_path, "Bad-Name", GOOD)
    with pytest.raises(ProfileError) as info:
        load_profile("Bad-Name", [tmp_path])
    assert info.value.field == "profile"
    with pytest.raises(ProfileError, match="name"):
        load_profile(str(tmp_path / "Bad-Name.yaml"), [])


def test_unknown_profile_lists_the_known(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile("nosuch", DIRS)
    assert "nosuch" in str(info.value) and "patterns" in str(info.value)


def test_invalid_yaml_and_listing_skips_it(tmp_path: Path) -> None:
    write(tmp_path, "broken", "universe: [unclosed\n")
    with pytest.raises(ProfileError) as info:
        load_profile("broken", [tmp_path])
    assert "broken.yaml" in str(info.value) and "\n" not in str(info.value)
    errors: list[ProfileError] = []
    assert list_profiles([tmp_path], errors=errors) == []
    assert len(errors) == 1


def test_universe_count_larger_than_file(tmp_path: Path) -> None:
    text = GOOD.replace(
        'symbols: [AAPL, MSFT, "7203"]\n  exchanges: {"7203": XTKS}', "file: us_etfs.csv\n  count: 999"
    )
    text = text.replace("seeds: {MSFT: 9}\n", "")
    with pytest.raises(ProfileError) as info:
        load_profile(str(write(tmp_path, "mine", text)), [], as_of=AS_OF)
    assert info.value.field == "universe.count" and info.value.value == 999


def test_files_source_path_resolved_against_profile(tmp_path: Path) -> None:
    text = GOOD + "source:\n  kind: files\n  path: data\n  columns: {symbol: Ticker}\n"
    p = load_profile(str(write(tmp_path, "mine", text)), [], as_of=AS_OF)
    assert p.source.kind == "files"
    assert isinstance(p.source, FilesSourceSpec)
    assert p.source.path == (tmp_path / "data").resolve()
    assert p.source.columns["symbol"] == "Ticker"
    assert p.source.on_bad_rows == "fail"


def test_a_profile_records_the_bytes_it_was_read_from(tmp_path: Path) -> None:
    """``Profile.inputs``: every file resolution read (or looked for), with the digest of the bytes parsed."""
    import hashlib

    from refresher.profile import DATA_DIR, profile_from_file

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    (tmp_path / "mine.csv").write_bytes(universe := b"symbol\nAAPL\n")
    path = tmp_path / "p.yaml"
    path.write_bytes(text := b"universe: {file: mine.csv}\nmonths: 1\nas_of: 2025-03-31\n")
    profile = profile_from_file(path)
    path.write_text("edited after the read")  # a refresh's stamp must vouch for what was parsed, not this
    assert profile.inputs == ((path, sha(text)), (tmp_path / "mine.csv", sha(universe)))
    shipped = tmp_path / "shipped.yaml"
    shipped.write_bytes(
        text := b"universe: {file: us_equities.csv, count: 1}\nmonths: 1\nas_of: 2025-03-31\n"
    )
    assert profile_from_file(shipped).inputs == (
        (shipped, sha(text)),
        (tmp_path / "us_equities.csv", None),  # looked for first: one appearing here would be read instead
        (DATA_DIR / "us_equities.csv", sha((DATA_DIR / "us_equities.csv").read_bytes())),
    )


def test_an_as_of_with_a_session_not_closed_yet_is_refused(tmp_path: Path) -> None:
    # The synthetic source made up bars for sessions that had not happened; files and postgres found none
    last = last_completed_session("XNYS")
    unclosed = sessions_between("XNYS", last + dt.timedelta(days=1), last + dt.timedelta(days=10))[0]
    write(tmp_path, "mine", "universe: {symbols: [AAPL]}\nmonths: 2\n")
    assert load_profile("mine", [tmp_path], as_of=last).end == last
    message = re.escape(f"{unclosed} has not closed yet (its last closed session: {last})")
    with pytest.raises(ProfileError, match=rf"mine\.yaml: as_of='{unclosed}': XNYS's session of {message}"):
        load_profile("mine", [tmp_path], as_of=unclosed)
    write(
        tmp_path, "ranged", f"universe: {{symbols: [AAPL]}}\nstart: {last.replace(day=1)}\nend: {unclosed}\n"
    )
    with pytest.raises(ProfileError, match=rf"ranged\.yaml: end='{unclosed}': XNYS's session of {message}"):
        load_profile("ranged", [tmp_path])
    far = dt.date(last.year + 1, 1, 15)
    write(tmp_path, "pinned", f"universe: {{symbols: [AAPL]}}\nmonths: 2\nas_of: {far}\n")
    with pytest.raises(ProfileError, match=r"pinned\.yaml: as_of=.*has not closed yet"):
        load_profile("pinned", [tmp_path])


def test_a_universe_of_two_exchanges_ends_where_both_have_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Now is frozen at chosen instants: the profile asks the calendar's sessions closed and not, at that instant.
    def freeze(at: dt.datetime) -> None:
        for query in (last_completed_session, first_unclosed_session):
            monkeypatch.setattr(profile, query.__name__, functools.partial(query, at=at))

    new_york = 'universe: {symbols: [AAPL, "7203"], exchanges: {"7203": XTKS}}\nmonths: 2\n'
    tokyo = 'universe: {symbols: [AAPL, "7203"], exchanges: {AAPL: XNYS}}\nexchange: XTKS\nmonths: 2\n'
    write(tmp_path, "new_york", new_york)  # the universe's calendar is New York's, Toyota trades in Tokyo
    write(tmp_path, "tokyo", tokyo)  # the universe's calendar is Tokyo's, Apple trades in New York
    tuesday, wednesday, thursday = dt.date(2025, 6, 10), dt.date(2025, 6, 11), dt.date(2025, 6, 12)
    unclosed = r"{}'s session of {} has not closed yet \(its last closed session: {}\)"

    # 12:00 UTC on Wednesday: Tokyo's Wednesday closed at 06:30; New York's opens at 13:30.
    freeze(dt.datetime(2025, 6, 11, 12, 0, tzinfo=dt.UTC))
    assert load_profile("new_york", [tmp_path]).end == tuesday
    # Tokyo's last closed session, but New York's of that day is still to come: the day before both closed
    assert load_profile("tokyo", [tmp_path]).end == tuesday
    for name in ("new_york", "tokyo"):
        with pytest.raises(ProfileError, match=unclosed.format("XNYS", wednesday, tuesday)):
            load_profile(name, [tmp_path], as_of=wednesday)
    write(tmp_path, "ranged", new_york.replace("months: 2", f"start: 2025-05-01\nend: {wednesday}"))
    with pytest.raises(ProfileError, match=r"ranged\.yaml: end='2025-06-11': XNYS's session of 2025-06-11"):
        load_profile("ranged", [tmp_path])

    # 03:00 UTC on Thursday: New York's Wednesday has closed; Tokyo's Thursday is trading.
    freeze(dt.datetime(2025, 6, 12, 3, 0, tzinfo=dt.UTC))
    assert load_profile("new_york", [tmp_path]).end == wednesday
    assert load_profile("tokyo", [tmp_path]).end == wednesday
    for name in ("new_york", "tokyo"):
        assert load_profile(name, [tmp_path], as_of=wednesday).end == wednesday
        with pytest.raises(ProfileError, match=f"session of {thursday} has not closed yet"):  # both exchanges
            load_profile(name, [tmp_path], as_of=thursday)


@pytest.mark.parametrize(
    ("csv", "field", "value", "reason"),
    [
        ("symbol\nAAPL\nMSFT\nAAPL\n", "line 4.symbol", "AAPL", "duplicate of line 2"),
        ("symbol\nAAPL\naapl\n", "line 3.symbol", "aapl", "duplicate of line 2"),
        ("symbol,exchange\nAAPL,XNYS\nVOD,LSE\n", "line 3.exchange", "LSE", "unknown exchange"),
        ("symbol\nAAPL\nMS FT\n", "line 3.symbol", "MS FT", "not a valid symbol"),
        ("symbol\n", "symbol", None, "no symbols"),
    ],
)
def test_a_bad_universe_file_row_names_the_file_and_its_line(
    tmp_path: Path, csv: str, field: str, value: str | None, reason: str
) -> None:
    """The error of a universe file's row names that file and line, not a field of the profile the user never
    wrote (``mine.yaml: universe.symbols.2``, ``mine.yaml: exchange='LSE'`` when the profile says XNYS)."""
    (tmp_path / "u.csv").write_text(csv)
    path = write(tmp_path, "mine", "universe: {file: u.csv}\nexchange: XNYS\nmonths: 1\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path), [], as_of=AS_OF)
    assert (info.value.file, info.value.field, info.value.value) == (str(tmp_path / "u.csv"), field, value)
    assert reason in info.value.reason and "\n" not in str(info.value)


def test_symbols_differing_only_in_case_are_one_symbol_twice(tmp_path: Path) -> None:
    """``[AAPL, aapl]`` loaded the same company twice under two names (and, for an upstream keyed by one
    spelling, an empty second one): refused like any duplicate, naming the first spelling."""
    path = write(tmp_path, "mine", "universe: {symbols: [AAPL, MSFT, aapl]}\nmonths: 1\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path), [], as_of=AS_OF)
    assert (info.value.field, info.value.value) == ("universe.symbols.2", "aapl")
    assert "duplicate of universe.symbols.0 'AAPL'" in info.value.reason


def test_a_universe_file_header_with_blanks_and_a_lowercase_exchange_are_read(tmp_path: Path) -> None:
    """Spreadsheets pad cells: ``symbol , exchange`` is the symbol and exchange columns, as the cells below
    them are stripped; an exchange code in any case is that exchange, as ``market status`` takes it."""
    (tmp_path / "u.csv").write_text("symbol , exchange \n AAPL , XNYS \nVOD,xlon\n")
    path = write(tmp_path, "mine", "universe: {file: u.csv}\nexchange: xnys\nmonths: 1\n")
    p = load_profile(str(path), [], as_of=AS_OF)
    assert [(lst.symbol, lst.exchange) for lst in p.listings] == [("AAPL", "XNYS"), ("VOD", "XLON")]
    assert p.exchange == "XNYS"


def test_as_of_and_end_both_given_is_refused(tmp_path: Path) -> None:
    """Both name the window's last day; with both, ``end`` silently won and ``as_of`` (say the later one) did
    nothing: the user pinned June and got March. Refused in one line naming both."""
    text = "universe: {symbols: [AAPL]}\nmonths: 2\nend: 2025-03-31\nas_of: 2025-06-30\n"
    with pytest.raises(ProfileError) as info:
        load_profile(str(write(tmp_path, "mine", text)), [])
    assert (info.value.field, info.value.value) == ("as_of", "2025-06-30")
    assert "end" in info.value.reason
    same = text.replace("2025-06-30", "2025-03-31")  # the same day twice says one thing
    assert load_profile(str(write(tmp_path, "mine", same)), []).end == dt.date(2025, 3, 31)


@pytest.mark.parametrize(
    ("universe", "field", "value", "reason"),
    [
        ("{symbols: [AAPL, MSFT], count: 5}", "universe.count", 5, "universe.symbols has only 2 symbols"),
        ("{symbols: []}", "universe.symbols", [], "the universe is empty"),
        ("{file: u.csv, asset_class: etf}", "universe.asset_class", "etf", "no row of u.csv"),
    ],
)
def test_an_empty_or_short_universe_names_the_field_that_made_it_so(
    tmp_path: Path, universe: str, field: str, value: object, reason: str
) -> None:
    """A count larger than the symbols listed was ignored (the file case refused it), and an empty universe
    was `universe=None`: each names the field the user wrote and its value."""
    (tmp_path / "u.csv").write_text("symbol,asset_class\nAAPL,equity\n")
    path = write(tmp_path, "mine", f"universe: {universe}\nmonths: 1\n")
    with pytest.raises(ProfileError) as info:
        load_profile(str(path), [], as_of=AS_OF)
    assert (info.value.field, info.value.value) == (field, value)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("text", "field", "value", "hint"),
    [
        # ON Semiconductor: YAML 1.1 reads ON as true, and the line said `=True: Input should be a valid string`
        ("universe: {symbols: [AAPL, ON]}\nmonths: 1\n", "universe.symbols.1", True, "as a boolean"),
        ("universe: {symbols: [AAPL, NO]}\nmonths: 1\n", "universe.symbols.1", False, "as a boolean"),
        (
            "universe: {symbols: [7203]}\nexchange: XTKS\nmonths: 1\n",
            "universe.symbols.0",
            7203,
            "as a number",
        ),
        ("universe: {symbols: [AAPL]}\nmonths: 1\ndescription: 2025\n", "description", 2025, "as a number"),
        # the hint quoted what YAML made of it, not what was written: 0700 (YAML 1.1 octal) said '448', 1.50 '1.5'
        ("universe: {symbols: [AAPL, 0700]}\nmonths: 1\n", "universe.symbols.1", 448, "as a number"),
        ("universe: {symbols: [AAPL, 1.50]}\nmonths: 1\n", "universe.symbols.1", 1.5, "as a number"),
        # an empty file, or one of comments alone, said `(root)='NoneType': a profile must be a mapping`
        ("", "(root)", None, "the file is empty"),
        ("# my profile, to be written\n", "(root)", None, "the file is empty"),
    ],
)
def test_a_value_yaml_did_not_read_as_the_user_meant_says_how(
    tmp_path: Path, text: str, field: str, value: object, hint: str
) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(str(write(tmp_path, "mine", text)), [], as_of=AS_OF)
    assert (info.value.field, info.value.value) == (field, value)
    assert hint in info.value.reason and "NoneType" not in str(info.value), info.value
    if hint.startswith("as a"):
        assert "write it in quotes" in info.value.reason
    if hint == "as a number":
        assert "exactly as in the file" in info.value.reason and f"'{value}'" not in info.value.reason


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        # each said "Extra inputs are not permitted", which a quant reads as a YAML problem, not a typo
        ("universe: {symbols: [AAPL]}\nmonth: 1\n", "month", "unknown field (did you mean months?)"),
        (
            "universe: {symbols: [AAPL], symbol: [X]}\nmonths: 1\n",
            "universe.symbol",
            "(did you mean symbols?)",
        ),
        (
            "universe: {symbols: [AAPL]}\nmonths: 1\nsource: {kind: files, path: ., dialy: x.csv}\n",
            "source.dialy",
            "(did you mean daily?)",
        ),
        (
            "universe: {symbols: [AAPL]}\nmonths: 1\nfeatures: [{name: dashboard_data, param: {}}]\n",
            "features.0.param",
            "(did you mean params?)",
        ),
        # among the fields of the source's own kind: a synthetic source has no dsn to suggest
        ("universe: {symbols: [AAPL]}\nmonths: 1\nsource: {dsn: x}\n", "source.dsn", "unknown field"),
        # "Input should be a valid dictionary or instance of _Universe" named a private class
        ("universe:\nmonths: 1\n", "universe", "must be a mapping of fields"),
    ],
)
def test_an_unknown_field_or_a_field_that_is_no_mapping_says_so_in_the_users_words(
    tmp_path: Path, text: str, field: str, reason: str
) -> None:
    with pytest.raises(ProfileError) as info:
        load_profile(str(write(tmp_path, "mine", text)), [], as_of=AS_OF)
    assert info.value.field == field and info.value.reason.endswith(reason), info.value
    assert "_Universe" not in str(info.value) and "Extra inputs" not in str(info.value)
