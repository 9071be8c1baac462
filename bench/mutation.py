"""Mutation score of the pure core, per module: ``make mutation`` (``python -m bench.mutation``).

mutmut 3 (config: ``[tool.mutmut]`` in pyproject.toml) mutates one module at a time with ONE worker, running
for each mutant only the fast tests that reach the mutated function. The score is killed / (killed + survived +
no tests + timeout): a mutant no test reaches counts against the module. Every survivor is listed with the
reason it is equivalent (it cannot change behaviour) from ``EQUIVALENT`` below, or flagged as unexplained, which
is a missing test. Too slow for ``make test`` (minutes per module on a busy 2-core machine).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "refresher/plan.py",
    "refresher/segments.py",
    "refresher/calendar.py",
    "featurestore/keys.py",
    "featurestore/fingerprint.py",
    # added by this wave: the validation rules at the source edge, the job queue's retry classification
    "refresher/sources/validate.py",
    "refresher/jobs/retry.py",
)
GOAL = 0.90
KILLED = {1, 3, 37}
STATUS = {
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    -24: "timeout",
    24: "timeout",
}

# Survivors that cannot change behaviour, keyed by module and the mutated line as `mutmut show` prints it
# (after the "+"). Keyed by text rather than mutant number so the notes survive edits elsewhere in the module.
_SIGNED = "a signed and an unsigned 8-byte length or count are the same bytes below 2**63"
_ZERO_COPY = (
    "the array has no nulls and a primitive type, so a zero-copy view always succeeds: same numpy array"
)
_MODULE_DEFAULT = (
    "unreachable default: the target is a function, a builtin or a class by then, and each has a `__module__` "
    "attribute (None at worst)"
)
_NO_WARNING = (
    "exchange_calendars emits no warning while building with the pinned pandas here; the filters guard other "
    "versions (a broken filter only fails when a warning is raised)"
)
_INT64_ALREADY = "the values are int64 (or datetime64[ns]) already: the same array either way"
_TEMP_NAME = "the temporary's name is never read: it is renamed over the target"
_NO_BREAK = "a day without a break stores break_start = break_end = close, so both branches give the close"
_CLIP = "searchsorted(...) - 1 lies in [-1, len - 1]; a -1 left unclipped indexes the last session, whose open is later"
_FROM_ARRAYS = "`Table.from_arrays(..., schema=)` casts each array to the schema's type: the same column"
_BOOL_ALREADY = "the mask is bool already"
_MASKED = "the placeholder stands where `when_ok` is False, and those rows are masked out afterwards"
_UNIQUE = "bars_table gets validated rows, whose times are unique: every sort gives the same order"
_STRICT = "both sides have one entry per bad row: `strict` never decides"
_SAME_ORDER = (
    "`_ORDER` is Segment's own dataclass order (symbol, timeframe, month) as a C-level key: a speed measure, "
    "the same order"
)
EQUIVALENT: dict[str, dict[str, str]] = {
    "refresher/plan.py": {
        "digest.update(len(raw).to_bytes(8, ))": "`int.to_bytes` defaults to big-endian since Python 3.11",
        "digest.update(len(raw).to_bytes(8, ) + raw)": "`int.to_bytes` defaults to big-endian since Python 3.11",
        "wanted = sorted(set(desired), key=None)": _SAME_ORDER,
        "wanted = sorted(set(desired), )": _SAME_ORDER,
        "stale = sorted((s for s in loaded if s not in wanted_set), key=None)": _SAME_ORDER,
        "stale = sorted((s for s in loaded if s not in wanted_set), )": _SAME_ORDER,
    },
    "featurestore/keys.py": {
        'return tag + struct.pack(">q", len(body)) + body': _SIGNED,
        'digest.update(struct.pack(">q", len(encoded)))': _SIGNED,
        'return tagged(b"F", b"nan" if (math.isnan(number)) and False else number.hex().encode())': (
            "`float.hex()` of every NaN, either sign, is already 'nan': the branch only states the intent"
        ),
        "name = f\"{getattr(target, '__module__', None)}.{target.__qualname__}\"": _MODULE_DEFAULT,
        "name = f\"{getattr(target, '__module__', )}.{target.__qualname__}\"": _MODULE_DEFAULT,
        "name = f\"{getattr(target, '__module__', 'XX?XX')}.{target.__qualname__}\"": _MODULE_DEFAULT,
        "if low is None and high is None:": "`min_max` of one column gives both bounds or neither",
        "scale = _NANOS_PER_UNIT[str(column.type.unit)] if pa.types.is_timestamp(column.type) else 1": (
            "the else value is always overwritten: a time column is a timestamp, date32 or date64"
        ),
    },
    "refresher/calendar.py": {
        'warnings.simplefilter("ignore", )': _NO_WARNING,
        'warnings.simplefilter("ignore", None)': _NO_WARNING,
        "return np.asarray(sched[col].dt.tz_convert(None).to_numpy(dtype=None).astype(np.int64))": _INT64_ALREADY,
        'sessions = (sched.index.to_numpy(dtype="datetime64[D]").astype(None)).astype(np.int64)': (
            "days as float64 and back to int64 are the same integers"
        ),
        "no_break = (b_start == nat) & (b_end == nat)": "a schedule's break start and end are NaT together",
        "return _cache_dir / f\"{exchange}-xc{installed_version('EXCHANGE_CALENDARS')}-{CALENDAR_START}-{last}.i64\"": (
            "installed_version normalises distribution names: the same version"
        ),
        "with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as handle:": _TEMP_NAME,
        'with tempfile.NamedTemporaryFile(dir=path.parent, suffix="XX.tmpXX", delete=False) as handle:': _TEMP_NAME,
        'with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".TMP", delete=False) as handle:': _TEMP_NAME,
        "with tempfile.NamedTemporaryFile(dir=path.parent, suffix=None, delete=False) as handle:": _TEMP_NAME,
        'with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=None) as handle:': (
            "None is falsy: the temporary is kept for os.replace"
        ),
        'i = np.clip(np.searchsorted(cal.opens, minutes, side="right") - 1, 0, len(cal.opens) + 1)': _CLIP,
        'i = np.clip(np.searchsorted(cal.opens, minutes, side="right") - 1, None, len(cal.opens) - 1)': _CLIP,
        'i = np.clip(np.searchsorted(cal.opens, minutes, side="right") - 1, 0, None)': _CLIP,
        "return np.asarray(inside & ~on_break & (minutes % _NS_PER_MIN == 0), dtype=None)": (
            "the mask is bool already"
        ),
        "return np.asarray(inside & ~on_break & (minutes % _NS_PER_MIN == 0), )": "the mask is bool already",
        "next_close = cal.break_starts[i] if t <= cal.break_starts[i] else cal.closes[i]": (
            "open means t is before the break start (or the close, which is the break start on days without one)"
        ),
        "next_close = cal.break_starts[nxt] if (cal.break_starts[nxt] < cal.closes[nxt]) or True else cal.closes[nxt]": _NO_BREAK,
        "next_close = cal.break_starts[nxt] if cal.break_starts[nxt] <= cal.closes[nxt] else cal.closes[nxt]": _NO_BREAK,
        "run_len = (np.stack([b_start - opens, closes - b_end], axis=1).ravel() / _NS_PER_MIN).astype(np.int64)": (
            "run lengths are non-negative: truncating a float quotient equals floor division (exact below 2**53 "
            "minutes)"
        ),
        "within = np.arange(total, dtype=None) - np.repeat(run_offset, run_len)": "arange of an int is int64 on Linux",
        "within = np.arange(total, ) - np.repeat(run_offset, run_len)": "arange of an int is int64 on Linux",
        "counts = run_len.reshape(-2, 2).sum(axis=1)": "numpy takes any negative size as the one inferred dimension",
        "lo = int(np.searchsorted(self.sessions, _days(start), ))": "searchsorted's side defaults to 'left'",
    },
    "refresher/sources/validate.py": {
        "return np.asarray(inside & bars.when_ok, dtype=None)": _BOOL_ALREADY,
        "return np.asarray(inside & bars.when_ok, )": _BOOL_ALREADY,
        "when = np.where(bars.when_ok, bars.when, 1)": _MASKED,
        "when = np.where(bars.when_ok, bars.when, None)": _MASKED
        + " (as an object array: slower, same values)",
        "keyed = pd.Series(np.where(bars.when_ok, bars.when, None))": _MASKED,
        'with np.errstate(invalid=None):  # NaN compares False: those rows are charged to "finite" already': (
            "numpy raises no floating-point warning for comparisons with NaN, so the errstate never decides"
        ),
        "when_array = pa.array(when[order].astype(np.int32), None)": _FROM_ARRAYS,
        "when_array = pa.array(when[order].astype(np.int32), )": _FROM_ARRAYS,
        "when_array = pa.array(when[order] // 1000, None)": _FROM_ARRAYS,
        "when_array = pa.array(when[order] // 1000, )": _FROM_ARRAYS,
        'when_array = pa.array(when[order] // 1000, pa.timestamp("us", tz=None))': _FROM_ARRAYS,
        'when_array = pa.array(when[order] // 1000, pa.timestamp("us", ))': _FROM_ARRAYS,
        'when_array = pa.array(when[order] // 1000, pa.timestamp("us", tz="XXUTCXX"))': _FROM_ARRAYS,
        'when_array = pa.array(when[order] // 1000, pa.timestamp("us", tz="utc"))': _FROM_ARRAYS,
        'volume = pa.array(np.rint(values["volume"][order]).astype(None))': (
            _FROM_ARRAYS + " (the rounded floats are whole numbers, so the cast is exact)"
        ),
        "symbols = pa.array(np.full(len(when), segment.symbol, dtype=object), None)": _FROM_ARRAYS,
        "symbols = pa.array(np.full(len(when), segment.symbol, dtype=object), )": _FROM_ARRAYS,
        "symbols = pa.array(np.full(len(when), segment.symbol, dtype=None), pa.string())": (
            "a numpy unicode array converts to the same Arrow strings"
        ),
        "symbols = pa.array(np.full(len(when), segment.symbol, ), pa.string())": (
            "a numpy unicode array converts to the same Arrow strings"
        ),
        "order = np.argsort(when, kind=None)": _UNIQUE,
        "order = np.argsort(when, )": _UNIQUE,
        'order = np.argsort(when, kind="STABLE")': "numpy reads the sort kind case-insensitively",
        'records = bars.raw.iloc[positions].astype(str).to_dict("RECORDS")': (
            "pandas reads the orient case-insensitively"
        ),
        "for p, record in zip(positions.tolist(), records, strict=None):": _STRICT,
        "for p, record in zip(positions.tolist(), records, ):": _STRICT,
        "for p, record in zip(positions.tolist(), records, strict=False):": _STRICT,
        "examples = tuple(_where(None, bars, int(p), key, short=True) for p in hit[:_EXAMPLES])": (
            "the short form of a place leaves the source out"
        ),
    },
    "featurestore/fingerprint.py": {
        "return bits // 8 if (bits % 8 == 0 and not pa.types.is_boolean(kind)) or True else 0": (
            "bool is the only fixed-width type whose bit width is not a multiple of 8, and 1 // 8 is 0 anyway"
        ),
        "return bits // 8 if bits % 8 == 0 or not pa.types.is_boolean(kind) else 0": (
            "bool is the only fixed-width type whose bit width is not a multiple of 8: both tests agree on it"
        ),
        "where = pc.indices_nonzero(chunk.is_null()).to_numpy(zero_copy_only=None).astype(np.int64)": _ZERO_COPY,
        "where = pc.indices_nonzero(chunk.is_null()).to_numpy(zero_copy_only=True).astype(np.int64)": _ZERO_COPY,
        "chunk.cast(pa.uint8()).to_numpy(zero_copy_only=None).astype(np.uint8).tobytes()": _ZERO_COPY,
        "chunk.cast(pa.uint8()).to_numpy(zero_copy_only=True).astype(np.uint8).tobytes()": _ZERO_COPY,
        'h.update(struct.pack("<Q", len(text)))': _SIGNED,
        'digest.update(struct.pack("<Q", table.num_rows))': _SIGNED,
        'outer.update(struct.pack("<Q", table.num_rows))': _SIGNED,
        "if data is not None or offsets[-1] > offsets[0]:": (
            "a chunk without a data buffer has only empty strings, and feeding zero bytes is a no-op"
        ),
        "if data is not None and offsets[-1] >= offsets[0]:": "feeding zero bytes is a no-op",
        "return lambda h, n, chunk: 0": "a feeder's return value is ignored",
        "return chunk.fill_null(None)": (
            "pyarrow's fill_null rebuilds the array and writes zeros under nulls even for a null fill value "
            "(pyarrow 26): the bytes fed are the same"
        ),
    },
}


def _mutmut(*args: str) -> subprocess.CompletedProcess[str]:
    mutmut = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(mutmut), *args], cwd=ROOT, capture_output=True, text=True, check=False)


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _exit_codes(path: str) -> dict[str, int | None]:
    meta = ROOT / "mutants" / f"{path}.meta"
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    return codes


@functools.cache
def _mutant_functions(path: str) -> dict[str, str]:
    source = (ROOT / "mutants" / path).read_text()
    return {
        node.name: ast.get_source_segment(source, node) or ""
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef)
    }


def _mutated_line(path: str, mutant: str) -> str:
    """The line(s) a mutant changes, as `mutmut show` would print them after the "+"."""
    # Read from mutmut's own mutated copy (each mutant is a function beside its ``__mutmut_orig``): a `mutmut
    # show` per survivor costs seconds on a busy machine, this costs nothing. Falls back to `mutmut show`.
    functions = _mutant_functions(path)
    short = mutant.rsplit(".", 1)[-1]
    original = functions.get(short.rsplit("__mutmut_", 1)[0] + "__mutmut_orig")
    if original is None or short not in functions:
        diff = _mutmut("show", mutant).stdout.splitlines()
    else:
        # Drop the def lines: they differ by name only.
        diff = list(difflib.unified_diff(original.splitlines()[1:], functions[short].splitlines()[1:], n=0))
    added = [line[1:].strip() for line in diff if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(added) or "(line removed)"


@dataclasses.dataclass(frozen=True)
class Survivor:
    name: str
    status: str
    line: str
    why: str


@dataclasses.dataclass(frozen=True)
class ModuleScore:
    """One module's mutation result: counts by status and every mutant not killed."""

    path: str
    statuses: Counter[str]
    survivors: tuple[Survivor, ...]
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def detected(self) -> int:
        # A mutant that makes the tests time out changed behaviour as surely as one that fails them.
        return self.statuses["killed"] + self.statuses["timeout"]

    @property
    def score(self) -> float:
        return self.detected / self.total if self.total else 1.0


def _status(code: int | None) -> str:
    if code is None:
        return "not checked"
    return "killed" if code in KILLED else STATUS.get(code, "suspicious")


SECONDS = ROOT / "mutants" / "seconds.json"


def run_module(path: str) -> None:
    """Mutate one module (its results land in mutmut's ``mutants/`` tree)."""
    started = time.monotonic()
    result = _mutmut("run", "--max-children", "1", f"{_module_name(path)}.*")
    if not (ROOT / "mutants" / f"{path}.meta").exists():
        raise SystemExit(f"mutmut run failed for {path}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    seconds = json.loads(SECONDS.read_text()) if SECONDS.exists() else {}
    SECONDS.write_text(json.dumps({**seconds, path: time.monotonic() - started}))


def score_module(path: str) -> ModuleScore:
    """A mutated module's counts, and its survivors with the reason each is equivalent."""
    seconds = json.loads(SECONDS.read_text()).get(path, 0.0) if SECONDS.exists() else 0.0
    codes = _exit_codes(path)
    notes = EQUIVALENT.get(path, {})
    survivors = []
    for name in sorted(name for name, code in codes.items() if _status(code) not in ("killed", "timeout")):
        line = _mutated_line(path, name)
        why = notes.get(line, "UNEXPLAINED: a missing test")
        survivors.append(Survivor(name.rsplit(".", 1)[-1], _status(codes[name]), line, why))
    statuses = Counter(_status(code) for code in codes.values())
    return ModuleScore(path, statuses, tuple(survivors), seconds)


def render(results: list[ModuleScore]) -> str:
    lines = [
        "# Mutation score of the pure core",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with mutmut, one worker, `nice -n 19`, the "
        "fast tests of `[tool.mutmut]` in pyproject.toml. Reproduce: `make mutation` (or `make mutation "
        f"MODULES=refresher/plan.py` for one). Goal: >= {GOAL:.0%} killed per module; every survivor is listed "
        "with why it cannot change behaviour, or as UNEXPLAINED (a missing test). Score = (killed + timeout) / "
        "mutants: a mutant that hangs the tests is detected.",
        "",
        "| module | mutants | killed | timeout | score | survived | no tests | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| `{r.path}` | {r.total} | {r.statuses['killed']} | {r.statuses['timeout']} | {r.score:.1%} | "
            f"{r.statuses['survived']} | {r.statuses['no tests']} | {r.seconds:.0f} |"
        )
    for r in results:
        if not r.survivors:
            continue
        lines += [
            "",
            f"## Survivors in `{r.path}`",
            "",
            "| mutant | status | mutated line | why |",
            "|---|---|---|---|",
        ]
        for survivor in r.survivors:
            escaped = survivor.line.replace("|", "\\|")
            lines.append(f"| `{survivor.name}` | {survivor.status} | `{escaped}` | {survivor.why} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "mutation.md")
    parser.add_argument("--modules", nargs="*", default=list(MODULES))
    parser.add_argument("--keep", action="store_true", help="reuse mutants/ from an earlier run")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from mutants/")
    args = parser.parse_args(argv)
    if not (args.keep or args.report_only):
        # A fresh tree: results cached across source or test edits are the ones a mutation report must not trust.
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)
    os.environ.setdefault("PYTHONHASHSEED", "0")
    for path in [] if args.report_only else args.modules:
        print(f"mutating {path} ...", flush=True)
        run_module(path)
        print(f"  {score_module(path).score:.1%} detected", flush=True)
    results = [score_module(path) for path in args.modules]
    args.output.write_text(render(results))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
