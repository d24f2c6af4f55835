"""DeepSpeed checkpoints with a completeness marker, retention (last K + best), RNG state and auto-resume,
resumable on another world size.

Layout under ``<run_dir>/checkpoints`` (DeepSpeed's own layout: this folder is DeepSpeed's ``save_dir``)::

    step_00000120/                 # one DeepSpeed tag (model/optimizer shards written by every rank)
        rng_rank{r}.pt             # python/numpy/torch RNG states of rank r
        train_config.yaml          # resolved config (export/evaluate need only this folder)
        COMPLETE                   # JSON, written by rank 0 after *all* ranks finished writing: the step, the
                                   # layout (world size, global batch, position as a global sample index) and
                                   # every file's size and sha256 (each rank hashes the files it wrote)
    step_00000120_universal/       # DeepSpeed universal checkpoint, made on a resume at another world size
    latest                         # DeepSpeed's pointer (tag of the newest complete checkpoint)
    zero_to_fp32.py, zero_to_torch.py   # DeepSpeed's recovery scripts (it copies them at every save)
    best.json                      # {"tag": ..., "metric": ...}

A checkpoint without ``COMPLETE`` (a crash or SIGKILL during save) is never picked by ``--resume auto``, and
``latest`` is rewritten only after ``COMPLETE`` (atomically), so it never points at a partial checkpoint and
DeepSpeed's tools work as documented: ``cd <run_dir>/checkpoints && python zero_to_fp32.py . out`` (ZeRO 1/2/3),
``ds_to_universal.py --input_folder step_X --output_folder step_X_universal``. ``COMPLETE`` stays the source of
truth for ``--resume auto``, which also checks every file against its record (:func:`verify`) and skips a damaged
checkpoint with one line: a resume never starts from bytes other than the ones saved.
``python -m pipeline.checkpointing verify RUN_DIR`` checks a run's checkpoints on demand.

Another world size (:func:`universal_for`): the per-rank ZeRO partitions are re-partitioned by DeepSpeed's
universal checkpoint (``ds_to_universal`` once, on rank 0, then ``"checkpoint": {"load_universal": true}``),
which handles ZeRO 1, 2 and 3 with the optimizer moments; :mod:`pipeline.resume` decides whether the
new layout can continue the run exactly before anything starts.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline import distributed as dist_utils
from pipeline.atomic import write_atomic
from pipeline.config import CheckpointConfig
from pipeline.deepspeed_compat import convert_to_universal, repair_universal_zero3_load
from pipeline.rng import rng_state, set_rng_state

MARKER = "COMPLETE"
LATEST = "latest"                       # DeepSpeed's pointer file (its tools read it)
UNIVERSAL_SUFFIX = "_universal"
UNIVERSAL_MARKER = "UNIVERSAL_COMPLETE"
_TAG_RE = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``COMPLETE`` record of a checkpoint: step, metric and (checkpoints since layout recording) the layout
    :func:`pipeline.resume.check_layout` compares (``world_size``, ``global_batch``, ...)."""
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


def resolve_resume(resume: str, ckpt_dir: str | Path, log=print) -> Path | None:
    """``"auto"`` -> the newest complete checkpoint whose files are the bytes that were saved (a damaged one is
    skipped with one line through ``log``), or None; a path -> that checkpoint, which must be complete and intact
    (else :class:`FileNotFoundError` / :class:`DamagedCheckpointError`, one line each)."""
    if resume in ("", "none"):
        return None
    if resume == "auto":
        return newest_intact(ckpt_dir, log)
    path = Path(resume)
    if path.is_dir() and not _TAG_RE.match(path.name):  # a checkpoints folder or run dir
        path = newest_intact(path / "checkpoints" if (path / "checkpoints").is_dir() else path, log) or path
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint.resume: {resume} is not a complete checkpoint (no {MARKER} marker)")
    if (problem := verify(path)) is not None:
        raise DamagedCheckpointError(f"checkpoint.resume: {path} is damaged: {problem}; resume from another "
                                     f"checkpoint ('python -m pipeline.checkpointing verify {path.parent}' lists "
                                     f"them)")
    return path


def newest_intact(ckpt_dir: str | Path, log=print) -> Path | None:
    """The newest complete checkpoint that passes :func:`verify`; each damaged newer one is named in one line."""
    for path in reversed(list_complete(ckpt_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"checkpoint {path} is damaged ({problem}): skipped, an earlier complete checkpoint is used")
    return None


# ----------------------------------------------------------------------------------------- integrity
class DamagedCheckpointError(RuntimeError):
    """A checkpoint's files are not the bytes that were saved (missing, short, or another sha256)."""


_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)")


def file_owner(name: str) -> int:
    """The rank that writes (and hashes) a checkpoint file: its ZeRO partition's or RNG state's rank, else 0."""
    m = _RANK_FILE.search(name)
    return int(m.group(1)) if m else 0


def sha256_file(path: Path) -> str:
    # hand-written: hashlib.file_digest needs Python 3.11, the project supports 3.10
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_records(path: Path, rank: int) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of the files in checkpoint folder ``path`` that ``rank`` wrote."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in sorted(path.iterdir()) if f.is_file() and f.name != MARKER and file_owner(f.name) == rank}


def verify(path: str | Path) -> str | None:
    """None when every file the checkpoint's ``COMPLETE`` records is there with its size and sha256 (or when it
    records none: written before files were recorded); else one line saying what differs."""
    path = Path(path)
    try:
        files = read_meta(path).get("files") or {}
    except (OSError, ValueError) as e:
        return f"its {MARKER} record is unreadable ({type(e).__name__})"
    for name, rec in sorted(files.items()):   # sizes first: a stat per file
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if (size := f.stat().st_size) != rec["bytes"]:
            return f"{name} has {size} bytes, {rec['bytes']} were saved"
    for name, rec in sorted(files.items()):
        if sha256_file(path / name) != rec["sha256"]:
            return f"{name} is not the file that was saved (sha256 differs)"
    return None


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
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), path / f"rng_rank{rank}.pt")
        if rank == 0:
            (path / "train_config.yaml").write_text(config_yaml)
    except (RuntimeError, OSError) as e:   # torch's writer says "iostream error" / "unexpected pos", not ENOSPC
        if (full := disk_full_line(path, e)) is None:
            raise
        raise DiskFullError(full) from None
    dist_utils.barrier()  # every rank's shards + RNG are on disk
    files: dict[str, Any] = {}
    for part in dist_utils.all_gather_object(file_records(path, rank)):   # each rank hashes what it wrote
        files |= part
    if rank == 0:
        write_atomic(path / MARKER, json.dumps({"step": step, "metric": metric, **(meta or {}), "files": files}))
        write_atomic(ckpt_dir / LATEST, tag)  # DeepSpeed's pointer, only once the checkpoint is complete
        _update_best_and_prune(ckpt_dir, path, metric, keep_last, keep_best)
    dist_utils.barrier()
    return path


class DiskFullError(OSError):
    """The file system filled up while a checkpoint was written (the checkpoint stays incomplete, never resumed)."""


def checkpoint_bytes(path: Path) -> int:
    """The bytes a complete checkpoint's files take (its ``COMPLETE`` record, else the folder's files)."""
    try:
        files = read_meta(path).get("files")
    except (OSError, ValueError):
        files = None
    if files:
        return sum(rec["bytes"] for rec in files.values())
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def disk_full_line(path: Path, error: BaseException) -> str | None:
    """One line for a save that failed because ``path``'s file system is full (None if it is not full): what was
    needed, what is free, which checkpoint is intact and how to resume."""
    previous = find_latest(path.parent)
    need = checkpoint_bytes(previous) if previous is not None else None
    free = shutil.disk_usage(path.parent).free
    enospc = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not (enospc or free < max(need or 0, 1 << 20)):
        return None
    mib = 1 << 20
    intact = (f"the previous complete checkpoint {previous.name} is intact" if previous is not None
              else "no earlier complete checkpoint exists")
    needed = f"about {need / mib:.1f} MiB needed, " if need else ""
    return (f"no space left on the file system of {path.parent} while saving checkpoint {path.name} ({needed}"
            f"{free / mib:.1f} MiB free); {intact}: free space (or set run.run_dir elsewhere) and rerun with "
            f"--resume auto")


def load(engine, path: str | Path, *, rank: int, restore_rng: bool = True) -> dict[str, Any]:
    """Restore model/optimizer/scheduler shards (from ``path`` or, when the engine was built with
    ``load_universal``, from its universal copy) + this rank's RNG; returns the client state."""
    path = Path(path)
    universal = engine.load_universal_checkpoint()
    source = universal_path(path) if universal else path
    own = [g["weight_decay"] for g in engine.optimizer.param_groups]
    try:
        _, client_state = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:   # unreadable bytes, as torch.load says
        if isinstance(e, torch.OutOfMemoryError):
            raise
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise DamagedCheckpointError(f"checkpoint {source} could not be loaded ({type(e).__name__}: {reason}); "
                                     f"'python -m pipeline.checkpointing verify {path.parent}' checks its files, "
                                     f"'--resume PATH' picks another") from None
    if client_state is None:
        raise DamagedCheckpointError(f"checkpoint {source} could not be loaded (DeepSpeed found no client state)")
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
    """The trainer's checkpoint component: decides when to save (:meth:`due`) and saves and loads the engine with
    the trainer's stateful parts.

    ``components`` maps a client-state key to anything with ``state_dict()`` / ``load_state_dict()`` (the loop
    position, the LR schedule, the EMA weights); the DeepSpeed engine saves model and optimizer shards itself."""

    def __init__(self, engine, ckpt_dir: str | Path, cfg: CheckpointConfig, *, rank: int, config_yaml: str,
                 components: dict[str, Any], log=print):
        self.engine, self.dir, self.cfg, self.rank = engine, Path(ckpt_dir), cfg, rank
        self.config_yaml, self.components, self.log = config_yaml, components, log
        self.last_saved_step: int | None = None

    def due(self, step: int, *, boundary: bool, failed: bool = False) -> bool:
        """Whether to save now, after optimizer step ``step``: at every boundary (an epoch's end after its
        evaluation, ``run.max_steps``, a preemption) unless the run failed; inside an epoch every
        ``checkpoint.every_steps`` optimizer steps (once per step number: skipped steps do not advance it)."""
        if failed:
            return False
        if boundary:
            return True
        every = self.cfg.every_steps
        return bool(every) and step % every == 0 and step != self.last_saved_step

    def save(self, step: int, *, metric: float | None = None, meta: dict[str, Any] | None = None) -> Path:
        """Collective. ``meta`` goes into ``COMPLETE`` (the layout record)."""
        state = {name: part.state_dict() for name, part in self.components.items()}
        path = save(self.engine, self.dir, step, state, rank=self.rank, config_yaml=self.config_yaml,
                    keep_last=self.cfg.keep_last, metric=metric, keep_best=self.cfg.keep_best, meta=meta)
        self.last_saved_step = step
        self.log(f"checkpoint {path}")
        return path

    def load(self, path: Path, *, restore_rng: bool = True) -> None:
        """Load ``path`` into the engine and the components (and this rank's RNG when ``restore_rng``)."""
        state = load(self.engine, path, rank=self.rank, restore_rng=restore_rng)
        for name, part in self.components.items():
            if name in state:
                part.load_state_dict(state[name])
        self.last_saved_step = None


# ----------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.checkpointing verify RUN_DIR|CHECKPOINTS_DIR|CHECKPOINT``: one line per complete
    checkpoint, ``ok`` or what is damaged. Exit 0: all intact; 1: a checkpoint is damaged; 2: none found."""
    p = argparse.ArgumentParser(prog="python -m pipeline.checkpointing", description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every complete checkpoint's files against its COMPLETE record")
    v.add_argument("path", type=Path, help="a run folder, its checkpoints folder, or one checkpoint")
    args = p.parse_args(argv)
    path = args.path
    if _TAG_RE.match(path.name) and is_complete(path):
        found = [path]
    else:
        found = list_complete(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    if not found:
        print(f"error: no complete checkpoint under {path}", file=sys.stderr)
        return 2
    damaged = 0
    for ckpt in found:
        problem = verify(ckpt)
        damaged += problem is not None
        print(f"{ckpt}  " + ("ok" if problem is None else f"DAMAGED: {problem}"))
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
