"""AdamW with the reference parameter groups (timm's ``param_groups_weight_decay``): no weight decay on 1-d
tensors (norm weights, biases) and on what the model's ``no_weight_decay()`` lists -- for CPVT, as in the
official CPVT/Twins code, the class token, the optional learned ``pos_embed`` and every PEG parameter
(``pos_block.*``, conv weights and biases). ``optim.decay_peg_weights: true`` decays the PEG conv weights instead
(not the reference; an ablation)."""
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
    # gradient accumulation steps (DeepSpeed gradient_accumulation_steps); with data.global_batch_size set, the
    # fewest steps >= this value that keep the micro-batch within data.max_batch_per_gpu (derived per world size)
    grad_accum: int = 1
    grad_clip: float = 1.0          # written into the DeepSpeed config's gradient_clipping (0 = off)
    implementation: Literal["client", "deepspeed"] = "client"  # torch AdamW handed to DeepSpeed, or DS torch_adam
    decay_peg_weights: bool = False   # true: weight decay on the PEG conv weights (the reference exempts them)

    def validate(self) -> None:
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("eps", self.eps)
        check_positive("grad_accum", self.grad_accum)
        check_positive("grad_clip", self.grad_clip, allow_zero=True)
        for i, b in enumerate(self.betas):
            check_range(f"betas[{i}]", b, 0.0, 0.999999)
        if self.decay_peg_weights and self.implementation != "client":
            # the trainer hands DeepSpeed's own optimizer the reference groups
            raise ConfigError("decay_peg_weights: true needs implementation 'client'; allowed with "
                              f"implementation={self.implementation!r}: [false]")


def no_decay_names(model: nn.Module, decay_peg_weights: bool = False) -> set[str]:
    """Parameters without weight decay: 1-d tensors and biases (timm's rule) plus the model's
    ``no_weight_decay()`` (CPVT: cls_token, pos_embed, every ``pos_block.*`` parameter)."""
    skip = _skip_list(model, decay_peg_weights)
    return {n for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or n in skip}


def _skip_list(model: nn.Module, decay_peg_weights: bool) -> set[str]:
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    if decay_peg_weights:
        skip = {n for n in skip if not (n.startswith("pos_block.") and n.endswith(".weight"))}
    return skip


def param_groups(model: nn.Module, weight_decay: float, decay_peg_weights: bool = False) -> list[dict]:
    """timm's groups (no-decay first, an empty group left out) for the rule above."""
    from timm.optim import param_groups_weight_decay

    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=_skip_list(model, decay_peg_weights))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer | None:
    """Client optimizer for ``deepspeed.initialize(optimizer=...)``; None when DeepSpeed builds it (see below)."""
    if cfg.implementation == "deepspeed":
        return None
    # the lr is set before every step by pipeline.schedules.LRScheduler
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.decay_peg_weights), lr=0.0, betas=cfg.betas,
                             eps=cfg.eps)


def deepspeed_optimizer_section(cfg: OptimConfig) -> dict:
    """DeepSpeed ``optimizer`` config section (AdamW via ``torch_adam``: no fused-op compile on CPU)."""
    if cfg.name != "adamw":
        raise ConfigError(f"optim.name: {cfg.name!r} is not one of ['adamw']")
    return {"type": "AdamW", "params": {"lr": 0.0, "betas": list(cfg.betas), "eps": cfg.eps,
                                        "weight_decay": cfg.weight_decay, "torch_adam": True}}
