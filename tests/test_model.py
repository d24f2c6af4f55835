"""CPVT model: parameter counts, shapes at many resolutions, PEG semantics, attention maps, errors."""
import pytest
import torch
import timm

import pipeline.models  # noqa: F401  (registers cpvt_* in timm)
from pipeline.models import CPVT, PEG


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(**kwargs) -> CPVT:
    """A small CPVT (same code path as the zoo, fewer blocks) for the heavier behavioural checks."""
    args = dict(patch_size=16, embed_dim=48, depth=4, num_heads=3, num_classes=10)
    args.update(kwargs)
    return CPVT(**args).eval()


@pytest.fixture(scope='module')
def cpvt_ti():
    torch.manual_seed(0)
    return timm.create_model('cpvt_ti').eval()


@pytest.mark.parametrize('name, expected', [
    ('cpvt_ti', 5_681_512),
    ('cpvt_ti_gap', 5_681_320),
    ('cpvt_s', 21_978_856),
    ('cpvt_s_gap', 21_978_472),
    ('cpvt_b', 86_424_040),
    ('cpvt_b_gap', 86_423_272),
])
def test_parameter_counts_match_paper(name, expected):
    with torch.device('meta'):  # shapes only: no memory, no init cost
        model = timm.create_model(name)
    assert n_params(model) == expected
    assert len(model.pos_block) == 1 and model.peg_positions == (0,)
    assert 'pos_embed' not in model.state_dict()


def test_registered_variants_and_cfg():
    for name in ('cpvt_ti', 'cpvt_s', 'cpvt_b', 'cpvt_ti_gap', 'cpvt_s_gap', 'cpvt_b_gap'):
        assert name in timm.list_models('cpvt_*')
    cfg = timm.models.get_pretrained_cfg('cpvt_ti').to_dict()
    assert cfg['input_size'] == (3, 224, 224) and cfg['crop_pct'] == 0.875
    assert cfg['mean'] == timm.data.IMAGENET_DEFAULT_MEAN and cfg['std'] == timm.data.IMAGENET_DEFAULT_STD


def test_state_dict_key_names():
    keys = set(timm.create_model('cpvt_ti', num_classes=10).state_dict())
    for k in ('patch_embed.proj.weight', 'cls_token', 'blocks.0.norm1.weight', 'blocks.0.attn.qkv.bias',
              'blocks.11.attn.proj.weight', 'blocks.3.norm2.bias', 'blocks.5.mlp.fc1.weight',
              'blocks.5.mlp.fc2.bias', 'norm.weight', 'head.weight', 'pos_block.0.proj.0.weight',
              'pos_block.0.proj.0.bias'):
        assert k in keys, k
    with torch.device('meta'):
        multi = timm.create_model('cpvt_ti', peg_positions=(0, 1, 2, 3, 4))
    assert {k for k in multi.state_dict() if k.startswith('pos_block')} == {
        f'pos_block.{k}.proj.0.{p}' for k in range(5) for p in ('weight', 'bias')}
    assert n_params(multi) == 5_681_512 + 4 * (192 * 9 + 192)


@pytest.mark.parametrize('size', [(224, 224), (160, 160), (384, 384), (224, 320)])
def test_output_shapes_any_multiple_same_weights(cpvt_ti, size):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = cpvt_ti.forward_features(x)
        out = cpvt_ti.forward_head(feats)
    assert feats.shape == (1, 1 + (size[0] // 16) * (size[1] // 16), 192)
    assert out.shape == (1, 1000)
    assert torch.isfinite(out).all()


def test_num_classes_drop_path_and_gap_shapes():
    model = timm.create_model('cpvt_ti_gap', num_classes=7, drop_path_rate=0.1).eval()
    assert model.cls_token is None and model.global_pool == 'avg'
    assert model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 64, 96))
    assert feats.shape == (2, 4 * 6, 192)
    assert model.forward_head(feats).shape == (2, 7)


def test_peg_algorithm1_matches_explicit_depthwise_conv():
    torch.manual_seed(0)
    peg = PEG(8, kernel_size=3)
    x = torch.randn(2, 1 + 3 * 5, 8)
    out = peg(x, (3, 5), num_prefix_tokens=1)
    grid = x[:, 1:].transpose(1, 2).reshape(2, 8, 3, 5)
    conv = peg.proj[0]
    expected = torch.nn.functional.conv2d(grid, conv.weight, conv.bias, padding=1, groups=8) + grid
    assert torch.allclose(out[:, 1:], expected.flatten(2).transpose(1, 2), atol=1e-6)
    assert torch.equal(out[:, 0], x[:, 0])
    # init: normal(0, sqrt(2 / (k*k))) on the depthwise weight, zero bias
    big = PEG(384, kernel_size=3).proj[0]
    assert big.weight.shape == (384, 1, 3, 3) and big.bias.abs().sum() == 0
    assert big.weight.std().item() == pytest.approx((2 / 9) ** 0.5, rel=0.1)


def test_class_token_bypasses_peg():
    """Perturbing the PEG weights changes patch tokens right after the PEG but never the class token."""
    torch.manual_seed(0)
    model = tiny(peg_positions=(1,))
    captured = []
    model.pos_block[0].register_forward_hook(lambda mod, args, out: captured.append((args[0].clone(), out.clone())))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        model.pos_block[0].proj[0].weight.add_(torch.randn_like(model.pos_block[0].proj[0].weight))
        model.pos_block[0].proj[0].bias.add_(1.0)
        model(x)
    (in_a, out_a), (in_b, out_b) = captured
    assert torch.equal(in_a, in_b)  # same input to the PEG both times
    assert torch.equal(out_a[:, 0], in_a[:, 0]) and torch.equal(out_b[:, 0], out_a[:, 0])
    assert not torch.allclose(out_a[:, 1:], out_b[:, 1:])


def test_zero_padding_gives_absolute_position():
    """A constant token grid stays non-constant after the PEG: border positions see zero padding."""
    torch.manual_seed(0)
    peg = PEG(4, kernel_size=3)
    x = torch.ones(1, 1 + 6 * 6, 4)
    out = peg(x, (6, 6), num_prefix_tokens=1)[0, 1:].reshape(6, 6, 4)
    interior = out[1:-1, 1:-1]
    assert torch.allclose(interior, interior[0, 0].expand_as(interior))  # translation equivariant inside
    assert not torch.allclose(out[0, 0], out[2, 2])  # corner differs from interior
    assert not torch.allclose(out[0, 3], out[2, 3])  # edge differs from interior
    assert not torch.allclose(out[0, 0], out[0, 3])  # corner differs from edge

    # and through a whole model: a constant image gives position-dependent tokens after block 0's PEG
    model = tiny()
    captured = []
    model.pos_block[0].register_forward_hook(lambda mod, args, out: captured.append((args[0], out)))
    with torch.no_grad():
        model(torch.full((1, 3, 96, 96), 0.5))
    before, after = captured[0]
    assert torch.allclose(before[0, 1:], before[0, 1:2].expand(36, -1), atol=1e-5)  # no position info yet
    assert (after[0, 1:] - after[0, 1:].mean(0)).abs().max() > 1e-3


@pytest.mark.parametrize('k', [1, 3, 5, 7])
def test_odd_peg_kernels_build(k):
    model = tiny(peg_kernel=k)
    assert model.pos_block[0].proj[0].kernel_size == (k, k)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 80)).shape == (1, 10)


@pytest.mark.parametrize('k', [2, 4, 0])
def test_even_peg_kernels_rejected(k):
    with pytest.raises(ValueError, match='peg_kernel'):
        tiny(peg_kernel=k)


@pytest.mark.parametrize('positions', [-1, (-1,), (-1, 0, 2), [0, 1, 2, 3]])
def test_peg_positions(positions):
    model = tiny(peg_positions=positions)
    expected = (positions,) if isinstance(positions, int) else tuple(positions)
    assert model.peg_positions == expected and len(model.pos_block) == len(expected)
    calls = []
    for k, peg in enumerate(model.pos_block):
        peg.register_forward_hook(lambda mod, args, out, k=k: calls.append(k))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == list(range(len(expected)))


def test_peg_before_block0_sees_patch_embeddings():
    model = tiny(peg_positions=-1)
    captured = []
    model.pos_block[0].register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        model(x)
        patches = model.patch_embed(x)
    assert torch.equal(captured[0][:, 1:], patches)


@pytest.mark.parametrize('positions', [(12,), (-2,), (0, 0)])
def test_bad_peg_positions_rejected(positions):
    with pytest.raises(ValueError, match='peg_positions'):
        CPVT(embed_dim=48, depth=12, num_heads=3, peg_positions=positions)


def test_no_peg_means_no_position_information():
    model = tiny(peg_positions=())
    assert len(model.pos_block) == 0 and model.pos_embed is None
    x = torch.randn(1, 3, 32, 32)
    perm = torch.randperm(4)
    # permuting whole patches permutes the patch tokens and leaves the class token unchanged
    patches = x.unfold(2, 16, 16).unfold(3, 16, 16).reshape(1, 3, 4, 16, 16)[:, :, perm]
    x_perm = patches.reshape(1, 3, 2, 2, 16, 16).permute(0, 1, 2, 4, 3, 5).reshape(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model.forward_features(x), model.forward_features(x_perm)
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-5)
    assert torch.allclose(a[:, 1:][:, perm], b[:, 1:], atol=1e-5)


def test_learned_pos_embed_baseline_resamples():
    model = tiny(pos_embed='learned', peg_positions=(), img_size=64)
    assert model.pos_embed.shape == (1, 1 + 16, 48)
    assert model.no_weight_decay() == {'cls_token', 'pos_embed'}   # no PEG in this baseline
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
        assert model(torch.randn(1, 3, 96, 128)).shape == (1, 10)
    with pytest.raises(ValueError, match='pos_embed'):
        tiny(pos_embed='sinusoidal')


def test_no_weight_decay():
    # the official CPVT/Twins rule: the class token and every PEG parameter (pos_block.*)
    peg = {'pos_block.0.proj.0.weight', 'pos_block.0.proj.0.bias'}
    with torch.device('meta'):
        assert timm.create_model('cpvt_ti').no_weight_decay() == {'cls_token'} | peg
        assert timm.create_model('cpvt_ti_gap').no_weight_decay() == peg


def test_gap_applies_final_norm_before_mean():
    torch.manual_seed(0)
    model = tiny(class_token=False, global_pool='avg')
    with torch.no_grad():
        model.norm.weight.normal_()  # make the final norm non-trivial
        model.norm.bias.normal_()
    captured = []
    model.norm.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(torch.randn(2, 3, 48, 48)), pre_logits=True)
    tokens = captured[0]  # (B, N, C) before the final norm, no class token
    assert tokens.shape == (2, 9, 48)
    assert torch.allclose(pooled, model.norm(tokens).mean(1), atol=1e-6)
    assert not torch.allclose(pooled, model.norm(tokens.mean(1)), atol=1e-3)  # timm's pool-then-norm differs


def test_token_pool_requires_class_token():
    with pytest.raises(ValueError, match='class_token'):
        tiny(class_token=False, global_pool='token')


@pytest.mark.parametrize('size', [(225, 224), (224, 200), (100, 100)])
def test_bad_input_size_raises_clear_error(cpvt_ti, size):
    with pytest.raises(ValueError, match=r'not a multiple of the patch size 16'):
        cpvt_ti(torch.randn(1, 3, *size))
    with pytest.raises(ValueError, match=r'not a multiple of the patch size 16'):
        cpvt_ti.get_attention_maps(torch.randn(1, 3, *size))


def test_attention_maps_match_sdpa():
    torch.manual_seed(0)
    model = tiny(peg_positions=(0, 1))
    x = torch.randn(2, 3, 48, 64)
    n = 1 + 3 * 4
    with torch.no_grad():
        out_before = model(x)
        maps = model.get_attention_maps(x)
        out_after = model(x)
        assert torch.equal(out_before, out_after)
        assert sorted(maps) == [0, 1, 2, 3]
        for attn in maps.values():
            assert attn.shape == (2, 3, n, n)
            assert torch.allclose(attn.sum(-1), torch.ones(2, 3, n), atol=1e-5)
            assert (attn >= 0).all()

        # the explicit path reproduces the SDPA path block by block
        captured = []
        hooks = [blk.register_forward_hook(lambda mod, args, out: captured.append((args[0], out)))
                 for blk in model.blocks]
        model(x)
        for h in hooks:
            h.remove()
        for i, (blk_in, blk_out) in enumerate(captured):
            explicit_out, attn = model.blocks[i].forward_with_attn(blk_in)
            assert torch.allclose(explicit_out, blk_out, atol=1e-5)
            assert torch.allclose(attn, maps[i], atol=1e-6)
            sdpa = model.blocks[i].attn(model.blocks[i].norm1(blk_in))
            explicit, _ = model.blocks[i].attn(model.blocks[i].norm1(blk_in), return_attn=True)
            assert torch.allclose(sdpa, explicit, atol=1e-5)

        subset = model.get_attention_maps(x, layers=[1, -1])
    assert sorted(subset) == [1, 3]
    assert torch.allclose(subset[1], maps[1]) and torch.allclose(subset[3], maps[3])
    with pytest.raises(ValueError, match='layers'):
        model.get_attention_maps(x, layers=[4])


def test_attention_maps_gap_variant_token_count():
    model = tiny(class_token=False, global_pool='avg')
    with torch.no_grad():
        maps = model.get_attention_maps(torch.randn(1, 3, 32, 64), layers=[0])
    assert maps[0].shape == (1, 3, 8, 8)


def test_backward_and_grad_checkpointing_match():
    torch.manual_seed(0)
    model = tiny(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for n, g in grads.items() if 'pos_block' in n or 'cls_token' in n)
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_init_follows_deit():
    torch.manual_seed(0)
    model = timm.create_model('cpvt_ti', drop_path_rate=0.1)
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert qkv.bias.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.equal(model.norm.weight, torch.ones(192)) and model.norm.eps == 1e-6
    rates = [blk.drop_path1.drop_prob if hasattr(blk.drop_path1, 'drop_prob') else 0.0 for blk in model.blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])


@pytest.mark.parametrize('pos_embed', ['none', 'learned'])
def test_bf16_forward_backward(pos_embed):
    model = tiny(pos_embed=pos_embed, img_size=32, peg_positions=(0, 1)).to(torch.bfloat16).train()
    out = model(torch.randn(2, 3, 48, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 10)
    out.float().sum().backward()
    assert model.pos_block[1].proj[0].weight.grad is not None


def test_peg_runs_in_fp32_under_cpu_autocast():
    """CPU bf16 autocast keeps the PEG's depthwise conv in fp32 (bf16 depthwise convs are a slow path on CPUs
    without AVX512-BF16/AMX), while the rest of the model autocasts; a bf16 model without autocast stays bf16."""
    from pipeline.models.cpvt import PEG

    torch.manual_seed(0)
    peg = PEG(16)
    x = torch.randn(2, 1 + 6 * 4, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y = peg(x, (6, 4))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, peg(x, (6, 4)), rtol=0, atol=0)   # exactly the fp32 result
    yb = peg.to(torch.bfloat16)(x.bfloat16(), (6, 4))
    assert yb.dtype == torch.bfloat16
    model = tiny(img_size=32).eval()
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 32, 32)).dtype == torch.bfloat16   # the head still autocasts
