"""DeepSpeed checkpoints with a completeness marker, retention (last K + best), RNG state and auto-resume.

Layout under ``<run_dir>/checkpoints``::

    step_00000120/                 # one DeepSpeed tag (model/optimizer shards written by every rank)
        rng_rank{r}.pt             # python/numpy/torch RNG states of rank r
        train_config.yaml          # resolved config (export/evaluate need only this folder)
        COMPLETE                   # JSON, written by rank 0 after *all* ranks finished writing
    best.json                      # {"tag": ..., "metric": ...}

A checkpoint without ``COMPLETE`` (a crash or SIGKILL during save) is never picked by ``--resume auto``.
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
from pipeline.config import check_positive
from pipeline.rng import rng_state, set_rng_state

MARKER = "COMPLETE"
_TAG_RE = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointConfig:
    every_steps: int = 0       # also save every N optimizer steps (0: only at epoch end)
    keep_last: int = 3         # complete checkpoints kept besides the best one
    keep_best: bool = True     # keep the checkpoint with the best eval top-1
    resume: str = "none"       # "auto" (newest complete checkpoint under run_dir, else start fresh), "none", or a path

    def validate(self) -> None:
        check_positive("every_steps", self.every_steps, allow_zero=True)
        check_positive("keep_last", self.keep_last)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


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
         config_yaml: str, keep_last: int, metric: float | None = None, keep_best: bool = True) -> Path:
    """Collective: every rank must call it. Returns the checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    path = ckpt_dir / tag
    if rank == 0 and path.exists():  # a stale incomplete save of the same step (crash, then resume)
        shutil.rmtree(path)
    dist_utils.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), path / f"rng_rank{rank}.pt")
    dist_utils.barrier()  # every rank's shards + RNG are on disk
    if rank == 0:
        (path / "train_config.yaml").write_text(config_yaml)
        _write_atomic(path / MARKER, json.dumps({"step": step, "metric": metric}))
        _update_best_and_prune(ckpt_dir, path, metric, keep_last, keep_best)
    dist_utils.barrier()
    return path


def load(engine, path: str | Path, *, rank: int) -> dict[str, Any]:
    """Restore model/optimizer/scheduler shards + this rank's RNG; returns the client state."""
    path = Path(path)
    _, client_state = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise RuntimeError(f"failed to load checkpoint {path}")
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _update_best_and_prune(ckpt_dir: Path, new: Path, metric: float | None, keep_last: int, keep_best: bool) -> None:
    best_file = ckpt_dir / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    if keep_best and metric is not None and (best is None or metric > best["metric"]
                                             or not (ckpt_dir / best["tag"]).is_dir()):
        best = {"tag": new.name, "metric": metric}
        _write_atomic(best_file, json.dumps(best))
    keep = {p.name for p in list_complete(ckpt_dir)[-keep_last:]}
    if keep_best and best is not None:
        keep.add(best["tag"])
    for p in list_complete(ckpt_dir):
        if p.name not in keep:
            (p / MARKER).unlink()  # mark incomplete first so a crash mid-delete never leaves a "complete" husk
            shutil.rmtree(p, ignore_errors=True)
    # incomplete folders older than the newest complete checkpoint are leftovers of crashed saves
    newest = int(_TAG_RE.match(new.name).group(1))
    for p in ckpt_dir.iterdir():
        m = _TAG_RE.match(p.name)
        if p.is_dir() and m and int(m.group(1)) < newest and not is_complete(p):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------- the trainer's component
class Checkpointer:
    """Owns the checkpoint cadence and collects the trainer's stateful parts.

    ``components`` maps a client-state key to anything with ``state_dict()`` / ``load_state_dict()`` (the loop
    position, the LR schedule, the EMA weights); the DeepSpeed engine saves model and optimizer shards itself.
    ``maybe_save(step, at_epoch_end)`` saves every ``checkpoint.every_steps`` optimizer steps inside an epoch
    (the epoch end always saves, after evaluation, through :meth:`save`)."""

    def __init__(self, engine, ckpt_dir: str | Path, cfg: CheckpointConfig, *, rank: int, config_yaml: str,
                 components: dict[str, Any], log=print):
        self.engine, self.dir, self.cfg, self.rank = engine, Path(ckpt_dir), cfg, rank
        self.config_yaml, self.components, self.log = config_yaml, components, log
        self.last_saved_step: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.components.items()}

    def maybe_save(self, step: int, at_epoch_end: bool) -> Path | None:
        every = self.cfg.every_steps
        if every and step % every == 0 and not at_epoch_end and step != self.last_saved_step:
            return self.save(step)
        return None

    def save(self, step: int, metric: float | None = None) -> Path:
        path = save(self.engine, self.dir, step, self.state_dict(), rank=self.rank, config_yaml=self.config_yaml,
                    keep_last=self.cfg.keep_last, metric=metric, keep_best=self.cfg.keep_best)
        self.last_saved_step = step
        self.log(f"checkpoint {path}")
        return path

    def resume(self) -> Path | None:
        """Load ``checkpoint.resume`` (``auto``: the newest complete checkpoint) into the engine and components;
        returns the checkpoint folder, or None when starting fresh."""
        path = resolve_resume(self.cfg.resume, self.dir)
        if path is None:
            return None
        state = load(self.engine, path, rank=self.rank)
        for name, part in self.components.items():
            if name in state:
                part.load_state_dict(state[name])
        self.last_saved_step = None
        return path
