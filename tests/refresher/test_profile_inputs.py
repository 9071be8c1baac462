"""Inputs that cannot leak: --profile reads only profiles, errors never echo a file, the universe has a limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from refresher.cli import main
from refresher.errors import ProfileError
from refresher.profile import DEFAULT_MAX_SYMBOLS, load_profile
from refresher.profile_files import find_profile_file
from tests.fixtures_postgres import world_traversable_tmp
from tests.unprivileged import as_nobody

SECRET = "s3cret-Pa55word"


def _plan(profile: str, state: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["plan", "--profile", profile, "--state-dir", str(state), "--store", str(state / "store")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state dir holding what engines keep there: a server record with its password."""
    record = tmp_path / "state" / "local" / "dev" / "server.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"port": 5432, "user": "refresher", "password": SECRET}))
    return tmp_path / "state"


def test_a_system_file_is_not_read_as_a_profile(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _plan("/etc/passwd", state, capsys)
    assert "root:" not in err and "not a profile name or a .yaml/.yml file" in err


def test_nothing_of_the_state_dir_is_ever_echoed(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record = state / "local" / "dev" / "server.json"
    assert SECRET not in _plan(str(record), state, capsys)
    disguised = tmp_path / "innocent.yaml"  # a symlink with a profile's name does not get around it
    disguised.symlink_to(record)
    err = _plan(str(disguised), state, capsys)
    assert SECRET not in err and "state dir" in err


def test_a_yaml_file_that_is_no_profile_is_named_not_pasted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = Path("/etc/passwd").read_text()
    (tmp_path / "copied.yaml").write_text(json.dumps(text))  # valid YAML: one long string
    err = _plan(str(tmp_path / "copied.yaml"), tmp_path / "state", capsys)
    assert "root:" not in err and "(root)='str': a profile must be a mapping" in err


def test_a_universe_file_header_is_not_echoed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "u.csv").write_text(f"user,password\nrefresher,{SECRET}\n")
    (tmp_path / "p.yaml").write_text("universe:\n  file: u.csv\n")
    err = _plan(str(tmp_path / "p.yaml"), tmp_path / "state", capsys)
    assert SECRET not in err and "password" not in err and "needs a 'symbol' column" in err
    (tmp_path / "q.yaml").write_text("universe:\n  file: ../../etc/passwd\n")
    assert "must be a .csv file" in _plan(str(tmp_path / "q.yaml"), tmp_path / "state", capsys)


def test_a_long_value_is_shortened_to_one_short_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text(f"universe:\n  symbols: [AAPL]\ndescription: [{'x' * 5000}]\n")
    err = _plan(str(tmp_path / "p.yaml"), tmp_path / "state", capsys)
    assert "description" in err and len(err) < 400


def _universe(path: Path, symbols: int, extra: str = "") -> Path:
    names = ", ".join(f"S{i:05d}" for i in range(symbols))
    path.write_text(f"universe:\n  symbols: [{names}]\n{extra}months: 1\ntimeframes: [1d]\n")
    return path


def test_a_universe_over_the_limit_is_refused_at_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = _universe(tmp_path / "big.yaml", DEFAULT_MAX_SYMBOLS + 1)
    err = _plan(str(big), tmp_path / "state", capsys)
    assert f"universe='{DEFAULT_MAX_SYMBOLS + 1} symbols'" in err and "universe.max_symbols=5000" in err
    with pytest.raises(ProfileError, match="max_symbols"):
        load_profile(str(_universe(tmp_path / "huge.yaml", 1_000_000)), [])
    assert len(load_profile(str(_universe(tmp_path / "fine.yaml", DEFAULT_MAX_SYMBOLS)), []).listings) == 5000


def test_a_profile_may_raise_its_own_limit(tmp_path: Path) -> None:
    path = tmp_path / "wide.yaml"
    path.write_text(
        "universe:\n  max_symbols: 6000\n  symbols: ["
        + ", ".join(f"S{i:05d}" for i in range(5001))
        + "]\nmonths: 1\ntimeframes: [1d]\n"
    )
    assert len(load_profile(str(path), []).listings) == 5001


def test_a_spreadsheets_utf8_universe_with_a_byte_order_mark_and_blank_lines_loads(tmp_path: Path) -> None:
    # Excel's "CSV UTF-8" starts with a BOM: the header read as '\ufeffsymbol', and the profile failed with
    # "universe file needs a 'symbol' column" on a file that has one
    (tmp_path / "u.csv").write_bytes(b"\xef\xbb\xbfsymbol,exchange\r\nAAPL,XNYS\r\n , \r\nSAP,XETR\r\n")
    (tmp_path / "p.yaml").write_text("universe: {file: u.csv}\nmonths: 1\nas_of: 2025-03-31\n")
    listings = load_profile(str(tmp_path / "p.yaml"), []).listings
    assert [(lst.symbol, lst.exchange) for lst in listings] == [("AAPL", "XNYS"), ("SAP", "XETR")]


def test_a_universe_row_without_its_symbol_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "u.csv").write_text("exchange,symbol\nXNYS,AAPL\nXNAS\n")  # was a traceback, exit 1
    (tmp_path / "p.yaml").write_text("universe: {file: u.csv}\nmonths: 1\nas_of: 2025-03-31\n")
    err = _plan(str(tmp_path / "p.yaml"), tmp_path / "state", capsys)
    assert f"{tmp_path / 'u.csv'}: line 3=None: no symbol in this row" in err


@pytest.mark.parametrize("name", ["p.yaml", "u.csv"])
def test_a_file_that_is_not_utf8_is_one_line_naming_its_line(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "u.csv").write_bytes(b"symbol\nAAPL\n")
    (tmp_path / "p.yaml").write_bytes(b"universe: {file: u.csv}\nmonths: 1\nas_of: 2025-03-31\n")
    latin1 = (tmp_path / name).read_bytes() + b"# caf\xe9\n"  # was a UnicodeDecodeError traceback, exit 1
    (tmp_path / name).write_bytes(latin1)
    err = _plan(str(tmp_path / "p.yaml"), tmp_path / "state", capsys)
    line = latin1.count(b"\n")
    assert f"{tmp_path / name}: line {line}=b'\\xe9': not UTF-8 text" in err


def test_a_universe_file_its_user_may_not_read_is_one_line_naming_it() -> None:
    # as most users run refresher (tests run as root, which reads any file): a PermissionError traceback, where
    # the profile file itself said "cannot read" in one line
    import encodings.utf_8_sig  # noqa: F401 -- the child's interpreter may not reach its modules under /root

    root = world_traversable_tmp("refresher-universe-")
    (root / "u.csv").write_text("symbol\nAAPL\n")
    (root / "p.yaml").write_text("universe: {file: u.csv}\nmonths: 1\nas_of: 2025-03-31\n")
    (root / "u.csv").chmod(0o000)

    def read() -> str:
        try:
            return str(load_profile(str(root / "p.yaml"), []).symbols)
        except ProfileError as exc:
            return str(exc)

    assert as_nobody(read) == f"{root / 'u.csv'}: (file)='{root / 'u.csv'}': cannot read: Permission denied"


def test_a_profiles_directory_its_user_may_not_list_is_one_line_saying_so() -> None:
    # glob found nothing in it: "no such profile (known: none)", about a profile the user can see is there
    root = world_traversable_tmp("refresher-profiles-")
    (root / "mine.yaml").write_text("universe: {symbols: [AAPL]}\nmonths: 1\nas_of: 2025-03-31\n")
    root.chmod(0o711)  # nobody may pass through it, not list it

    def find() -> str:
        try:
            return str(find_profile_file("mine", [root]))
        except ProfileError as exc:
            return str(exc)

    assert as_nobody(find) == f"{root}: (profiles directory)='{root}': cannot read it: Permission denied"


@pytest.mark.parametrize("kind", ["directory", "looping link"])
def test_a_universe_file_that_is_no_file_says_what_it_is(tmp_path: Path, kind: str) -> None:
    # both were "no such file next to the profile or in ...", about a name the user sees in the directory
    if kind == "directory":
        (tmp_path / "u.csv").mkdir()
    else:
        (tmp_path / "u.csv").symlink_to("u.csv")
    (tmp_path / "p.yaml").write_text("universe: {file: u.csv}\nmonths: 1\nas_of: 2025-03-31\n")
    with pytest.raises(ProfileError) as caught:
        load_profile(str(tmp_path / "p.yaml"), [])
    reason = "a directory, not a file" if kind == "directory" else "Too many levels of symbolic links"
    assert str(caught.value) == (
        f"{tmp_path / 'p.yaml'}: universe.file='u.csv': cannot read {tmp_path / 'u.csv'}: {reason}"
    )
