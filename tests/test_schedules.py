"""Resolution and learning-rate schedules: edge cases, validation, batch-size changes."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ConfigError, LRScheduleConfig, ResolutionScheduleConfig, from_dict, load_config
from pipeline.schedules import LRSchedule, LRScheduler, ResolutionSchedule, epoch_progress


def res_schedule(total=10, **kw) -> ResolutionSchedule:
    return ResolutionSchedule(from_dict(ResolutionScheduleConfig, kw), total)


# ----------------------------------------------------------------------------------------- resolution
def test_fixed():
    s = res_schedule(kind="fixed", resolution=224)
    assert [s.at(e) for e in (0, 5, 9, 50)] == [(224, None)] * 4


def test_linear_ramp_ffcv_style():
    s = res_schedule(88, kind="linear", start_res=160, end_res=192, start_epoch=65, end_epoch=76, patch_size=16)
    res = [s.resolution(e) for e in range(88)]
    assert res[:66] == [160] * 66 and res[76:] == [192] * 12
    assert all(r % 16 == 0 for r in res)
    assert res == sorted(res) and set(res) == {160, 176, 192}
    # each epoch is the interpolated value rounded to the patch multiple
    for e in range(66, 76):
        exact = 160 + (e - 65) / (76 - 65) * 32
        assert res[e] == round(exact / 16) * 16


def test_linear_rounds_to_patch_size():
    s = res_schedule(10, kind="linear", start_res=128, end_res=224, start_epoch=0, end_epoch=9, patch_size=32)
    assert all(s.resolution(e) % 32 == 0 for e in range(10))
    assert s.resolution(0) == 128 and s.resolution(9) == 224 and s.resolution(100) == 224


def test_linear_start_equals_end_is_a_step():
    s = res_schedule(10, kind="linear", start_res=128, end_res=224, start_epoch=4, end_epoch=4)
    assert [s.resolution(e) for e in (0, 3, 4, 5, 20)] == [128, 128, 224, 224, 224]


def test_steps_and_epochs_beyond_the_end():
    s = res_schedule(30, kind="steps", steps=[[0, 128], [10, 160], [20, 224]])
    assert [s.resolution(e) for e in (0, 9, 10, 19, 20, 29, 30, 1000)] == [128, 128, 160, 160, 224, 224, 224, 224]


@pytest.mark.parametrize("steps, match", [
    ([[0, 128], [20, 224], [10, 160]], r"^steps: epochs \[0, 20, 10\] must be strictly increasing"),
    ([[0, 128], [10, 160], [10, 224]], r"^steps: epochs .* must be strictly increasing"),
    ([[5, 128]], r"^steps: the first entry must start at epoch 0"),
    ([[0, 130]], r"^steps\[0\]: 130 must be a multiple of 16"),
    ([], r"^steps: must list"),
    ([[0, -16]], r"^steps\[0\]: -16 must be > 0"),
])
def test_steps_invalid(steps, match):
    with pytest.raises(ConfigError, match=match):
        res_schedule(kind="steps", steps=steps)


def test_low_then_full():
    s = res_schedule(10, kind="low_then_full", low_res=160, resolution=224, full_res_epochs=3)
    assert [s.resolution(e) for e in range(12)] == [160] * 7 + [224] * 5
    s0 = res_schedule(10, kind="low_then_full", low_res=160, resolution=224, full_res_epochs=0)
    assert {s0.resolution(e) for e in range(10)} == {160}
    with pytest.raises(ConfigError, match=r"^full_res_epochs: 11 must be <= epochs \(10\)"):
        res_schedule(10, kind="low_then_full", full_res_epochs=11)


def test_batch_size_per_resolution():
    s = res_schedule(30, kind="steps", steps=[[0, 128], [10, 160], [20, 224]],
                     batch_sizes=[[224, 256], [128, 768]])
    assert s.at(0) == (128, 768)
    assert s.at(10) == (160, 256)      # between entries: the next larger resolution's (memory-safe) batch
    assert s.at(25) == (224, 256)
    t = res_schedule(5, kind="fixed", resolution=288, batch_sizes=[[224, 256]])
    assert t.at(0) == (288, None)      # above every entry: the data section's batch size
    assert [row[0] for row in s.table()] == list(range(30))


@pytest.mark.parametrize("kw, match", [
    (dict(kind="fixed", resolution=100), r"^resolution: 100 must be a multiple of 16"),
    (dict(kind="linear", start_epoch=5, end_epoch=2), r"^end_epoch: 2 must be >= start_epoch \(5\)"),
    (dict(kind="linear", start_res=0), r"^start_res: 0 must be > 0"),
    (dict(kind="cosine"), r"^kind: 'cosine' is not one of \['fixed', 'linear', 'steps', 'low_then_full', 'budgeted'\]"),
    (dict(batch_sizes=[[224, 0]]), r"^batch_sizes\[0\]: 0 must be > 0"),
    (dict(batch_sizes=[[224, 64], [224, 32]]), r"^batch_sizes\[1\]: resolution 224 is listed twice"),
    (dict(patch_size=0), r"^patch_size: 0 must be > 0"),
])
def test_resolution_config_errors_are_one_line(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        from_dict(ResolutionScheduleConfig, kw)
    assert "\n" not in str(e.value)


def test_resolution_config_from_yaml_and_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("kind: steps\nsteps: [[0, 128], [4, 224]]\n")
    cfg = load_config(ResolutionScheduleConfig, recipe, ["batch_sizes=[[128, 64]]"])
    assert cfg.steps == [(0, 128), (4, 224)] and ResolutionSchedule(cfg, 8).at(0) == (128, 64)


# ----------------------------------------------------------------------------------------- learning rate
def lr_schedule(total=10, **kw) -> LRSchedule:
    return LRSchedule(from_dict(LRScheduleConfig, kw), total)


def test_lr_scaled_by_global_batch():
    s = lr_schedule(10, lr=5e-4, warmup_epochs=0, min_lr=0.0)
    assert s(0.0, 512) == pytest.approx(5e-4)
    assert s(0.0, 2048) == pytest.approx(2e-3)          # the paper's batch 2048 -> 2e-3
    assert lr_schedule(10, warmup_epochs=0, batch_scaling="sqrt")(0.0, 2048) == pytest.approx(1e-3)
    assert lr_schedule(10, warmup_epochs=0, batch_scaling="none")(0.0, 2048) == pytest.approx(5e-4)


def test_lr_warmup_then_cosine():
    s = lr_schedule(10, lr=1e-3, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    assert s(0.0, 512) == pytest.approx(1e-6)
    assert s(1.0, 512) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert s(2.0, 512) == pytest.approx(1e-3)
    assert s(6.0, 512) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)   # half-way through the cosine
    assert s(10.0, 512) == pytest.approx(1e-5) and s(50.0, 512) == pytest.approx(1e-5)
    lrs = [s(p / 10, 512) for p in range(0, 101)]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


def test_lr_zero_warmup_starts_at_peak():
    s = lr_schedule(10, lr=1e-3, warmup_epochs=0)
    assert s(0.0, 512) == pytest.approx(1e-3)
    assert s(0.5, 512) < 1e-3


def test_lr_continuous_across_batch_size_change():
    """Resolution 128 at batch 1024 for epoch 0-4, then 224 at batch 512: the curve is a function of fractional
    epochs, so the shape is continuous at the switch and only the peak follows the global batch."""
    s = lr_schedule(10, lr=5e-4, warmup_epochs=1, min_lr=0.0, warmup_lr=0.0)
    samples = 10_000
    curve = []
    for epoch in range(10):
        gb = 1024 if epoch < 5 else 512
        steps = samples // gb
        for step in range(steps):
            p = epoch_progress(epoch, step, steps)
            curve.append((p, s(p, gb), gb))
    # lr / peak(gb) is the same smooth curve for both batch sizes
    shape = [(p, lr / s.peak_lr(gb)) for p, lr, gb in curve]
    for (p0, f0), (p1, f1) in zip(shape, shape[1:]):
        assert abs(f1 - f0) <= (p1 - p0) * math.pi / 2 * 1.0001 + 1e-9 or p0 < 1.0
    p_switch, first_after, _ = next(c for c in curve if c[2] == 512)
    assert p_switch == 5.0
    assert first_after == pytest.approx(s(p_switch, 1024) / 2)      # linear scaling rule at the switch
    last_before = [c for c in curve if c[2] == 1024][-1]
    assert first_after / s.peak_lr(512) == pytest.approx(last_before[1] / s.peak_lr(1024), rel=0.05)
    # the number of steps changed, the progress covered did not: the run still ends at min_lr
    assert curve[-1][0] == pytest.approx(10 - 1 / (samples // 512))


def test_lr_scheduler_sets_param_groups_and_round_trips_state():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.5}], lr=1.0)
    sched = LRScheduler(lr_schedule(10, lr=1e-3, warmup_epochs=0), opt)
    lr = sched.step(epoch=2, step=3, steps_in_epoch=10, global_batch=1024)
    assert opt.param_groups[0]["lr"] == pytest.approx(lr) and opt.param_groups[1]["lr"] == pytest.approx(lr / 2)
    assert lr == pytest.approx(sched.schedule(2.3, 1024))
    state = sched.state_dict()
    other = LRScheduler(sched.schedule)
    other.load_state_dict(state)
    assert other.state_dict() == state == {"last_lr": lr}
    other.load_state_dict({"progress": 2.3, "global_batch": 1024, "samples_seen": 1024, "last_lr": lr})  # older
    assert other.last_lr == lr


@pytest.mark.parametrize("kw, total, match", [
    (dict(lr=0), 10, r"^lr: 0\.0 must be > 0"),
    (dict(warmup_epochs=-1), 10, r"^warmup_epochs: -1\.0 must be >= 0"),
    (dict(batch_scaling="cubic"), 10, r"^batch_scaling: 'cubic' is not one of"),
    (dict(warmup_epochs=10), 10, r"^warmup_epochs: 10\.0 must be < epochs \(10\)"),
    (dict(), 0, r"^epochs: 0 must be > 0"),
])
def test_lr_config_errors(kw, total, match):
    with pytest.raises(ConfigError, match=match):
        lr_schedule(total, **kw)


def test_epoch_progress_rejects_empty_epoch():
    with pytest.raises(ValueError):
        epoch_progress(0, 0, 0)
