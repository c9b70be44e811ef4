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
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class PyrovaeWarning(UserWarning):
    """Data or settings that pyrovae accepts but that the user should know about (the CLI prints one line)."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 (core schema) scalars, which is what users mean: ``010`` is 10 (not
    octal 8), ``1:30`` is text (not sexagesimal 90), ``0x10`` / ``0b1`` / ``yes`` / ``on`` are text (so a
    number option refuses them), ``1e-3`` is a number; a key given twice is an error, not the last value."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"option {key!r} is given twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_INT, _FLOAT, _BOOL = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT, _BOOL)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# a leading zero (010) stays text: YAML 1.1 reads it as octal 8, YAML 1.2 as 10; the option refuses it
_Yaml12Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|(?:0|[1-9][0-9]*)(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Yaml12Loader.add_constructor(_INT, lambda loader, node: int(loader.construct_scalar(node), 10))


def _yaml_float(loader: yaml.SafeLoader, node: yaml.Node) -> float | str:
    text = loader.construct_scalar(node)
    try:
        return _float_text("value", text)
    except ValueError:
        return text  # 1e-400, 1e999: kept as written, so the option's own check names it


def _float_text(name: str, text: str) -> float:
    """``float(text)``, refusing a number that underflows to 0 or overflows to infinity."""
    s = text.strip()
    low = s.lower().lstrip("+-")
    if low in (".inf", ".nan"):
        s = s.replace(".", "", 1)
    out = float(s)
    mantissa = re.split(r"[eE]", s)[0]
    if out == 0 and re.search(r"[1-9]", mantissa):
        raise ValueError(
            f"option {name}={text} underflows to 0 in floating point; give a representable number"
        )
    if math.isinf(out) and "inf" not in low:
        raise ValueError(f"option {name}={text} overflows to infinity; give a representable number")
    return out


_Yaml12Loader.add_constructor(_FLOAT, _yaml_float)


def load_yaml(text: str) -> Any:
    """``text`` read as YAML 1.2 (see :class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


_NONE_STRINGS = ("none", "null", "~", "")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _allowed(tp: Any) -> tuple[tuple[Any, ...], bool]:
    """(the non-None types of an annotation, whether None is allowed); a ``Literal[...]`` stays whole."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = typing.get_args(tp)
        return tuple(a for a in args if a is not type(None)), type(None) in args
    return (tp,), tp is type(None)


def choices(tp: Any) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` annotation (the one place a typed option's choices are listed)."""
    if typing.get_origin(tp) is not typing.Literal:
        raise TypeError(f"{tp!r} is not a Literal annotation")
    return typing.get_args(tp)


def _as_float(name: str, v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"option {name} must be a number, got {v!r}")
    if isinstance(v, (int, float)):
        try:
            return float(v)
        except OverflowError:  # 10**400
            raise ValueError(
                f"option {name}={v} overflows to infinity; give a representable number"
            ) from None
    _check_leading_zero(name, v)
    try:
        float(str(v).strip())
    except ValueError:
        raise ValueError(f"option {name} must be a number (e.g. {name}=0.001 or 1e-3), got {v!r}") from None
    return _float_text(name, str(v))


def _as_int(name: str, v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError(f"option {name} must be an integer, got {v!r}")
    if isinstance(v, int):
        return v
    _check_leading_zero(name, v)
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


_LEADING_ZERO = re.compile(r"^[-+]?0[0-9_]+(?:\.|$)")


def _check_leading_zero(name: str, v: Any) -> None:
    text = v.strip() if isinstance(v, str) else ""
    if _LEADING_ZERO.match(text):
        digits = text.lstrip("+-").lstrip("0_")
        fixed = ("-" if text.startswith("-") else "") + (digits if digits[:1].isdigit() else "0" + digits)
        raise ValueError(
            f"option {name}={text} has a leading zero, which YAML 1.1 reads as octal and YAML 1.2 as "
            f"decimal; write it without the zero (e.g. {name}={fixed})"
        )


_COERCE: dict[type, Callable[[str, Any], Any]] = {float: _as_float, int: _as_int, bool: _as_bool}


def coerce_value(name: str, tp: Any, value: Any) -> Any:
    """``value`` converted to the annotation ``tp`` (``float``, ``int``, ``bool``, ``str``, ``Literal[...]``,
    ``X | None``)."""
    allowed, optional = _allowed(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_STRINGS):
        if optional:
            return None
        kind = allowed[0].__name__ if allowed else "a value"
        raise ValueError(f"option {name} needs a value of type {kind}, got {value!r}")
    errors = []
    for t in allowed:
        if typing.get_origin(t) is typing.Literal:  # one of a fixed set of words
            if value in typing.get_args(t):
                return value
            errors.append(f"option {name} must be one of {list(typing.get_args(t))}, got {value!r}")
            continue
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
    le: float | None = None,
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
    if le is not None and not value <= le:
        bounds.append(f"<= {le:d}" if isinstance(le, int) else f"<= {le:g}")
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
        loaded = load_yaml(path.read_text())
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
            out[k.strip().replace("-", "_")] = load_yaml(v)
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
