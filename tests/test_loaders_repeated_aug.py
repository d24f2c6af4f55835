"""DeiT repeated augmentation (``aug.repeats``): same steps per epoch, each drawn image several times with its
own augmentation; DeiT's RASampler order for FFCV (the copies of an image go to different ranks)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from pipeline.config import AugConfig, ConfigError, DataConfig, check_data_aug, load_config
from pipeline.data.ffcv_loader import repeated_aug_order
from pipeline.data.loader import build_train_loader
from tests.helpers_loaders import NUM_CLASSES, aug_cfg, data_cfg, loader_dataset

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see test_loaders_ffcv
PLAIN = dict(mixup=0.0, cutmix=0.0, reprob=0.0, auto_augment=None)


@dataclass
class _Top:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return loader_dataset(tmp_path_factory.getbasetemp() / "loader_data")


def test_config_validation():
    with pytest.raises(ConfigError, match=r"^aug\.repeats: 0 must be > 0$"):
        load_config(_Top, None, ["aug.repeats=0"])
    cfg = load_config(_Top, None, ["aug.repeats=3", "data.format=ffcv", "data.os_cache=false",
                                   "data.ffcv_order=quasi_random"])
    with pytest.raises(ConfigError, match=r"^data\.ffcv_order: 'quasi_random' cannot be combined with "
                                          r"aug\.repeats=3 .* allowed: \['random'\]$"):
        check_data_aug(cfg.data, cfg.aug)
    check_data_aug(cfg.data, AugConfig(repeats=1))


@pytest.mark.parametrize("n, world, repeats", [(48, 1, 3), (48, 2, 3), (50, 4, 3), (48, 2, 2)])
def test_rasampler_order(n, world, repeats):
    orders = [repeated_aug_order(n, repeats=repeats, seed=0, epoch=5, rank=r, world_size=world) for r in range(world)]
    assert all(len(o) == n // world for o in orders)                       # the normal epoch length per rank
    drawn = Counter(int(i) for o in orders for i in o)
    assert max(drawn.values()) == repeats and len(drawn) <= -(-n // repeats) + world
    assert sum(c == repeats for c in drawn.values()) >= len(drawn) - 2     # all but the cut-off ones, k times
    if world >= repeats:   # DeiT: the copies of one image are on different ranks, in the same position
        for i in range(len(orders[0])):
            column = [int(o[i]) for o in orders]
            assert len(set(column)) >= len(column) // repeats
    assert np.array_equal(orders[0], repeated_aug_order(n, repeats=repeats, seed=0, epoch=5, rank=0,
                                                        world_size=world))
    assert not np.array_equal(orders[0], repeated_aug_order(n, repeats=repeats, seed=0, epoch=6, rank=0,
                                                            world_size=world))


def test_repeat_stage():
    from pipeline.data.webdataset_loader import repeat_each

    assert list(repeat_each(3)(iter("ab"))) == list("aaabbb")


def test_wds_epoch_draws_each_image_repeats_times_with_different_augmentations(root):
    # 8 canonical streams of 6 positions (2 images x 3 copies each); the default 64 would give each of these 48
    # positions its own stream, and a stream's copies of an image would fall past the epoch
    loader = build_train_loader(data_cfg(root, shuffle_buffer=48, shuffle_initial=48, canonical_streams=8),
                                aug_cfg(repeats=3, **PLAIN),
                                num_classes=NUM_CLASSES, rank=0, world_size=1, seed=0)
    loader.set_epoch(0, 32)
    batches = list(loader.iter_with_keys())
    assert len(batches) == len(loader) == 48 // 8                          # steps per epoch unchanged
    keys = [k for _, _, ks in batches for k in ks]
    counts = Counter(keys)
    # the stream repeats each sample 3x before the shuffle buffer spreads the copies; near the epoch's end some
    # copies fall past it (negligible at ImageNet scale, visible on 48 images)
    assert len(keys) == 48 and max(counts.values()) == 3 and len(counts) <= 32
    images = {}
    for x, _, ks in batches:
        for img, k in zip(x, ks):
            images.setdefault(k, []).append(img)
    copies = next(v for v in images.values() if len(v) == 3)
    assert not torch.equal(copies[0], copies[1])                            # independently augmented
    again = build_train_loader(data_cfg(root, shuffle_buffer=48, shuffle_initial=48, canonical_streams=8),
                               aug_cfg(repeats=3, **PLAIN),
                               num_classes=NUM_CLASSES, rank=0, world_size=1, seed=0)
    again.set_epoch(0, 32, skip_batches=2)
    assert [ks for _, _, ks in again.iter_with_keys()] == [ks for _, _, ks in batches[2:]]   # exact resume


def test_ffcv_loader_follows_the_rasampler_order(root):
    from ffcv.reader import Reader

    labels = Reader(str(root / "ffcv" / "train.beton")).metadata["f1"]
    loader = build_train_loader(data_cfg(root, "ffcv", num_workers=1), aug_cfg(repeats=3, **PLAIN),
                                num_classes=NUM_CLASSES, rank=0, world_size=1, seed=0)
    loader.set_epoch(1, 32)
    order = [int(i) for i in loader.order.sample_order(1)]
    assert order == [int(i) for i in repeated_aug_order(48, repeats=3, seed=0, epoch=1, rank=0, world_size=1)]
    got = [y.tolist() for _, y in loader]
    assert got == [[int(labels[i]) for i in order[b:b + 8]] for b in range(0, 48, 8)]
