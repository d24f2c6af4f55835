"""The training job's whole configuration: :class:`TrainConfig` = model, data, aug, schedule, optim, checkpoint,
tracking, eval and run sections, plus the resolved DeepSpeed config.

``load_train_config(recipe, overrides, world_size)`` does everything that can fail on user input -- YAML, CLI
overrides, types, choices, cross-section rules, the DeepSpeed JSON and its batch arithmetic
(``train_batch_size = micro x accumulation x world``) -- and raises a one-line :class:`ConfigError` before any
data is read or a process group exists.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from pipeline.checkpointing import CheckpointConfig
from pipeline.config import ConfigError, check_positive, check_range, load_config, to_dict
from pipeline.data.config import AugConfig, DataConfig, check_data_aug
from pipeline.optim import OptimConfig, deepspeed_optimizer_section
from pipeline.schedules import LRSchedule, LRScheduleConfig, ResolutionSchedule, ResolutionScheduleConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).resolve().parent / "recipes"
DS_DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    name: Literal["cpvt_ti", "cpvt_s", "cpvt_b", "cpvt_ti_gap", "cpvt_s_gap", "cpvt_b_gap"] = "cpvt_ti"
    num_classes: Optional[int] = None   # None: from <data.root>/classes.json
    drop_path_rate: float = 0.1
    peg_positions: tuple[int, ...] = (0,)
    peg_kernel: int = 3
    pos_embed: Literal["none", "learned"] = "none"
    kwargs: dict = field(default_factory=dict)   # any other timm.create_model kwarg (embed_dim, depth, num_heads)

    def validate(self) -> None:
        check_range("drop_path_rate", self.drop_path_rate, 0.0, 1.0)
        if self.peg_kernel < 1 or self.peg_kernel % 2 == 0:
            raise ConfigError(f"peg_kernel: {self.peg_kernel!r} must be a positive odd integer")
        if self.num_classes is not None:
            check_positive("num_classes", self.num_classes)

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
    uri: Optional[str] = None           # None: $MLFLOW_TRACKING_URI, else sqlite:///<run_dir>/mlflow.db
    experiment: str = "cpvt"
    run_name: Optional[str] = None
    system_metrics: bool = True         # MLflow's psutil sampler (CPU/RAM/GPU) on rank 0


@dataclass
class EvalConfig:
    every_epochs: int = 1               # evaluate every N epochs (0: only at the end)
    resolutions: tuple[int, ...] = (160, 224, 288, 384)   # test resolutions (the training resolution is added)
    max_batches: Optional[int] = None   # cap per resolution (smoke runs); None: the whole val split

    def validate(self) -> None:
        check_positive("every_epochs", self.every_epochs, allow_zero=True)
        for i, r in enumerate(self.resolutions):
            check_positive(f"resolutions[{i}]", r)


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
            ResolutionSchedule(res_cfg, self.run.epochs)
            LRSchedule(self.schedule.lr, self.run.epochs)
        except ConfigError as e:
            raise ConfigError(f"schedule.{e}") from None
        check_data_aug(self.data, self.aug)
        for _, bs in res_cfg.batch_sizes:
            check_data_aug(self.data, self.aug, batch_size=bs, data_prefix="schedule.resolution.batch_sizes.")
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


def load_train_config(recipe: str | Path | None, overrides: list[str] = (), world_size: int = 1
                      ) -> tuple[TrainConfig, dict[str, Any]]:
    """Recipe YAML <- overrides -> validated TrainConfig + resolved DeepSpeed dict (raises ConfigError)."""
    if recipe is not None and not Path(recipe).is_file() and (RECIPES / Path(recipe).name).is_file():
        recipe = RECIPES / Path(recipe).name
    if recipe is not None and not Path(recipe).is_file() and (RECIPES / f"{recipe}.yaml").is_file():
        recipe = RECIPES / f"{recipe}.yaml"
    cfg = load_config(TrainConfig, recipe, overrides)
    ds = resolve_deepspeed_config(cfg, world_size)
    return cfg, ds
