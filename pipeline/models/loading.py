"""Load DeiT / timm ViT (or CPVT / official PEG) weights into a CPVT model.

`load_vit_state_dict(model, sd_or_ckpt)` accepts a plain state dict or a checkpoint dict that wraps it under
'model' (DeiT), 'state_dict' or 'module' (DeepSpeed); a 'module.' prefix (DDP) is stripped. The absolute
`pos_embed` of the source is dropped when the model has none (CPVT); when the model has a learned table
(pos_embed='learned') it is resampled to the model's grid with timm's resample_abs_pos_embed. Tensors whose
shape differs from the model's (e.g. a 1000-class head loaded into a 10-class model) are skipped, not loaded.
Everything is reported.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

__all__ = ['LoadReport', 'load_vit_state_dict', 'extract_state_dict']

_WRAPPER_KEYS = ('model', 'state_dict', 'module')


@dataclass
class LoadReport:
    loaded_keys: List[str] = field(default_factory=list)  # copied into the model
    missing_keys: List[str] = field(default_factory=list)  # in the model, absent from the source (kept as init)
    unexpected_keys: List[str] = field(default_factory=list)  # in the source, unknown to the model (ignored)
    dropped_keys: List[str] = field(default_factory=list)  # deliberately dropped (pos_embed)
    mismatched_keys: Dict[str, str] = field(default_factory=dict)  # key -> "source shape vs model shape"

    def summary(self) -> str:
        return (f'loaded {len(self.loaded_keys)} tensors; missing {self.missing_keys}; '
                f'unexpected {self.unexpected_keys}; dropped {self.dropped_keys}; '
                f'shape-mismatched {self.mismatched_keys}')


def extract_state_dict(sd_or_ckpt: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Unwrap {'model': sd} / {'state_dict': sd} / {'module': sd} and strip a leading 'module.' prefix."""
    sd = sd_or_ckpt
    for key in _WRAPPER_KEYS:
        if isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError('expected a state dict of tensors (or a checkpoint with a "model" key holding one)')
    return {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in sd.items()}


def _resample_pos_embed(model: nn.Module, posemb: torch.Tensor) -> torch.Tensor:
    prefix = model.num_prefix_tokens
    n_src = posemb.shape[1] - prefix
    side = int(math.isqrt(n_src))
    if side * side != n_src:
        raise ValueError(f'cannot resample pos_embed of shape {tuple(posemb.shape)}: '
                         f'{n_src} tokens after {prefix} prefix token(s) is not a square grid')
    return resample_abs_pos_embed(
        posemb, new_size=list(model.patch_embed.grid_size), old_size=[side, side], num_prefix_tokens=prefix)


@torch.no_grad()
def load_vit_state_dict(model: nn.Module, sd_or_ckpt: Mapping[str, Any]) -> LoadReport:
    """Copy matching tensors of a DeiT/timm ViT state dict (or checkpoint) into `model`; return a LoadReport."""
    src = extract_state_dict(sd_or_ckpt)
    target = model.state_dict()
    report = LoadReport()

    if 'pos_embed' in src:
        if getattr(model, 'pos_embed', None) is None:
            src.pop('pos_embed')
            report.dropped_keys.append('pos_embed')
        elif src['pos_embed'].shape != target['pos_embed'].shape:
            src['pos_embed'] = _resample_pos_embed(model, src['pos_embed'])

    to_load = {}
    for key, value in src.items():
        if key not in target:
            report.unexpected_keys.append(key)
        elif value.shape != target[key].shape:
            report.mismatched_keys[key] = f'{tuple(value.shape)} vs {tuple(target[key].shape)}'
        else:
            to_load[key] = value
    report.missing_keys = [k for k in target if k not in src]

    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # filtered above
    report.loaded_keys = list(to_load)
    return report
