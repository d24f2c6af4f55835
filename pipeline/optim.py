"""AdamW with DeiT's parameter groups: no weight decay on norms, biases (incl. PEG conv bias), cls_token, pos_embed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from pipeline.config import ConfigError, check_positive, check_range


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_accum: int = 1             # gradient accumulation steps (DeepSpeed gradient_accumulation_steps)
    grad_clip: float = 1.0          # written into the DeepSpeed config's gradient_clipping (0 = off)
    implementation: Literal["client", "deepspeed"] = "client"  # torch AdamW handed to DeepSpeed, or DS torch_adam

    def validate(self) -> None:
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("eps", self.eps)
        check_positive("grad_accum", self.grad_accum)
        check_positive("grad_clip", self.grad_clip, allow_zero=True)
        for i, b in enumerate(self.betas):
            check_range(f"betas[{i}]", b, 0.0, 0.999999)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: 1-d tensors (norm weights, biases, PEG bias) + model's list."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    return {n for n, p in model.named_parameters() if p.ndim <= 1 or n in skip or n.endswith(".bias")}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    skip = no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | None:
    """Client optimizer for ``deepspeed.initialize(optimizer=...)``; None when DeepSpeed builds it (see below)."""
    if cfg.implementation == "deepspeed":
        return None
    # the lr is set before every step by pipeline.schedules.LRScheduler
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=cfg.betas, eps=cfg.eps)


def deepspeed_optimizer_section(cfg: OptimConfig) -> dict:
    """DeepSpeed ``optimizer`` config section (AdamW via ``torch_adam``: no fused-op compile on CPU)."""
    if cfg.name != "adamw":
        raise ConfigError(f"optim.name: {cfg.name!r} is not one of ['adamw']")
    return {"type": "AdamW", "params": {"lr": 0.0, "betas": list(cfg.betas), "eps": cfg.eps,
                                        "weight_decay": cfg.weight_decay, "torch_adam": True}}
