"""The global batch on a world size: a recipe states the *global* batch (``data.global_batch_size``, DeiT's 1024)
and a per-GPU memory cap (``data.max_batch_per_gpu``); :func:`derive_batch` turns them into the per-rank
micro-batch and the accumulation steps, so the same recipe trains with the same global batch, LR schedule and
samples per step on 1, 8 or 32 ranks. A world size that cannot form the global batch is refused with the numbers.

A budgeted resolution schedule keeps the global batch in every stage (EfficientTrain++): :func:`stage_batches`
gives each lower resolution the fewest accumulation steps whose micro-batch fits the per-GPU cap scaled by the
token count, so low resolutions run bigger micro-batches and accumulate less.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from pipeline.config.errors import ConfigError, check_positive
from pipeline.config.schema import TrainConfig
from pipeline.config.sections import validate


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is formed on ``world`` ranks: ``global_batch = micro x accum x world``, and per listed
    resolution ``(resolution, global batch, micro-batch)`` with the same accumulation, or with ``accums[i]``
    steps where given (a budgeted schedule's constant global batch)."""
    world: int
    global_batch: int
    micro: int
    accum: int
    per_resolution: tuple[tuple[int, int, int], ...] = ()
    accums: tuple[int, ...] = ()

    def line(self) -> str:
        text = (f"global batch {self.global_batch} = per-rank batch {self.micro} x accumulation {self.accum} x "
                f"{self.world} ranks")
        for i, (res, g, m) in enumerate(self.per_resolution):
            text += f"; at {res} px {g} = {m} x {self.accums[i] if self.accums else self.accum} x {self.world}"
        return text


def token_cap(max_micro: int, res: int, top: int) -> int:
    """The per-rank micro-batch cap at ``res`` when ``max_micro`` holds at ``top``: the same tokens per micro-batch
    (``max_micro x (top / res)^2``), never below ``max_micro``."""
    return max_micro if res >= top else max(max_micro, int(max_micro * (top / res) ** 2))


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
        return max_micro if res is None else token_cap(max_micro, res, top)

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


def stage_batches(per_rank: int, resolutions: Sequence[int], top: int, *, max_micro: int | None,
                  even: bool = False) -> tuple[tuple[int, int, int], ...]:
    """``(resolution, micro, accum)`` for each resolution below ``top`` at a constant ``per_rank`` samples per
    optimizer step (``micro x accum = per_rank``): the fewest accumulation steps whose micro-batch is at most
    :func:`token_cap` (no cap: ``max_micro`` None) and even when ``even``. ``per_rank`` itself must be formable at
    ``top`` (:func:`derive_batch` checked it), so every lower resolution has a solution."""
    out = []
    for res in sorted({int(r) for r in resolutions if r < top}):
        cap = None if max_micro is None else token_cap(max_micro, res, top)
        accum = next(a for a in range(1, per_rank + 1)
                     if per_rank % a == 0 and (cap is None or per_rank // a <= cap)
                     and not (even and (per_rank // a) % 2))
        out.append((res, per_rank // accum, accum))
    return tuple(out)


def batch_plan(cfg: TrainConfig, world_size: int) -> BatchPlan:
    """The batch arithmetic of a config that already holds per-rank values (what load_train_config returned)."""
    micro, accum = cfg.data.batch_size, cfg.optim.grad_accum
    res_cfg = cfg.schedule.resolution
    if res_cfg.kind == "budgeted":   # one global batch, accumulation per resolution
        g = micro * accum * world_size
        return BatchPlan(world_size, g, micro, accum, tuple((r, g, b) for r, b in res_cfg.batch_sizes),
                         tuple(micro * accum // b for _, b in res_cfg.batch_sizes))
    return BatchPlan(world_size, micro * accum * world_size, micro, accum,
                     tuple((r, b * accum * world_size, b) for r, b in res_cfg.batch_sizes))


def apply_global_batch(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, BatchPlan]:
    """``cfg`` with per-rank values for ``world_size``: ``data.batch_size``, ``optim.grad_accum`` and the
    schedule's per-resolution batches derived from the recipe's global ones (unchanged when
    ``data.global_batch_size`` is null: the batch is then stated per rank)."""
    res_cfg = cfg.schedule.resolution
    if cfg.data.global_batch_size is None:
        return cfg, batch_plan(cfg, world_size)
    top = max(res_cfg.resolution_at(epoch, cfg.run.epochs) for epoch in range(cfg.run.epochs))
    budgeted = res_cfg.kind == "budgeted"
    if budgeted and res_cfg.batch_sizes:
        raise ConfigError(f"schedule.resolution.batch_sizes: {res_cfg.batch_sizes} cannot be given with a budgeted "
                          f"schedule and data.global_batch_size: every stage keeps the global batch, and the "
                          f"per-rank batches follow from data.max_batch_per_gpu; remove batch_sizes")
    plan = derive_batch(cfg.data.global_batch_size, world_size, min_accum=cfg.optim.grad_accum,
                        max_micro=cfg.data.max_batch_per_gpu, even=cfg.aug.mixup_active,
                        resolution_batches=res_cfg.batch_sizes, top_resolution=top)
    batch_sizes = [(r, m) for r, _, m in plan.per_resolution]
    if budgeted:
        stages = stage_batches(plan.micro * plan.accum, res_cfg.resolutions, top,
                               max_micro=cfg.data.max_batch_per_gpu, even=cfg.aug.mixup_active)
        batch_sizes = [(r, m) for r, m, _ in stages]
        plan = dataclasses.replace(plan, per_resolution=tuple((r, plan.global_batch, m) for r, m, _ in stages),
                                   accums=tuple(a for _, _, a in stages))
    out = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, batch_size=plan.micro),
        optim=dataclasses.replace(cfg.optim, grad_accum=plan.accum),
        schedule=dataclasses.replace(cfg.schedule, resolution=dataclasses.replace(res_cfg, batch_sizes=batch_sizes)))
    validate(out)
    return out, plan
