"""Resuming a run, exactly and anywhere: the plan (whether a checkpoint can continue at this start's layout,
decided from its ``COMPLETE`` record before any process group or data exists), the load (through DeepSpeed's
universal checkpoint on another world size), the self-check before the first step, and the sample-key log.
:class:`Resumer` is the trainer's one resume component.

The layout record (:func:`layout_meta`, written into ``COMPLETE`` at every save) holds the world size, the
per-rank batch, the accumulation, the global batch ``G`` of the epoch to continue, and the data position as a
*global* sample index (``samples_in_epoch = step_in_epoch x G``). Because the loaders give each global position
the same sample at any world size (:mod:`pipeline.data.base`), a run continues exactly on any world size ``R'``
with the same ``G`` (``data.batch_size x optim.grad_accum x R' = G``) from that index; WebDataset also needs the
same ``data.canonical_streams``, divisible by ``R'``. Anything else stops with one line (:func:`plan_resume`).

Self-check (:class:`SelfCheck`): every save records the SHA-256 of the sorted sample keys the next global step
will read (all ranks) and, per rank, of the RNG states; after a resume the trainer recomputes both just before
the first step and stops with a one-line :class:`ResumeMismatchError` if the data stream (a replaced shard,
changed ``data.*`` settings) or the RNG would diverge.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

import torch

from pipeline import checkpointing
from pipeline.checkpointing import DamagedCheckpointError, has_zero_partitions, read_meta, resolve_resume
from pipeline.config import ConfigError
from pipeline.data.step_batches import MicroBatch, step_keys
from pipeline.distributed import all_gather_object, barrier
from pipeline.rng import make_seed, rng_state, seed_everything
from pipeline.schedules import ResolutionSchedule, step_layout


class ResumeMismatchError(ConfigError):
    """The checkpoint cannot be continued exactly here (layout), or the resumed run would diverge (self-check)."""


@dataclass(frozen=True)
class ResumePlan:
    path: Path
    meta: dict[str, Any]
    world_size: int | None     # the checkpoint's (None: unknown, a checkpoint written before layouts were recorded)
    elastic: bool              # continuing on another world size
    universal: bool            # ZeRO partitions re-partitioned through DeepSpeed's universal checkpoint


def epoch_batch(cfg, epoch: int) -> int:
    """The per-rank batch of ``epoch``: the resolution schedule's, else ``data.batch_size``."""
    return ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs).at(epoch)[1] or cfg.data.batch_size


def layout_meta(cfg, *, world_size: int, epoch: int, step_in_epoch: int, global_step: int,
                zero_stage: int) -> dict[str, Any]:
    """The layout record of a checkpoint that continues at (``epoch``, ``step_in_epoch``)."""
    micro, accum = step_layout(cfg, epoch)[1:] if epoch < cfg.run.epochs else (cfg.data.batch_size,
                                                                                cfg.optim.grad_accum)
    g = micro * accum * world_size
    return {"world_size": world_size, "micro_batch": micro, "grad_accum": accum, "global_batch": g,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "samples_in_epoch": step_in_epoch * g,
            "global_step": global_step, "zero_stage": zero_stage, "data_format": cfg.data.format,
            "canonical_streams": cfg.data.canonical_streams if cfg.data.format == "wds" else None}


def _checkpoint_world(path: Path, meta: dict[str, Any]) -> int | None:
    return meta.get("world_size") or len(list(path.glob("rng_rank*.pt"))) or None


def plan_resume(cfg, world_size: int, log: Callable[[str], None] = print) -> ResumePlan | None:
    """The checkpoint ``checkpoint.resume`` names (None: start fresh) and how to load it at ``world_size``;
    raises :class:`ResumeMismatchError` (one line, with the numbers) when it cannot continue exactly."""
    try:
        path = resolve_resume(cfg.checkpoint.resume, cfg.run_dir / "checkpoints", log=log)
    except (FileNotFoundError, DamagedCheckpointError) as e:   # a named checkpoint that cannot be resumed
        raise ConfigError(str(e)) from None
    if path is None:
        return None
    meta = read_meta(path)
    old_world = _checkpoint_world(path, meta)
    elastic = old_world is not None and old_world != world_size
    check_layout(cfg, meta, world_size, path.name, elastic)
    return ResumePlan(path=path, meta=meta, world_size=old_world, elastic=elastic,
                      universal=elastic and has_zero_partitions(path))


def check_layout(cfg, meta: dict[str, Any], world_size: int, name: str, elastic: bool) -> None:
    where = f"checkpoint.resume: {name}"
    if "global_batch" not in meta:
        if elastic:
            raise ResumeMismatchError(f"{where} has no layout record (written before they were kept) and was "
                                      f"saved on another world size; resume it on {_checkpoint_world_hint(meta)}")
        return
    epoch = int(meta["epoch"])
    if epoch >= cfg.run.epochs:
        return   # the run is complete: nothing left to continue
    micro, accum = step_layout(cfg, epoch)[1:]
    g_old, g_new = int(meta["global_batch"]), micro * accum * world_size
    if g_new != g_old:
        raise ResumeMismatchError(
            f"{where} continues epoch {epoch} with a global batch of {g_old} ({meta['micro_batch']} per rank x "
            f"accumulation {meta['grad_accum']} x {meta['world_size']} ranks), this start would use {g_new} "
            f"({micro} x {accum} x {world_size}): an exact continuation needs data.batch_size x optim.grad_accum "
            f"x world = {g_old}")
    samples = int(meta["samples_in_epoch"])
    if samples % (micro * world_size):
        raise ResumeMismatchError(f"{where}: its position, global sample {samples} of epoch {epoch}, is not a "
                                  f"whole number of batches of {micro} x {world_size} ranks")
    if cfg.data.format != meta.get("data_format", cfg.data.format):
        raise ResumeMismatchError(f"{where} was trained on data.format={meta['data_format']!r}, this start "
                                  f"reads {cfg.data.format!r}: the sample order differs")
    if cfg.data.format == "wds":
        v_old = meta.get("canonical_streams")
        if v_old is not None and v_old != cfg.data.canonical_streams:
            raise ResumeMismatchError(f"{where} was trained with data.canonical_streams={v_old}, this start has "
                                      f"{cfg.data.canonical_streams}: the epoch's sample streams differ; keep {v_old}")
        if cfg.data.canonical_streams % world_size:
            raise ResumeMismatchError(f"{where}: data.canonical_streams={cfg.data.canonical_streams} is not "
                                      f"divisible by the world size {world_size}; resume on a divisor of it")
    elif elastic and cfg.data.ffcv_order == "quasi_random":
        raise ResumeMismatchError(f"{where}: data.ffcv_order 'quasi_random' (FFCV's single-process order) "
                                  f"resumes on one rank only")


def _checkpoint_world_hint(meta: dict[str, Any]) -> str:
    return f"{meta['world_size']} ranks" if meta.get("world_size") else "the world size that saved it"


# ----------------------------------------------------------------------------------------- the self-check
def keys_digest(keys: list[str]) -> str:
    """Order-independent SHA-256 of a multiset of sample keys."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()


def rng_digest(state: dict[str, Any]) -> str:
    return hashlib.sha256(pickle.dumps({k: (v.numpy().tobytes() if hasattr(v, "numpy") else v)
                                        for k, v in state.items() if k != "cuda"})).hexdigest()


def gather_keys(keys: list[str] | None, world_size: int) -> list[str] | None:
    """Every rank's ``keys`` of one global step (a collective with several ranks); None if any rank has none."""
    if world_size == 1:
        return keys
    out = all_gather_object(keys)
    return None if any(k is None for k in out) else [k for ks in out for k in ks]


class SelfCheck:
    """Made after a resume; :meth:`verify` runs once, before the first step, with that step's keys."""

    def __init__(self, meta: dict[str, Any], name: str, *, world_size: int, rng_state: dict[str, Any] | None):
        self.meta, self.name, self.world_size = meta, name, world_size
        self.rng = rng_digest(rng_state) if rng_state is not None else None

    def verify(self, keys: list[str] | None, rng_now: dict[str, Any]) -> list[str]:
        """Raise :class:`ResumeMismatchError` on a divergence; returns what was checked (for the log)."""
        checked = []
        want = self.meta.get("next_keys_sha256")
        got_keys = gather_keys(keys, self.world_size) if want else None
        if want and got_keys is not None:
            got = keys_digest(got_keys)
            if got != want:
                raise ResumeMismatchError(
                    f"resume self-check: the next step after {self.name} reads other samples than the checkpoint "
                    f"recorded (keys sha256 {got[:12]} != {want[:12]}): the data folder changed (a shard "
                    f"replaced?) or data.* settings differ; restore the data or start a new run")
            checked.append(f"next step's {len(got_keys)} sample keys")
        if self.rng is not None:
            if rng_digest(rng_now) != self.rng:
                raise ResumeMismatchError(f"resume self-check: the RNG state moved between loading {self.name} "
                                          f"and the first step; the continuation would not be exact")
            checked.append("RNG state")
        return checked


class Resumer:
    """The trainer's resume component. Made with the plan :func:`plan_resume` returned before the process group
    existed (None: a fresh start). :meth:`deepspeed_config` asks DeepSpeed for the universal load when the ZeRO
    partitions come from another world size; :meth:`load` converts (rank 0, once), loads, reseeds an elastic
    continuation and arms the self-check; :meth:`before_step` runs the self-check on the first step and appends
    to the key log (``checkpoint.record_keys``); :meth:`next_step_digest` is what a checkpoint records of the
    step after it."""

    def __init__(self, plan: ResumePlan | None, cfg, *, rank: int, world_size: int, log: Callable[[str], None]):
        self.plan, self.cfg, self.rank, self.world, self.log = plan, cfg, rank, world_size, log
        self._check: SelfCheck | None = None
        self._keys_log: IO[str] | None = None
        self._keys_start = 0

    def deepspeed_config(self, ds_config: dict[str, Any]) -> dict[str, Any]:
        if self.plan is None or not self.plan.universal:
            return ds_config
        return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}

    def load(self, checkpointer, state) -> Path | None:
        """Load the planned checkpoint into ``checkpointer``'s engine and parts (``state``, the loop position, is
        one of them); returns its folder or None. On
        another world size each rank's RNG restarts from (seed, rank, global step, world): per-rank streams
        cannot be carried over."""
        plan = self.plan
        if plan is None:
            return None
        if plan.universal:
            if self.rank == 0:
                checkpointing.universal_for(plan.path, log=self.log)
            barrier()
        checkpointer.load(plan.path, restore_rng=not plan.elastic)
        if plan.elastic:
            seed_everything(make_seed(self.cfg.run.seed, self.rank, state.global_step, self.world))
            self.log(f"continuing a {plan.world_size}-rank checkpoint on {self.world} ranks at global sample "
                     f"{plan.meta['samples_in_epoch']} of epoch {plan.meta['epoch']}"
                     + (" (ZeRO state re-partitioned from DeepSpeed's universal checkpoint)" if plan.universal
                        else ""))
        self._check = SelfCheck(plan.meta, plan.path.name, world_size=self.world, rng_state=rng_state())
        self.log(f"resumed from {plan.path} at epoch {state.epoch} step {state.step_in_epoch} "
                 f"(global {state.global_step})")
        return plan.path

    def before_step(self, micro: list[MicroBatch], *, epoch: int, step_in_epoch: int, global_step: int) -> None:
        if self._check is not None:   # the first step after a resume: the samples and RNG the checkpoint recorded?
            with torch.random.fork_rng(devices=[]):
                checked = self._check.verify(step_keys(micro), rng_state())
            self._check = None
            self.log("resume self-check passed: " + (", ".join(checked) or "nothing recorded to check"))
        if self.cfg.checkpoint.record_keys:
            self._record_keys(micro, epoch, step_in_epoch, global_step)

    def next_step_digest(self, micro: list[MicroBatch]) -> str | None:
        """Collective: the digest of the sample keys all ranks read in the step ``micro`` is this rank's part of."""
        keys = gather_keys(step_keys(micro) if micro else None, self.world)
        return keys_digest(keys) if keys else None

    def _record_keys(self, micro: list[MicroBatch], epoch: int, step_in_epoch: int, global_step: int) -> None:
        if self._keys_log is None:
            folder = self.cfg.run_dir / "keys"
            folder.mkdir(parents=True, exist_ok=True)
            self._keys_log = open(folder / f"rank{self.rank}.jsonl", "a")
            self._keys_start = global_step
        self._keys_log.write(json.dumps({"start": self._keys_start, "epoch": epoch, "step": step_in_epoch,
                                         "world": self.world, "keys": [k for _, _, ks in micro for k in ks or []]})
                             + "\n")
        self._keys_log.flush()


__all__ = ["ResumeMismatchError", "ResumePlan", "Resumer", "SelfCheck", "check_layout", "epoch_batch", "gather_keys",
           "keys_digest", "layout_meta", "plan_resume", "rng_digest"]
