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
  :func:`skipped_steps`);
* ``deepspeed/checkpoint/ds_to_universal.py``, a script DeepSpeed documents as a command but does not install
  as one: run by its file path with its own flags (:func:`convert_to_universal`);
* the ZeRO-3 universal load (``stage3.py`` ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), whose two
  slips :func:`repair_universal_zero3_load` undoes.

DeepSpeed itself is imported inside the functions that need it: it must not be imported before
:func:`pipeline.distributed.init_distributed` applied the device (``DS_ACCELERATOR``, ``LOCAL_RANK``).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

TESTED_VERSIONS = ("0.19",)   # the major.minor versions tests/test_library_internals.py was written against


def model_states_estimate(model: torch.nn.Module, stage: int, world_size: int) -> int:
    """DeepSpeed's own per-device estimate of model-state bytes (params, grads, optimizer states; no offload)
    for ZeRO ``stage`` (0-3) over ``world_size`` devices on one node."""
    # local: deepspeed only after the device is applied (module docstring)
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


def convert_to_universal(src: str | Path, out: str | Path, workers: int) -> None:
    """Run DeepSpeed's ``ds_to_universal.py`` on checkpoint folder ``src`` into ``out`` (``--inject_missing_state``
    adds the parameter-layout record that only Megatron models carry); a failure raises a one-line
    :class:`RuntimeError` with the script's last output line."""
    # local: deepspeed only after the device is applied (module docstring)
    from deepspeed.checkpoint import ds_to_universal

    cmd = [sys.executable, ds_to_universal.__file__, "--input_folder", str(src), "--output_folder", str(out),
           "--inject_missing_state", "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise RuntimeError(f"ds_to_universal failed on {src} (rc={proc.returncode}): {tail[0]}")


def repair_universal_zero3_load(optimizer, weight_decays: list[float]) -> None:
    """Undo two slips of DeepSpeed's ZeRO-3 universal load (0.19, stage3.py
    ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``); no-ops after a ZeRO-1/2 one, which has neither.

    * It gives every param group the hyper-parameters of group 0, so the no-decay group (norms, biases, PEG) and
      the decay group end with one weight decay: each group gets its own (``weight_decays``, read before the
      load) back.
    * It puts *one* ``step`` tensor into the state of every sub-group; Adam increments it in place once per
      sub-group per step, so the bias correction runs ahead (2 groups: step 13 after 5 steps from step 3, and
      a 1 -> 2 rank resume drifted 1e-4 from the uninterrupted run). Each state gets its own copy."""
    for group, weight_decay in zip(optimizer.param_groups, weight_decays):
        group["weight_decay"] = weight_decay
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


__all__ = ["TESTED_VERSIONS", "convert_to_universal", "inner_optimizer", "loss_scale", "model_states_estimate",
           "repair_universal_zero3_load", "skipped_steps", "zero3_partition"]
