"""Every use of DeepSpeed beyond its documented API, in one place (tested against the installed version by
``tests/test_library_internals.py``: a DeepSpeed upgrade that changes any of these fails there).

Documented and used directly elsewhere: ``deepspeed.initialize`` / ``init_distributed``, the engine's
``backward``/``step``/``was_step_applied``/``get_global_grad_norm``/``save_checkpoint``/``load_checkpoint``/
``module``/``optimizer``, ``deepspeed.utils.zero_to_fp32``. Undocumented, contained here:

* the model-state memory estimators behind DeepSpeed's printed ``estimate_zero{2,3}_..._all_live`` reports
  (``deepspeed.runtime.zero.stage_1_and_2`` / ``stage3``: ``estimate_zero{2,3}_model_states_mem_needs``,
  ``model_to_params``), which return the numbers (:func:`model_states_estimate`);
* ``param.ds_tensor``: a ZeRO-3 parameter's local partition (:func:`zero3_partition`);
* ``engine.optimizer.optimizer``: the torch optimizer inside DeepSpeed's ZeRO / mixed-precision wrapper
  (:func:`inner_optimizer`);
* ``engine.optimizer.loss_scale`` (fp16 optimizers' property) and ``engine.skipped_steps`` (:func:`loss_scale`,
  :func:`skipped_steps`).
"""
from __future__ import annotations

from typing import Any

import torch

TESTED_VERSIONS = ("0.19",)   # the major.minor versions tests/test_library_internals.py was written against


def model_states_estimate(model: torch.nn.Module, stage: int, world_size: int) -> int:
    """DeepSpeed's own per-device estimate of model-state bytes (params, grads, optimizer states; no offload)
    for ZeRO ``stage`` (0-3) over ``world_size`` devices on one node."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import model_to_params as zero3_model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs, model_to_params

    if stage == 3:
        total, largest = zero3_model_to_params(model)
        return estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=world_size,
                                                     cpu_offload=False, cpu_offload_params=False)[1]
    total = model_to_params(model)
    return estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world_size if stage else 1,
                                                 cpu_offload=False)[1]


def zero3_partition(param: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's partition of a ZeRO-3 parameter (None for a parameter DeepSpeed does not partition)."""
    return getattr(param, "ds_tensor", None)


def inner_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer holding the (fp32 master) parameters and states, inside DeepSpeed's wrapper."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def loss_scale(engine: Any) -> float:
    """The current fp16 loss scale (fp16 engines only)."""
    return float(engine.optimizer.loss_scale)


def skipped_steps(engine: Any) -> int:
    """Optimizer steps DeepSpeed skipped (fp16 overflows) in the run (its checkpoints save and restore the count)."""
    return int(engine.skipped_steps)


__all__ = ["TESTED_VERSIONS", "inner_optimizer", "loss_scale", "model_states_estimate", "skipped_steps",
           "zero3_partition"]
