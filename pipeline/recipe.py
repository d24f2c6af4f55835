"""The training job's whole configuration: :class:`TrainConfig` = model, data, aug, schedule, optim, checkpoint,
tracking, eval and run sections, plus the resolved DeepSpeed config.

``load_train_config(recipe, overrides, world_size)`` does everything that can fail on user input -- YAML, CLI
overrides, types, choices, cross-section rules, the DeepSpeed JSON and its batch arithmetic
(``train_batch_size = micro x accumulation x world``) -- and raises a one-line :class:`ConfigError` before any
data is read or a process group exists.

A recipe states the *global* batch (``data.global_batch_size``, DeiT's 1024) and a per-GPU memory cap
(``data.max_batch_per_gpu``); :func:`derive_batch` turns them into the per-rank micro-batch and the accumulation
steps for the world size, so the returned config holds per-rank values and the same recipe trains with the same
global batch, LR schedule and samples per step on 1, 8 or 32 ranks. A world size that cannot form the global batch
is refused with the numbers.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from pipeline.checkpointing import CheckpointConfig
from pipeline.config import (ConfigError, apply_overrides, check_positive, check_range, deep_merge, from_dict,
                             load_yaml, to_dict, validate)
from pipeline.data.config import AugConfig, DataConfig, check_data_aug
from pipeline.models.cpvt import check_peg_positions
from pipeline.optim import OptimConfig, deepspeed_optimizer_section
from pipeline.schedules import LRSchedule, LRScheduleConfig, ResolutionSchedule, ResolutionScheduleConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).resolve().parent / "recipes"
DS_DTYPES = ("fp32", "bf16", "fp16")
# every registered cpvt_* variant (pipeline/models/cpvt.py): 12 blocks of patch-16 tokens
MODEL_DEPTH, MODEL_PATCH = 12, 16


@dataclass
class ModelConfig:
    name: Literal["cpvt_ti", "cpvt_s", "cpvt_b", "cpvt_ti_gap", "cpvt_s_gap", "cpvt_b_gap"] = "cpvt_ti"
    num_classes: Optional[int] = None   # None: from <data.root>/classes.json
    drop_path_rate: float = 0.1
    peg_positions: tuple[int, ...] = (0,)
    peg_kernel: int = 3
    pos_embed: Literal["none", "learned"] = "none"
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


@dataclass
class ScheduleConfig:
    resolution: ResolutionScheduleConfig = field(default_factory=ResolutionScheduleConfig)
    lr: LRScheduleConfig = field(default_factory=LRScheduleConfig)


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None           # None: $MLFLOW_TRACKING_URI, else the project store (pipeline.tracking)
    experiment: str = "cpvt"
    run_name: Optional[str] = None
    recipe: Optional[str] = None        # the recipe's name, a run tag (load_train_config fills it in)
    system_metrics: bool = True         # MLflow's psutil sampler (CPU/RAM/GPU) on rank 0


@dataclass
class EvalConfig:
    every_epochs: int = 1               # evaluate every N epochs (0: only at the end)
    resolutions: tuple[int, ...] = (160, 224, 288, 384)   # test resolutions (the training resolution is added)
    max_batches: Optional[int] = None   # cap per resolution (smoke runs); None: the whole val split
    # center_crop: resize to res / aug.crop_pct + center crop res x res (timm/DeiT). native: the whole image,
    # short side res, aspect kept, both sides multiples of the patch size, long side <= native_max_aspect x res,
    # batched by aspect bucket (pipeline.data.aspect_buckets)
    mode: Literal["center_crop", "native"] = "center_crop"
    native_max_aspect: float = 2.0

    def validate(self) -> None:
        check_positive("every_epochs", self.every_epochs, allow_zero=True)
        for i, r in enumerate(self.resolutions):
            check_positive(f"resolutions[{i}]", r)
        if not self.native_max_aspect >= 1.0:
            raise ConfigError(f"native_max_aspect: {self.native_max_aspect!r} must be >= 1")


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    epochs: int = 300
    max_steps: Optional[int] = None     # stop after this many optimizer steps in total (smoke tests)
    log_every: int = 50
    deepspeed_config: str = "deepspeed_configs/zero2.json"
    # auto: bf16 on a CUDA GPU with bf16 or a CPU with native bf16, else fp32; an explicit value wins over the
    # JSON's bf16/fp16 sections (pipeline.device.finalize_deepspeed_config)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False               # torch.compile the model (one graph per input resolution)
    dist_timeout_s: int = 600           # process-group timeout: a dead peer fails the job after this long
    nonfinite_patience: int = 10        # stop after this many non-finite losses in a row
    stop_check_steps: int = 10          # ranks agree on a preemption signal every N steps (1 rank: every step)
    ema: bool = False
    ema_decay: float = 0.9998
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
            res_schedule = ResolutionSchedule(res_cfg, self.run.epochs)
            LRSchedule(self.schedule.lr, self.run.epochs)
        except ConfigError as e:
            raise ConfigError(f"schedule.{e}") from None
        check_data_aug(self.data, self.aug)
        for _, bs in res_cfg.batch_sizes:
            check_data_aug(self.data, self.aug, batch_size=bs, data_prefix="schedule.resolution.batch_sizes.")
        patch = self.model.patch_size
        if res_cfg.patch_size != patch:
            raise ConfigError(f"schedule.resolution.patch_size: {res_cfg.patch_size} must equal the model's patch "
                              f"size {patch}")
        for i, r in enumerate(self.eval.resolutions):
            if r % patch:
                raise ConfigError(f"eval.resolutions[{i}]: {r} must be a multiple of the patch size {patch} "
                                  f"(e.g. {max(patch, r // patch * patch)} or {(r // patch + 1) * patch})")
        if self.aug.aspect_buckets:
            m = self.aug.aspect_multiple
            if m % patch:
                raise ConfigError(f"aug.aspect_multiple: {m} must be a multiple of the patch size {patch} "
                                  f"(bucket sides are whole patches); e.g. {patch}")
            for epoch in range(self.run.epochs):
                r = res_schedule.at(epoch)[0]
                if r % m:
                    raise ConfigError(f"schedule.resolution: epoch {epoch} trains at {r} px, not a multiple of "
                                      f"aug.aspect_multiple={m} (aspect buckets are built from it)")
        if self.run.ema and self.ds_zero_stage_hint() == 3:
            raise ConfigError("run.ema: EMA needs full parameters on every rank; allowed with ZeRO stages [0, 1, 2]")

    def ds_zero_stage_hint(self) -> int | None:
        try:
            return int(_read_ds_json(self.run.deepspeed_config).get("zero_optimization", {}).get("stage", 0))
        except (ConfigError, ValueError, TypeError):
            return None

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir)

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_dict(self), sort_keys=False)


# ----------------------------------------------------------------------------------------- DeepSpeed JSON
def _resolve_path(path: str) -> Path:
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        p = ROOT / p
    return p


def _read_ds_json(path: str) -> dict[str, Any]:
    p = _resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"run.deepspeed_config: file not found: {path} "
                          f"(shipped: {sorted(x.name for x in (ROOT / 'deepspeed_configs').glob('*.json'))})")
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


def resolve_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed dict handed to ``deepspeed.initialize``: batch sizes filled in and checked, clipping and
    optimizer from the recipe, no ``"auto"`` left. Pure function of (cfg, world_size): no I/O besides the JSON."""
    ds = {k: v for k, v in _read_ds_json(cfg.run.deepspeed_config).items() if not k.startswith("_")}
    ds = copy.deepcopy(ds)
    where = f"deepspeed config {cfg.run.deepspeed_config}"
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage: {stage!r} is not one of [0, 1, 2, 3]")
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
    if "gradient_clipping" not in ds or ds["gradient_clipping"] == "auto":
        ds["gradient_clipping"] = cfg.optim.grad_clip
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


def read_num_classes(cfg: TrainConfig) -> int:
    """``model.num_classes`` or len(classes.json) -- a tiny metadata file, not training data."""
    if cfg.model.num_classes is not None:
        return cfg.model.num_classes
    if not cfg.data.root:
        raise ConfigError("data.root: must be set (the data_prep output folder), e.g. --data runs/demo/data")
    from pipeline.data.shard_index import read_classes  # a local folder or an s3:// / http(s):// URL

    return len(read_classes(cfg.data.root))


# ----------------------------------------------------------------------------------------- recipes
def find_recipe(recipe: str | Path | None, search: Sequence[str | Path] = ()) -> Path | None:
    """A recipe path, or a name (``cpvt_b``, ``cpvt_b.yaml``) looked up in ``search`` (site recipe folders)
    first, then ``pipeline/recipes``; a name found nowhere is returned as given (load_yaml names it)."""
    if recipe is None:
        return None
    p = Path(recipe)
    if p.is_file():
        return p
    for folder in [*map(Path, search), RECIPES]:
        for candidate in (folder / p.name, folder / f"{p.name}.yaml"):
            if candidate.is_file():
                return candidate
    return p


def model_recipe(model: str | None, search: Sequence[str | Path] = ()) -> Path | None:
    """The paper's recipe for ``--model X`` without ``--recipe``: ``recipes/X.yaml`` (None: there is none)."""
    if not model:
        return None
    found = find_recipe(model, search)
    return found if found is not None and found.is_file() else None


# ----------------------------------------------------------------------------------------- global batch
@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is formed on ``world`` ranks: ``global_batch = micro x accum x world``, and per listed
    resolution ``(resolution, global batch, micro-batch)`` with the same accumulation."""
    world: int
    global_batch: int
    micro: int
    accum: int
    per_resolution: tuple[tuple[int, int, int], ...] = ()

    def line(self) -> str:
        text = (f"global batch {self.global_batch} = per-rank batch {self.micro} x accumulation {self.accum} x "
                f"{self.world} ranks")
        for res, g, m in self.per_resolution:
            text += f"; at {res} px {g} = {m} x {self.accum} x {self.world}"
        return text


def derive_batch(global_batch: int, world: int, *, min_accum: int = 1, max_micro: int | None = None,
                 even: bool = False, resolution_batches: Sequence[tuple[int, int]] = (),
                 top_resolution: int | None = None) -> BatchPlan:
    """The fewest accumulation steps (>= ``min_accum``) such that ``global_batch`` and every
    ``(resolution, global batch)`` of a progressive schedule split into equal per-rank micro-batches of at most
    ``max_micro`` samples (at ``top_resolution``; a lower resolution r may hold ``max_micro x (top / r)^2``: the
    same number of tokens), even ones when ``even`` (Mixup pairs samples in the micro-batch). Pure; raises a
    one-line ConfigError with the numbers when this world size cannot form the batch."""
    check_positive("world_size", world)
    wanted = [("data.global_batch_size", None, int(global_batch))]
    wanted += [(f"schedule.resolution.batch_sizes[{i}]", int(r), int(g)) for i, (r, g) in enumerate(resolution_batches)]
    top = top_resolution or max([r for _, r, _ in wanted if r] or [1])

    def cap(res: int | None) -> int | None:
        if max_micro is None:
            return None
        return max_micro if res is None or res >= top else max(max_micro, int(max_micro * (top / res) ** 2))

    for field_name, _, g in wanted:
        if g % world:
            ok = [w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256) if all(x % w == 0 for _, _, x in wanted)]
            raise ConfigError(f"{field_name}: global batch {g} cannot be split over {world} ranks ({g} is not "
                              f"divisible by {world}); world sizes that can: {ok}")
    for accum in range(max(1, min_accum), global_batch // world + 1):
        micros = []
        for _, res, g in wanted:
            m, rest = divmod(g, world * accum)
            c = cap(res)
            if rest or m == 0 or (c is not None and m > c) or (even and m % 2):
                break
            micros.append(m)
        else:
            per_res = tuple((res, g, m) for (_, res, g), m in zip(wanted[1:], micros[1:]))
            return BatchPlan(world, global_batch, micros[0], accum, per_res)
    limits = [f"micro <= {max_micro} (data.max_batch_per_gpu)"] if max_micro is not None else []
    limits += ["an even micro-batch (aug.mixup/cutmix)"] if even else []
    limits += [f"accumulation >= {min_accum} (optim.grad_accum)"] if min_accum > 1 else []
    batches = ", ".join(str(g) for _, _, g in wanted)
    raise ConfigError(f"data.global_batch_size: {batches} cannot be formed on world size {world} as micro x "
                      f"accumulation x {world} with {' and '.join(limits) or 'integer steps'}; change the world "
                      f"size or data.max_batch_per_gpu")


def batch_plan(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """The batch arithmetic of a config that already holds per-rank values (what load_train_config returned)."""
    micro, accum = cfg.data.batch_size, cfg.optim.grad_accum
    return BatchPlan(world_size, micro * accum * world_size, micro, accum,
                     tuple((r, b * accum * world_size, b) for r, b in cfg.schedule.resolution.batch_sizes))


def apply_global_batch(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, BatchPlan]:
    """``cfg`` with per-rank values for ``world_size``: ``data.batch_size``, ``optim.grad_accum`` and the
    schedule's per-resolution batches derived from the recipe's global ones (unchanged when
    ``data.global_batch_size`` is null: the batch is then stated per rank)."""
    res_cfg = cfg.schedule.resolution
    if cfg.data.global_batch_size is None:
        return cfg, batch_plan(cfg, world_size)
    from pipeline.schedules import ResolutionSchedule

    top = max(r for _, r, _ in ResolutionSchedule(res_cfg, cfg.run.epochs).table())
    plan = derive_batch(cfg.data.global_batch_size, world_size, min_accum=cfg.optim.grad_accum,
                        max_micro=cfg.data.max_batch_per_gpu, even=cfg.aug.mixup_active,
                        resolution_batches=res_cfg.batch_sizes, top_resolution=top)
    out = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, batch_size=plan.micro),
        optim=dataclasses.replace(cfg.optim, grad_accum=plan.accum),
        schedule=dataclasses.replace(cfg.schedule, resolution=dataclasses.replace(
            res_cfg, batch_sizes=[(r, m) for r, _, m in plan.per_resolution])))
    validate(out)
    return out, plan


# ----------------------------------------------------------------------------------------- loading
def load_train_config(recipe: str | Path | None, overrides: Sequence[str] = (), world_size: int = 1,
                      defaults: Mapping[str, Any] | None = None, recipe_dirs: Sequence[str | Path] = ()
                      ) -> tuple[TrainConfig, dict[str, Any]]:
    """defaults (site values) <- recipe YAML <- overrides -> validated TrainConfig with per-rank batch values for
    ``world_size`` (:func:`apply_global_batch`) + the resolved DeepSpeed dict (raises ConfigError)."""
    recipe = find_recipe(recipe, recipe_dirs)
    if recipe is not None:   # the runs table's recipe tag
        overrides = [f"tracking.recipe={Path(recipe).stem}", *overrides]
    data: dict[str, Any] = dict(defaults or {})
    if recipe is not None:
        data = deep_merge(data, load_yaml(recipe))
    data = apply_overrides(data, overrides)
    keys = {o.split("=", 1)[0].strip().lstrip("-") for o in overrides}
    section = data.get("data")
    if "data.batch_size" in keys and isinstance(section, Mapping) and section.get("global_batch_size") is not None:
        # a per-rank batch asked for on the command line (benchmarks, smoke runs): the recipe's global batch is off
        res = (data.get("schedule") or {}).get("resolution") or {}
        if res.get("batch_sizes") and "schedule.resolution.batch_sizes" not in keys:
            raise ConfigError(f"schedule.resolution.batch_sizes: {res['batch_sizes']} are the recipe's global batches "
                              f"(data.global_batch_size={section['global_batch_size']}); with a per-rank "
                              f"data.batch_size give per-rank schedule.resolution.batch_sizes too")
        data = deep_merge(data, {"data": {"global_batch_size": None}})
    cfg = from_dict(TrainConfig, data)
    cfg, _ = apply_global_batch(cfg, world_size)
    ds = resolve_deepspeed_config(cfg, world_size)
    return cfg, ds
