"""Budgeted progressive-resolution schedules: the plan's arithmetic (equal-cost stages, whole epochs, the share of
the budget actually spent, one global batch with per-resolution batch and accumulation) and the augmentation
strength that follows the schedule (values, and the same batches when an epoch is resumed part-way)."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, ResolutionScheduleConfig, from_dict, load_train_config
from pipeline.config.batch import stage_batches, token_cap
from pipeline.config.budget import epoch_cost, plan_stages
from pipeline.config.recipes import RECIPES
from pipeline.data.loader import build_train_loader
from pipeline.schedules import (aug_strength, plan_lines, plan_rows, ramped_magnitude, step_layout,
                                with_magnitude)
from tests.helpers_loaders import NUM_CLASSES, aug_cfg, data_cfg, loader_dataset

ET_DEIT = [96, 96, 160, 160, 160, 160, 192, 192, 224, 224]   # EfficientTrain++'s DeiT-S segments


def budgeted(**kw) -> ResolutionScheduleConfig:
    args = dict(kind="budgeted", resolution=224, resolutions=ET_DEIT, budget=0.5, reference_epochs=300)
    return from_dict(ResolutionScheduleConfig, args | kw)


# ----------------------------------------------------------------------------------------- epochs per stage
def test_efficienttrain_deit_shape_epochs_and_share():
    plan = budgeted().stage_plan()
    assert [(s.resolution, s.epochs, s.segments) for s in plan.stages] == [
        (96, 163, 2), (160, 118, 4), (192, 41, 2), (224, 30, 2)]
    assert [s.first_epoch for s in plan.stages] == [0, 163, 281, 322] and plan.total_epochs == 352
    # 150 reference epochs asked for; 163 x (96/224)^2 + 118 x (160/224)^2 + 41 x (192/224)^2 + 30 = 150.27
    assert plan.cost == pytest.approx(163 * (96 / 224) ** 2 + 118 * (160 / 224) ** 2 + 41 * (192 / 224) ** 2 + 30)
    assert plan.share == pytest.approx(plan.cost / 300) and abs(plan.share - 0.5) < 0.002


@pytest.mark.parametrize("resolutions,final,ref,budget", [
    (ET_DEIT, 224, 300, 0.5), (ET_DEIT, 224, 300, 0.33), (ET_DEIT, 224, 100, 0.25),
    ([96, 128, 160, 192, 224], 224, 300, 0.5), ([128, 160, 192, 224], 224, 90, 0.7),
    ([32, 32, 48, 48, 48, 48, 48, 48, 64, 64], 64, 12, 0.5), ([64, 64], 64, 10, 0.4)])
def test_every_stage_costs_its_segments_share(resolutions, final, ref, budget):
    """Equal cost per segment: a stage of k segments costs k/n of the budget, up to half an epoch of rounding at
    its resolution plus the error carried from the stages before; the total is off by at most half an epoch at
    the last stage's resolution (cumulative rounding)."""
    plan = plan_stages(resolutions, final, ref, budget)
    per_segment = budget * ref / len(resolutions)
    ideal = spent = 0.0
    for s in plan.stages:
        unit = epoch_cost(s.resolution, final)
        assert s.epochs >= 1 and s.cost == pytest.approx(s.epochs * unit)
        ideal, spent = ideal + s.segments * per_segment, spent + s.cost
        # the EfficientTrain++ rule: (final / r)^2 times the epochs the same cost buys at final, whole epochs
        # chosen so that the cumulative cost stays within half an epoch at r of the ideal one
        assert abs(spent - ideal) <= unit / 2 + 1e-9 or s.epochs == 1, (s, spent, ideal)
    assert abs(plan.cost - budget * ref) <= epoch_cost(plan.stages[-1].resolution, final) / 2 + 1e-9
    assert plan.share == pytest.approx(plan.cost / ref)
    assert plan.total_epochs == sum(s.epochs for s in plan.stages)


def test_budget_scales_the_run_and_a_lower_budget_trains_fewer_epochs():
    epochs = [budgeted(budget=b).stage_plan().total_epochs for b in (0.25, 0.33, 0.5, 1.0)]
    assert epochs == sorted(epochs) and len(set(epochs)) == 4
    full = plan_stages([224], 224, 300, 1.0)
    assert (full.total_epochs, full.share) == (300, 1.0)


def test_segments_split_a_stage_evenly_and_epochs_map_to_stages():
    plan = budgeted().stage_plan()
    segments = [plan.segment_at(e) for e in range(plan.total_epochs)]
    assert segments == sorted(segments) and set(segments) == set(range(10))
    # 160 px: 118 epochs over 4 segments -> 29 or 30 epochs each
    counts = [segments.count(k) for k in range(2, 6)]
    assert sum(counts) == 118 and max(counts) - min(counts) <= 1
    assert [plan.stage_at(e).resolution for e in (0, 162, 163, 280, 281, 321, 322, 351, 400)] == \
        [96, 96, 160, 160, 192, 192, 224, 224, 224]
    cfg = budgeted()
    assert [cfg.resolution_at(e, 352) for e in (0, 163, 351)] == [96, 160, 224]


@pytest.mark.parametrize("kw,needle", [
    (dict(resolutions=[]), "resolutions: must list one resolution per equal-cost segment"),
    (dict(resolutions=[160, 96, 224]), "resolutions: [160, 96, 224] must not decrease"),
    (dict(resolutions=[96, 160, 192]), "the last entry 192 must be the final resolution (224)"),
    (dict(resolutions=[96, 100, 224]), "resolutions[1]: 100 must be a multiple of 16"),
    (dict(budget=0.0), "budget: 0.0 must be > 0"),
    (dict(reference_epochs=0), "reference_epochs: 0 must be > 0"),
])
def test_invalid_budgeted_schedules_are_one_line(kw, needle):
    with pytest.raises(ConfigError) as e:
        budgeted(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------- run.epochs, batches
def test_recipe_derives_run_epochs_and_refuses_a_conflicting_override():
    cfg, _ = load_train_config(RECIPES / "cpvt_s_fast.yaml", [], world_size=8)
    assert cfg.run.epochs == 352 and cfg.schedule.resolution.reference_epochs == 300
    cfg, _ = load_train_config(RECIPES / "cpvt_s_fast.yaml", ["schedule.resolution.budget=0.33"], world_size=8)
    assert cfg.run.epochs == 233
    load_train_config(RECIPES / "cpvt_s_fast.yaml", ["run.epochs=352"], world_size=8)   # the same value: fine
    with pytest.raises(ConfigError) as e:
        load_train_config(RECIPES / "cpvt_s_fast.yaml", ["run.epochs=100"], world_size=8)
    assert str(e.value).startswith("run.epochs: 100 cannot be set with a budgeted resolution schedule, which "
                                   "trains 352 epochs")
    # a config built without load_train_config must state the plan's length itself
    from pipeline.config import TrainConfig

    with pytest.raises(ConfigError, match=r"^schedule\.resolution: the budgeted schedule trains 352 epochs, "
                                          r"run\.epochs is 300; set run\.epochs: 352"):
        from_dict(TrainConfig, {"schedule": {"resolution": dict(kind="budgeted", resolutions=ET_DEIT,
                                                                 budget=0.5, reference_epochs=300)}})


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_constant_global_batch_with_per_resolution_batch_and_accumulation(world):
    """DeiT's 1024 in every stage: micro x accumulation x world = 1024, each micro within the per-GPU cap scaled
    by the token count (128 at 224 px), the fewest accumulation steps that allow it."""
    cfg, ds = load_train_config(RECIPES / "cpvt_s_fast.yaml", [], world_size=world)
    assert ds["train_batch_size"] == 1024
    per_rank = 1024 // world
    seen = {}
    for e in range(cfg.run.epochs):
        res, micro, accum = step_layout(cfg, e)
        assert micro * accum * world == 1024, (e, res, micro, accum)
        assert micro <= token_cap(128, res, 224) and micro % 2 == 0   # Mixup pairs samples: even micro-batches
        assert accum == min(a for a in range(1, per_rank + 1) if per_rank % a == 0
                            and per_rank // a <= token_cap(128, res, 224) and (per_rank // a) % 2 == 0)
        seen[res] = (micro, accum)
    assert sorted(seen) == [96, 160, 192, 224]
    if world == 2:   # 512 samples per rank and step
        assert seen == {96: (512, 1), 160: (128, 4), 192: (128, 4), 224: (128, 4)}
    if world == 4:
        assert seen == {96: (256, 1), 160: (128, 2), 192: (128, 2), 224: (128, 2)}
    rows = plan_rows(cfg, world)
    assert [r["global_batch"] for r in rows] == [1024] * 4
    assert [r["tokens_per_step"] for r in rows] == [1024 * (r // 16) ** 2 for r in (96, 160, 192, 224)]
    assert sum(r["epochs"] for r in rows) == cfg.run.epochs and sum(r["share_of_plan"] for r in rows) == \
        pytest.approx(1.0, abs=1e-3)


def test_stage_batches_without_a_cap_and_with_mixup():
    assert stage_batches(64, [32, 48, 64], 64, max_micro=None) == ((32, 64, 1), (48, 64, 1))
    assert stage_batches(24, [32, 64], 64, max_micro=6, even=True) == ((32, 24, 1),)
    # cap at 48 px: int(6 x (64/48)^2) = 10: 24 and 12 are too big, 8 (3 steps) fits
    assert stage_batches(24, [48, 64], 64, max_micro=6, even=True) == ((48, 8, 3),)


def test_per_rank_batch_sizes_must_divide_the_samples_per_step(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""
model: {name: cpvt_ti, kwargs: {embed_dim: 48, depth: 2, num_heads: 2}}
data: {batch_size: 2}
aug: {auto_augment: null, mixup: 0.0, cutmix: 0.0}
optim: {grad_accum: 2}
schedule:
  resolution: {kind: budgeted, resolution: 64, resolutions: [32, 64], budget: 0.5, reference_epochs: 4,
               batch_sizes: [[32, 4]]}
  lr: {warmup_epochs: 0}
""")
    cfg, ds = load_train_config(recipe, [], world_size=2)
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (8, 2)
    assert [step_layout(cfg, e) for e in range(cfg.run.epochs)] == [(32, 4, 1)] * 4 + [(64, 2, 2)]
    with pytest.raises(ConfigError, match=r"^schedule\.resolution\.batch_sizes\[0\]: per-rank batch 3 at 32 px must "
                                          r"divide data\.batch_size x optim\.grad_accum = 4"):
        load_train_config(recipe, ["schedule.resolution.batch_sizes=[[32, 3]]"], world_size=2)
    with pytest.raises(ConfigError, match=r"^schedule\.resolution\.batch_sizes: .* cannot be given with a budgeted"):
        load_train_config(recipe, ["data.global_batch_size=8"], world_size=2)


def test_plan_lines_state_the_stages():
    cfg, _ = load_train_config(RECIPES / "cpvt_s_fast.yaml", [], world_size=4)
    lines = plan_lines(cfg, 4)
    assert lines[0].startswith("budgeted schedule: 4 stages, 352 epochs, 0.501 of the compute of 300 epochs at "
                               "224 px (budget 0.5")
    assert lines[2].split() == ["1", "96", "0-162", "(163)", "256", "1", "1024", "36864", "0-1", "19.9%"]
    assert lines[5].split() == ["4", "224", "322-351", "(30)", "128", "2", "1024", "200704", "8-9", "20.0%"]
    fixed, _ = load_train_config(RECIPES / "cpvt_s.yaml", [], world_size=4)
    assert plan_lines(fixed, 4) == []


# ----------------------------------------------------------------------------------------- augmentation strength
def test_magnitude_rises_over_the_segments_like_efficienttrain():
    cfg, _ = load_train_config(RECIPES / "cpvt_s_fast.yaml", [], world_size=8)
    mags = [ramped_magnitude(cfg.aug.auto_augment, aug_strength(cfg, e)) for e in range(cfg.run.epochs)]
    assert mags[0] == 0 and mags[-1] == 9 and mags == sorted(mags) and set(mags) == set(range(10))
    assert [r["magnitudes"] for r in plan_rows(cfg, 8)] == [[0, 1], [2, 3, 4, 5], [6, 7], [8, 9]]
    off, _ = load_train_config(RECIPES / "cpvt_s_fast.yaml", ["aug.strength_ramp=none"], world_size=8)
    assert {aug_strength(off, e) for e in range(off.run.epochs)} == {1.0}


def test_strength_ramp_by_epochs_and_by_stages_of_other_kinds():
    cfg, _ = load_train_config(RECIPES / "demo.yaml", ["aug.auto_augment=rand-m9-mstd0.5-inc1",
                                                      "aug.strength_ramp=epochs"], world_size=2)
    assert [aug_strength(cfg, e) for e in (0, 11, 99)] == [0.0, 1.0, 1.0]
    assert aug_strength(cfg, 3) == pytest.approx(3 / 11)
    cfg, _ = load_train_config(RECIPES / "demo.yaml", ["aug.auto_augment=rand-m9-mstd0.5-inc1",
                                                      "aug.strength_ramp=stages"], world_size=2)
    assert [aug_strength(cfg, e) for e in (0, 5, 6, 11)] == [0.0, 0.0, 1.0, 1.0]   # steps 48 -> 64: two stages


def test_magnitude_spec_rewriting_and_ramp_validation():
    assert ramped_magnitude("rand-m9-mstd0.5-inc1", 0.5) == 4 and ramped_magnitude("rand-m9-mstd0.5-inc1", 1) == 9
    assert ramped_magnitude("rand-n2", 0.5) == 5 and ramped_magnitude("augmix-m5", 0.5) is None
    assert ramped_magnitude(None, 0.5) is None
    assert with_magnitude("rand-m9-mstd0.5-inc1", 3) == "rand-m3-mstd0.5-inc1"
    assert with_magnitude("rand-mstd0.5-m12", 0) == "rand-mstd0.5-m0" and with_magnitude("rand-n2", 4) == "rand-n2-m4"
    with pytest.raises(ConfigError, match=r"^aug\.strength_ramp: 'stages' ramps RandAugment's magnitude; "
                                          r"auto_augment 'augmix-m5-w3'"):
        load_train_config(RECIPES / "cpvt_s_fast.yaml", ["aug.auto_augment=augmix-m5-w3"], world_size=8)
    with pytest.raises(ConfigError, match=r"^aug\.strength_ramp: 'epochs' has nothing to ramp"):
        load_train_config(RECIPES / "demo.yaml", ["aug.strength_ramp=epochs"], world_size=2)
    cfg, _ = load_train_config(RECIPES / "demo.yaml", ["aug.strength_ramp=epochs", "aug.ramp_mixup=true",
                                                      "aug.mixup=0.8"], world_size=2)
    assert cfg.aug.ramp_mixup


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return loader_dataset(tmp_path_factory.getbasetemp() / "loader_data")


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_wds_strength_follows_set_epoch_and_resumes_exactly(root):
    """RandAugment at the epoch's magnitude in persistent workers: a part-way epoch (skip_batches) gives the tail of
    the uninterrupted epoch bit for bit, a fresh loader the same epoch, and another strength other pixels."""
    aug = aug_cfg(auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, reprob=0.0)

    def loader():
        return build_train_loader(data_cfg(root, num_workers=2), aug, num_classes=NUM_CLASSES, rank=0,
                                  world_size=1, seed=0)

    a = loader()
    a.set_epoch(2, 32, aug_strength=3 / 9)
    assert a.magnitude == 3 and a.dataset.settings.tolist()[-1] == 3
    full = _batches(a)
    for k in (1, 4):
        b = loader()
        b.set_epoch(2, 32, skip_batches=k, aug_strength=3 / 9)
        tail = _batches(b)
        assert len(tail) == len(full) - k and all(torch.equal(x, u) and torch.equal(y, v)
                                                  for (x, y), (u, v) in zip(full[k:], tail))
    a.set_epoch(2, 32, aug_strength=1.0)           # the recipe's spec (magnitude 9): other pixels, same order
    assert a.magnitude is None and a.dataset.settings.tolist()[-1] == -1
    strong = _batches(a)
    assert not all(torch.equal(x, u) for (x, _), (u, _) in zip(full, strong))
    a.set_epoch(2, 32, aug_strength=3 / 9)         # back again in the same workers: the first epoch's batches
    again = _batches(a)
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(full, again))
    with pytest.raises(ConfigError, match=r"^aug_strength: 1.5"):
        a.set_epoch(2, 32, aug_strength=1.5)


def test_mixup_probability_follows_the_ramp(root):
    aug = aug_cfg(auto_augment=None, mixup=0.8, cutmix=1.0, mixup_prob=0.8, reprob=0.0, strength_ramp="epochs",
                  ramp_mixup=True)
    loader = build_train_loader(data_cfg(root), aug, num_classes=NUM_CLASSES, rank=0, world_size=1, seed=0)
    loader.set_epoch(0, 32, aug_strength=0.0)
    assert loader.batch_augment.mixup.mix_prob == 0.0
    _, y = next(iter(loader))
    assert torch.allclose(y.max(dim=1).values, torch.tensor(1 - 0.1 + 0.1 / NUM_CLASSES))   # nothing mixed
    loader.set_epoch(1, 32, aug_strength=0.5)
    assert loader.batch_augment.mixup.mix_prob == pytest.approx(0.4)


def test_ffcv_augment_op_takes_the_epochs_magnitude(root):
    aug = aug_cfg(auto_augment="rand-m9-mstd0.5-inc1", mixup=0.0, cutmix=0.0, reprob=0.0)
    loader = build_train_loader(data_cfg(root, "ffcv", num_workers=1), aug, num_classes=NUM_CLASSES, rank=0,
                                world_size=1, seed=0)
    loader.set_epoch(0, 32, aug_strength=2 / 9)
    assert loader.augment.magnitude == 2
    x, _ = next(iter(loader))
    assert x.shape[-2:] == (32, 32)
    assert any("m=2" in repr(op) for op in loader.augment.transform_for(32).ops)
    loader.set_epoch(1, 32)
    assert loader.augment.magnitude is None and any("m=9" in repr(op) for op in loader.augment.transform_for(32).ops)
