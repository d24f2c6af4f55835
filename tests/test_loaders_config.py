"""DataConfig / AugConfig validation: one-line ConfigErrors naming the (dotted) field and the allowed values."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pipeline.config import AugConfig, ConfigError, DataConfig, check_data_aug, from_dict, load_config


@dataclass
class _Top:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)


@pytest.mark.parametrize("overrides, match", [
    (["data.format=tfrecord"], r"^data\.format: 'tfrecord' is not one of \['wds', 'ffcv'\]$"),
    (["data.batch_size=0"], r"^data\.batch_size: 0 must be > 0$"),
    (["data.num_workers=-1"], r"^data\.num_workers: -1 must be >= 0$"),
    (["data.dtype=float16"], r"^data\.dtype: 'float16' is not one of \['float32', 'bfloat16'\]$"),
    (["data.shuffle_initial=5000"], r"^data\.shuffle_initial: 5000 must be in \[0, 2000\]$"),
    (["data.format=ffcv", "data.ffcv_order=quasi_random"], r"^data\.ffcv_order: 'quasi_random' needs os_cache"),
    (["data.ffcv_order=sequential"], r"^data\.ffcv_order: 'sequential' is not one of"),
    (["data.bogus=1"], r"^data\.bogus: unknown field"),
    (["aug.auto_augment=rand-q9"], r"^aug\.auto_augment: 'rand-q9' is not a timm auto-augment spec"),
    (["aug.reprob=1.5"], r"^aug\.reprob: 1\.5 must be in \[0\.0, 1\.0\]$"),
    (["aug.remode=noise"], r"^aug\.remode: 'noise' is not one of \['const', 'rand', 'pixel'\]$"),
    (["aug.scale=[0.9, 0.1]"], r"^aug\.scale: \[0\.9, 0\.1\] must satisfy 0 < min <= max$"),
    (["aug.crop_pct=0"], r"^aug\.crop_pct: 0\.0 must be in \(0, 1\]$"),
    (["aug.mixup=-0.1"], r"^aug\.mixup: -0\.1 must be in \[0\.0, 1\.0\]$"),
    (["aug.std=[0.2, 0.2]"], r"^aug\.std: expected 3 values"),
    (["aug.smoothing=1"], r"^aug\.smoothing: 1\.0 must be in"),
])
def test_errors_are_one_line_and_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(_Top, None, overrides)
    assert "\n" not in str(e.value)


def test_defaults_are_the_deit_recipe():
    cfg = load_config(_Top)
    a = cfg.aug
    assert (a.auto_augment, a.reprob, a.mixup, a.cutmix, a.smoothing) == ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 0.1)
    assert a.mean == (0.485, 0.456, 0.406) and a.std == (0.229, 0.224, 0.225) and a.crop_pct == 0.875
    assert a.mixup_active and not from_dict(AugConfig, {"mixup": 0, "cutmix": 0}).mixup_active


def test_auto_augment_can_be_disabled():
    assert from_dict(AugConfig, {"auto_augment": None}).auto_augment is None
    assert from_dict(AugConfig, {"auto_augment": ""}).auto_augment == ""


def test_mixup_needs_even_batch():
    with pytest.raises(ConfigError, match=r"^data\.batch_size: 33 must be even when aug\.mixup/aug\.cutmix is on"):
        check_data_aug(DataConfig(batch_size=33), AugConfig())
    check_data_aug(DataConfig(batch_size=33), AugConfig(mixup=0, cutmix=0))
    with pytest.raises(ConfigError, match=r"^data\.batch_size: 5 must be even"):
        check_data_aug(DataConfig(batch_size=32), AugConfig(), batch_size=5)
