"""The features a profile can name, and how one entry of ``features:`` becomes a validated ``FeatureUse``.

A feature's parameters are the keyword-only arguments of its function; their annotations and defaults are the
one definition pydantic validates against, so a default documented in the signature is the default used.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from featurestore.errors import FeatureStoreError
from refresher.errors import ProfileError, exception_line
from refresher.features import compute

if TYPE_CHECKING:
    import pandas as pd

Compute = Callable[..., "pd.DataFrame"]
# A feature's name becomes a table name (features_<name>, at most 63 bytes in PostgreSQL).
FEATURE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,49}$")
# An entry's own ``version:`` (2, "2024-06-b", "1.3+data"): one short word, part of the key.
_VERSION_RE = re.compile(r"[\w.+-]{1,64}", re.ASCII)


@dataclass(frozen=True)
class FeatureSpec:
    """A named, versioned feature computation; ``needs_universe`` features read a ``benchmark`` column.

    ``version`` is part of the feature-store key: bump it when the numbers a feature produces change (the key
    covers the source of ``compute`` and ``bulk`` as well, so an edit there recomputes without one).
    ``ordered`` lists parameter pairs that must be strictly increasing (a fast window below a slow one).
    """

    name: str
    version: str
    compute: Compute
    needs_universe: bool = False
    ordered: tuple[tuple[str, str], ...] = ()
    # "1m": computed per (symbol, month) from minute bars, one row per session; "1d": from daily bars.
    timeframe: str = "1d"

    @property
    def is_user(self) -> bool:
        """A user's ``module:function`` (``user_feature``): nothing is known of what it reads or writes."""
        return self.version == "user"

    @property
    def params_model(self) -> type[BaseModel]:
        return _params_model(self.compute)

    @property
    def defaults(self) -> dict[str, Any]:
        """Every parameter with its default value."""
        return self.params_model().model_dump()


@dataclass(frozen=True)
class FeatureUse:
    """One entry of a profile's ``features:``: a registered feature, the name its table and ledger rows go
    under (``as:``, the feature's own name by default), and its parameters, validated with defaults filled in.
    """

    name: str
    spec: FeatureSpec
    params: tuple[tuple[str, Any], ...] = ()
    # The profile's ``version:`` of the entry (None: not given), part of its store key and input hash.
    version: str | None = None

    @property
    def feature(self) -> str:
        """The registered name, or ``module:function`` for a user's function."""
        return self.spec.name

    @property
    def params_json(self) -> str:
        """The parameters canonically: part of the store key and of ``refresher_features.input_hash``."""
        return json.dumps(dict(self.params), sort_keys=True, separators=(",", ":"), default=_param_json)

    def compute(self, bars: pd.DataFrame) -> pd.DataFrame:
        return self.spec.compute(bars, **dict(self.params))


def _param_json(value: Any) -> dict[str, str]:
    """``json.dumps``'s stand-in for a parameter JSON has no form for (a YAML date, a date default of a user's
    function): the store's hash of it, which tags its type. FeatureStoreError for a type the store cannot key."""
    # Imported for such a value only: loading a profile must not bring pyarrow.
    from featurestore.keys import config_hash

    return {"config_hash": config_hash(value)}


_MODELS: dict[Compute, type[BaseModel]] = {}


def _params_model(func: Compute) -> type[BaseModel]:
    """A strict pydantic model of ``func``'s keyword-only parameters: no coercion ("10" is not 10), no extras."""
    if func not in _MODELS:
        parameters = inspect.signature(func).parameters.values()
        # Only the keyword-only parameters' annotations are resolved: the others name pandas (a DataFrame in
        # and out), which loading a profile must not import.
        annotated = SimpleNamespace(
            __annotations__={
                p.name: p.annotation
                for p in parameters
                if p.kind is inspect.Parameter.KEYWORD_ONLY and p.annotation is not inspect.Parameter.empty
            }
        )
        try:
            hints = typing.get_type_hints(
                annotated, globalns=getattr(func, "__globals__", {}), include_extras=True
            )
        except Exception:  # a user's function with annotations that do not resolve: take values as given
            hints = {}
        fields: dict[str, Any] = {
            p.name: (hints.get(p.name, Any), ... if p.default is inspect.Parameter.empty else p.default)
            for p in parameters
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        # A function taking **kwargs accepts any parameter; otherwise an unknown one is a typo.
        extra: Literal["allow", "forbid"] = (
            "allow" if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters) else "forbid"
        )
        _MODELS[func] = create_model(
            f"{getattr(func, '__name__', 'feature')}_params",
            __config__=ConfigDict(extra=extra, strict=True),
            **fields,
        )
    return _MODELS[func]


# Every version one more since 3a3a0a5: before it, a user's function writing to its input frame changed the rows
# of the entries after it, which were stored and recorded in the ledger as the built-in's: an upgraded refresher
# would have kept them (a feature's source alone versions it, and that did not change).
FEATURES: Mapping[str, FeatureSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            FeatureSpec("high_low_detection", "2", compute.high_low_detection),
            FeatureSpec("trend_analysis", "2", compute.trend_analysis, ordered=(("fast", "slow"),)),
            FeatureSpec("full_analysis", "2", compute.full_analysis, ordered=(("macd_fast", "macd_slow"),)),
            FeatureSpec("performance_metrics", "2", compute.performance_metrics),
            FeatureSpec("websocket_testing", "3", compute.websocket_testing, timeframe="1m"),
            FeatureSpec("dashboard_data", "2", compute.dashboard_data),
            FeatureSpec("etf_metadata", "2", compute.etf_metadata),
            FeatureSpec("correlation_analysis", "2", compute.correlation_analysis, needs_universe=True),
            FeatureSpec("intraday_session", "2", compute.intraday_session, timeframe="1m"),
        )
    }
)


def get_feature(name: str) -> FeatureSpec:
    """The feature called ``name``, or ProfileError naming it and the choices."""
    try:
        return FEATURES[name]
    except KeyError:
        raise ProfileError(
            "(features)", "features", name, f"unknown feature (choices: {', '.join(FEATURES)})"
        ) from None


# The user's modules this process imported (``user_feature``): only they run code refresher does not know, such as
# a C extension's printf into libc's buffer of fd 1 (``cli``'s redirection flushes it when there are any).
USER_MODULES: set[str] = set()


def user_feature(path: Path | str, field: str, function: str) -> FeatureSpec:
    """The user's ``module:function`` as a feature; ProfileError when it cannot be imported or called."""
    module_name, _, attr = function.partition(":")
    if not module_name or not attr:
        raise ProfileError(path, field, function, "write the function as module.path:function_name")
    USER_MODULES.add(module_name)  # its code runs from here on, even if its import fails midway
    from refresher.features.modules import record_imports, user_modules

    record_imports()  # the source it computes with: the features are versioned later, maybe after an edit
    try:
        module = importlib.import_module(module_name)
    # The user's module: any import-time error is theirs to see, in one line; a sys.exit() at its top level (a
    # script's argument parsing) too, which would otherwise end refresher with that status and no word.
    except (Exception, SystemExit) as exc:
        raise ProfileError(
            path, field, function, f"cannot import {module_name}: {exception_line(exc)}"
        ) from None
    user_modules([module])  # those imported before ``record_imports``: their source as read now, not later
    func = getattr(module, attr, None)
    if not callable(func):
        raise ProfileError(path, field, function, f"{module_name} has no function {attr}")
    return FeatureSpec(function, "user", func)


def resolve_feature(
    path: Path | str,
    field: str,
    name: str,
    alias: str | None = None,
    params: Mapping[str, Any] | None = None,
    *,
    function: str | None = None,
    timeframe: str | None = None,
    version: Any = None,
) -> FeatureUse:
    """The validated use of feature ``name`` (or of the user's ``function``, loaded under ``name``) as written
    at ``field`` of profile ``path``; ProfileError naming the file, the field (down to the parameter) and the
    value otherwise."""
    mapping = alias is not None or params or function is not None or version is not None
    if version is not None and (
        not isinstance(version, str | int)
        or isinstance(version, bool)
        or not _VERSION_RE.fullmatch(str(version))
    ):
        reason = (
            "a version is a whole number or up to 64 letters, digits, '.', '_', '+' or '-' (2.5: write '2.5')"
        )
        raise ProfileError(path, f"{field}.version", version, reason)
    if function is not None and timeframe not in (None, "1d"):
        raise ProfileError(
            path, f"{field}.timeframe", timeframe, "a function computes over daily bars (1d) only"
        )
    if function is not None:
        if alias is not None:
            raise ProfileError(path, f"{field}.as", alias, "a function's table is its name: drop `as`")
        spec = user_feature(path, f"{field}.function", function)
    elif name in FEATURES:
        spec = FEATURES[name]
    else:
        where = f"{field}.name" if mapping else field
        raise ProfileError(path, where, name, f"unknown feature (choices: {', '.join(FEATURES)})")
    if function is None and timeframe not in (None, spec.timeframe):
        raise ProfileError(
            path, f"{field}.timeframe", timeframe, f"{name} computes from {spec.timeframe} bars"
        )
    table_name = name if alias is None else alias
    if not FEATURE_NAME_RE.match(table_name):
        where = f"{field}.as" if alias is not None else f"{field}.name"
        raise ProfileError(path, where, table_name, f"feature names must match {FEATURE_NAME_RE.pattern}")
    try:
        model = spec.params_model.model_validate(dict(params or {}))
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = ".".join(str(p) for p in error["loc"])
        given = (params or {}).get(str(error["loc"][0])) if error["loc"] else params
        reason = error["msg"]
        if error["type"] == "extra_forbidden":
            reason = f"not a parameter of {spec.name} (parameters: {', '.join(spec.params_model.model_fields) or 'none'})"
        raise ProfileError(path, f"{field}.params.{loc}", given, reason) from None
    values = model.model_dump()
    for key, value in values.items():
        try:
            json.dumps(value, default=_param_json)
        except (TypeError, ValueError, FeatureStoreError):
            reason = (
                f"type {type(value).__name__} cannot be part of the feature's key: use numbers, text or dates"
            )
            raise ProfileError(path, f"{field}.params.{key}", value, reason) from None
    for low, high in spec.ordered:
        if not values[low] < values[high]:
            raise ProfileError(
                path, f"{field}.params.{low}", values[low], f"must be below {high}={values[high]!r}"
            )
    return FeatureUse(
        table_name, spec, tuple(sorted(values.items())), None if version is None else str(version)
    )


def compute_universe(
    name: str, bars: Mapping[str, pd.DataFrame], params: Mapping[str, Any] | None = None
) -> dict[str, pd.DataFrame]:
    """Feature ``name`` for every symbol of a universe; universe features see the equal-weight benchmark."""
    use = resolve_feature("(features)", "features", name, None, params)
    if not use.spec.needs_universe:
        return {sym: use.compute(df) for sym, df in bars.items()}
    bench = compute.equal_weight_index(bars)
    return {sym: use.compute(df.assign(benchmark=bench.reindex(df.index))) for sym, df in bars.items()}


__all__ = [
    "FEATURES",
    "Compute",
    "FeatureSpec",
    "FeatureUse",
    "compute_universe",
    "get_feature",
    "resolve_feature",
]
