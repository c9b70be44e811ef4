"""Typed, validated options: every ``ModelConfig`` / ``TrainConfig`` field is coerced to its declared type.

Options arrive as strings or YAML scalars (``--set lr=1e-3``, a YAML file, a stored ``config.json``). YAML 1.1
reads ``1e-3`` as the *string* ``"1e-3"``, and ``clip_norm=1e2`` as ``"1e2"``; before this module such
values reached torch as strings. :func:`coerce_fields` turns each value into its field's type (``float``,
``int``, ``bool``, ``str``, optionally ``None``) and :func:`check_range` validates ranges, both with
messages that name the option and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class PyrovaeWarning(UserWarning):
    """Data or settings that pyrovae accepts but that the user should know about (the CLI prints one line)."""


_NONE_STRINGS = ("none", "null", "~", "")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _allowed(tp: Any) -> tuple[tuple[type, ...], bool]:
    """(the non-None types of an annotation, whether None is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = typing.get_args(tp)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (tp,), tp is type(None)


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"option {name} must be a number, got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        raise ValueError(f"option {name} must be a number (e.g. {name}=0.001 or 1e-3), got {v!r}") from None


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"option {name} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    try:
        f = float(str(v).strip()) if not isinstance(v, float) else v
    except ValueError:
        raise ValueError(f"option {name} must be an integer (e.g. {name}=10), got {v!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise ValueError(f"option {name} must be an integer (e.g. {name}=10), got {v!r}")
    return int(f)


def _as_bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ValueError(f"option {name} must be true or false, got {v!r}")


_COERCE: dict[type, Callable[[str, Any], Any]] = {float: _as_float, int: _as_int, bool: _as_bool}


def coerce_value(name: str, tp: Any, value: Any) -> Any:
    """``value`` converted to the annotation ``tp`` (``float``, ``int``, ``bool``, ``str``, ``X | None``)."""
    allowed, optional = _allowed(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS):
        if optional:
            return None
        kind = allowed[0].__name__ if allowed else "a value"
        raise ValueError(f"option {name} needs a value of type {kind}, got {value!r}")
    errors = []
    for t in allowed:
        if t is str:
            if isinstance(value, str):
                return value
            errors.append(f"option {name} must be text, got {value!r}")
            continue
        try:
            return _COERCE[t](name, value)
        except ValueError as err:
            errors.append(str(err))
    raise ValueError(errors[0] if errors else f"option {name}: cannot read {value!r}")


def coerce_fields(obj: Any) -> None:
    """Coerce every field of the dataclass instance ``obj`` to its annotated type, in place."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, coerce_value(f.name, hints[f.name], getattr(obj, f.name)))


def preview(items: Sequence[Any], n: int = 10) -> str:
    """The first ``n`` of ``items`` as a list, with " ..." when there are more (for one-line errors)."""
    items = list(items)
    return f"{items[:n]}{' ...' if len(items) > n else ''}"


def check_range(
    name: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    choices: Iterable[str] | None = None,
) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` (``None`` passes) lies in the range / choices."""
    if value is None:
        return
    if choices is not None:
        choices = list(choices)
        if value not in choices:
            raise ValueError(f"option {name} must be one of {choices}, got {value!r}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"option {name} must be a finite number, got {value!r}")
    bounds = []
    if gt is not None and not value > gt:
        bounds.append(f"> {gt:g}")
    if ge is not None and not value >= ge:
        bounds.append(f">= {ge:g}")
    if lt is not None and not value < lt:
        bounds.append(f"< {lt:g}")
    if bounds:
        raise ValueError(f"option {name} must be {' and '.join(bounds)}, got {value!r}")


def replace_checked(obj: Any, kind: str, **kw: Any) -> Any:
    """``dataclasses.replace`` refusing unknown names (``kind``: "model" / "training" in the message)."""
    names = [f.name for f in dataclasses.fields(obj)]
    unknown = set(kw) - set(names)
    if unknown:
        raise ValueError(f"unknown {kind} option(s) {sorted(unknown)}; valid: {names}")
    return dataclasses.replace(obj, **kw)


def read_options_file(path: str | Path) -> dict[str, Any]:
    """A flat YAML mapping of options (``--config``), with one clear error for every way it can be wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such options file: {path}; pass a YAML file of key: value lines")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ValueError(f"cannot read options file {path}{where}: {problem}; fix its YAML") from None
    except UnicodeDecodeError:
        raise ValueError(f"options file {path} is not a text file; pass a YAML file of options") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(
            f"options file {path} must be a mapping of option: value lines (e.g. 'lr: 1e-3'), "
            f"not a {type(loaded).__name__}"
        )
    nested = [k for k, v in loaded.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(
            f"options file {path}: {nested} hold nested mappings; write every option on its own "
            "top-level line (e.g. 'n_latent: 10')"
        )
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def parse_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """``["n_latent=20", "lr=1e-3"]`` -> ``{"n_latent": 20, "lr": "1e-3"}`` (YAML scalars; typed later)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. n_latent=20)")
        k, v = item.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = yaml.safe_load(v)
        except yaml.YAMLError:
            out[k.strip().replace("-", "_")] = v
    return out


def route_options(options: Mapping[str, Any], groups: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Split flat ``key=value`` options into groups by name: one dict per group, in the order of ``groups``.

    ``groups``: {group name: a dataclass (its field names) or an iterable of names}; a key in no group is
    one ``ValueError`` listing every group's options (a name in two groups goes to the first).
    """
    names = {
        g: [f.name for f in dataclasses.fields(keys)] if dataclasses.is_dataclass(keys) else list(keys)
        for g, keys in groups.items()
    }
    out: list[dict[str, Any]] = [{} for _ in names]
    unknown = []
    for k, v in options.items():
        for i, keys in enumerate(names.values()):
            if k in keys:
                out[i][k] = v
                break
        else:
            unknown.append(k)
    if unknown:
        shown = "; ".join(f"{g} options: {sorted(keys)}" for g, keys in names.items())
        raise ValueError(f"unknown option(s) {sorted(unknown)}; {shown}")
    return out
