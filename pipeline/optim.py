"""AdamW with the reference parameter groups (timm's ``param_groups_weight_decay``): no weight decay on 1-d
tensors (norm weights, biases) and on what the model's ``no_weight_decay()`` lists -- for CPVT, as in the
official CPVT/Twins code, the class token, the optional learned ``pos_embed`` and every PEG parameter
(``pos_block.*``, conv weights and biases). ``optim.decay_peg_weights: true`` decays the PEG conv weights instead
(not the reference; an ablation)."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import OptimConfig


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
