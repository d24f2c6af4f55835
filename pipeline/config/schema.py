"""Every config section of a training run, with its defaults and a comment per field: :class:`TrainConfig` =
model, data, aug, schedule (resolution, lr), optim, checkpoint, tracking, eval and run sections.

Sections are plain dataclasses; :func:`pipeline.config.sections.from_dict` builds them from YAML/CLI data (types
checked by pydantic) and runs each section's ``validate()`` (children first, then :meth:`TrainConfig.validate`
for rules across sections). Every rule raises a one-line :class:`ConfigError` naming the field. The schedule
arithmetic that validation needs (which resolution an epoch trains at) lives on the schedule sections, so
:mod:`pipeline.schedules` and this module compute the same thing.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import yaml

from pipeline.config.budget import StagePlan, plan_stages
from pipeline.config.errors import ConfigError, check_multiple, check_positive, check_range
from pipeline.config.extras import FFCV_MISSING, ffcv_installed
from pipeline.config.sections import to_dict
from pipeline.redaction import redact_values

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the test resolutions evaluated by default (the training resolution is added): DeiT/CPVT's table
EVAL_RESOLUTIONS = (160, 224, 288, 384)
# every registered cpvt_* variant (pipeline/models/cpvt.py): 12 blocks of patch-16 tokens
MODEL_DEPTH, MODEL_PATCH = 12, 16


# ----------------------------------------------------------------------------------------- model
def check_peg_positions(peg_positions: int | Sequence[int], depth: int,
                        error: type[Exception] = ValueError) -> tuple[int, ...]:
    """The PEG positions of a ``depth``-block model, sorted: each in [-1, depth - 1] (-1: on the patch embeddings
    before block 0), none repeated. The one rule for the model and for the training config (which checks it
    before a model is built, raising its own ``error``)."""
    if isinstance(peg_positions, int):
        peg_positions = (peg_positions,)
    positions = tuple(int(p) for p in peg_positions)
    for i, p in enumerate(positions):
        if not -1 <= p < depth:
            raise error(f"peg_positions[{i}]: {p} is out of range for depth {depth}; allowed: -1 (before block 0) "
                        f"to {depth - 1}")
    if len(set(positions)) != len(positions):
        raise error(f"peg_positions: {list(positions)} repeats a position")
    return tuple(sorted(positions))


@dataclass
class ModelConfig:
    # the registered variant (pipeline/models/cpvt.py); *_gap: global average pooling instead of the class token
    name: Literal["cpvt_ti", "cpvt_s", "cpvt_b", "cpvt_ti_gap", "cpvt_s_gap", "cpvt_b_gap"] = "cpvt_ti"
    num_classes: Optional[int] = None   # None: from <data.root>/classes.json
    drop_path_rate: float = 0.1         # stochastic depth rate (DeiT: 0.1)
    peg_positions: tuple[int, ...] = (0,)   # PEGs after these blocks (-1: before block 0); CPVT: after block 0
    peg_kernel: int = 3                 # the PEG's depth-wise conv kernel (odd)
    pos_embed: Literal["none", "learned"] = "none"   # learned: DeiT's absolute position table as well / instead
    kwargs: dict = field(default_factory=dict)   # any other timm.create_model kwarg (embed_dim, depth, num_heads)

    @property
    def depth(self) -> int:
        return int(self.kwargs.get("depth", MODEL_DEPTH))

    @property
    def patch_size(self) -> int:
        return int(self.kwargs.get("patch_size", MODEL_PATCH))

    def validate(self) -> None:
        check_range("drop_path_rate", self.drop_path_rate, 0.0, 1.0)
        if self.peg_kernel < 1 or self.peg_kernel % 2 == 0:
            raise ConfigError(f"peg_kernel: {self.peg_kernel!r} must be a positive odd integer")
        if self.num_classes is not None:
            check_positive("num_classes", self.num_classes)
        check_positive("kwargs.depth", self.depth)
        check_positive("kwargs.patch_size", self.patch_size)
        check_peg_positions(self.peg_positions, self.depth, error=ConfigError)   # the model's rule, before it is built

    def create_kwargs(self, num_classes: int) -> dict[str, Any]:
        return dict(self.kwargs, num_classes=num_classes, drop_path_rate=self.drop_path_rate,
                    peg_positions=tuple(self.peg_positions), peg_kernel=self.peg_kernel, pos_embed=self.pos_embed)



# ----------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    format: Literal["wds", "ffcv"] = "wds"   # WebDataset shards or FFCV .beton files (the optional extra ffcv)
    root: str = ""                      # data_prep output root (holds classes.json, wds/, ffcv/)
    train_split: str = "train"          # the split names data_prep wrote (shard / .beton prefixes)
    val_split: str = "val"              # the split evaluated
    # samples per optimizer step over all ranks (the recipe's, e.g. DeiT's 1024). Set: pipeline.config.batch derives
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
    # the ranks on the node) minus one; a value above that is lowered to it (pipeline.data.workers.fit_num_workers)
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
    ffcv_batches_ahead: int = 3         # FFCV: batches its loader prepares ahead
    channels_last: bool = False         # image batches in channels-last memory format
    dtype: Literal["float32", "bfloat16"] = "float32"   # dtype of the normalised image batches

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
        if self.format == "ffcv" and not ffcv_installed():
            raise ConfigError(f"format: 'ffcv' needs FFCV, but {FFCV_MISSING}; use format 'wds'")
        if self.format == "ffcv" and self.ffcv_order == "quasi_random" and self.os_cache:
            raise ConfigError("ffcv_order: 'quasi_random' needs os_cache=false (FFCV's process cache); "
                              "allowed with os_cache=true: ['random']")


@dataclass
class AugConfig:
    # DeiT repeated augmentation: each epoch draws ~N/repeats distinct images, each `repeats` times with its
    # own augmentation (same number of steps per epoch); 1 = off, DeiT uses 3
    repeats: int = 1
    # per sample:
    scale: tuple[float, float] = (0.08, 1.0)            # RandomResizedCrop: area fraction range
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)   # RandomResizedCrop: aspect ratio range (W/H)
    hflip: float = 0.5                                   # horizontal flip probability
    # aspect-bucketed training (WebDataset): each optimizer step crops all its images to one H x W bucket of
    # ~resolution^2 pixels with W/H inside `ratio`, sides multiples of `aspect_multiple` (the model's patch);
    # pipeline.data.aspect_buckets
    aspect_buckets: bool = False
    aspect_multiple: int = 16           # aspect buckets: both sides are multiples of this
    train_interpolation: Literal["bicubic", "bilinear", "random"] = "bicubic"   # RandomResizedCrop resize filter
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"   # timm spec; null/"" disables
    # augmentation strength that follows training progress (pipeline.schedules.aug_strength), a fraction s in
    # [0, 1] of the recipe's: RandAugment's magnitude becomes round(s x m) of auto_augment's m. none: s = 1;
    # stages: rises from 0 to 1 over the resolution schedule's stages (budgeted: over its equal-cost segments,
    # EfficientTrain++'s m = 0, 1, ..., 9 for ten); epochs: rises linearly from 0 at the first epoch to 1 at the
    # last. A function of the epoch alone, so a resumed run sees the same values
    strength_ramp: Literal["none", "stages", "epochs"] = "none"
    ramp_mixup: bool = False            # the ramp also scales mixup_prob (Mixup/CutMix applied s x mixup_prob)
    color_jitter: float = 0.3                              # only used when auto_augment is off (timm rule)
    # on the batch, after normalisation:
    reprob: float = 0.25                # random erasing probability
    remode: Literal["const", "rand", "pixel"] = "pixel"   # random erasing fill (timm)
    recount: int = 1                    # random erasing: at most this many boxes per image
    mixup: float = 0.8                  # Mixup alpha (0: off)
    cutmix: float = 1.0                 # CutMix alpha (0: off)
    cutmix_minmax: Optional[tuple[float, float]] = None   # CutMix box size range (overrides the alpha)
    mixup_prob: float = 1.0             # probability that a batch is mixed
    mixup_switch_prob: float = 0.5      # probability of CutMix instead of Mixup when both are on
    mixup_mode: Literal["batch", "pair", "elem"] = "batch"   # one mix per batch, per pair or per element
    smoothing: float = 0.1              # folded into soft targets when mixup/cutmix is on, else the loss's job
    # evaluation:
    crop_pct: float = 0.875             # center crop: resize to resolution / crop_pct first
    eval_interpolation: Literal["bicubic", "bilinear"] = "bicubic"   # eval resize filter
    mean: tuple[float, float, float] = IMAGENET_MEAN   # normalisation (train and eval)
    std: tuple[float, float, float] = IMAGENET_STD     # normalisation (train and eval)

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
        if self.strength_ramp != "none":
            if self.auto_augment and not self.auto_augment.startswith("rand"):
                raise ConfigError(f"strength_ramp: {self.strength_ramp!r} ramps RandAugment's magnitude; "
                                  f"auto_augment {self.auto_augment!r} is not a RandAugment spec (rand-m9-...); "
                                  f"use one or set strength_ramp: none")
            if not self.auto_augment and not (self.ramp_mixup and self.mixup_active):
                raise ConfigError(f"strength_ramp: {self.strength_ramp!r} has nothing to ramp: auto_augment is "
                                  f"off and ramp_mixup is false (or Mixup/CutMix off); set strength_ramp: none")


def check_auto_augment(field_name: str, spec: str) -> None:
    """Parse a timm auto-augment spec the way timm will, turning its asserts into a one-line ConfigError."""
    # timm pulls torch in: only when a recipe names a spec (launchers load configs on a login node)
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



# ----------------------------------------------------------------------------------------- schedules
@dataclass
class ResolutionScheduleConfig:
    # how the resolution follows the epoch
    kind: Literal["fixed", "linear", "steps", "low_then_full", "budgeted"] = "fixed"
    resolution: int = 224                 # fixed, the final resolution of low_then_full and budgeted
    start_res: int = 160                  # linear
    end_res: int = 192                    # linear
    start_epoch: int = 0                  # linear: last epoch at start_res
    end_epoch: int = 0                    # linear: first epoch at end_res
    steps: list[tuple[int, int]] = field(default_factory=list)        # steps: [[epoch, res], ...]
    low_res: int = 160                    # low_then_full
    full_res_epochs: int = 0              # low_then_full: the last N epochs run at `resolution`
    patch_size: int = 16                  # every resolution is a multiple of this
    batch_sizes: list[tuple[int, int]] = field(default_factory=list)  # [[res, per-rank batch], ...]
    # budgeted (pipeline.config.budget, EfficientTrain++): one resolution per equal-cost segment, low to high, the
    # last one `resolution` (list one several times to give it more segments). The run spends `budget` x the
    # compute of `reference_epochs` epochs at `resolution` (the fixed-resolution recipe), and its epochs are
    # derived: run.epochs is set to the plan's total (pipeline.config.loading). The global batch is the same in
    # every stage: a low resolution takes a bigger per-rank batch and fewer accumulation steps
    # (pipeline.config.batch; batch_sizes, if given, are per-rank batches at that global batch)
    resolutions: list[int] = field(default_factory=list)
    budget: float = 1.0                   # budgeted: share of the reference run's compute (0.5: half)
    reference_epochs: int = 0             # budgeted: the fixed-resolution run's epochs (DeiT: 300)

    def stage_plan(self) -> StagePlan:
        """budgeted: the stages and their epochs."""
        if self.kind != "budgeted":
            raise ValueError(f"stage_plan() is for kind 'budgeted', not {self.kind!r}")
        return plan_stages(self.resolutions, self.resolution, self.reference_epochs, self.budget)

    def check_epochs(self, total_epochs: int) -> None:
        """The rules that need the run's length."""
        if total_epochs <= 0:
            raise ConfigError(f"epochs: {total_epochs!r} must be > 0")
        if self.kind == "low_then_full" and self.full_res_epochs > total_epochs:
            raise ConfigError(f"full_res_epochs: {self.full_res_epochs} must be <= epochs ({total_epochs})")
        if self.kind == "budgeted" and total_epochs != (want := self.stage_plan().total_epochs):
            raise ConfigError(f"resolution: the budgeted schedule trains {want} epochs, run.epochs is "
                              f"{total_epochs}; set run.epochs: {want} (load_train_config derives it)")

    def resolution_at(self, epoch: int, total_epochs: int) -> int:
        """The training resolution of ``epoch`` (0-based) in a run of ``total_epochs``."""
        if self.kind == "fixed":
            return self.resolution
        if self.kind == "budgeted":
            return self.stage_plan().stage_at(epoch).resolution
        if self.kind == "linear":
            if epoch >= self.end_epoch:
                return self.end_res
            if epoch <= self.start_epoch:
                return self.start_res
            frac = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
            res = self.start_res + frac * (self.end_res - self.start_res)
            return int(round(res / self.patch_size)) * self.patch_size
        if self.kind == "steps":
            res = self.steps[0][1]
            for e, r in self.steps:
                if epoch >= e:
                    res = r
            return res
        return self.resolution if epoch >= total_epochs - self.full_res_epochs else self.low_res

    def validate(self) -> None:
        check_positive("patch_size", self.patch_size)
        p = self.patch_size

        def res_ok(name: str, value: int) -> None:
            check_positive(name, value)
            check_multiple(name, value, p)

        if self.kind == "fixed":
            res_ok("resolution", self.resolution)
        elif self.kind == "linear":
            res_ok("start_res", self.start_res)
            res_ok("end_res", self.end_res)
            check_positive("start_epoch", self.start_epoch, allow_zero=True)
            if self.end_epoch < self.start_epoch:
                raise ConfigError(f"end_epoch: {self.end_epoch} must be >= start_epoch ({self.start_epoch})")
        elif self.kind == "steps":
            if not self.steps:
                raise ConfigError("steps: must list [epoch, resolution] pairs for kind 'steps', e.g. "
                                  "[[0, 128], [10, 160], [20, 224]]")
            epochs = [e for e, _ in self.steps]
            if epochs[0] != 0:
                raise ConfigError(f"steps: the first entry must start at epoch 0, got epoch {epochs[0]}")
            if any(b <= a for a, b in zip(epochs, epochs[1:])):
                raise ConfigError(f"steps: epochs {epochs} must be strictly increasing")
            for i, (_, r) in enumerate(self.steps):
                res_ok(f"steps[{i}]", r)
        elif self.kind == "budgeted":
            res_ok("resolution", self.resolution)
            if not self.resolutions:
                raise ConfigError(f"resolutions: must list one resolution per equal-cost segment for kind "
                                  f"'budgeted', low to high, ending at resolution ({self.resolution}), e.g. "
                                  f"[96, 96, 160, 160, 160, 160, 192, 192, 224, 224]")
            for i, r in enumerate(self.resolutions):
                res_ok(f"resolutions[{i}]", r)
            if any(b < a for a, b in zip(self.resolutions, self.resolutions[1:])):
                raise ConfigError(f"resolutions: {list(self.resolutions)} must not decrease")
            if self.resolutions[-1] != self.resolution:
                raise ConfigError(f"resolutions: the last entry {self.resolutions[-1]} must be the final "
                                  f"resolution ({self.resolution}), the reference run's")
            if not self.budget > 0:
                raise ConfigError(f"budget: {self.budget!r} must be > 0 (a share of the reference run's compute)")
            check_positive("reference_epochs", self.reference_epochs)
        else:  # low_then_full
            res_ok("low_res", self.low_res)
            res_ok("resolution", self.resolution)
            check_positive("full_res_epochs", self.full_res_epochs, allow_zero=True)
        seen = set()
        for i, (r, b) in enumerate(self.batch_sizes):
            res_ok(f"batch_sizes[{i}]", r)
            check_positive(f"batch_sizes[{i}]", b)
            if r in seen:
                raise ConfigError(f"batch_sizes[{i}]: resolution {r} is listed twice")
            seen.add(r)


@dataclass
class LRScheduleConfig:
    lr: float = 5e-4                       # peak lr at the reference global batch
    ref_batch: int = 512                   # lr is scaled by global_batch / ref_batch
    batch_scaling: Literal["linear", "sqrt", "none"] = "linear"   # how the peak follows the global batch
    warmup_epochs: float = 5.0             # linear warmup from warmup_lr to the peak (fractional epochs)
    warmup_lr: float = 1e-6                # the warmup starts here
    min_lr: float = 1e-5                   # the cosine ends here

    def check_epochs(self, total_epochs: int) -> None:
        """The rules that need the run's length."""
        if total_epochs <= 0:
            raise ConfigError(f"epochs: {total_epochs!r} must be > 0")
        if self.warmup_epochs >= total_epochs:
            raise ConfigError(f"warmup_epochs: {self.warmup_epochs} must be < epochs ({total_epochs})")

    def validate(self) -> None:
        check_positive("lr", self.lr)
        check_positive("ref_batch", self.ref_batch)
        check_positive("warmup_epochs", self.warmup_epochs, allow_zero=True)
        check_positive("warmup_lr", self.warmup_lr, allow_zero=True)
        check_positive("min_lr", self.min_lr, allow_zero=True)


@dataclass
class ScheduleConfig:
    resolution: ResolutionScheduleConfig = field(default_factory=ResolutionScheduleConfig)   # epoch -> resolution
    lr: LRScheduleConfig = field(default_factory=LRScheduleConfig)   # warmup + cosine

# ----------------------------------------------------------------------------------------- optimizer, checkpoints
@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"   # the optimizer
    weight_decay: float = 0.05      # not on 1-d tensors, biases and the model's no_weight_decay() (pipeline.optim)
    betas: tuple[float, float] = (0.9, 0.999)   # AdamW betas
    eps: float = 1e-8                   # AdamW epsilon
    # gradient accumulation steps (DeepSpeed gradient_accumulation_steps); with data.global_batch_size set, the
    # fewest steps >= this value that keep the micro-batch within data.max_batch_per_gpu (derived per world size)
    grad_accum: int = 1
    # max global gradient norm, the DeepSpeed config's gradient_clipping (0: off, DeiT's default). The default is
    # DeepSpeed's own (1.0); a JSON that sets gradient_clipping must agree (pipeline.config.deepspeed)
    grad_clip: float = 1.0
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


@dataclass
class CheckpointConfig:
    every_steps: int = 0       # also save every N optimizer steps (0: only at epoch end)
    keep_last: int = 3         # complete checkpoints kept besides the best one
    keep_best: bool = True     # keep the checkpoint with the best eval top-1
    resume: str = "none"       # "auto" (newest complete checkpoint under run_dir, else start fresh), "none", or a path
    # debug: append every consumed micro-batch's sample keys to <run_dir>/keys/rank{r}.jsonl (host strings the
    # loader has anyway; off: nothing is collected)
    record_keys: bool = False

    def validate(self) -> None:
        check_positive("every_steps", self.every_steps, allow_zero=True)
        check_positive("keep_last", self.keep_last)



# ----------------------------------------------------------------------------------------- tracking, eval, run
@dataclass
class TrackingConfig:
    enabled: bool = True                # log params, metrics and artifacts to MLflow (rank 0)
    uri: Optional[str] = None           # None: $MLFLOW_TRACKING_URI, else the project store (pipeline.tracking)
    experiment: str = "cpvt"            # MLflow experiment name
    run_name: Optional[str] = None      # None: MLflow's generated name (the SLURM launcher: the run dir's name)
    recipe: Optional[str] = None        # the recipe's name, a run tag (load_train_config fills it in)
    system_metrics: bool = True         # MLflow's psutil sampler (CPU/RAM/GPU) on rank 0


@dataclass
class EvalConfig:
    every_epochs: int = 1               # evaluate every N epochs (0: only at the end)
    resolutions: tuple[int, ...] = EVAL_RESOLUTIONS   # test resolutions (the training resolution is added)
    max_batches: Optional[int] = None   # cap per resolution (smoke runs); None: the whole val split
    # center_crop: resize to res / aug.crop_pct + center crop res x res (timm/DeiT). native: the whole image,
    # short side res, aspect kept, both sides multiples of the patch size, long side <= native_max_aspect x res,
    # batched by aspect bucket (pipeline.data.aspect_buckets)
    mode: Literal["center_crop", "native"] = "center_crop"
    native_max_aspect: float = 2.0      # native: the long side is at most this x the short side
    # the test resolution is chosen on minival (held out from train by `python -m data_prep --minival-fraction`),
    # among the training resolution and `resolutions`, at the end of training; val is then read at the chosen one
    # (never used to choose). true: when data.root has the split (else one line says there is none); false: never
    choose_test_res: bool = True
    minival_split: str = "minival"      # the split the test resolution is chosen on

    def validate(self) -> None:
        check_positive("every_epochs", self.every_epochs, allow_zero=True)
        for i, r in enumerate(self.resolutions):
            check_positive(f"resolutions[{i}]", r)
        if not self.native_max_aspect >= 1.0:
            raise ConfigError(f"native_max_aspect: {self.native_max_aspect!r} must be >= 1")
        if not self.minival_split:
            raise ConfigError("minival_split: must be a non-empty split name (data_prep writes 'minival')")


@dataclass
class RunConfig:
    run_dir: str = "runs/default"       # checkpoints, logs and the resolved config go here
    seed: int = 0                       # every random draw derives from it (pipeline.rng)
    epochs: int = 300                   # training epochs
    max_steps: Optional[int] = None     # stop after this many optimizer steps in total (smoke tests)
    log_every: int = 50                 # optimizer steps between logged training metrics
    deepspeed_config: str = "deepspeed_configs/zero2.json"   # ZeRO stage and communication (deepspeed_configs/)
    # auto: bf16 on a CUDA GPU with bf16 or a CPU with native bf16, else fp32; an explicit value wins over the
    # JSON's bf16/fp16 sections (pipeline.device.finalize_deepspeed_config)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False               # torch.compile the model (one graph per input resolution)
    dist_timeout_s: int = 600           # process-group timeout: a dead peer fails the job after this long
    nonfinite_patience: int = 10        # stop after this many non-finite losses in a row
    stop_check_steps: int = 10          # ranks agree on a preemption signal every N steps (1 rank: every step)
    ema: bool = False                   # an EMA of the weights, evaluated beside the model (ZeRO 0-2)
    ema_decay: float = 0.9998           # the EMA decay per optimizer step
    progress_bar: Optional[bool] = None   # None: tqdm on a TTY, plain lines otherwise

    def validate(self) -> None:
        check_positive("epochs", self.epochs)
        check_positive("log_every", self.log_every)
        check_positive("nonfinite_patience", self.nonfinite_patience)
        check_positive("stop_check_steps", self.stop_check_steps)
        check_range("ema_decay", self.ema_decay, 0.0, 1.0)
        check_positive("dist_timeout_s", self.dist_timeout_s)
        if self.max_steps is not None:
            check_positive("max_steps", self.max_steps)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        # cross-section rules (sections validated themselves already)
        res_cfg = self.schedule.resolution
        try:
            res_cfg.check_epochs(self.run.epochs)
            self.schedule.lr.check_epochs(self.run.epochs)
        except ConfigError as e:
            raise ConfigError(f"schedule.{e}") from None
        check_data_aug(self.data, self.aug)
        for _, bs in res_cfg.batch_sizes:
            check_data_aug(self.data, self.aug, batch_size=bs, data_prefix="schedule.resolution.batch_sizes.")
        if res_cfg.kind == "budgeted":   # one global batch: each stage's accumulation is per_step / its batch
            per_step = self.data.batch_size * self.optim.grad_accum
            for i, (r, bs) in enumerate(res_cfg.batch_sizes):
                if per_step % bs:
                    raise ConfigError(f"schedule.resolution.batch_sizes[{i}]: per-rank batch {bs} at {r} px must "
                                      f"divide data.batch_size x optim.grad_accum = {per_step} (a budgeted schedule "
                                      f"keeps the global batch; accumulation = {per_step} / batch)")
        patch = self.model.patch_size
        if res_cfg.patch_size != patch:
            raise ConfigError(f"schedule.resolution.patch_size: {res_cfg.patch_size} must equal the model's patch "
                              f"size {patch}")
        for i, r in enumerate(self.eval.resolutions):
            if r % patch:
                raise ConfigError(f"eval.resolutions[{i}]: {r} must be a multiple of the patch size {patch} "
                                  f"(e.g. {max(patch, r // patch * patch)} or {(r // patch + 1) * patch})")
        if self.eval.minival_split in (self.data.val_split, self.data.train_split):
            raise ConfigError(f"eval.minival_split: {self.eval.minival_split!r} is data.val_split or "
                              f"data.train_split; the test resolution is chosen on held-out train images "
                              f"(data_prep writes 'minival')")
        if self.aug.aspect_buckets:
            m = self.aug.aspect_multiple
            if m % patch:
                raise ConfigError(f"aug.aspect_multiple: {m} must be a multiple of the patch size {patch} "
                                  f"(bucket sides are whole patches); e.g. {patch}")
            for epoch in range(self.run.epochs):
                r = res_cfg.resolution_at(epoch, self.run.epochs)
                if r % m:
                    raise ConfigError(f"schedule.resolution: epoch {epoch} trains at {r} px, not a multiple of "
                                      f"aug.aspect_multiple={m} (aspect buckets are built from it)")
        # run.ema with ZeRO-3 is refused where the JSON's stage is read (pipeline.config.deepspeed)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir)

    def to_yaml(self) -> str:
        """The config as stored in the run folder, the checkpoints and MLflow: URLs without their credentials."""
        return yaml.safe_dump(redact_values(to_dict(self)), sort_keys=False)
