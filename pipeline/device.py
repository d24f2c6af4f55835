"""The one place that decides where a process computes: device, process-group backend, DeepSpeed accelerator, and
the training precision that fits that hardware.

Every entry point (``pipeline.train``, ``pipeline.evaluate``, ``pipeline.analysis.*``, the demo, the tests) goes
through :func:`select_device`; :func:`pipeline.distributed.init_distributed` applies the choice before
``deepspeed`` is imported. The rule (:func:`decide_device`, a pure function of the environment and what torch
reports):

1. ``DS_ACCELERATOR=cpu`` set explicitly wins: CPU + gloo, even where CUDA works.
2. ``DS_ACCELERATOR=cuda`` without a usable CUDA device is a :class:`DeviceError`.
3. CUDA usable: ``cuda:(local_rank % visible GPUs)`` + NCCL. Where SLURM binds one GPU per task
   (``--gpus-per-task=1``, ``--gpu-bind``, per-task cgroups) every task sees one GPU, ordinal 0.
4. CUDA unusable although GPUs were allocated (``SLURM_GPUS_ON_NODE``, ``SLURM_JOB_GPUS``, ``SLURM_STEP_GPUS``,
   ``SLURM_GPUS_PER_TASK`` or a non-empty ``CUDA_VISIBLE_DEVICES`` -- except the list DeepSpeed's launcher
   writes there on any machine): a one-line :class:`DeviceError` with the
   reason, the NVIDIA driver version and the CUDA version the torch wheel was built for -- never a silent
   CPU run on a GPU node.
5. Otherwise: CPU + gloo.

DeepSpeed picks its device from ``LOCAL_RANK`` (``deepspeed.init_distributed`` binds the NCCL group to
``cuda:$LOCAL_RANK`` and the engine calls ``set_device(int(os.environ["LOCAL_RANK"]))``), so
:func:`apply_device` rewrites ``LOCAL_RANK`` to the chosen CUDA ordinal and keeps the node-local rank in
``CPVT_NODE_LOCAL_RANK``.

Precision (:func:`resolve_precision`, :func:`finalize_deepspeed_config`): an explicit ``run.precision`` wins;
else a DeepSpeed JSON that enables bf16/fp16 (or disables both explicitly: a user's fp32 JSON) is the
request; else ``auto``: bf16 on a CUDA GPU with bf16, bf16 on a CPU with native bf16 (AMX / AVX512-BF16),
fp32 otherwise. fp16 only when asked, and only on CUDA.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, MutableMapping

import torch

from pipeline.config import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
NODE_LOCAL_RANK = "CPVT_NODE_LOCAL_RANK"   # the launcher's node-local rank, once LOCAL_RANK names the CUDA ordinal
SLURM_GPU_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_PER_TASK")
# DeepSpeed's dynamic loss scaling, used when run.precision=fp16 meets a JSON without an fp16 section
FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}


class DeviceError(RuntimeError):
    """A one-line reason why this process cannot run where it was asked to (raised before any process group)."""


@dataclass(frozen=True)
class DeviceChoice:
    kind: str            # "cuda" | "cpu"
    index: int | None    # CUDA ordinal this process uses (None on CPU)
    backend: str         # "nccl" | "gloo"
    accelerator: str     # the DS_ACCELERATOR value: "cuda" | "cpu"
    reason: str          # one line, logged once at start

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.kind, self.index) if self.kind == "cuda" else torch.device("cpu")


# ----------------------------------------------------------------------------------------- the rule
def node_local_rank(environ: Mapping[str, str]) -> int:
    """This process's rank on its node: kept by :func:`apply_device`, else the launcher's (torchrun/deepspeed
    ``LOCAL_RANK``, srun ``SLURM_LOCALID``), else 0."""
    for key in (NODE_LOCAL_RANK, "LOCAL_RANK", "SLURM_LOCALID"):
        value = environ.get(key, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def allocated_gpus(environ: Mapping[str, str]) -> str | None:
    """``"SLURM_JOB_GPUS=0,1"``-style description of the GPUs this job was given, or None when none were."""
    found = []
    for key in SLURM_GPU_VARS:
        value = environ.get(key, "").strip()
        if value and value not in ("0", "(null)", "N/A"):
            found.append(f"{key}={value}")
    cvd = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    # DeepSpeed's launcher (it exports CROSS_RANK) writes its --num_gpus list there even on a machine without CUDA
    by_deepspeed_launcher = "CROSS_RANK" in environ and "SLURM_JOB_ID" not in environ
    if cvd and cvd.lower() not in ("-1", "none", "nodevfiles", "void") and not by_deepspeed_launcher:
        found.append(f"CUDA_VISIBLE_DEVICES={cvd}")
    return " ".join(found) or None


def decide_device(environ: Mapping[str, str], *, cuda_available: bool, cuda_count: int,
                  cuda_problem: str | None = None) -> DeviceChoice:
    """Device, backend and DeepSpeed accelerator for this process (pure: see the module docstring for the rule).

    ``cuda_problem``: why CUDA is unusable (with the driver and wheel versions), for the error messages."""
    requested = environ.get("DS_ACCELERATOR", "").strip().lower()
    if requested not in ("", "cuda", "cpu"):
        raise DeviceError(f"DS_ACCELERATOR={requested}: not supported by this pipeline; allowed: cuda, cpu or unset")
    local_rank = node_local_rank(environ)
    usable = cuda_available and cuda_count > 0
    if requested == "cpu":
        also = f" ({cuda_count} CUDA GPU(s) visible, unused)" if usable else ""
        return DeviceChoice("cpu", None, "gloo", "cpu", f"cpu: DS_ACCELERATOR=cpu set explicitly{also}")
    problem = cuda_problem or ("no CUDA device visible" if cuda_available else "torch.cuda.is_available() is False")
    if usable:
        index = local_rank % cuda_count
        shared = f"; local rank {local_rank} >= {cuda_count} visible: ordinal local_rank % {cuda_count}" \
            if local_rank >= cuda_count else ""
        return DeviceChoice("cuda", index, "nccl", "cuda",
                            f"cuda:{index} (local rank {local_rank}, {cuda_count} visible GPU(s){shared})")
    if requested == "cuda":
        raise DeviceError(f"DS_ACCELERATOR=cuda but CUDA is unusable: {problem}")
    gpus = allocated_gpus(environ)
    if gpus:
        raise DeviceError(f"GPUs allocated ({gpus}) but CUDA is unusable: {problem}; refusing to train on CPU "
                          f"(install a torch wheel for this driver: make setup TORCH_INDEX_URL=..., or set "
                          f"DS_ACCELERATOR=cpu to run on CPU on purpose)")
    return DeviceChoice("cpu", None, "gloo", "cpu", f"cpu: no usable CUDA device ({problem})")


# ----------------------------------------------------------------------------------------- what torch reports
def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver version (``/proc/driver/nvidia/version``, else ``nvidia-smi``), or None."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text) \
            or re.search(r"\b(\d{3}\.\d+(?:\.\d+)?)\b", text)
        if match:
            return match.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def cuda_problem() -> str:
    """One line: why torch cannot use CUDA here, the NVIDIA driver and the CUDA version of the torch wheel."""
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a build without CUDA"
    else:
        why = "torch.cuda.is_available() is False"
        try:
            torch.cuda.init()
            if torch.cuda.device_count() == 0:
                why = "no CUDA device visible"
        except Exception as e:  # noqa: BLE001 - torch's own explanation is the message we want
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = first.split(". Please")[0].rstrip(".")
    driver = nvidia_driver_version()
    return (f"{why}; NVIDIA driver {driver or 'not found (no /proc/driver/nvidia/version, no nvidia-smi)'}; "
            f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none'}")


def select_device(environ: Mapping[str, str] | None = None) -> DeviceChoice:
    """:func:`decide_device` over ``os.environ`` and torch.cuda; raises :class:`DeviceError`."""
    env = os.environ if environ is None else environ
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    problem = None if available and count else cuda_problem()
    return decide_device(env, cuda_available=available, cuda_count=count, cuda_problem=problem)


def apply_device(choice: DeviceChoice, environ: MutableMapping[str, str] | None = None) -> None:
    """Make the process agree with ``choice``; call before ``import deepspeed``.

    Exports ``DS_ACCELERATOR``; on CUDA keeps the node-local rank in ``CPVT_NODE_LOCAL_RANK``, sets
    ``LOCAL_RANK`` to the chosen ordinal (DeepSpeed binds ``cuda:$LOCAL_RANK``), selects the device and turns
    TF32 matmuls/convolutions on."""
    env = os.environ if environ is None else environ
    env["DS_ACCELERATOR"] = choice.accelerator
    if choice.kind != "cuda":
        return
    env.setdefault(NODE_LOCAL_RANK, str(node_local_rank(env)))
    env["LOCAL_RANK"] = str(choice.index)
    torch.cuda.set_device(choice.index)
    enable_tf32()


def enable_tf32() -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer; bf16/fp16 kernels are unaffected)."""
    if hasattr(torch.backends.cudnn, "conv"):   # torch >= 2.9: per-backend fp32_precision
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ----------------------------------------------------------------------------------------- precision
def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AMX-BF16 or AVX512-BF16 in /proc/cpuinfo's flags);
    elsewhere bf16 is emulated and many times slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def _native_bf16(choice: DeviceChoice) -> bool:
    if choice.kind == "cuda":
        with torch.cuda.device(choice.index):
            return bool(torch.cuda.is_bf16_supported())
    return cpu_has_native_bf16()


def resolve_precision(requested: str, choice: DeviceChoice, *, native_bf16: bool | None = None,
                      source: str = "run.precision") -> tuple[str, str]:
    """``("bf16" | "fp16" | "fp32", one-line why)`` for a request (``auto`` or an explicit precision) on
    ``choice``. ``native_bf16``: whether the device has bf16 in hardware (None: ask torch / /proc/cpuinfo);
    ``source``: where the request came from, for the messages. fp16 on CPU and bf16 on a GPU without bf16
    raise a one-line :class:`ConfigError` naming ``run.precision``."""
    if requested not in PRECISIONS:
        raise ConfigError(f"run.precision: {requested!r} is not one of {list(PRECISIONS)}")
    native = _native_bf16(choice) if native_bf16 is None and requested in ("auto", "bf16") else bool(native_bf16)
    where = "CUDA GPU" if choice.kind == "cuda" else "CPU"
    if requested == "fp16":
        if choice.kind != "cuda":
            raise ConfigError(f"run.precision: 'fp16' ({source}) needs a CUDA GPU (DeepSpeed has no fp16 on CPU; "
                              f"this process: {choice.reason}); allowed here: ['auto', 'bf16', 'fp32']")
        return "fp16", f"{source}=fp16 (dynamic loss scaling)"
    if requested == "bf16":
        if choice.kind == "cuda" and not native:
            raise ConfigError(f"run.precision: 'bf16' ({source}) is not supported by this GPU; allowed here: "
                              f"['auto', 'fp16', 'fp32']")
        slow = "" if native else " (this CPU has no native bf16: emulated, many times slower than fp32)"
        return "bf16", f"{source}=bf16{slow}"
    if requested == "fp32":
        return "fp32", f"{source}=fp32"
    if native:
        return "bf16", f"auto: bf16 ({where} with native bf16)"
    hint = " (bf16 is emulated on this CPU; no AMX/AVX512-BF16)" if choice.kind == "cpu" else \
        " (this GPU has no bf16; run.precision=fp16 for mixed precision)"
    return "fp32", f"auto: fp32{hint}"


def torch_dtype(precision: str) -> torch.dtype:
    """The input dtype of a resolved precision (``"bf16"`` | ``"fp16"`` | ``"fp32"``)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def json_precision_request(ds: Mapping[str, Any]) -> str | None:
    """What a DeepSpeed JSON asks for: ``"bf16"``/``"fp16"`` when enabled, ``"fp32"`` when it has a bf16 or fp16
    section and enables neither, None when it says nothing (the shipped ``zero{1,2,3}.json``)."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    if "bf16" in ds or "fp16" in ds:
        return "fp32"
    return None


def finalize_deepspeed_config(ds: Mapping[str, Any], cfg, choice: DeviceChoice, *,
                              native_bf16: bool | None = None) -> tuple[dict[str, Any], str, str]:
    """``(DeepSpeed dict for deepspeed.initialize, precision, one log line)``.

    ``ds`` is :func:`pipeline.config.resolve_deepspeed_config`'s output (pure validation, any machine); this
    adds what depends on the hardware: the precision (explicit ``run.precision`` > the JSON's bf16/fp16 >
    ``auto``) written as the JSON's ``bf16``/``fp16`` sections, and on CPU ``overlap_comm`` off (gloo on
    DeepSpeed's CPU accelerator has no side streams to overlap on)."""
    out = copy.deepcopy(dict(ds))
    requested, source = cfg.run.precision, "run.precision"
    if requested == "auto":
        from_json = json_precision_request(out)
        if from_json is not None:
            requested, source = from_json, f"run.deepspeed_config {Path(cfg.run.deepspeed_config).name}"
    prec, why = resolve_precision(requested, choice, native_bf16=native_bf16, source=source)
    for section in ("bf16", "fp16"):
        if section == prec:
            base = FP16_DEFAULTS if section == "fp16" else {}
            out[section] = {**base, **out.get(section, {}), "enabled": True}
        elif section in out:
            out[section] = {**out[section], "enabled": False}
    notes = []
    zero = out.get("zero_optimization")
    if choice.kind == "cpu" and isinstance(zero, dict) and zero.get("overlap_comm"):
        out["zero_optimization"] = {**zero, "overlap_comm": False}
        notes.append("overlap_comm off (gloo on CPU cannot overlap communication)")
    stage = out.get("zero_optimization", {}).get("stage", 0)
    if stage == 1 and prec == "bf16" and out.get("data_types", {}).get("grad_accum_dtype") == "fp32":
        raise ConfigError(f"run.deepspeed_config: {cfg.run.deepspeed_config}: data_types.grad_accum_dtype "
                          f"'fp32' with ZeRO-1 and bf16 runs DeepSpeed's BF16_Optimizer, whose checkpoints "
                          f"pipeline.export cannot consolidate; allowed: remove it (bf16 accumulation) or use "
                          f"ZeRO-2 (fp32 accumulation)")
    line = f"precision {prec}: {why}; ZeRO-{stage}" + "".join(f"; {n}" for n in notes)
    return out, prec, line


# ----------------------------------------------------------------------------------------- inference
def autocast(device: torch.device):
    """bf16 autocast on a CUDA device with bf16 (fp32 weights, mixed-precision kernels); a no-op elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_forward(model, device: torch.device):
    """``model`` itself, or on CUDA a forward that runs it under :func:`autocast` (evaluation and analysis)."""
    if device.type != "cuda":
        return model

    def forward(x):
        with autocast(device):
            return model(x)

    return forward
