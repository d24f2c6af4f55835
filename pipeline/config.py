"""Configs as data: typed dataclass sections, YAML recipes, dotted CLI overrides, up-front validation.

Every config section is a ``@dataclass``. Field types drive parsing and validation:

* ``Literal[...]`` fields accept only the listed values,
* ``int`` / ``float`` / ``bool`` / ``str`` / ``tuple[...]`` / ``list[...]`` / ``Optional[...]`` are coerced
  from YAML or CLI text,
* nested dataclasses are built recursively,
* a section may define ``validate(self)`` for cross-field rules; it raises :class:`ConfigError`.

Any problem raises :class:`ConfigError` whose message is one line naming the dotted field and the allowed
values, e.g. ``data.format: 'tfrecord' is not one of ['wds', 'ffcv']``. Nothing here reads data or touches a
process group, so callers validate before doing either.

Recipes may inherit: a top-level ``_base_: other.yaml`` key (path relative to the recipe) is loaded first and
the recipe's keys are merged over it.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A one-line, user-facing configuration error (raised before any data or process group is touched)."""


# ----------------------------------------------------------------------------------------- field checks
def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{field}: {value!r} is not one of {allowed}")


def check_positive(field: str, value: float, allow_zero: bool = False) -> None:
    if value is None or (value < 0 if allow_zero else value <= 0):
        raise ConfigError(f"{field}: {value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_range(field: str, value: float, lo: float, hi: float) -> None:
    if value is None or not (lo <= value <= hi):
        raise ConfigError(f"{field}: {value!r} must be in [{lo}, {hi}]")


def check_multiple(field: str, value: int, of: int) -> None:
    if value is None or value % of != 0:
        raise ConfigError(f"{field}: {value!r} must be a multiple of {of}")


# ----------------------------------------------------------------------------------------- parsing
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(field: str, tp: Any, value: Any) -> Any:
    """Coerce ``value`` (from YAML or CLI) to annotation ``tp``; raise ConfigError naming ``field``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = list(get_args(tp))
        if value not in allowed:
            raise ConfigError(f"{field}: {value!r} is not one of {allowed}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{field}: null is not allowed")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(field, arg, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{field}: {value!r} does not match {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{field}.")
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value]
            else:
                raise ConfigError(f"{field}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(f"{field}[{i}]", args[0], v) for i, v in enumerate(value)]
        elif origin is tuple and args:
            value = list(value)
            if len(value) != len(args):
                raise ConfigError(f"{field}: expected {len(args)} values, got {value!r}")
            items = [_coerce(f"{field}[{i}]", a, v) for i, (a, v) in enumerate(zip(args, value))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(f"{field}[{i}]", inner, v) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else list(items)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{field}: {value!r} is not a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{field}: {value!r} is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{field}: {value!r} is not an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{field}: {value!r} is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{field}: {value!r} is not a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{field}: {value!r} is not a string")
    if tp is Path:
        return Path(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, rejecting unknown keys, then run ``validate()``."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field (allowed: {sorted(fields)})")
    kwargs = {name: _coerce(f"{prefix}{name}", hints[name], value) for name, value in data.items()}
    obj = cls(**kwargs)
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


# ----------------------------------------------------------------------------------------- YAML + CLI
def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML recipe, resolving ``_base_`` inheritance (relative to the recipe's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: {path} must hold a mapping at top level")
    base = data.pop("_base_", None)
    if base:
        bases = [base] if isinstance(base, str) else list(base)
        merged: dict[str, Any] = {}
        for b in bases:
            merged = deep_merge(merged, load_yaml(path.parent / b))
        data = deep_merge(merged, data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=1e-3'`` -> (['optim', 'lr'], 0.001). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override: {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override: {text!r} has an empty field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    out = deep_merge({}, data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = {} if nxt is None else nxt
                if not isinstance(nxt, dict):
                    raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
                node[part] = nxt
            node = nxt
        node[path[-1]] = value
    return out


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = (),
                defaults: Mapping[str, Any] | None = None) -> T:
    """defaults <- recipe YAML <- CLI overrides, then typed + validated into ``cls``."""
    data: dict[str, Any] = dict(defaults or {})
    if recipe is not None:
        data = deep_merge(data, load_yaml(recipe))
    data = apply_overrides(data, overrides)
    return from_dict(cls, data)
