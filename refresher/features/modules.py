"""The user's own modules a user feature's code comes from: their source is part of the feature's version.

From the modules a feature's function is named by and defined in, every module their source imports (``import
x``, ``import x.y as z``, ``from x import y``, ``from . import y``, at the top or inside a function), and the
modules those import, transitively, cycles included, as long as the module is the user's: a file outside the
standard library, site-packages and refresher itself, or a module of the package a root belongs to, wherever it
is installed. Editing a helper or a constant the function imports from another of the user's modules recomputes
the feature, as editing one beside it does; a library's code is versioned by its install, not read.

Imports are found by parsing the source, and located without importing anything: a module this process already
imported by its ``__file__``, another through the path finder (a function's lazy import not yet run). A module
imported is versioned by its source as read when it was imported (``record_imports``), the code this process runs.
"""

from __future__ import annotations

import ast
import functools
import importlib.machinery
import importlib.util
import os
import sys
import weakref
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class UserModule:
    """One of the user's modules: the bytes of its file, and the modules its source imports."""

    name: str
    source: bytes
    imports: frozenset[str]


# Per refresh: the user's modules read so far (None: not the user's, or not found), by module name.
Seen = MutableMapping[str, UserModule | None]


def user_modules(roots: Iterable[ModuleType], seen: Seen | None = None) -> list[UserModule]:
    """``roots`` (wherever their files are: a feature of a package the user installed) and the modules they
    import, transitively, that are the user's or of a root's package, sorted by name; a module without a source
    file is left out.

    ``seen``: what an earlier call of the same refresh read (entries of one project share their helpers)."""
    seen = {} if seen is None else seen
    names = {r.__name__ for r in roots}
    # The roots' packages are read wherever they are installed, as the roots are: a package of the user's
    # installed into site-packages (``pip install .``) keeps its helpers beside the function, and a new install
    # of an edited helper was served the rows of the old one.
    packages = {name.partition(".")[0] for name in names}
    found = {m.name: m for m in (_read(name, anywhere=True) for name in names) if m is not None}
    todo = [name for module in found.values() for name in module.imports]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        if name.partition(".")[0] in packages:
            # Not kept in ``seen``: to another entry, whose roots are of other packages, it is a library.
            module = _read(name, anywhere=True)
        else:
            if name not in seen:
                seen[name] = _read(name)
            module = seen[name]
        if module is not None:
            found[name] = module
            todo.extend(module.imports - found.keys())
    return [found[name] for name in sorted(found)]


def _read(name: str, *, anywhere: bool = False) -> UserModule | None:
    """Module ``name`` as read now; None when it has no source file, or it is not the user's (unless ``anywhere``)."""
    located = _locate(name)
    if located is None:
        return None
    path, is_package = located
    if not path.endswith(".py") or not (anywhere or _is_users(path)):
        return None
    source = _source(name, path)
    if source is None:
        return None
    package = name if is_package else name.rpartition(".")[0]
    return UserModule(name, source, frozenset(_imports(source, package)))


# The source of each of the user's modules as this process imported it, by the module's spec (one per import: a
# module imported again has a new one): what its code is, in a process (a worker) that refreshes again after the
# user edited the file, until it imports the module again. By identity (a spec is not hashable), while it lives.
_IMPORTED: dict[int, tuple[weakref.ref[object], bytes]] = {}


def _remember(key: object, source: bytes) -> bytes:
    """Record ``source`` as ``key``'s; it."""

    def forget(ref: weakref.ref[object], ident: int = id(key)) -> None:
        if _IMPORTED.get(ident, (None,))[0] is ref:
            del _IMPORTED[ident]

    _IMPORTED[id(key)] = (weakref.ref(key, forget), source)
    return source


def _recalled(key: object) -> bytes | None:
    ref, source = _IMPORTED.get(id(key), (None, None))
    return source if ref is not None and ref() is key else None


class _Recorder:
    """First on ``sys.meta_path``: finds a module's spec with the finders after it, as the import system would, and
    reads the source of a module of the user's as it is imported (a helper imported inside the function too)."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        finders = sys.meta_path
        after = finders[finders.index(self) + 1 :] if self in finders else finders[:]
        for finder in after:
            find = getattr(finder, "find_spec", None)
            spec: importlib.machinery.ModuleSpec | None = (
                find(name, path, target) if find is not None else None
            )
            if spec is not None:
                break
        else:
            return None
        origin = spec.origin
        if spec.has_location and isinstance(origin, str) and origin.endswith(".py") and _is_users(origin):
            source = _file_bytes(origin)
            if source is not None:  # else the loader finds out
                _remember(spec, source)
        return spec


def record_imports() -> None:
    """From here on, record the source of the user's modules as this process imports them (idempotent)."""
    if not any(isinstance(finder, _Recorder) for finder in sys.meta_path):
        _not_users()  # computed before: it imports
        sys.meta_path.insert(0, _Recorder())


def _source(name: str, path: str) -> bytes | None:
    """Module ``name``'s source: as imported (recorded then, or first read since), else the file as it is now."""
    module = sys.modules.get(name)
    key = None if module is None else getattr(module, "__spec__", None) or module
    if key is not None and (recorded := _recalled(key)) is not None:
        return recorded
    source = _file_bytes(path)
    if source is None:
        return None
    # Imported before ``record_imports``: as first read.
    return source if key is None else _remember(key, source)


def module_source(name: str) -> bytes | None:
    """Module ``name``'s source as this process runs it (read as first asked after its import, or the file as it is
    now when it is not imported yet), importing nothing; None when it has no source file."""
    located = _locate(name)
    return None if located is None else _source(name, located[0])


def _file_bytes(path: str) -> bytes | None:
    """The bytes of the file at ``path``; None when it cannot be read."""
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError:
        return None


def _locate(name: str) -> tuple[str, bool] | None:
    """The file of module ``name`` and whether it is a package, importing nothing; None when it has no file."""
    module = sys.modules.get(name)
    if module is not None:
        path = getattr(module, "__file__", None)
        return (path, hasattr(module, "__path__")) if isinstance(path, str) else None
    parent = name.rpartition(".")[0]
    search: list[str] | None = None  # a parent not imported: ``_find`` finds it
    if parent and (imported := sys.modules.get(parent)) is not None:
        search = list(getattr(imported, "__path__", None) or [])
        if not search:
            return None
    spec = _find(name, search)
    if spec is None or not spec.has_location or not isinstance(spec.origin, str):
        return None
    return spec.origin, spec.submodule_search_locations is not None


def _find(name: str, search: list[str] | None) -> importlib.machinery.ModuleSpec | None:
    """The path finder's spec of ``name`` (searching its parent's ``search`` path), resolving parents it needs."""
    if search is None and "." in name:
        parent = _find(name.rpartition(".")[0], None)
        search = list(parent.submodule_search_locations or []) if parent is not None else None
        if not search:
            return None
    try:
        return importlib.machinery.PathFinder.find_spec(name, search)
    except (ImportError, ValueError):
        return None


def _imports(source: bytes, package: str) -> set[str]:
    """Every module name ``source`` imports (a package's parents too: importing ``a.b`` runs ``a``), and for
    ``from x import y`` also ``x.y``, which is a module when ``y`` is a submodule (the caller finds out)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()  # not what this process imported (edited since): its bytes are hashed all the same
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            try:
                base = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            except (ImportError, ValueError):
                continue  # a relative import beyond the top-level package: Python refuses it too
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return {
        ".".join(parts[:n]) for parts in (name.split(".") for name in names) for n in range(1, len(parts) + 1)
    }


def _is_users(path: str) -> bool:
    # A library's path is seldom a link: its realpath (some lstat calls) is asked only of what looks the user's.
    return not os.path.abspath(path).startswith(_not_users()) and not os.path.realpath(path).startswith(
        _not_users()
    )


@functools.cache
def _not_users() -> tuple[str, ...]:
    """The directories whose modules are not the user's: the standard library, site-packages (this environment's,
    the user's, any on ``sys.path``) and refresher's own packages (an editable install lies outside them)."""
    import site
    import sysconfig

    import featurestore
    import refresher

    paths = sysconfig.get_paths()
    dirs = {paths[kind] for kind in ("stdlib", "platstdlib", "purelib", "platlib") if kind in paths}
    dirs.update(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    dirs.update(p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages"))
    dirs.update(os.path.dirname(package.__file__ or "") for package in (refresher, featurestore))
    return tuple(
        {os.path.join(resolve(d), "") for d in dirs if d for resolve in (os.path.abspath, os.path.realpath)}
    )


__all__ = ["Seen", "UserModule", "module_source", "record_imports", "user_modules"]
