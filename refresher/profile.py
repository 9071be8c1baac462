"""Profiles: what a developer wants loaded, read from YAML into a frozen ``Profile``.

Pydantic validates at the YAML edge only (extra fields are errors, so a typo never silently does nothing);
everything past ``load_profile`` sees plain frozen dataclasses. Every invalid input raises ``ProfileError``
naming the file, the dotted field and the value, in one line.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import difflib
import functools
import hashlib
import io
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
)

from refresher.calendar import CALENDAR_START, EXCHANGES, first_unclosed_session, last_completed_session
from refresher.errors import CalendarError, ProfileError, without_secrets
from refresher.profile_files import PROFILE_SUFFIXES as PROFILE_SUFFIXES
from refresher.profile_files import find_profile_file, profile_files, validate_profile
from refresher.segments import TIMEFRAMES, Timeframe

if TYPE_CHECKING:
    from refresher.features.registry import FeatureUse

# Symbols reach file names (files source) and SQL parameters; keep them to what tickers actually use.
SYMBOL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,19}$")
# A profile larger than this is a typo or a runaway generator more often than a real need; a profile that
# really wants more says so with ``universe.max_symbols`` (plan measured ~2 s per 120,000 segments).
DEFAULT_MAX_SYMBOLS = 5000
DATA_DIR = Path(__file__).resolve().parent / "data"
_UNIVERSE_COLUMNS = ("symbol", "exchange", "asset_class")  # what a universe file's columns are read for
SOURCE_KINDS = ("synthetic", "files", "postgres")
BadRowPolicy = Literal["fail", "skip", "quarantine"]
_BEFORE_CALENDARS = f"before {CALENDAR_START}, where the calendars start"
TargetColumn = Literal["symbol", "date", "ts", "open", "high", "low", "close", "volume"]


@dataclass(frozen=True, slots=True)
class Listing:
    """One symbol of a profile's universe, with the exchange whose calendar its bars follow."""

    symbol: str
    exchange: str
    asset_class: str
    seed: int


@dataclass(frozen=True)
class Profile:
    """A resolved profile: concrete listings, an inclusive date range, and the months covering it."""

    name: str
    path: Path
    description: str
    listings: tuple[Listing, ...]
    timeframes: tuple[Timeframe, ...]
    start: dt.date
    end: dt.date
    months: tuple[dt.date, ...]
    features: tuple[FeatureUse, ...]
    seed: int
    reset_target_seconds: float
    source: SourceSpec
    exchange: str = "XNYS"
    # The files read to resolve it, absolute as named when read, each with the sha256 of the bytes read (None:
    # looked for, absent): the profile file first, then the universe file's candidates up to the one found.
    # With the code and the date they decide every field above (the refresh stamp compares them).
    inputs: tuple[tuple[Path, str | None], ...] = ()

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(lst.symbol for lst in self.listings)

    def listing(self, symbol: str) -> Listing:
        found = self._listing_of.get(symbol)
        if found is None:
            raise ProfileError(self.path, "listings", symbol, f"symbol not in profile {self.name!r}")
        return found

    @functools.cached_property
    def _listing_of(self) -> dict[str, Listing]:
        # A scan per call made planning quadratic: 1,000 symbols x 120 segments each took 5 s in listing().
        return {lst.symbol: lst for lst in self.listings}


# --- the YAML edge -----------------------------------------------------------------------------------------


def _not_a_number(value: Any) -> Any:
    if isinstance(value, int | float):  # pydantic's lax mode read it as seconds since 1970
        raise ValueError("a date is written YYYY-MM-DD, not a number")
    return value


# Numbers, booleans and dates as YAML writes them: lax mode took `months: true` for 1, `as_of: 0` for 1970-01-01,
# `reset_target_seconds: '30'` for 30.0 and `version_query: 'no'` or 0 for false. A float field takes an int.
_Int = Annotated[int, Strict()]
_Float = Annotated[float, Strict()]
_Bool = Annotated[bool, Strict()]
_Date = Annotated[dt.date, BeforeValidator(_not_a_number)]


def _file_pattern(value: Any) -> Any:
    # `{Symbol}.csv` was one shared file of that literal name, every segment loaded empty as "no such file";
    # `{symbol}_{date}.csv` or `{symbol.csv` a traceback at the first segment read
    if not isinstance(value, str):
        return value  # the str type's own error
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(value) if name is not None]
    except ValueError as exc:
        raise ValueError(f"{exc}: the only placeholder is {{symbol}}") from None
    for name in names:
        if name != "symbol":
            raise ValueError(f"unknown placeholder {{{name}}}: the only one is {{symbol}}")
    if names and "{symbol}" not in value:  # `{symbol!r}`: never formatted, a file of that literal name
        raise ValueError("the only placeholder is {symbol}, written as is")
    return value


# A source file's name: one file with a symbol column, or one per symbol named by `{symbol}`.
_FilePattern = Annotated[str, BeforeValidator(_file_pattern)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Universe(_Strict):
    symbols: list[str] | None = None
    file: str | None = None
    count: _Int | None = Field(default=None, ge=1)
    asset_class: str | None = None
    exchanges: dict[str, str] = Field(default_factory=dict)
    max_symbols: _Int = Field(default=DEFAULT_MAX_SYMBOLS, ge=1)


class _SourceBase(_Strict):
    """What every source shares: what to do with rows that fail validation, and with shrinking segments."""

    on_bad_rows: BadRowPolicy = "fail"
    allow_shrink: _Bool = False


class SyntheticSourceSpec(_SourceBase):
    """Deterministic generated bars (the default); no options of its own."""

    kind: Literal["synthetic"] = "synthetic"


class FilesSourceSpec(_SourceBase):
    """User files under ``path`` (resolved against the profile's directory); see ``refresher.sources.files``."""

    kind: Literal["files"]
    path: Path
    daily: _FilePattern = "daily/{symbol}.csv"
    minute: _FilePattern = "minute/{symbol}.csv"
    format: Literal["auto", "csv", "parquet"] = "auto"
    columns: dict[TargetColumn, str] = Field(default_factory=dict)
    tz: str | None = None
    label: Literal["left", "right"] = "left"
    # the order of text dates like 04/11/2024; auto decides per column and refuses one that reads in both
    date_order: Literal["auto", "day_first", "month_first"] = "auto"


class PostgresSourceSpec(_SourceBase):
    """An upstream PostgreSQL; see ``refresher.sources.postgres``."""

    kind: Literal["postgres"]
    dsn: str
    daily_table: str = "ohlcv_daily"
    minute_table: str = "ohlcv_1min"
    columns: dict[TargetColumn, str] = Field(default_factory=dict)
    tz: str = "UTC"
    version: str = ""
    version_query: _Bool = True
    # timeframe -> a SELECT with %(symbol)s, %(start)s, %(end)s placeholders, sent with them as parameters
    queries: dict[Timeframe, str] = Field(default_factory=dict)


def _source_kind(value: Any) -> str | None:
    # A source without ``kind`` is synthetic, as it always was; an unknown kind matches no tag (one error).
    kind = value.get("kind", "synthetic") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if kind in SOURCE_KINDS else None


SourceSpec = Annotated[
    Annotated[SyntheticSourceSpec, Tag("synthetic")]
    | Annotated[FilesSourceSpec, Tag("files")]
    | Annotated[PostgresSourceSpec, Tag("postgres")],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message=f"unknown source kind (choices: {', '.join(SOURCE_KINDS)})",
    ),
]


class _FeatureEntry(_Strict):
    """A feature with a table name of its own (``as``) and parameters, validated by ``features.registry``."""

    name: str
    as_: str | None = Field(default=None, alias="as")
    params: dict[str, Any] = Field(default_factory=dict)
    # A user's function, ``module.path:function``, loaded under ``name``.
    function: str | None = None
    timeframe: str | None = None
    # The user's own version of the entry, part of its key: what the key cannot see changed (a data file it reads).
    version: Any = None  # text or a whole number, checked by ``resolve_feature``


# A plain name or a mapping; tagged so an error in a mapping is reported against the mapping, not the string.
FeatureEntry = Annotated[
    Annotated[str, Tag("plain")] | Annotated[_FeatureEntry, Tag("entry")],
    Discriminator(lambda value: "plain" if isinstance(value, str) else "entry"),
]


class _Profile(_Strict):
    name: str | None = None
    description: str = ""
    universe: _Universe
    exchange: str = "XNYS"
    months: _Int | None = Field(default=None, ge=1, le=300)
    as_of: _Date | None = None
    start: _Date | None = None
    end: _Date | None = None
    timeframes: list[str] = Field(default_factory=lambda: ["1d", "1m"], min_length=1)
    features: list[FeatureEntry] = Field(default_factory=list)
    seed: _Int = 0
    seeds: dict[str, _Int] = Field(default_factory=dict)
    reset_target_seconds: _Float = Field(default=30.0, gt=0, allow_inf_nan=False)
    source: SourceSpec = Field(default_factory=SyntheticSourceSpec)


def _first_error(path: Path, err: ValidationError) -> ProfileError:
    errors = err.errors()
    # A required field missing beside an unknown key of the same mapping is most likely that key misspelled:
    # `source: {kind: postgres, dns: ...}` said "source.dsn=None: Field required" and not a word of `dns`.
    missing = {e["loc"][:-1] for e in errors if e["type"] == "missing"}
    e = next((e for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] in missing), errors[0])
    parts = [str(p) for p in e["loc"]]
    kind = "synthetic"
    if parts[:1] == ["source"] and parts[1:2] and parts[1] in SOURCE_KINDS:
        kind = parts.pop(1)  # the union's tag: the user wrote source.path, not source.files.path
    if parts[:1] == ["features"] and parts[2:3] in (["plain"], ["entry"]):
        parts.pop(2)  # the same for features.1.params, not features.1.entry.params
    if e["type"] == "source_kind":
        parts.append("kind")
        e["input"] = e["input"].get("kind") if isinstance(e["input"], dict) else e["input"]
    if e["type"] == "missing":
        e["input"] = None  # pydantic gives the enclosing mapping; the user's value is "nothing"
    if e["type"] == "value_error":
        e["msg"] = str(e["ctx"]["error"])  # our own check's words, without pydantic's "Value error, "
    if e["type"] == "string_type" and isinstance(e["input"], bool | int | float):
        # `symbols: [AAPL, ON]` read ON as True: "=True: Input should be a valid string" named no ON
        e["msg"] += (
            "; YAML reads an unquoted yes, no, on, off, true or false as a boolean: write it in quotes (e.g. 'ON')"
            if isinstance(e["input"], bool)
            # not the number in quotes: YAML read 0700 as 448 (octal) and 1.50 as 1.5
            else "; YAML read it as a number: write it in quotes, exactly as in the file (e.g. '0700')"
        )
    if e["type"] == "model_type":  # "a valid dictionary or instance of _Universe" named our private class
        e["msg"] = "must be a mapping of fields"
        if parts == ["universe"] and isinstance(e["input"], list):  # a list of names written at `universe:`
            e["msg"] += ": write the names under `symbols:` (universe: {symbols: [AAPL, MSFT]})"
    if e["type"] == "extra_forbidden":  # `month: 3` said only "Extra inputs are not permitted"
        e["msg"] = _unknown_field(parts, kind)
    loc = ".".join(parts) or "(root)"
    more = len(errors) - 1
    reason = e["msg"] + (f" (+{more} more error{'s' * (more > 1)})" if more else "")
    return ProfileError(path, loc, e.get("input"), reason)


def _unknown_field(parts: list[str], kind: str) -> str:
    """Why a key is refused, with the field it is closest to where the key stands (``month``: months; in
    ``source:``, among the fields of its ``kind``)."""
    where, key = tuple(parts[:-1]), parts[-1]
    sources: dict[str, type[BaseModel]] = {
        "synthetic": SyntheticSourceSpec,
        "files": FilesSourceSpec,
        "postgres": PostgresSourceSpec,
    }
    models: dict[tuple[str, ...], type[BaseModel]] = {
        (): _Profile,
        ("universe",): _Universe,
        ("source",): sources[kind],
    }
    model = models.get(where, _FeatureEntry if where[:1] == ("features",) and len(where) == 2 else None)
    names = [f.alias or name for name, f in model.model_fields.items()] if model is not None else []
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f"unknown field (did you mean {close[0]}?)" if close else "unknown field"


class _KeyTwice(Exception):
    """A mapping's key given twice: where (``line N``), the key, and why, for ``_read_yaml``'s ProfileError."""

    def __init__(self, at: str, key: str, reason: str) -> None:
        super().__init__(at, key, reason)
        self.at, self.key, self.reason = at, key, reason


# libyaml when available: a 20,000-symbol profile parses in milliseconds instead of seconds.
class _YamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """A date that looks like one but is not (``as_of: 2025-02-30``) stays text, for the field's own check to
    name it: PyYAML's ValueError was a traceback."""

    def construct_yaml_timestamp(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError:
            return self.construct_scalar(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A key given twice in one mapping is an error: PyYAML kept the last, so a forgotten ``months: 1``
        below the ``months: 3`` just edited silently won. Keys a ``<<`` merge brings are meant to be overridden:
        only the mapping's own keys are compared, before the merge is flattened into them."""
        first_at: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue
            earlier = first_at.setdefault((key.tag, key.value), key)
            if earlier is not key:
                first = earlier.start_mark.line + 1
                raise _KeyTwice(
                    f"line {key.start_mark.line + 1}", key.value, f"given twice (first on line {first})"
                )
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


_YamlLoader.add_constructor("tag:yaml.org,2002:timestamp", _YamlLoader.construct_yaml_timestamp)


def _read_input(path: Path, inputs: list[tuple[Path, str | None]]) -> str:
    """The text of a file the profile is resolved from, its digest appended to ``inputs``: the digest is of
    the very bytes parsed, so a file edited during a refresh cannot be vouched for by the stamp it writes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:  # a universe CSV whose mode keeps the user out was a PermissionError traceback
        raise ProfileError(path, "(file)", str(path), f"cannot read: {exc.strerror or exc}") from exc
    inputs.append((path.absolute(), hashlib.sha256(raw).hexdigest()))
    try:
        # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which would else be part of
        # the first column's name (the universe's 'symbol' column then was not found)
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        byte = raw[exc.start : exc.start + 1]
        raise ProfileError(path, f"line {line}", byte, "not UTF-8 text: save the file as UTF-8") from None


def _yaml_error(path: Path, text: str, exc: yaml.YAMLError) -> ProfileError:
    """YAML's own words, the line and column it stopped at and that line's text (``line 2=None`` showed none),
    and where the construct it was reading began (an unclosed ``[`` is found only on a later line).

    Stopped at the file's end (an unclosed quote), the line named is the one the construct began on."""
    mark = getattr(exc, "problem_mark", None)
    begun = getattr(exc, "context_mark", None)
    context = getattr(exc, "context", None)
    lines = text.splitlines()
    reason = f"invalid YAML: {getattr(exc, 'problem', None) or exc}"
    if mark is not None and mark.line >= len(lines) and begun is not None:
        mark, reason = begun, f"{reason} ({context})" if context else reason
    elif context and begun is not None and mark is not None and begun.line != mark.line:
        reason += f" ({context} on line {begun.line + 1})"
    if mark is None or mark.line >= len(lines):
        return ProfileError(path, "(file)", None, reason)
    shown = without_secrets(
        lines[mark.line].strip()
    )  # the line's text, a source's DSN on it without its password
    return ProfileError(path, f"line {mark.line + 1}, column {mark.column + 1}", shown, reason)


def _read_yaml(path: Path, inputs: list[tuple[Path, str | None]]) -> dict[str, Any]:
    text = _read_input(path, inputs)
    try:
        data = yaml.load(text, Loader=_YamlLoader)
    except _KeyTwice as exc:
        raise ProfileError(path, exc.at, exc.key, exc.reason) from None
    except yaml.YAMLError as exc:
        raise _yaml_error(path, text, exc) from None
    if data is None:  # no YAML document at all: "(root)='NoneType': a profile must be a mapping" said what?
        raise ProfileError(path, "(root)", None, "the file is empty (a profile needs universe and months)")
    if not isinstance(data, dict):
        # Only the type: the root of a file that is not a profile is the whole file (never echo it).
        raise ProfileError(path, "(root)", type(data).__name__, "a profile must be a mapping")
    return data


# --- resolution --------------------------------------------------------------------------------------------


def _exchange(path: Path | str, fld: str, value: str) -> str:
    """The exchange code, in any case (``xnys`` is XNYS, as ``market status`` takes it), or one line naming it."""
    code = value.strip().upper()
    if code not in EXCHANGES:
        raise ProfileError(path, fld, value, f"unknown exchange (choices: {', '.join(EXCHANGES)})")
    return code


def _symbol(path: Path | str, fld: str, value: str) -> str:
    if not SYMBOL_RE.match(value):
        raise ProfileError(path, fld, value, f"not a valid symbol (must match {SYMBOL_RE.pattern})")
    return value


@dataclass(frozen=True, slots=True)
class _Row:
    """One universe row and where it was written, for an error to name that file and line (or field)."""

    symbol: str
    exchange: str
    asset_class: str
    file: Path
    at: str  # "universe.symbols.3" or "line 4"
    symbol_field: str
    exchange_field: str


def _universe_candidates(path: Path, name: str) -> tuple[Path, Path]:
    """Where ``universe.file: name`` is looked for, in order: next to the profile, then our data."""
    return path.parent / name, DATA_DIR / name


def _universe_file(path: Path, name: str, inputs: list[tuple[Path, str | None]]) -> Path:
    # only profiles with a universe file: not an import of the no-op refresh
    from refresher._file_obstacle import file_obstacle

    for candidate in _universe_candidates(path, name):
        st, reason = file_obstacle(candidate)
        if st is not None:
            return candidate
        if reason is not None:  # a directory or a looping link was "no such file", about a name one can see
            raise ProfileError(path, "universe.file", name, f"cannot read {candidate}: {reason}")
        inputs.append((candidate.absolute(), None))  # one appearing here later would be read instead
    raise ProfileError(path, "universe.file", name, f"no such file next to the profile or in {DATA_DIR}")


def _universe_rows(
    path: Path, u: _Universe, default_exchange: str, inputs: list[tuple[Path, str | None]]
) -> list[_Row]:
    """The universe's rows, in universe order."""
    if (u.symbols is None) == (u.file is None):
        raise ProfileError(path, "universe", None, "give exactly one of universe.symbols or universe.file")
    if u.symbols is not None:
        rows = [
            _Row(s, default_exchange, u.asset_class or "equity", path, f, f, "exchange")
            for i, s in enumerate(u.symbols)
            for f in [f"universe.symbols.{i}"]
        ]
        if not rows:
            raise ProfileError(path, "universe.symbols", u.symbols, "the universe is empty")
        if u.count is not None and u.count > len(rows):
            raise ProfileError(
                path, "universe.count", u.count, f"universe.symbols has only {len(rows)} symbols"
            )
        return rows if u.count is None else rows[: u.count]
    assert u.file is not None
    if not u.file.lower().endswith(".csv"):
        raise ProfileError(path, "universe.file", u.file, "must be a .csv file")
    ufile = _universe_file(path, u.file, inputs)
    with io.StringIO(_read_input(ufile, inputs), newline="") as fh:
        reader = csv.DictReader(fh)
        # A spreadsheet pads cells: "symbol " is the symbol column, as " AAPL " below it is AAPL.
        cols: dict[str, str] = {}
        for c in reader.fieldnames or []:
            name = c.strip().lower()
            if name in cols and name in _UNIVERSE_COLUMNS:  # DictReader would keep the last one's cells
                raise ProfileError(ufile, "line 1", c, f"named twice (first as {cols[name]!r})")
            cols[name] = c
        if "symbol" not in cols:
            # Not the header itself: the first line of a file that is no universe could be anything.
            raise ProfileError(
                ufile, "symbol", None, f"universe file needs a 'symbol' column ({len(cols)} found)"
            )
        rows, read = [], 0
        for rec in reader:
            if not any((cell or "").strip() for cell in rec.values() if isinstance(cell, str)):
                continue  # a line of blanks, like an empty line
            at = f"line {reader.line_num}"
            if not (rec[cols["symbol"]] or "").strip():
                raise ProfileError(ufile, at, rec[cols["symbol"]], "no symbol in this row")
            read += 1
            exchange = (rec.get(cols.get("exchange", ""), "") or "").strip()
            asset_class = (rec.get(cols.get("asset_class", ""), "") or "").strip() or "equity"
            if u.asset_class is None or asset_class == u.asset_class:
                exchange_field = f"{at}.exchange" if exchange else "exchange"
                rows.append(
                    _Row(
                        rec[cols["symbol"]].strip(),
                        exchange or default_exchange,
                        asset_class,
                        ufile,
                        at,
                        f"{at}.symbol",
                        exchange_field,
                    )
                )
    if not read:
        raise ProfileError(ufile, "symbol", None, "no symbols in this universe file")
    if not rows:
        raise ProfileError(path, "universe.asset_class", u.asset_class, f"no row of {ufile.name} has it")
    if u.count is not None:
        if u.count > len(rows):
            raise ProfileError(path, "universe.count", u.count, f"{ufile.name} has only {len(rows)} symbols")
        rows = rows[: u.count]
    return rows


def _listings(path: Path, p: _Profile, inputs: list[tuple[Path, str | None]]) -> tuple[Listing, ...]:
    rows = _universe_rows(path, p.universe, p.exchange, inputs)
    if len(rows) > p.universe.max_symbols:
        raise ProfileError(
            path,
            "universe",
            f"{len(rows)} symbols",
            f"more than universe.max_symbols={p.universe.max_symbols}; raise it in the profile if you mean it",
        )
    # By upper case: AAPL and aapl are one company twice (and an upstream keyed by one spelling has no other).
    first_of: dict[str, _Row] = {}
    listings = []
    for row in rows:
        sym = _symbol(row.file, row.symbol_field, row.symbol)
        first = first_of.setdefault(sym.upper(), row)
        if first is not row:
            raise ProfileError(row.file, row.symbol_field, sym, f"duplicate of {first.at} {first.symbol!r}")
        if sym in p.universe.exchanges:
            exch = _exchange(path, f"universe.exchanges.{sym}", p.universe.exchanges[sym])
        else:
            exch = _exchange(row.file, row.exchange_field, row.exchange)
        listings.append(Listing(sym, exch, row.asset_class, p.seeds.get(sym, p.seed)))
    seen = {listing.symbol for listing in listings}
    for table, fld in ((p.seeds, "seeds"), (p.universe.exchanges, "universe.exchanges")):
        for sym in table:
            if sym not in seen:
                raise ProfileError(path, f"{fld}.{sym}", table[sym], "symbol is not in the universe")
    return tuple(listings)


def _add_months(d: dt.date, n: int) -> dt.date:
    k = d.year * 12 + d.month - 1 + n
    return dt.date(k // 12, k % 12 + 1, 1)


def months_covering(start: dt.date, end: dt.date) -> tuple[dt.date, ...]:
    """First-of-month dates of every month that [start, end] touches."""
    first, last = start.replace(day=1), end.replace(day=1)
    out = []
    while first <= last:
        out.append(first)
        first = _add_months(first, 1)
    return tuple(out)


def _date_range(
    path: Path, p: _Profile, as_of: dt.date | None, exchanges: Sequence[str]
) -> tuple[dt.date, dt.date]:
    """Inclusive [start, end]: ``months`` whole calendar months ending with as_of's (partial) month, or start/end.

    Counting whole months (rather than as_of minus N months) keeps every month but the last stable from one
    day to the next, so a daily refresh re-fetches only the current month.
    """
    if p.months is not None and p.start is not None:
        raise ProfileError(path, "start", p.start.isoformat(), "give either months or start/end, not both")
    if p.months is None and p.start is None:
        raise ProfileError(path, "months", None, "give months (counted back from as_of) or start/end")
    if p.as_of is not None and p.end is not None and p.as_of != p.end:
        # both name the last day: with both, `end` won and the user's as_of silently did nothing
        raise ProfileError(
            path, "as_of", p.as_of.isoformat(), f"and end={p.end} both name the last day: give one"
        )
    end = as_of or p.end or p.as_of
    if end is None:
        end = _last_closed(path, p.exchange, exchanges)
    else:
        end_field = "end" if as_of is None and p.end else "as_of"
        if end < CALENDAR_START:  # and counted back from year 1, a year 0 (a ValueError's traceback)
            raise ProfileError(path, end_field, end.isoformat(), _BEFORE_CALENDARS)
        _require_closed(path, end_field, end, exchanges)
    if p.months is not None:
        start = _add_months(end.replace(day=1), -(p.months - 1))
        if start < CALENDAR_START:  # the field the user wrote, not the `start` they did not
            raise ProfileError(
                path,
                "months",
                p.months,
                f"counted back from {end} the window starts {start}, {_BEFORE_CALENDARS}",
            )
    else:
        assert p.start is not None
        start = p.start
    if start > end:
        raise ProfileError(path, "start", start.isoformat(), f"after the end date {end}")
    if start < CALENDAR_START:
        raise ProfileError(path, "start", start.isoformat(), _BEFORE_CALENDARS)
    return start, end


def _last_closed(path: Path, exchange: str, exchanges: Sequence[str]) -> dt.date:
    """The default end: ``exchange``'s last closed session, or the universe's other exchange's last closed one
    when that exchange has a session up to it still to close (Tokyo's closed day, New York's still trading).
    Read from the cached session times, without numpy: a no-op refresh asks this too."""
    try:
        end = last_completed_session(exchange)
        for other in dict.fromkeys(exchanges):
            if first_unclosed_session(other) <= end:
                end = last_completed_session(other)
    except CalendarError as exc:
        raise ProfileError(path, "as_of", None, exc.message) from exc
    return end


def _require_closed(path: Path, field: str, end: dt.date, exchanges: Sequence[str]) -> None:
    """Refuse an end with a session up to it that has not closed: the synthetic source made up its bars (a
    market that has not traded), the files and postgres sources found none or part of a day; no source can
    load it whole. A weekend or holiday after the last closed session is fine."""
    for exchange in dict.fromkeys(exchanges):
        try:
            last = last_completed_session(exchange)
            unclosed = first_unclosed_session(exchange) if end > last else None
        except CalendarError as exc:
            raise ProfileError(path, field, end.isoformat(), exc.message) from exc
        if unclosed is not None and unclosed <= end:
            raise ProfileError(
                path,
                field,
                end.isoformat(),
                f"{exchange}'s session of {unclosed} has not closed yet (its last closed session: {last}); "
                "leave as_of out to end at the last closed session",
            )


def _source(path: Path, s: SourceSpec) -> SourceSpec:
    if isinstance(s, FilesSourceSpec):
        root = s.path.expanduser()
        return s.model_copy(update={"path": root if root.is_absolute() else (path.parent / root).resolve()})
    return s


def profile_from_file(path: Path, *, as_of: dt.date | None = None) -> Profile:
    """Read, validate and resolve one profile file."""
    from refresher.features.registry import resolve_feature

    path = Path(path)
    inputs: list[tuple[Path, str | None]] = []
    data = _read_yaml(path, inputs)
    try:
        p = _Profile.model_validate(data)
    except ValidationError as exc:
        raise _first_error(path, exc) from None
    name = p.name or path.stem
    validate_profile(name, file=path, field="name")
    if p.name is not None and p.name != path.stem:
        raise ProfileError(path, "name", p.name, f"must equal the file name {path.stem!r}")
    p = p.model_copy(update={"exchange": _exchange(path, "exchange", p.exchange)})
    for i, tf in enumerate(p.timeframes):
        if tf not in TIMEFRAMES:
            raise ProfileError(
                path, f"timeframes.{i}", tf, f"unknown timeframe (choices: {', '.join(TIMEFRAMES)})"
            )
        if tf in p.timeframes[:i]:
            raise ProfileError(
                path, f"timeframes.{i}", tf, f"named twice (first as timeframes.{p.timeframes.index(tf)})"
            )
    features = [
        resolve_feature(path, f"features.{i}", feat)
        if isinstance(feat, str)
        else resolve_feature(
            path,
            f"features.{i}",
            feat.name,
            feat.as_,
            feat.params,
            function=feat.function,
            timeframe=feat.timeframe,
            version=feat.version,
        )
        for i, feat in enumerate(p.features)
    ]
    for i, use in enumerate(features):
        # A feature reads its timeframe's bars only: without them it would load nothing, and say nothing.
        if use.spec.timeframe not in p.timeframes:
            raise ProfileError(path, f"features.{i}", use.name, f"needs {use.spec.timeframe} in timeframes")
        earlier = next((e for e in features[:i] if e.name == use.name), use)
        if earlier != use:
            raise ProfileError(path, f"features.{i}", use.name, "named twice: give one of them another `as:`")
    listings = _listings(path, p, inputs)
    start, end = _date_range(path, p, as_of, [listing.exchange for listing in listings])
    return Profile(
        name=name,
        path=path.resolve(),
        description=p.description,
        listings=listings,
        timeframes=tuple(dict.fromkeys(tf for tf in TIMEFRAMES if tf in p.timeframes)),
        start=start,
        end=end,
        months=months_covering(start, end),
        features=tuple(dict.fromkeys(features)),
        seed=p.seed,
        reset_target_seconds=p.reset_target_seconds,
        source=_source(path, p.source),
        exchange=p.exchange,
        inputs=tuple(inputs),
    )


def with_source_policy(
    profile: Profile, *, on_bad_rows: BadRowPolicy | None = None, allow_shrink: bool | None = None
) -> Profile:
    """The profile with the command line's ``--on-bad-rows`` / ``--allow-shrink`` over its ``source:``."""
    update: dict[str, Any] = {}
    if on_bad_rows is not None:
        update["on_bad_rows"] = on_bad_rows
    if allow_shrink is not None:
        update["allow_shrink"] = allow_shrink
    if not update:
        return profile
    return dataclasses.replace(profile, source=profile.source.model_copy(update=update))


def load_profile(
    name_or_path: str,
    dirs: Sequence[Path],
    *,
    as_of: dt.date | None = None,
    private_dirs: Sequence[Path] = (),
) -> Profile:
    """A profile by name (searched in ``dirs``, first wins) or by path to a ``.yaml``/``.yml`` file.

    Nothing else is ever read: not a file of another kind (``/etc/passwd``), not a file under ``private_dirs``
    (the state dir, where server passwords live), even through a symlink.
    """
    path = find_profile_file(name_or_path, dirs, private_dirs=private_dirs)
    return profile_from_file(path, as_of=as_of)


def list_profiles(
    dirs: Sequence[Path], *, as_of: dt.date | None = None, errors: list[ProfileError] | None = None
) -> list[Profile]:
    """Every loadable profile in ``dirs`` sorted by name; invalid ones are skipped and appended to ``errors``."""
    out = []
    for _, f in sorted(profile_files(dirs).items()):
        try:
            out.append(profile_from_file(f, as_of=as_of))
        except ProfileError as exc:
            if errors is not None:
                errors.append(exc)
    return out


__all__ = [
    "DEFAULT_MAX_SYMBOLS",
    "BadRowPolicy",
    "FilesSourceSpec",
    "Listing",
    "PostgresSourceSpec",
    "Profile",
    "SourceSpec",
    "SyntheticSourceSpec",
    "list_profiles",
    "load_profile",
    "months_covering",
    "profile_from_file",
    "with_source_policy",
]
