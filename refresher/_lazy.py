"""Imports deferred to first use: a module needed at call time only, and a package's public names."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for the module ``name`` until an attribute is read, then imports it (once: sys.modules keeps it).

    ``refresher.features.compute`` holds pandas so: a profile load reads the feature functions' signatures
    (their parameters and defaults), and must not pay pandas' import for it (issue 13: `refresher profiles`
    and a no-op refresh).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


def lazy_attributes(package: str, names: Mapping[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """A package's PEP 562 ``__getattr__``: each public name imported from its module (``names`` maps a module
    of ``package`` to the names it defines) on first use, then kept as a plain attribute of the package."""
    home = {name: module for module, defined in names.items() for name in defined}

    def __getattr__(name: str) -> Any:
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["LazyModule", "lazy_attributes"]
