"""DeepSpeed checkpoints with a completeness marker, retention (last K + best), RNG state and auto-resume,
resumable on another world size.

Layout under ``<run_dir>/checkpoints`` (DeepSpeed's own layout: this folder is DeepSpeed's ``save_dir``)::

    step_00000120/                 # one DeepSpeed tag (model/optimizer shards written by every rank)
        rng_rank{r}.pt             # python/numpy/torch RNG states of rank r
        train_config.yaml          # resolved config (export/evaluate need only this folder)
        COMPLETE                   # JSON, written by rank 0 after *all* ranks finished writing: the step and
                                   # the layout (world size, global batch, position as a global sample index)
    step_00000120_universal/       # DeepSpeed universal checkpoint, made on a resume at another world size
    latest                         # DeepSpeed's pointer (tag of the newest complete checkpoint)
    zero_to_fp32.py, zero_to_torch.py   # DeepSpeed's recovery scripts (it copies them at every save)
    best.json                      # {"tag": ..., "metric": ...}

A checkpoint without ``COMPLETE`` (a crash or SIGKILL during save) is never picked by ``--resume auto``, and
``latest`` is rewritten only after ``COMPLETE`` (atomically), so it never points at a partial checkpoint and
DeepSpeed's tools work as documented: ``cd <run_dir>/checkpoints && python zero_to_fp32.py . out`` (ZeRO 1/2/3),
``ds_to_universal.py --input_folder step_X --output_folder step_X_universal``. ``COMPLETE`` stays the source of
truth for ``--resume auto``.

Another world size (:func:`universal_for`): the per-rank ZeRO partitions are re-partitioned by DeepSpeed's
universal checkpoint (``ds_to_universal`` once, on rank 0, then ``"checkpoint": {"load_universal": true}``),
which handles ZeRO 1, 2 and 3 with the optimizer moments; :mod:`pipeline.resume_check` decides whether the
new layout can continue the run exactly before anything starts.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed as dist_utils
from pipeline.atomic import write_atomic
from pipeline.config import check_positive
from pipeline.deepspeed_compat import convert_to_universal, repair_universal_zero3_load
from pipeline.rng import rng_state, set_rng_state

MARKER = "COMPLETE"
LATEST = "latest"                       # DeepSpeed's pointer file (its tools read it)
UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_MARKER = "UNIVERSAL_COMPLETE"
_TAG_RE = re.compile(r"^step_(\d+)$")


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


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``COMPLETE`` record of a checkpoint: step, metric and (checkpoints since layout recording) the layout
    :func:`pipeline.resume_check.check_layout` compares (``world_size``, ``global_batch``, ...)."""
    return json.loads((Path(path) / MARKER).read_text())


def list_complete(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if p.is_dir() and (m := _TAG_RE.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_latest(ckpt_dir: str | Path) -> Path | None:
    done = list_complete(ckpt_dir)
    return done[-1] if done else None


def resolve_resume(resume: str, ckpt_dir: str | Path) -> Path | None:
    """``"auto"`` -> newest complete checkpoint or None; a path -> that checkpoint (must be complete)."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        return find_latest(ckpt_dir)
    path = Path(resume)
    if path.is_dir() and not _TAG_RE.match(path.name):  # a checkpoints folder or run dir
        path = find_latest(path / "checkpoints" if (path / "checkpoints").is_dir() else path) or path
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {MARKER} marker)")
    return path


# ----------------------------------------------------------------------------------------- save / load
def save(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], *, rank: int,
         config_yaml: str, keep_last: int, metric: float | None = None, keep_best: bool = True,
         meta: dict[str, Any] | None = None) -> Path:
    """Collective: every rank must call it. Returns the checkpoint folder. ``meta`` goes into ``COMPLETE``."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0 and path.exists():  # a stale save of the same step (crash, then resume): never pointed to
        if _read_latest(ckpt_dir) == tag:
            (ckpt_dir / LATEST).unlink()
        shutil.rmtree(path)
    dist_utils.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    dist_utils.barrier()  # every rank's shards + RNG are on disk
    if rank == 0:
        (path / "train_config.yaml").write_text(config_yaml)
        write_atomic(path / MARKER, json.dumps({"step": step, "metric": metric, **(meta or {})}))
        write_atomic(ckpt_dir / LATEST, tag)  # DeepSpeed's pointer, only once the checkpoint is complete
        _update_best_and_prune(ckpt_dir, path, metric, keep_last, keep_best)
    dist_utils.barrier()
    return path


def load(engine, path: str | Path, *, rank: int, restore_rng: bool = True) -> dict[str, Any]:
    """Restore model/optimizer/scheduler shards (from ``path`` or, when the engine was built with
    ``load_universal``, from its universal copy) + this rank's RNG; returns the client state."""
    path = Path(path)
    universal = engine.load_universal_checkpoint()
    source = universal_path(path) if universal else path
    own = [g["weight_decay"] for g in engine.optimizer.param_groups]
    _, client_state = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"failed to load checkpoint {source}")
    if universal:
        repair_universal_zero3_load(engine.optimizer, own)
    rng_file = path / f"rng_rank{rank}.pt"
    if restore_rng and rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def has_zero_partitions(path: str | Path) -> bool:
    """Whether the checkpoint holds per-rank optimizer partitions (ZeRO 1-3, or DeepSpeed's bf16 optimizer)."""
    return any(Path(path).glob("*zero_pp_rank_*_optim_states.pt"))


def universal_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + UNIVERSAL_SUFFIX)


def universal_for(path: str | Path, log=print) -> Path:
    """DeepSpeed's universal checkpoint of ``path`` (made once with its ``ds_to_universal.py``, as DeepSpeed
    documents it; ``--inject_missing_state`` adds the parameter-layout record that only Megatron models carry).
    Run on one process; the others wait at a barrier. Returns the universal folder."""
    path = Path(path)
    out = universal_path(path)
    if (out / UNIVERSAL_MARKER).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)   # an interrupted conversion
    log(f"converting {path.name} to a DeepSpeed universal checkpoint (ds_to_universal) for a new world size")
    convert_to_universal(path, out, workers=max(1, min(4, os.cpu_count() or 1)))
    write_atomic(out / UNIVERSAL_MARKER, json.dumps({"source": path.name}))
    return out


def _read_latest(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / LATEST
    return f.read_text().strip() if f.is_file() else None


def _update_best_and_prune(ckpt_dir: Path, new: Path, metric: float | None, keep_last: int, keep_best: bool) -> None:
    best_file = ckpt_dir / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    if keep_best and metric is not None and (best is None or metric > best["metric"]
                                             or not (ckpt_dir / best["tag"]).is_dir()):
        best = {"tag": new.name, "metric": metric}
        write_atomic(best_file, json.dumps(best))
    keep = {p.name for p in list_complete(ckpt_dir)[-keep_last:]}
    if keep_best and best is not None:
        keep.add(best["tag"])
    for p in list_complete(ckpt_dir):
        if p.name not in keep:
            (p / MARKER).unlink()  # mark incomplete first so a crash mid-delete never leaves a "complete" husk
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(universal_path(p), ignore_errors=True)
    # incomplete folders older than the newest complete checkpoint are leftovers of crashed saves
    newest = int(_TAG_RE.match(new.name).group(1))
    for p in ckpt_dir.iterdir():
        m = _TAG_RE.match(p.name)
        if p.is_dir() and m and int(m.group(1)) < newest and not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(universal_path(p), ignore_errors=True)


# ----------------------------------------------------------------------------------------- the trainer's component
class Checkpointer:
    """Owns the checkpoint cadence and collects the trainer's stateful parts.

    ``components`` maps a client-state key to anything with ``state_dict()`` / ``load_state_dict()`` (the loop
    position, the LR schedule, the EMA weights); the DeepSpeed engine saves model and optimizer shards itself.
    ``meta()`` (optional) returns the layout record written into ``COMPLETE`` at each save.
    ``due(step, at_epoch_end)`` is the cadence: every ``checkpoint.every_steps`` optimizer steps inside an epoch
    (the trainer then records the next step's keys and calls :meth:`save`; the epoch end always saves, after
    evaluation)."""

    def __init__(self, engine, ckpt_dir: str | Path, cfg: CheckpointConfig, *, rank: int, config_yaml: str,
                 components: dict[str, Any], log=print, meta=None):
        self.engine, self.dir, self.cfg, self.rank = engine, Path(ckpt_dir), cfg, rank
        self.config_yaml, self.components, self.log = config_yaml, components, log
        self.meta = meta or (lambda: {})
        self.last_saved_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.components.items()}

    def due(self, step: int, at_epoch_end: bool) -> bool:
        """Whether the cadence saves at ``step`` (the caller then calls :meth:`save`)."""
        every = self.cfg.every_steps
        return bool(every) and step % every == 0 and not at_epoch_end and step != self.last_saved_step

    def save(self, step: int, metric: float | None = None) -> Path:
        path = save(self.engine, self.dir, step, self.state_dict(), rank=self.rank, config_yaml=self.config_yaml,
                    keep_last=self.cfg.keep_last, metric=metric, keep_best=self.cfg.keep_best, meta=self.meta())
        self.last_saved_step = step
        self.log(f"checkpoint {path}")
        return path

    def resume(self, path: Path | None = None, *, restore_rng: bool = True) -> Path | None:
        """Load ``path`` (default: ``checkpoint.resume``, ``auto`` = the newest complete checkpoint) into the
        engine and components; returns the checkpoint folder, or None when starting fresh."""
        path = path if path is not None else resolve_resume(self.cfg.resume, self.dir)
        if path is None:
            return None
        state = load(self.engine, path, rank=self.rank, restore_rng=restore_rng)
        for name, part in self.components.items():
            if name in state:
                part.load_state_dict(state[name])
        self.last_saved_step = None
        return path
