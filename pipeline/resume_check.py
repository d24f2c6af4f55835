"""Resuming anywhere, checked: whether a checkpoint can continue exactly at this start's layout (decided from its
``COMPLETE`` record before any process group or data exists), and the self-check before the first step.

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
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.checkpointing import has_zero_partitions, read_meta, resolve_resume
from pipeline.config import ConfigError


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
    from pipeline.schedules import ResolutionSchedule

    return ResolutionSchedule(cfg.schedule.resolution, cfg.run.epochs).at(epoch)[1] or cfg.data.batch_size


def layout_meta(cfg, *, world_size: int, epoch: int, step_in_epoch: int, global_step: int,
                zero_stage: int) -> dict[str, Any]:
    """The layout record of a checkpoint that continues at (``epoch``, ``step_in_epoch``)."""
    micro = epoch_batch(cfg, epoch) if epoch < cfg.run.epochs else cfg.data.batch_size
    accum = cfg.optim.grad_accum
    g = micro * accum * world_size
    return {"world_size": world_size, "micro_batch": micro, "grad_accum": accum, "global_batch": g,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "samples_in_epoch": step_in_epoch * g,
            "global_step": global_step, "zero_stage": zero_stage, "data_format": cfg.data.format,
            "canonical_streams": cfg.data.canonical_streams if cfg.data.format == "wds" else None}


def _checkpoint_world(path: Path, meta: dict[str, Any]) -> int | None:
    return meta.get("world_size") or len(list(path.glob("rng_rank*.pt"))) or None


def plan_resume(cfg, world_size: int) -> ResumePlan | None:
    """The checkpoint ``checkpoint.resume`` names (None: start fresh) and how to load it at ``world_size``;
    raises :class:`ResumeMismatchError` (one line, with the numbers) when it cannot continue exactly."""
    path = resolve_resume(cfg.checkpoint.resume, cfg.run_dir / "checkpoints")
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
    micro, accum = epoch_batch(cfg, epoch), cfg.optim.grad_accum
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
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, keys)
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


__all__ = ["ResumeMismatchError", "ResumePlan", "SelfCheck", "check_layout", "epoch_batch", "gather_keys",
           "keys_digest", "layout_meta", "plan_resume", "rng_digest"]
