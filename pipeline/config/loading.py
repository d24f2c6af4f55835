"""Loading configs: YAML recipes with ``_base_`` inheritance, dotted command-line overrides
(``optim.lr=1e-3``, values read as YAML), merged as site defaults <- recipe <- command line, then typed and
validated (:mod:`pipeline.config.sections`).

A recipe may inherit: a top-level ``_base_: other.yaml`` key (path relative to the recipe) is loaded first and
the recipe's keys are merged over it. :func:`load_train_config` is the training job's whole configuration step:
the recipe found by name, a budgeted resolution schedule's length made ``run.epochs``, the global batch turned into
per-rank values and the DeepSpeed JSON resolved.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from pipeline.config.batch import apply_global_batch
from pipeline.config.deepspeed import resolve_deepspeed_config
from pipeline.config.errors import ConfigError
from pipeline.config.recipes import find_recipe
from pipeline.config.schema import ResolutionScheduleConfig, TrainConfig
from pipeline.config.sections import from_dict

T = TypeVar("T")


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


def merge_sources(recipe: str | Path | None = None, overrides: Sequence[str] = (),
                  defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """defaults <- recipe YAML <- CLI overrides, as one plain nested mapping (not yet typed)."""
    data: dict[str, Any] = dict(defaults or {})
    if recipe is not None:
        data = deep_merge(data, load_yaml(recipe))
    return apply_overrides(data, overrides)


def load_config(cls: type[T], recipe: str | Path | None = None, overrides: Sequence[str] = (),
                defaults: Mapping[str, Any] | None = None) -> T:
    """defaults <- recipe YAML <- CLI overrides, then typed + validated into ``cls``."""
    return from_dict(cls, merge_sources(recipe, overrides, defaults))


def derive_budgeted_epochs(data: Mapping[str, Any], override_keys: set[str] = frozenset()) -> dict[str, Any]:
    """``data`` with ``run.epochs`` set to the plan's total when ``schedule.resolution.kind`` is ``budgeted`` (the
    budget decides the run's length; the recipe's own ``run.epochs`` is replaced). A ``run.epochs`` asked for on
    the command line that disagrees is refused: the budget is what to change."""
    res = (data.get("schedule") or {}).get("resolution") if isinstance(data.get("schedule"), Mapping) else None
    if not isinstance(res, Mapping) or res.get("kind") != "budgeted":
        return dict(data)
    total = from_dict(ResolutionScheduleConfig, res, prefix="schedule.resolution.").stage_plan().total_epochs
    run = data.get("run") if isinstance(data.get("run"), Mapping) else {}
    if "run.epochs" in override_keys and str(run.get("epochs")) != str(total):
        raise ConfigError(f"run.epochs: {run.get('epochs')!r} cannot be set with a budgeted resolution schedule, "
                          f"which trains {total} epochs; change schedule.resolution.budget or reference_epochs")
    return deep_merge(data, {"run": {"epochs": total}})


def load_train_config(recipe: str | Path | None, overrides: Sequence[str] = (), world_size: int = 1,
                      defaults: Mapping[str, Any] | None = None, recipe_dirs: Sequence[str | Path] = ()
                      ) -> tuple[TrainConfig, dict[str, Any]]:
    """defaults (site values) <- recipe YAML <- overrides -> validated TrainConfig with per-rank batch values for
    ``world_size`` (:func:`~pipeline.config.batch.apply_global_batch`) + the resolved DeepSpeed dict. Everything
    that can fail on user input fails here, as one ConfigError line, before any data or process group."""
    recipe = find_recipe(recipe, recipe_dirs)
    if recipe is not None:   # the runs table's recipe tag
        overrides = [f"tracking.recipe={Path(recipe).stem}", *overrides]
    data = merge_sources(recipe, overrides, defaults)
    keys = {o.split("=", 1)[0].strip().lstrip("-") for o in overrides}
    section = data.get("data")
    if "data.batch_size" in keys and isinstance(section, Mapping) and section.get("global_batch_size") is not None:
        # a per-rank batch asked for on the command line (benchmarks, smoke runs): the recipe's global batch is off
        res = (data.get("schedule") or {}).get("resolution") or {}
        if res.get("batch_sizes") and "schedule.resolution.batch_sizes" not in keys:
            raise ConfigError(f"schedule.resolution.batch_sizes: {res['batch_sizes']} are the recipe's global batches "
                              f"(data.global_batch_size={section['global_batch_size']}); with a per-rank "
                              f"data.batch_size give per-rank schedule.resolution.batch_sizes too")
        data = deep_merge(data, {"data": {"global_batch_size": None}})
    cfg = from_dict(TrainConfig, derive_budgeted_epochs(data, keys))
    cfg, _ = apply_global_batch(cfg, world_size)
    return cfg, resolve_deepspeed_config(cfg, world_size)
