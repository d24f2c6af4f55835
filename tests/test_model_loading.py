"""Loading DeiT / timm ViT weights into CPVT: matching tensors copied, pos_embed dropped, keys reported."""
import pytest
import torch
import timm

import pipeline.models  # noqa: F401  (registers cpvt_* in timm)
from pipeline.models import load_vit_state_dict

PEG_KEYS = ['pos_block.0.proj.0.weight', 'pos_block.0.proj.0.bias']


@pytest.fixture(scope='module')
def deit_tiny_sd():
    torch.manual_seed(1)
    vit = timm.create_model('vit_tiny_patch16_224', num_classes=1000)  # random weights, DeiT-tiny shape
    return {k: v.clone() for k, v in vit.state_dict().items()}


@pytest.mark.parametrize('wrap', [False, True])
def test_deit_state_dict_loads_into_cpvt_ti(deit_tiny_sd, wrap):
    torch.manual_seed(2)
    model = timm.create_model('cpvt_ti')
    peg_before = {k: v.clone() for k, v in model.state_dict().items() if k in PEG_KEYS}
    source = {'model': deit_tiny_sd, 'epoch': 299} if wrap else deit_tiny_sd

    report = load_vit_state_dict(model, source)

    assert report.dropped_keys == ['pos_embed']
    assert sorted(report.missing_keys) == sorted(PEG_KEYS)
    assert report.unexpected_keys == [] and report.mismatched_keys == {}
    sd = model.state_dict()
    assert set(report.loaded_keys) == set(deit_tiny_sd) - {'pos_embed'}
    for key in report.loaded_keys:
        assert torch.equal(sd[key], deit_tiny_sd[key]), key
    for key in PEG_KEYS:  # PEG untouched
        assert torch.equal(sd[key], peg_before[key])
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_head_shape_mismatch_is_reported_not_loaded(deit_tiny_sd):
    model = timm.create_model('cpvt_ti', num_classes=10)
    head_before = model.head.weight.clone()
    report = load_vit_state_dict(model, {f'module.{k}': v for k, v in deit_tiny_sd.items()})
    assert set(report.mismatched_keys) == {'head.weight', 'head.bias'}
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.blocks[3].attn.qkv.weight, deit_tiny_sd['blocks.3.attn.qkv.weight'])


def test_official_cpvt_state_dict_roundtrip():
    torch.manual_seed(3)
    src = timm.create_model('cpvt_ti', peg_positions=(0, 1, 2, 3, 4))
    dst = timm.create_model('cpvt_ti', peg_positions=(0, 1, 2, 3, 4))
    report = load_vit_state_dict(dst, src.state_dict())
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.dropped_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src.eval()(x), dst.eval()(x))


def test_learned_baseline_resamples_pos_embed(deit_tiny_sd):
    model = timm.create_model('cpvt_ti', pos_embed='learned', peg_positions=(), img_size=160)
    report = load_vit_state_dict(model, deit_tiny_sd)
    assert report.dropped_keys == [] and report.missing_keys == [] and report.mismatched_keys == {}
    assert model.pos_embed.shape == (1, 1 + 10 * 10, 192)
    assert torch.equal(model.pos_embed[:, 0], deit_tiny_sd['pos_embed'][:, 0])  # class-token slot kept


def test_rejects_non_state_dict():
    model = timm.create_model('cpvt_ti_gap', num_classes=0)
    with pytest.raises(ValueError, match='state dict'):
        load_vit_state_dict(model, {'model': {'a': 1}})
