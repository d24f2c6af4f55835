"""Aspect-bucketed training (``aug.aspect_buckets``): the bucket rule, one bucket per optimizer step on every
rank, world-size invariance of the step's samples and pixels, mid-epoch skipping, and the up-front refusals."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.aspect_buckets import train_bucket, train_bucket_shapes
from pipeline.data.loader import build_train_loader
from tests.helpers_loaders import NUM_CLASSES, aug_cfg, data_cfg, loader_dataset

RES = 64
# no batch-level draws (random erasing, Mixup): those follow the rank, the per-sample crop follows the position
BUCKETS = dict(aspect_buckets=True, ratio=(0.5, 2.0), mixup=0.0, cutmix=0.0, reprob=0.0)


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return loader_dataset(tmp_path_factory.getbasetemp() / "loader_data")


def _loader(root, *, rank=0, world_size=1, batch_size=4, **aug):
    return build_train_loader(data_cfg(root, batch_size=batch_size), aug_cfg(**{**BUCKETS, **aug}),
                              num_classes=NUM_CLASSES, rank=rank, world_size=world_size, seed=0)


def _steps(loader, epoch: int, accum: int, skip_steps: int = 0) -> list[list[tuple]]:
    """The epoch's optimizer steps: each a list of (images, labels, keys) micro-batches."""
    loader.set_epoch(epoch, RES, skip_batches=skip_steps * accum, accum=accum)
    batches = list(loader.iter_with_keys())
    return [batches[i:i + accum] for i in range(0, len(batches), accum)]


def test_bucket_rule():
    """The 224 px buckets with DeiT's crop-aspect range: multiples of the patch, ~224^2 pixels, W/H inside it."""
    assert train_bucket_shapes(224) == [(256, 192), (240, 208), (224, 224), (208, 240), (192, 256)]
    for res, ratio in ((224, (3 / 4, 4 / 3)), (160, (3 / 4, 4 / 3)), (384, (0.5, 2.0)), (64, (0.5, 2.0))):
        shapes = train_bucket_shapes(res, 16, ratio)
        assert (res, res) in shapes and len(shapes) == len(set(shapes))
        for h, w in shapes:
            assert h % 16 == 0 and w % 16 == 0 and ratio[0] <= w / h <= ratio[1]
            # H = res^2 / W rounded to the nearest multiple of 16: at most 8 px (half a patch) of rounding
            assert abs(h - res * res / w) <= 8
    assert train_bucket_shapes(32) == [(32, 32)]   # too small for another shape within [3/4, 4/3]
    with pytest.raises(ConfigError, match="must be a positive multiple of aug.aspect_multiple=16"):
        train_bucket_shapes(72)
    seq = [train_bucket(train_bucket_shapes(224), seed=0, epoch=1, step=k) for k in range(40)]
    assert seq == [train_bucket(train_bucket_shapes(224), seed=0, epoch=1, step=k) for k in range(40)]
    assert len(set(seq)) == 5 and seq != [train_bucket(train_bucket_shapes(224), seed=0, epoch=2, step=k)
                                          for k in range(40)]


def test_one_bucket_per_step_on_every_rank_and_the_same_step_at_any_world_size(root):
    """2 ranks x batch 4 vs 1 rank x batch 4 x accumulation 2 (global batch 8): every micro-batch of a step, on
    every rank, has the step's bucket shape; the step reads the same samples with the same pixels in both
    layouts (per-sample crops are drawn by global position, with the step's aspect ratio)."""
    shapes = train_bucket_shapes(RES, 16, BUCKETS["ratio"])
    assert len(shapes) > 1
    two = [_steps(_loader(root, rank=r, world_size=2), epoch=1, accum=1) for r in (0, 1)]
    one = _steps(_loader(root), epoch=1, accum=2)
    assert len(one) == len(two[0]) == len(two[1]) == 48 // 8
    seen = set()
    for k, step in enumerate(one):
        want = train_bucket(shapes, seed=0, epoch=1, step=k)
        seen.add(want)
        micro = step + two[0][k] + two[1][k]
        assert {tuple(x.shape[-2:]) for x, _, _ in micro} == {want}, k
        assert all(x.shape[0] == 4 for x, _, _ in micro)
        pixels_one = {key: x[i] for x, _, keys in step for i, key in enumerate(keys)}
        pixels_two = {key: x[i] for r in (0, 1) for x, _, keys in two[r][k] for i, key in enumerate(keys)}
        assert pixels_one.keys() == pixels_two.keys() and len(pixels_one) == 8
        assert all(torch.equal(pixels_one[key], pixels_two[key]) for key in pixels_one), k
    assert len(seen) > 1   # the shape really changes from step to step


def test_mid_epoch_skip_resumes_the_bucket_sequence_and_pixels(root):
    full = _steps(_loader(root), epoch=2, accum=2)
    for skip in (1, 4):
        tail = _steps(_loader(root), epoch=2, accum=2, skip_steps=skip)
        assert len(tail) == len(full) - skip
        for a, b in zip(full[skip:], tail):
            assert all(torch.equal(x, u) and torch.equal(y, v) and k == q for (x, y, k), (u, v, q) in zip(a, b))


def test_a_resolution_schedule_changes_the_buckets_with_the_epoch(root):
    """Progressive resolution / batch size by resolution: each epoch's buckets come from its own resolution."""
    loader = _loader(root)
    for epoch, res, bs in ((0, 64, 4), (1, 96, 2), (2, 128, 2)):
        loader.set_epoch(epoch, res, batch_size=bs, accum=1)
        shapes = train_bucket_shapes(res, 16, BUCKETS["ratio"])
        got = [tuple(x.shape) for x, _ in loader]
        assert len(got) == 48 // bs
        assert got == [(bs, 3, *train_bucket(shapes, seed=0, epoch=epoch, step=k)) for k in range(len(got))]


def test_workers_and_batch_level_augmentation_keep_the_step_shape(root):
    """Two DataLoader workers, Mixup/CutMix and random erasing on: each batch still has its step's shape."""
    shapes = train_bucket_shapes(RES, 16, BUCKETS["ratio"])
    loader = build_train_loader(data_cfg(root, batch_size=4, num_workers=2),
                                aug_cfg(**{**BUCKETS, "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25}),
                                num_classes=NUM_CLASSES, rank=0, world_size=1, seed=0)
    loader.set_epoch(0, RES, accum=3)
    for b, (x, y) in enumerate(loader):
        assert tuple(x.shape) == (4, 3, *train_bucket(shapes, seed=0, epoch=0, step=b // 3))
        assert y.shape == (4, NUM_CLASSES)   # soft targets


@pytest.mark.parametrize("kw,message", [
    (dict(fmt="ffcv"), "aug.aspect_buckets: true needs data.format: 'wds'"),
    (dict(decode="device"), "aug.aspect_buckets: true cannot be combined with data.decode: 'device'"),
])
def test_formats_that_cannot_bucket_are_refused_in_one_line(root, kw, message):
    with pytest.raises(ConfigError) as e:
        build_train_loader(data_cfg(root, **kw), aug_cfg(**BUCKETS, auto_augment=None), num_classes=NUM_CLASSES,
                           rank=0, world_size=1, seed=0)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_recipe_and_up_front_checks():
    """The shipped recipe, and the training config's one-line refusals (before any data or process group)."""
    from pipeline.config import RECIPES, load_train_config

    recipe = RECIPES / "cpvt_ti_aspect.yaml"
    cfg, _ = load_train_config(recipe, ["data.root=/nonexistent"], world_size=8)
    assert cfg.aug.aspect_buckets and cfg.data.format == "wds" and cfg.model.name == "cpvt_ti"
    assert train_bucket_shapes(224, cfg.aug.aspect_multiple, tuple(cfg.aug.ratio)) == train_bucket_shapes(224)
    for overrides, message in (
            (["aug.aspect_multiple=8"], "aug.aspect_multiple: 8 must be a multiple of the patch size 16"),
            (["aug.aspect_multiple=32", "schedule.resolution.resolution=240"],
             "schedule.resolution: epoch 0 trains at 240 px, not a multiple of aug.aspect_multiple=32"),
            (["data.format=ffcv"], "aug.aspect_buckets: true needs data.format: 'wds'")):
        with pytest.raises(ConfigError) as e:
            load_train_config(recipe, ["data.root=/nonexistent", *overrides], world_size=8)
        assert str(e.value).startswith(message) and "\n" not in str(e.value), overrides
