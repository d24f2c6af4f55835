"""The DeepSpeed JSON resolved against a recipe: the dict handed to ``deepspeed.initialize``.

The JSON holds what a user picks between (ZeRO stage, buckets, communication dtype); the recipe decides the rest:
batch sizes (``train_batch_size = micro x accumulation x world``), ``gradient_clipping`` (``optim.grad_clip``)
and, with ``optim.implementation: deepspeed``, the optimizer section. A value the JSON pins is checked against
the recipe's, and a disagreement is one ConfigError line naming both. The precision is ``run.precision``'s
(applied per machine by :func:`pipeline.device.finalize_deepspeed_config`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipeline.config.errors import ConfigError
from pipeline.config.recipes import DEEPSPEED_CONFIGS, ROOT
from pipeline.config.schema import OptimConfig, TrainConfig

DS_DTYPES = ("fp32", "bf16", "fp16")


def _resolve_path(path: str) -> Path:
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        p = ROOT / p
    return p


def read_deepspeed_json(path: str) -> dict[str, Any]:
    """``run.deepspeed_config``'s JSON (a path, or relative to the repository root)."""
    p = _resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"run.deepspeed_config: file not found: {path} "
                          f"(shipped: {sorted(x.name for x in DEEPSPEED_CONFIGS.glob('*.json'))})")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"run.deepspeed_config: {path} is not valid JSON ({e})") from None


def _find_auto(d: Any, prefix: str = "") -> str | None:
    if isinstance(d, dict):
        for k, v in d.items():
            hit = _find_auto(v, f"{prefix}{k}.")
            if hit:
                return hit
    elif d == "auto":
        return prefix.rstrip(".")
    return None


def deepspeed_optimizer_section(cfg: OptimConfig) -> dict:
    """DeepSpeed ``optimizer`` config section (AdamW via ``torch_adam``: no fused-op compile on CPU)."""
    if cfg.name != "adamw":
        raise ConfigError(f"optim.name: {cfg.name!r} is not one of ['adamw']")
    return {"type": "AdamW", "params": {"lr": 0.0, "betas": list(cfg.betas), "eps": cfg.eps,
                                        "weight_decay": cfg.weight_decay, "torch_adam": True}}


def _check_precision_fields(ds: dict[str, Any], where: str) -> None:
    bf16 = bool(ds.get("bf16", {}).get("enabled", False))
    fp16 = bool(ds.get("fp16", {}).get("enabled", False))
    if bf16 and fp16:
        raise ConfigError(f"{where}: bf16.enabled and fp16.enabled are both true; allowed: one of them or neither")
    # whether this machine can run the precision is the trainer's check (pipeline.device), not the config's:
    # an fp16 job is validated and submitted from a login node without a GPU
    for key, value in (("communication_data_type", ds.get("communication_data_type")),
                       ("data_types.grad_accum_dtype", ds.get("data_types", {}).get("grad_accum_dtype"))):
        if value is not None and value not in DS_DTYPES:
            raise ConfigError(f"{where}: {key}: {value!r} is not one of {list(DS_DTYPES)}")


def _fill_from_recipe(ds: dict[str, Any], cfg: TrainConfig, world_size: int, where: str) -> None:
    """Batch sizes and gradient clipping from the recipe; a value the JSON pins must agree with it."""
    micro = cfg.data.batch_size
    accum = cfg.optim.grad_accum
    want = micro * accum * world_size
    for key, value in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum),
                       ("train_batch_size", want)):
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{where}: {key}={given} does not match the recipe: train_batch_size = micro "
                              f"{micro} (data.batch_size) x accumulation {accum} (optim.grad_accum) x world "
                              f"{world_size} = {want}; remove it from the JSON or make them agree")
        ds[key] = value
    clip = cfg.optim.grad_clip
    given = ds.get("gradient_clipping", "auto")
    if given != "auto" and given != clip:
        raise ConfigError(f"{where}: gradient_clipping={given} does not match the recipe's optim.grad_clip={clip}; "
                          f"remove it from the JSON (the recipe decides) or make them agree")
    ds["gradient_clipping"] = clip


def resolve_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed dict handed to ``deepspeed.initialize``: batch sizes and clipping filled in from the recipe
    and checked, the optimizer from the recipe, no ``"auto"`` left. Pure function of (cfg, world_size): no I/O
    besides the JSON."""
    ds = {k: v for k, v in read_deepspeed_json(cfg.run.deepspeed_config).items() if not k.startswith("_")}
    ds = copy.deepcopy(ds)
    where = f"deepspeed config {cfg.run.deepspeed_config}"
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage: {stage!r} is not one of [0, 1, 2, 3]")
    if cfg.run.ema and stage == 3:
        raise ConfigError("run.ema: EMA needs full parameters on every rank; allowed with ZeRO stages [0, 1, 2]")
    _check_precision_fields(ds, where)
    _fill_from_recipe(ds, cfg, world_size, where)
    if cfg.optim.implementation == "deepspeed":
        ds["optimizer"] = deepspeed_optimizer_section(cfg.optim)
    elif "optimizer" in ds:
        raise ConfigError(f"{where}: has an 'optimizer' section but optim.implementation is 'client'; "
                          f"allowed: remove it, or set optim.implementation=deepspeed")
    if "scheduler" in ds:
        raise ConfigError(f"{where}: 'scheduler' must not be set (the lr comes from schedule.lr)")
    ds.setdefault("steps_per_print", 10**9)
    auto = _find_auto(ds)
    if auto:
        raise ConfigError(f"{where}: {auto} is 'auto'; the trainer only fills batch sizes and gradient_clipping, "
                          f"set a value")
    return ds


def precision(ds: dict[str, Any]) -> str:
    """The precision a (finalized) DeepSpeed dict trains in."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"
