"""Typed config sections from plain data and back: pydantic converts and type-checks a nested mapping into the
section dataclasses, each section's ``validate()`` hook checks its cross-field rules, and any problem becomes one
:class:`ConfigError` line naming the dotted field.

Field types drive the conversion (pydantic's lax mode: ``'3'`` is an int, ``'true'`` a bool, ``5e-4`` read as
text a float, a number where a string belongs is kept as its text): ``Literal[...]`` fields accept only the
listed values, ``tuple[...]``/``list[...]`` fields a list (a lone number is read as a one-item list, so
``eval.resolutions=224`` works on the command line), nested dataclasses a mapping, and keys that name no field
are refused.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar, Union, get_args, get_origin

import pydantic

from pipeline.config.errors import ConfigError

T = TypeVar("T")

# unknown keys are errors; a number given for a string field is kept as its text (YAML reads `run_name: 123` as int)
_PYDANTIC = pydantic.ConfigDict(extra="forbid", coerce_numbers_to_str=True)
_KIND = {"int": "is not an integer", "float": "is not a number", "bool": "is not a boolean (true/false)",
         "string": "is not a string"}


@functools.cache
def _input_model(cls: type) -> type[pydantic.BaseModel]:
    # a stdlib dataclass takes its pydantic settings from the model it sits in
    return pydantic.create_model(f"{cls.__name__}Input", __config__=_PYDANTIC, value=(cls, ...))


def _optional_inner(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _annotation_at(cls: type, loc: tuple) -> Any:
    """The annotation of the field that ``loc`` (pydantic's error location) points at."""
    tp: Any = cls
    for part in loc:
        tp = _optional_inner(tp)
        if dataclasses.is_dataclass(tp) and isinstance(part, str):
            tp = typing.get_type_hints(tp).get(part, Any)
        elif get_origin(tp) in (tuple, list) and isinstance(part, int):
            args = get_args(tp)
            fixed = get_origin(tp) is tuple and not (len(args) == 2 and args[1] is Ellipsis)
            tp = (args[part] if part < len(args) else Any) if fixed else (args[0] if args else Any)
        else:
            return Any
    return _optional_inner(tp)


def _dotted(prefix: str, loc: tuple) -> str:
    out = prefix.rstrip(".")
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out


def _message(cls: type, prefix: str, err: Mapping[str, Any]) -> str:
    """pydantic's error -> the project's one line: ``field: value <what is wrong / allowed>``."""
    loc, kind, value = tuple(err["loc"][1:]), err["type"], err["input"]
    field = _dotted(prefix, loc)
    if kind == "unexpected_keyword_argument":
        owner = _annotation_at(cls, loc[:-1])
        allowed = sorted(f.name for f in dataclasses.fields(owner) if f.init)
        return f"{field}: unknown field (allowed: {allowed})"
    if kind in ("missing", "too_short", "too_long"):
        where = loc[:-1] if kind == "missing" else loc
        tp = _annotation_at(cls, where)
        if get_origin(tp) is tuple:
            return f"{_dotted(prefix, where)}: expected {len(get_args(tp))} values, got {value!r}"
    if kind == "literal_error":
        return f"{field}: {value!r} is not one of {list(get_args(_annotation_at(cls, loc)))}"
    if value is None:
        return f"{field}: null is not allowed"
    if kind.startswith(("dataclass_", "model_")):
        return f"{field}: expected a mapping for section {_annotation_at(cls, loc).__name__}, got {value!r}"
    if kind in ("tuple_type", "list_type", "iterable_type"):
        return f"{field}: expected a list, got {value!r}"
    if kind in ("dict_type", "mapping_type"):
        return f"{field}: expected a mapping, got {value!r}"
    what = _KIND.get(kind.split("_", 1)[0])
    return f"{field}: {value!r} {what}" if what else f"{field}: {value!r}: {err['msg']}"


def _set_at(data: dict[str, Any], loc: tuple, value: Any) -> None:
    node: Any = data
    for part in loc[:-1]:
        node = node[part]
    node[loc[-1]] = value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys, then run ``validate()``."""
    data = copy.deepcopy(dict(data or {}))
    while True:
        try:
            obj = _input_model(cls).model_validate({"value": data}).value
            break
        except pydantic.ValidationError as e:
            err = e.errors(include_url=False)[0]
            value = err["input"]
            if (err["type"] in ("tuple_type", "list_type") and isinstance(value, (int, float))
                    and not isinstance(value, bool)):
                _set_at(data, tuple(err["loc"][1:]), [value])   # a lone number for a list: a one-item list
                continue
            raise ConfigError(_message(cls, prefix, err)) from None
    validate(obj, prefix)
    return obj


def validate(obj: Any, prefix: str = "") -> None:
    """Run ``validate()`` on ``obj`` and every nested dataclass section (children first)."""
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            validate(child, f"{prefix}{f.name}.")
    hook = getattr(obj, "validate", None)
    if callable(hook):
        try:
            hook()
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(prefix) else f"{prefix}{msg}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML/JSON/MLflow params."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(obj)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


__all__ = ["flatten", "from_dict", "to_dict", "validate"]
