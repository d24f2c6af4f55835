"""WebDataset loader: batch contract, determinism + cheap skipping, resolution changes, exact validation."""
from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.data.loader import build_eval_loader, build_train_loader
from tests.helpers_loaders import NUM_CLASSES, aug_cfg, data_cfg, loader_dataset, split_info

NO_MIX = dict(mixup=0.0, cutmix=0.0)


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return loader_dataset(tmp_path_factory.getbasetemp() / "loader_data")


def _train(root, seed=0, aug=None, **kw):
    return build_train_loader(data_cfg(root, **kw), aug or aug_cfg(), num_classes=NUM_CLASSES, rank=0,
                              world_size=1, seed=seed)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_shards_are_real_and_odd(root):
    info = split_info(root, "train")
    assert info["num_samples"] == 48 and len(info["filenames"]) % 2 == 1


def test_batch_contract_soft_targets(root):
    loader = _train(root)
    loader.set_epoch(0, 64)
    assert len(loader) == 48 // 8
    batches = list(loader)
    assert len(batches) == len(loader)
    x, y = batches[0]
    assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.shape == (8, NUM_CLASSES) and y.dtype == torch.float32
    torch.testing.assert_close(y.sum(1), torch.ones(8))
    assert (y >= 0).all() and (y.max(1).values < 1).all()   # smoothing 0.1 keeps every target below 1
    assert -3 < x.mean() < 3 and x.std() > 0.1                # normalised, not raw 0..255


def test_batch_contract_int_targets_bf16_channels_last(root):
    loader = _train(root, aug=aug_cfg(**NO_MIX, reprob=0.0, auto_augment=None), dtype="bfloat16",
                    channels_last=True)
    loader.set_epoch(0, 48)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 48, 48) and x.dtype == torch.bfloat16
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and y.shape == (8,) and 0 <= int(y.min()) and int(y.max()) < NUM_CLASSES


def test_normalisation_matches_imagenet_stats(root):
    """Eval images are (pixel/255 - mean) / std of the timm eval transform's uint8 output."""
    from PIL import Image

    from pipeline.data.transforms import decode_image, eval_transform
    import tarfile

    aug = aug_cfg()
    ev = build_eval_loader(data_cfg(root, jpeg_draft=False), resolution=32, rank=0, world_size=1, crop_pct=0.875)
    x, y, keys = next(ev.iter_with_keys())
    with tarfile.open(root / "wds" / split_info(root, "val")["filenames"][0]) as tf:
        jpg = tf.extractfile(f"{keys[0]}.jpg").read()
    ref = eval_transform(aug, 32, 0.875)(decode_image(jpg)).float()
    mean = torch.tensor(aug.mean).view(3, 1, 1)
    std = torch.tensor(aug.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], (ref / 255 - mean) / std, atol=1e-5, rtol=1e-5)
    assert isinstance(decode_image(jpg), Image.Image)


def test_determinism_and_skip_with_workers(root):
    """Same (seed, epoch, rank) -> same batches from a fresh loader; skip_batches=k == drop the first k."""
    a = _train(root, num_workers=2)
    a.set_epoch(3, 64)
    full = list(a)
    b = _train(root, num_workers=2)
    b.set_epoch(3, 64)
    assert _same(full, list(b))
    for k in (1, 3, len(full)):
        b.set_epoch(3, 64, skip_batches=k)
        assert _same(full[k:], list(b)), k
    b.set_epoch(4, 64)
    assert not _same(full, list(b))
    c = _train(root, seed=1, num_workers=2)
    c.set_epoch(3, 64)
    assert not _same(full, list(c))


def test_skip_does_not_decode_skipped_samples(root, monkeypatch):
    import pipeline.data.transforms as T

    calls = []
    real = T.open_image
    monkeypatch.setattr(T, "open_image", lambda data: calls.append(1) or real(data))
    loader = _train(root)
    loader.set_epoch(0, 32, skip_batches=4)
    assert len(list(loader)) == len(loader) - 4
    assert len(calls) == (len(loader) - 4) * 8


def test_epoch_order_covers_the_shards(root):
    """Shards are dealt per epoch, so a single-rank epoch sees (nearly) every sample."""
    loader = _train(root, aug=aug_cfg(**NO_MIX))
    loader.set_epoch(0, 32)
    keys = [k for _, _, ks in loader.iter_with_keys() for k in ks]
    assert len(keys) == 48 and len(set(keys)) >= 40


def test_resolution_and_batch_size_follow_set_epoch(root):
    loader = _train(root)
    dataloader = loader.dataloader
    for epoch, (res, bs) in enumerate([(32, 8), (48, 8), (64, 12), (32, 4)]):
        loader.set_epoch(epoch, res, batch_size=bs)
        shapes = [tuple(x.shape) for x, _ in loader]
        assert len(shapes) == len(loader) == 48 // bs
        assert set(shapes) == {(bs, 3, res, res)}
    assert loader.dataloader is dataloader   # same objects, nothing rebuilt


def test_persistent_workers_follow_set_epoch_and_match_a_fresh_loader(root):
    """Workers are forked once; each epoch's settings (resolution, batch size, skip) still reach them, and a
    long-lived loader's epoch equals a freshly built loader's epoch (nothing stale is carried over)."""
    loader = _train(root, num_workers=2)
    pids = None
    for epoch, (res, bs, skip) in enumerate([(32, 8, 0), (48, 4, 0), (64, 8, 2), (32, 12, 1)]):
        loader.set_epoch(epoch, res, batch_size=bs, skip_batches=skip)
        batches = list(loader)
        workers = loader.dataloader._iterator._workers
        pids = pids or [w.pid for w in workers]
        assert [w.pid for w in workers] == pids and all(w.is_alive() for w in workers)
        assert [tuple(x.shape) for x, _ in batches] == [(bs, 3, res, res)] * (48 // bs - skip)
        fresh = _train(root, num_workers=2)
        fresh.set_epoch(epoch, res, batch_size=bs, skip_batches=skip)
        assert _same(batches, list(fresh)), epoch
    loader.set_epoch(9, 32)
    next(iter(loader))                       # abandon an epoch midway: the next one starts clean
    loader.set_epoch(10, 32)
    fresh = _train(root, num_workers=2)
    fresh.set_epoch(10, 32)
    assert _same(list(loader), list(fresh))


def test_odd_batch_with_mixup_rejected(root):
    loader = _train(root)
    with pytest.raises(ConfigError, match=r"^data\.batch_size: 7 must be even"):
        loader.set_epoch(0, 32, batch_size=7)
    with pytest.raises(ConfigError, match=r"^data\.batch_size: 7 must be even"):
        _train(root, batch_size=7)
    _train(root, aug=aug_cfg(**NO_MIX), batch_size=7).set_epoch(0, 32)   # fine without mixup
    with pytest.raises(ConfigError, match=r"^data\.batch_size: global batch 64"):
        loader.set_epoch(0, 32, batch_size=64)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_exact_and_padded(root, world_size):
    info = split_info(root, "val")
    seen, per_rank = [], []
    for rank in range(world_size):
        ev = build_eval_loader(data_cfg(root, num_workers=2 if rank == 0 else 0), resolution=32, rank=rank,
                               world_size=world_size, crop_pct=0.875)
        assert ev.num_samples == info["num_samples"] == 20
        batches = list(ev.iter_with_keys())
        per_rank.append(len(batches))
        assert len(batches) == len(ev)
        for x, y, keys in batches:
            assert x.shape == (6, 3, 32, 32) and y.shape == (6,)
            assert [k == "" for k in keys] == (y == -1).tolist()
            seen += [(k, int(lab)) for k, lab in zip(keys, y) if k]
    assert len(set(per_rank)) == 1
    keys = [k for k, _ in seen]
    assert len(keys) == len(set(keys)) == 20


def test_missing_data_errors_are_one_line(tmp_path, root):
    with pytest.raises(ConfigError, match=r"^data\.root: must point"):
        build_train_loader(data_cfg(""), aug_cfg(), num_classes=4, rank=0, world_size=1, seed=0)
    with pytest.raises(ConfigError, match=r"^data\.root: classes\.json not found"):
        build_train_loader(data_cfg(tmp_path), aug_cfg(), num_classes=4, rank=0, world_size=1, seed=0)
    with pytest.raises(ConfigError, match=r"^data\.val_split: 'test' is not in"):
        build_eval_loader(data_cfg(root, val_split="test"), resolution=32, rank=0, world_size=1)
    with pytest.raises(ConfigError, match=r"^num_classes: 2 is smaller than the 4 classes"):
        build_train_loader(data_cfg(root), aug_cfg(), num_classes=2, rank=0, world_size=1, seed=0)
    for exc in (ConfigError,):
        with pytest.raises(exc) as e:
            build_eval_loader(data_cfg(root), resolution=32, rank=0, world_size=1, crop_pct=1.5)
        assert "\n" not in str(e.value) and str(e.value).startswith("crop_pct:")


@pytest.mark.parametrize("workers", [0, 2])
def test_iteration_leaves_global_rng_alone(root, workers):
    """Per-sample/batch seeding and the DataLoader's worker seeds never touch the trainer's RNG streams."""
    import random

    import numpy as np

    loader = _train(root, num_workers=workers)
    loader.set_epoch(0, 32)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    list(loader)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
