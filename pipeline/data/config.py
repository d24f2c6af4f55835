"""Config sections for the input pipeline: :class:`DataConfig` (where the data is and how it is loaded) and
:class:`AugConfig` (the DeiT augmentation recipe through timm).

Both are plain dataclasses parsed and validated by :mod:`pipeline.config` (``Literal`` choices, ``validate()``
hooks, one-line :class:`~pipeline.config.ConfigError` naming the field). Rules that need both sections (Mixup
needs an even per-rank batch) live in :func:`check_data_aug`, which the loader factory calls before touching
any data and which the trainer may call up front.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Literal, Mapping, Optional

from pipeline.config import ConfigError, check_positive, check_range

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    format: Literal["wds", "ffcv"] = "wds"
    root: str = ""                      # data_prep output root (holds classes.json, wds/, ffcv/)
    train_split: str = "train"
    val_split: str = "val"
    # samples per optimizer step over all ranks (the recipe's, e.g. DeiT's 1024). Set: pipeline.recipe derives
    # data.batch_size (per rank) and optim.grad_accum for the world size, and schedule.resolution.batch_sizes are
    # global batches too. null: data.batch_size is stated per rank (the global batch grows with the world)
    global_batch_size: Optional[int] = None
    # most samples one rank puts through the model at once, at the schedule's largest training resolution
    # (lower resolutions scale it by the token count); null: no cap, only optim.grad_accum accumulates
    max_batch_per_gpu: Optional[int] = None
    # per rank; derived when global_batch_size is set (a data.batch_size given on the command line states a per-rank
    # batch instead and turns global_batch_size off)
    batch_size: int = 128
    eval_batch_size: int = 256          # per rank
    # WebDataset: DataLoader workers; FFCV: decoding threads. null: this rank's CPUs (its CPU affinity shared by
    # the ranks on the node) minus one; a value above that is lowered to it (pipeline.data.config.fit_num_workers)
    num_workers: Optional[int] = 4
    prefetch_factor: int = 2            # WebDataset: batches prefetched per worker
    pin_memory: bool = True             # pinned host batches (uint8, copied non_blocking); only with a CUDA device
    shuffle_buffer: int = 2000          # WebDataset: samples in each canonical stream's shuffle buffer
    shuffle_initial: int = 500          # WebDataset: samples buffered before the first one is yielded
    # WebDataset training: the epoch's sample streams, independent of the world size and the worker count (the
    # world size must divide it; a rank's workers share its canonical_streams / world streams); keep it to resume
    canonical_streams: int = 64
    jpeg_draft: bool = True             # WebDataset: decode big JPEGs at a reduced DCT scale (PIL draft)
    # WebDataset training: where JPEGs are decoded. cpu: in the DataLoader workers; device: the workers draw the
    # crop/flip/jitter from the JPEG header and ship the bytes, the batch is decoded on the loader's device
    # (nvJPEG on CUDA) and cropped/resized/flipped there (pipeline/data/device_decode.py)
    decode: Literal["cpu", "device"] = "cpu"
    os_cache: bool = True               # FFCV: rely on the page cache (False: FFCV's process cache)
    ffcv_order: Literal["random", "quasi_random"] = "random"  # quasi_random: single process, os_cache=False
    ffcv_batches_ahead: int = 3
    channels_last: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"

    def validate(self) -> None:
        check_positive("batch_size", self.batch_size)
        check_positive("eval_batch_size", self.eval_batch_size)
        for name in ("global_batch_size", "max_batch_per_gpu"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if self.num_workers is not None:
            check_positive("num_workers", self.num_workers, allow_zero=True)
        check_positive("prefetch_factor", self.prefetch_factor)
        check_positive("shuffle_buffer", self.shuffle_buffer)
        check_positive("canonical_streams", self.canonical_streams)
        check_range("shuffle_initial", self.shuffle_initial, 0, self.shuffle_buffer)
        check_positive("ffcv_batches_ahead", self.ffcv_batches_ahead)
        for name in ("train_split", "val_split"):
            if not getattr(self, name):
                raise ConfigError(f"{name}: must be a non-empty split name (e.g. 'train', 'val')")
        if self.decode not in ("cpu", "device"):
            raise ConfigError(f"decode: {self.decode!r} is not one of ['cpu', 'device']")
        if self.decode == "device" and self.format != "wds":
            raise ConfigError(f"decode: 'device' needs format 'wds' (FFCV decodes inside its own pipeline); "
                              f"allowed with format={self.format!r}: ['cpu']")
        if self.format == "ffcv" and self.ffcv_order == "quasi_random" and self.os_cache:
            raise ConfigError("ffcv_order: 'quasi_random' needs os_cache=false (FFCV's process cache); "
                              "allowed with os_cache=true: ['random']")


@dataclass
class AugConfig:
    # DeiT repeated augmentation: each epoch draws ~N/repeats distinct images, each `repeats` times with its
    # own augmentation (same number of steps per epoch); 1 = off, DeiT uses 3
    repeats: int = 1
    # RandomResizedCrop + flip (per sample)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    # aspect-bucketed training (WebDataset): each optimizer step crops all its images to one H x W bucket of
    # ~resolution^2 pixels with W/H inside `ratio`, sides multiples of `aspect_multiple` (the model's patch);
    # pipeline.data.aspect_buckets
    aspect_buckets: bool = False
    aspect_multiple: int = 16
    train_interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"   # timm spec; null/"" disables
    color_jitter: float = 0.3                              # only used when auto_augment is off (timm rule)
    # on the batch, after normalisation
    reprob: float = 0.25
    remode: Literal["const", "rand", "pixel"] = "pixel"
    recount: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    cutmix_minmax: Optional[tuple[float, float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"
    smoothing: float = 0.1              # folded into soft targets when mixup/cutmix is on, else the loss's job
    # eval
    crop_pct: float = 0.875
    eval_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def mixup_active(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None) and self.mixup_prob > 0

    def validate(self) -> None:
        check_positive("repeats", self.repeats)
        check_positive("aspect_multiple", self.aspect_multiple)
        for name in ("scale", "ratio"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                raise ConfigError(f"{name}: {[lo, hi]!r} must satisfy 0 < min <= max")
        if self.scale[1] > 1:
            raise ConfigError(f"scale: {list(self.scale)!r} must stay within (0, 1]")
        check_range("hflip", self.hflip, 0.0, 1.0)
        check_positive("color_jitter", self.color_jitter, allow_zero=True)
        check_range("reprob", self.reprob, 0.0, 1.0)
        check_positive("recount", self.recount)
        # Beta(alpha, alpha) concentrations (DeiT: 0.8 and 1.0); above 1 every mix is pushed towards 50/50, which
        # no published ViT recipe uses: such a value is taken for a confusion with mixup_prob and refused
        check_range("mixup", self.mixup, 0.0, 1.0)
        check_range("cutmix", self.cutmix, 0.0, 1.0)
        if self.cutmix_minmax is not None and not (0 < self.cutmix_minmax[0] <= self.cutmix_minmax[1] <= 1):
            raise ConfigError(f"cutmix_minmax: {list(self.cutmix_minmax)!r} must satisfy 0 < min <= max <= 1")
        check_range("mixup_prob", self.mixup_prob, 0.0, 1.0)
        check_range("mixup_switch_prob", self.mixup_switch_prob, 0.0, 1.0)
        check_range("smoothing", self.smoothing, 0.0, 0.999)
        if not (0 < self.crop_pct <= 1):
            raise ConfigError(f"crop_pct: {self.crop_pct!r} must be in (0, 1]")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{name}: {getattr(self, name)!r} must hold 3 values (RGB)")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std: {list(self.std)!r} must be > 0")
        if self.auto_augment:
            check_auto_augment("auto_augment", self.auto_augment)


def check_auto_augment(field_name: str, spec: str) -> None:
    """Parse a timm auto-augment spec the way timm will, turning its asserts into a one-line ConfigError."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    allowed = "rand-m9-mstd0.5-inc1, rand-m7-n2, augmix-m5-w3, original, v0, 3a, or null to disable"
    # timm skips a section without a number ('rand-zz' is plain RandAugment): refuse it instead of ignoring it
    for section in spec.split("-")[1:]:
        if not re.fullmatch(r"[a-z]+\d.*", section) and not (spec.startswith("rand") and section.startswith("t")):
            raise ConfigError(f"{field_name}: {spec!r} is not a timm auto-augment spec (section {section!r} has "
                              f"no value; timm would ignore it); examples: {allowed}")
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:
        if spec.startswith("rand"):
            rand_augment_transform(spec, hparams)
        elif spec.startswith("augmix"):
            augment_and_mix_transform(spec, dict(hparams, translate_pct=0.3))
        else:
            auto_augment_transform(spec, hparams)
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        detail = f" ({str(e).splitlines()[0]})" if str(e) else ""
        raise ConfigError(f"{field_name}: {spec!r} is not a timm auto-augment spec{detail}; "
                          f"examples: {allowed}") from None


def check_data_aug(data: DataConfig, aug: AugConfig, batch_size: int | None = None,
                   data_prefix: str = "data.", aug_prefix: str = "aug.") -> None:
    """Rules spanning both sections. ``batch_size`` overrides ``data.batch_size`` (a schedule's per-epoch value)."""
    bs = data.batch_size if batch_size is None else batch_size
    check_positive(f"{data_prefix}batch_size", bs)
    if aug.repeats > 1 and data.format == "ffcv" and data.ffcv_order != "random":
        raise ConfigError(f"{data_prefix}ffcv_order: {data.ffcv_order!r} cannot be combined with "
                          f"{aug_prefix}repeats={aug.repeats} (repeated augmentation sets its own order); "
                          f"allowed: ['random']")
    if data.decode == "device" and aug.auto_augment:
        raise ConfigError(f"{data_prefix}decode: 'device' cannot be combined with {aug_prefix}auto_augment="
                          f"{aug.auto_augment!r} (it needs decoded pixels in the workers); set "
                          f"{aug_prefix}auto_augment: null or {data_prefix}decode: 'cpu'")
    if aug.aspect_buckets and data.format != "wds":
        raise ConfigError(f"{aug_prefix}aspect_buckets: true needs {data_prefix}format: 'wds' (FFCV's decoder "
                          f"pipeline has one output size per loader); allowed with {data.format!r}: [false]")
    if aug.aspect_buckets and data.decode == "device":
        raise ConfigError(f"{aug_prefix}aspect_buckets: true cannot be combined with {data_prefix}decode: 'device' "
                          f"(its batch decoder crops one square size); set {data_prefix}decode: 'cpu'")
    if aug.mixup_active and bs % 2:
        raise ConfigError(f"{data_prefix}batch_size: {bs} must be even when {aug_prefix}mixup/{aug_prefix}cutmix "
                          f"is on (timm Mixup pairs samples within the batch)")


# ----------------------------------------------------------------------------------------- loader workers
def task_cpus(environ: Mapping[str, str] | None = None) -> int:
    """CPUs this rank may use: its CPU affinity (SLURM's --cpus-per-task, taskset, cgroups), divided among the
    ranks of a launcher that starts them all with the node's whole affinity (torchrun, deepspeed)."""
    env = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0))
    local = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 1)   # torchrun / deepspeed's launcher
    if local > 1 and cpus >= (os.cpu_count() or cpus):   # every rank sees the whole machine: share it
        cpus //= local
    return max(1, cpus)


def fit_num_workers(data: DataConfig, cpus: int) -> tuple[DataConfig, str | None]:
    """``data`` with ``num_workers`` fitted to ``cpus`` (null: cpus - 1, at least 1; more than cpus: cpus), and
    the line to log when it was lowered. Called before FFCV/numba are imported: numba refuses more threads than
    the machine has, with a message that names no config field."""
    if data.num_workers is None:
        return replace(data, num_workers=max(1, cpus - 1)), None
    if data.num_workers > cpus:
        return replace(data, num_workers=cpus), (f"data.num_workers: {data.num_workers} lowered to {cpus}, the CPUs "
                                                 f"this rank may use (its CPU affinity)")
    return data, None


__all__ = ["AugConfig", "DataConfig", "IMAGENET_MEAN", "IMAGENET_STD", "check_auto_augment", "check_data_aug",
           "fit_num_workers", "task_cpus"]
