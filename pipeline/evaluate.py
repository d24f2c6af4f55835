"""Top-1/top-5 on the val split at several resolutions without fine-tuning (the paper's resolution experiment).

Two modes (``eval.mode``, ``--mode``): ``center_crop`` (timm/DeiT: resize to res / crop_pct, center crop
res x res) and ``native`` (what only a PEG model can do: the whole image, short side res, aspect kept, both sides
rounded to the patch size, long side at most ``eval.native_max_aspect`` x res, batched by aspect bucket;
:mod:`pipeline.data.aspect_buckets` states the rule).

Distributed: each rank scores its share of the val split; the eval loader pads so every rank runs the same
number of batches with the same shapes in the same order (ZeRO-3 forwards are collective) and padding carries
label -1, which is ignored. Counts are summed over ranks, so every val sample is counted exactly once.

Standalone, over a DeepSpeed checkpoint (any ZeRO stage) or an exported ``.safetensors``::

    python -m pipeline.evaluate runs/demo --data runs/demo/data --resolutions 64 96 128
    torchrun --nproc_per_node 2 -m pipeline.evaluate runs/demo/export/model.safetensors --data DATA
    deepspeed --num_gpus 2 pipeline/evaluate.py runs/demo --data DATA
    python -m pipeline.evaluate runs/demo --ema          # the checkpoint's EMA weights (run.ema=true)
    python -m pipeline.evaluate runs/demo --mode native  # whole images at their aspect bucket

The input pipeline is the one the trainer evaluated with, from the run's resolved config (the checkpoint's
``train_config.yaml``, or the copy an export carries): ``aug.crop_pct``, ``aug.eval_interpolation``,
``aug.mean``/``aug.std``, the ``data`` section (root, format, val split, eval batch size, workers, decoding
options), the resolutions (the final training resolution + ``eval.resolutions``) and ``eval.mode`` /
``eval.native_max_aspect``; ``eval.max_batches`` is not applied (the whole val split is scored). Command-line
flags override single settings; an export without a config uses the defaults. The settings used are printed first.

The test resolution is chosen, not assumed (``eval.choose_test_res``, ``--choose-test-res``): when the data has
a ``minival`` split (held out from train by ``python -m data_prep ... --minival-fraction``), the model is scored
there at the same resolutions, the best minival top-1 picks the resolution (:func:`choose_test_resolution`: ties
go to the training resolution, else the lowest), and val's top-1 is reported at it. Val never takes part in the
choice. The trainer does this after its final evaluation (:meth:`Evaluator.choose_test_res`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import timm
import torch
import yaml

import pipeline.models  # noqa: F401 - registers the cpvt_* models with timm
from pipeline import export as export_mod
from pipeline.config import (EVAL_RESOLUTIONS, AugConfig, ConfigError, DataConfig, EvalConfig, TrainConfig,
                             check_choice, from_dict, validate)
from pipeline.data.aspect_buckets import check_native
from pipeline.data.loader import build_eval_loader
from pipeline.data.shard_index import has_split
from pipeline.device import DeviceError, autocast_forward, select_device
from pipeline.distributed import all_reduce_, destroy, detect_env, init_distributed, use_device
from pipeline.ffcv_compat import import_ffcv
from pipeline.schedules import ResolutionSchedule


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], data_cfg, *, resolutions: Sequence[int],
             rank: int, world_size: int, crop_pct: float, device: torch.device,
             input_dtype: torch.dtype = torch.float32, max_batches: int | None = None,
             aug_cfg=None, loaders: dict | None = None, mode: str = "center_crop", patch_size: int,
             max_aspect: float = 2.0) -> dict[int, dict[str, float]]:
    """``{resolution: {"top1": %, "top5": %, "loss": mean CE, "n": samples, "tokens": patch tokens}}`` summed
    over all ranks; ``mode``: ``center_crop`` or ``native`` (short side = resolution, long side <=
    ``max_aspect`` x, multiples of ``patch_size``, the model's).

    Counts stay on the device and are reduced and read once per resolution. ``loaders``: a dict that caches the
    eval loader of each (mode, resolution) across calls (the trainer evaluates every few epochs)."""
    loaders = {} if loaders is None else loaders
    results: dict[int, dict[str, float]] = {}
    for res in sorted(set(int(r) for r in resolutions)):
        key = (mode, res)
        if key not in loaders:
            loaders[key] = build_eval_loader(data_cfg, resolution=res, rank=rank, world_size=world_size,
                                             crop_pct=crop_pct, aug_cfg=aug_cfg, device=device, mode=mode,
                                             patch_size=patch_size, max_aspect=max_aspect)
        loader = loaders[key]
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, count
        for i, (images, labels) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            images = images.to(device=device, dtype=input_dtype, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            sums += batch_counts(forward(images).float(), labels)
        c1, c5, loss, n = all_reduce_(sums).tolist()
        if max_batches is None and int(n) != int(loader.num_samples):
            raise RuntimeError(f"eval at {res}px counted {int(n)} samples, the val split has {loader.num_samples}")
        results[res] = {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1),
                        "loss": loss / max(n, 1), "n": int(n), "tokens": int(loader.num_tokens(patch_size))}
    return results


def batch_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[top-1 hits, top-5 hits, CE sum, samples] of one batch as a device tensor; padding (label -1) is masked
    out without a host round trip (timm's ``accuracy`` returns host floats, so it is not used here)."""
    keep = labels >= 0
    safe = labels.clamp(min=0)
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = (top5 == safe[:, None]) & keep[:, None]
    ce = torch.nn.functional.cross_entropy(logits, safe, reduction="none") * keep
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), ce.sum(), keep.sum()]).double()


def choose_test_resolution(minival_top1: Mapping[int, float], train_res: int | None) -> tuple[int, str]:
    """(the test resolution with the best minival top-1, why). Ties: the training resolution when it is among the
    best, else the lowest of them. It is given minival's scores only, so val cannot take part in the choice."""
    if not minival_top1:
        raise ValueError("choose_test_resolution: no minival scores")
    best = max(minival_top1.values())
    tied = sorted(r for r, top1 in minival_top1.items() if top1 == best)
    if len(tied) == 1:
        return tied[0], "best minival top-1"
    if train_res in tied:
        return int(train_res), f"tie at {tied} px: the training resolution"
    return tied[0], f"tie at {tied} px: the lowest"


@dataclasses.dataclass(frozen=True)
class ResolutionChoice:
    """The test resolution chosen on minival (:func:`choose_test_resolution`) and val's top-1 there."""

    resolution: int
    why: str
    minival: dict[int, dict[str, float]]   # minival results at every candidate resolution
    val_top1: float                        # val top-1 at the chosen resolution

    @property
    def minival_top1(self) -> float:
        return self.minival[self.resolution]["top1"]

    def line(self) -> str:
        return (f"test resolution {self.resolution} px chosen on minival (top-1 {self.minival_top1:.1f} %, "
                f"{self.why}); val top-1 at {self.resolution} px: {self.val_top1:.1f} %")

    def metrics(self) -> dict[str, float]:
        """MLflow metrics: ``test_res/chosen``, ``test_res/minival_top1``, ``test_res/val_top1`` and minival's
        top-1 at every candidate (``test_res/minival_top1_{r}px``)."""
        return {"test_res/chosen": self.resolution, "test_res/minival_top1": self.minival_top1,
                "test_res/val_top1": self.val_top1,
                **{f"test_res/minival_top1_{r}px": v["top1"] for r, v in sorted(self.minival.items())}}

    def summary(self) -> dict:
        return {"chosen": self.resolution, "why": self.why, "minival_top1": self.minival_top1,
                "val_top1": self.val_top1, "minival": {str(r): v for r, v in sorted(self.minival.items())}}


def choose_on_minival(minival: Mapping[int, Mapping[str, float]], val: Mapping[int, Mapping[str, float]],
                      train_res: int | None) -> ResolutionChoice:
    """Choose on ``minival``'s results ({resolution: {"top1", ...}}), then read ``val``'s top-1 at the choice."""
    res, why = choose_test_resolution({r: v["top1"] for r, v in minival.items()}, train_res)
    if res not in val:
        raise ValueError(f"val was not scored at the chosen test resolution {res} px (scored: {sorted(val)})")
    return ResolutionChoice(res, why, {r: dict(v) for r, v in minival.items()}, float(val[res]["top1"]))


def no_minival_line(root: str, split: str) -> str:
    """What is said when the test resolution cannot be chosen: the data has no held-out split."""
    return (f"test resolution: not chosen, {root} has no {split!r} split (carve one from train with `python -m "
            f"data_prep wds|ffcv ... --minival-fraction 0.01`); the val table stands as it is")


class Evaluator:
    """The trainer's evaluation component: its own cadence (``eval.every_epochs`` and the last epoch), eval
    loaders built once per resolution and reused, the EMA weights scored at the training resolution, and the
    test resolution chosen on minival (``eval.choose_test_res``)."""

    def __init__(self, cfg, *, rank: int, world_size: int, device: torch.device, input_dtype: torch.dtype):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device, self.input_dtype = device, input_dtype
        self.loaders: dict[tuple[str, int], object] = {}   # (mode, resolution) -> eval loader of the val split
        self.split_loaders: dict[str, dict[tuple[str, int], object]] = {}   # the same for other splits

    def should_eval(self, epoch: int, last: bool) -> bool:
        every = self.cfg.eval.every_epochs
        return last or bool(every and (epoch + 1) % every == 0)

    def __call__(self, forward, resolutions: Sequence[int], input_dtype: torch.dtype | None = None,
                 split: str | None = None):
        """Results at ``resolutions`` on the val split (``split``: another one, e.g. minival)."""
        data = self.cfg.data if split is None else dataclasses.replace(self.cfg.data, val_split=split)
        loaders = self.loaders if split is None else self.split_loaders.setdefault(split, {})
        return evaluate(forward, data, resolutions=resolutions, rank=self.rank, world_size=self.world_size,
                        crop_pct=self.cfg.aug.crop_pct, device=self.device,
                        input_dtype=self.input_dtype if input_dtype is None else input_dtype,
                        max_batches=self.cfg.eval.max_batches, aug_cfg=self.cfg.aug, loaders=loaders,
                        mode=self.cfg.eval.mode, max_aspect=self.cfg.eval.native_max_aspect,
                        patch_size=self.cfg.model.patch_size)

    def choose_test_res(self, forward, train_res: int, val: Mapping[int, Mapping[str, float]],
                        log: Callable[[str], None]) -> ResolutionChoice | None:
        """With ``eval.choose_test_res`` and a minival split in the data: score minival at the training
        resolution and ``eval.resolutions``, choose there, read ``val`` (the final results) at the choice, say so
        in one line. None: switched off, or no minival (said in one line). Collective: every rank calls it."""
        ev, data = self.cfg.eval, self.cfg.data
        if not ev.choose_test_res:
            return None
        if not has_split(data.root, data.format, ev.minival_split):
            log(no_minival_line(data.root, ev.minival_split))
            return None
        minival = self(forward, (train_res, *ev.resolutions), split=ev.minival_split)
        choice = choose_on_minival(minival, val, train_res)
        log(choice.line())
        return choice


def format_table(results: dict[int, dict[str, float]], train_res: int | None = None) -> str:
    lines = ["resolution  top-1   top-5   samples"]
    for res in sorted(results):
        r = results[res]
        mark = "  (train)" if res == train_res else ""
        lines.append(f"{res:>10}  {r['top1']:6.2f}  {r['top5']:6.2f}  {r['n']:>7}{mark}")
    return "\n".join(lines)


def load_model(path: str | Path, ema: bool = False):
    """A plain fp32 timm model from an export (.safetensors) or a DeepSpeed checkpoint / run dir (``ema``: the
    checkpoint's EMA weights)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        if ema:
            raise ValueError(f"--ema: {path} is an export; export the EMA weights with `python -m pipeline.export "
                             f"RUN --ema` and evaluate that file")
        model, meta = export_mod.load_export(path)
        return model, meta["model"]
    ckpt = export_mod.resolve_checkpoint(path)
    name, kwargs = export_mod.checkpoint_model_spec(ckpt)
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(export_mod.ema_state_dict(ckpt) if ema else export_mod.consolidated_state_dict(ckpt))
    return model, name


def stored_config(path: str | Path):
    """(TrainConfig, where it was read) saved with the weights at ``path``: the checkpoint's ``train_config.yaml``
    or the copy in an export's metadata; ``(None, why)`` when there is none."""
    path = Path(path)
    if path.suffix == ".safetensors":
        text, where = export_mod.read_meta(path).get("train_config"), f"{path} (export metadata)"
    else:
        yml = export_mod.resolve_checkpoint(path) / "train_config.yaml"
        text, where = (yml.read_text() if yml.is_file() else None), str(yml)
    if text is None:
        return None, f"no training config stored with {path}"
    return from_dict(TrainConfig, yaml.safe_load(text)), where


def eval_settings(path: str | Path, data_flags: dict, aug_flags: dict, resolutions: Sequence[int] | None = None):
    """(DataConfig, AugConfig, resolutions, where they came from) for evaluating the weights at ``path`` like the
    trainer did: its run config's ``data``/``aug`` sections and final evaluation resolutions (without a config:
    the defaults), each overridden by a flag that is not None (``data_flags``/``aug_flags``: field -> value)."""
    cfg, source = stored_config(path)
    data_flags = {k: v for k, v in data_flags.items() if v is not None}
    aug_flags = {k: v for k, v in aug_flags.items() if v is not None}
    data_cfg = dataclasses.replace(cfg.data if cfg else DataConfig(eval_batch_size=128, num_workers=2), **data_flags)
    aug_cfg = dataclasses.replace(cfg.aug if cfg else AugConfig(), **aug_flags)
    validate(data_cfg, "data.")
    validate(aug_cfg, "aug.")
    if not data_cfg.root:
        raise ConfigError(f"data.root: pass --data ({source})")
    flags = [f"data.{k}" for k in data_flags if k != "root"] + [f"aug.{k}" for k in aug_flags]
    if resolutions is not None:
        flags.append("resolutions")
    else:
        resolutions = list(EVAL_RESOLUTIONS)
        if cfg is not None:  # what the trainer's final evaluation scored
            final_res = ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs).at(cfg.run.epochs - 1)[0]
            resolutions = [final_res, *cfg.eval.resolutions]
    origin = f"from {source}" if cfg else f"defaults: {source}"
    return data_cfg, aug_cfg, list(resolutions), origin + (f"; command line: {', '.join(flags)}" if flags else "")


def eval_mode_settings(path: str | Path, mode: str | None = None,
                       max_aspect: float | None = None) -> tuple[str, float]:
    """(eval mode, native max aspect) for the weights at ``path``: the flags when given, else the run config's
    ``eval.mode`` / ``eval.native_max_aspect``, else center_crop / 2.0."""
    cfg, _ = stored_config(path)
    ev = cfg.eval if cfg is not None else EvalConfig()
    mode = ev.mode if mode is None else mode
    max_aspect = ev.native_max_aspect if max_aspect is None else float(max_aspect)
    check_choice("eval.mode", mode, ("center_crop", "native"))
    if not max_aspect >= 1.0:
        raise ConfigError(f"eval.native_max_aspect: {max_aspect!r} must be >= 1")
    return mode, max_aspect


def choice_settings(path: str | Path, choose: bool | None = None) -> tuple[bool, str, int | None]:
    """(``eval.choose_test_res``, the minival split, the final training resolution or None) for the weights at
    ``path``: the flag when given, else the run config's, else true / minival / None (ties then go to the
    lowest resolution)."""
    cfg, _ = stored_config(path)
    ev = cfg.eval if cfg is not None else EvalConfig()
    choose = ev.choose_test_res if choose is None else choose
    train_res = None
    if cfg is not None:
        train_res = ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs).at(cfg.run.epochs - 1)[0]
    return choose, ev.minival_split, train_res


def describe_settings(data_cfg, aug_cfg, resolutions: Sequence[int]) -> str:
    return (f"crop_pct={aug_cfg.crop_pct} interpolation={aug_cfg.eval_interpolation} mean={list(aug_cfg.mean)} "
            f"std={list(aug_cfg.std)} resolutions={sorted(set(resolutions))} format={data_cfg.format} "
            f"val_split={data_cfg.val_split} batch_size={data_cfg.eval_batch_size} dtype={data_cfg.dtype} "
            f"channels_last={data_cfg.channels_last} jpeg_draft={data_cfg.jpeg_draft}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m pipeline.evaluate``; a flag left out takes the run config's setting."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="export .safetensors, checkpoint folder (step_*) or run dir")
    p.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights (run.ema=true)")
    p.add_argument("--data", default=None, help="data_prep output root (default: the run's data.root)")
    p.add_argument("--format", default=None, choices=["wds", "ffcv"], help="the run's data.format, else wds")
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="the run's final training resolution + eval.resolutions, else 160 224 288 384")
    p.add_argument("--batch-size", type=int, default=None, help="the run's data.eval_batch_size, else 128")
    p.add_argument("--workers", type=int, default=None, help="the run's data.num_workers, else 2")
    p.add_argument("--crop-pct", type=float, default=None, help="the run's aug.crop_pct, else 0.875")
    p.add_argument("--interpolation", default=None, choices=["bicubic", "bilinear"],
                   help="the run's aug.eval_interpolation, else bicubic")
    p.add_argument("--mean", type=float, nargs=3, default=None, help="the run's aug.mean, else ImageNet's")
    p.add_argument("--std", type=float, nargs=3, default=None, help="the run's aug.std, else ImageNet's")
    p.add_argument("--mode", default=None, choices=["center_crop", "native"],
                   help="the run's eval.mode, else center_crop; native: whole image, short side = resolution")
    p.add_argument("--max-aspect", type=float, default=None,
                   help="native mode: long side <= this x short side (the run's eval.native_max_aspect, else 2)")
    p.add_argument("--choose-test-res", default=None, action=argparse.BooleanOptionalAction,
                   help="with a minival split in the data, choose the resolution there and report val's top-1 at "
                        "it (default: the run's eval.choose_test_res, else on)")
    p.add_argument("--json", default=None, help="also write the results here ({resolution: ...}, and 'test_res' "
                                                "when one was chosen)")
    # the deepspeed launcher passes --local_rank=N (ranks come from the environment, see detect_env)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _settings_from_args(p: argparse.ArgumentParser, args: argparse.Namespace):
    """(data, aug, resolutions, where they came from, eval mode, native max aspect): the flags over the stored
    run config; a bad setting ends through ``p.error`` (exit 2)."""
    data_flags = {"root": args.data, "format": args.format, "eval_batch_size": args.batch_size,
                  "num_workers": args.workers}
    aug_flags = {"crop_pct": args.crop_pct, "eval_interpolation": args.interpolation,
                 "mean": args.mean and tuple(args.mean), "std": args.std and tuple(args.std)}
    try:
        data_cfg, aug_cfg, resolutions, origin = eval_settings(args.model, data_flags, aug_flags, args.resolutions)
        mode, max_aspect = eval_mode_settings(args.model, args.mode, args.max_aspect)
        choice = choice_settings(args.model, args.choose_test_res)
    except ConfigError as e:
        p.error(str(e))
    except FileNotFoundError as e:  # neither an export nor a folder holding a complete checkpoint
        p.error(f"model: {e} (give an export .safetensors, a run folder or a checkpoint folder)")
    return data_cfg, aug_cfg, resolutions, origin, mode, max_aspect, choice


def _load_checked_model(p: argparse.ArgumentParser, args: argparse.Namespace, mode: str,
                        resolutions: Sequence[int], max_aspect: float):
    """(model, name) from ``args.model``; in native mode every resolution is checked against the model's patch
    size; --ema without EMA weights or a bad resolution ends through ``p.error`` (exit 2)."""
    try:
        model, name = load_model(args.model, ema=args.ema)
        if mode == "native":   # the whole image, both sides multiples of the model's patch size
            for r in resolutions:
                check_native(r, model.patch_size, max_aspect, field="resolutions")
    except ValueError as e:  # --ema without EMA weights; a ConfigError (a ValueError) from check_native
        p.error(str(e))
    return model, name


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    data_cfg, aug_cfg, resolutions, origin, mode, max_aspect, (choose, minival_split, train_res) = \
        _settings_from_args(p, args)

    env = detect_env()  # torchrun / deepspeed / SLURM variables, or a single process
    rank, world_size = env.rank, env.world_size
    try:
        choice = select_device()  # the trainer's rule: device, backend, DeepSpeed accelerator
    except DeviceError as e:
        p.exit(1, f"error: {e}\n")
    use_device(choice)  # before a checkpoint load imports deepspeed
    if rank == 0:
        print(f"device: {choice.reason}", flush=True)
        print(f"eval settings ({origin}): {describe_settings(data_cfg, aug_cfg, resolutions)} mode={mode}"
              + (f" max_aspect={max_aspect}" if mode == "native" else ""), flush=True)
    # Load the model (and import ffcv) *before* the process group exists: torch modules that timm imports lazily
    # (torch.distributed._shard, ...) take ``group=dist.group.WORLD`` as a default argument, so importing them
    # afterwards pins the group; destroy() could not free it and gloo's worker threads would outlive the
    # interpreter, now and then aborting it at exit ("terminate called without an active exception").
    model, name = _load_checked_model(p, args, mode, resolutions, max_aspect)
    if data_cfg.format == "ffcv":
        import_ffcv()
    if world_size > 1:
        init_distributed(choice)
    device = choice.torch_device
    model.to(device).eval()

    def score(data) -> dict[int, dict[str, float]]:
        return evaluate(autocast_forward(model, device), data, resolutions=resolutions, rank=rank,
                        world_size=world_size, crop_pct=aug_cfg.crop_pct, device=device, aug_cfg=aug_cfg,
                        mode=mode, patch_size=model.patch_size, max_aspect=max_aspect)

    results = score(data_cfg)
    chosen, choice_line = None, None
    if choose:   # minival is scored after val; the choice reads minival's results only
        if has_split(data_cfg.root, data_cfg.format, minival_split):
            minival = score(dataclasses.replace(data_cfg, val_split=minival_split))
            chosen = choose_on_minival(minival, results, train_res)
            choice_line = chosen.line()
        else:
            choice_line = no_minival_line(data_cfg.root, minival_split)
    if rank == 0:
        print(f"{name} from {args.model}" + (" (EMA weights)" if args.ema else "") + f", {mode} evaluation")
        print(format_table(results))
        if choice_line:
            print(choice_line)
        if args.json:
            out = {str(k): v for k, v in results.items()} | ({"test_res": chosen.summary()} if chosen else {})
            Path(args.json).write_text(json.dumps(out, indent=2))
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
