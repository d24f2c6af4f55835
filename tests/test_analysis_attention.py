"""Attention-map analysis: the arrays plotted are the model's attention, reshaped correctly, per head/layer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers_analysis import tiny_cpvt
from pipeline.analysis.attention_maps import attention_stats, patch_attention, plot_attention_comparison


def test_class_token_rows_match_model_attention():
    model = tiny_cpvt("cpvt_ti")
    x = torch.randn(2, 3, 64, 48)
    maps = patch_attention(model, x, [0, -1])
    with torch.no_grad():
        raw = model.get_attention_maps(x, [0, 2])
    assert set(maps) == {0, -1}
    for layer, raw_layer in ((0, 0), (-1, 2)):
        a = maps[layer]
        assert a.shape == (2, 2, 4, 3)  # (B, heads, 64/16, 48/16)
        # class-token query row over the 12 patch keys, in raster order
        np.testing.assert_allclose(a.reshape(2, 2, 12), raw[raw_layer][:, :, 0, 1:].numpy(), rtol=1e-5, atol=1e-7)
        # what is left of each row went to the class token itself
        np.testing.assert_allclose(a.sum(axis=(-2, -1)) + raw[raw_layer][:, :, 0, 0].numpy(), 1.0, rtol=1e-5)


def test_gap_model_uses_mean_over_queries():
    model = tiny_cpvt("cpvt_ti_gap")
    x = torch.randn(1, 3, 32, 32)
    a = patch_attention(model, x, [1])[1]
    with torch.no_grad():
        raw = model.get_attention_maps(x, [1])[1]
    assert a.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(a.reshape(1, 2, 4), raw.mean(dim=2).numpy(), rtol=1e-5)
    np.testing.assert_allclose(a.sum(axis=(-2, -1)), 1.0, rtol=1e-5)


def test_plot_returns_the_panels_it_draws(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    runs = {"cpvt": patch_attention(tiny_cpvt("cpvt_ti", seed=0), x, [0, 2]),
            "learned-pe": patch_attention(tiny_cpvt("cpvt_ti", seed=1, peg_positions=(), pos_embed="learned",
                                                    img_size=32), x, [0, 2])}
    images = np.random.default_rng(0).random((2, 32, 32, 3))
    out = tmp_path / "attn.png"
    plotted = plot_attention_comparison(images, runs, out)
    assert out.stat().st_size > 0
    assert plotted["labels"] == ["cpvt", "learned-pe"] and plotted["layers"] == [0, 2]
    assert len(plotted["panels"]) == 2 * 2 * 2 * 2  # images x runs x layers x heads
    np.testing.assert_array_equal(plotted["panels"][(1, "learned-pe", 2, 1)], runs["learned-pe"][2][1, 1])
    # the two runs differ (different weights), so the figure compares different data
    assert not np.allclose(plotted["panels"][(0, "cpvt", 0, 0)], plotted["panels"][(0, "learned-pe", 0, 0)])


def test_attention_stats_local_vs_uniform():
    uniform = np.full((1, 1, 5, 5), 1 / 25)
    centre = np.zeros((1, 1, 5, 5))
    centre[..., 2, 2] = 1.0
    s_uni, s_cen = attention_stats({0: uniform})[0], attention_stats({0: centre})[0]
    assert s_uni["entropy"] == pytest.approx(np.log(25))
    assert s_cen["entropy"] == pytest.approx(0.0, abs=1e-9)
    assert s_cen["mean_dist_from_centre"] == pytest.approx(0.0)
    assert s_uni["mean_dist_from_centre"] > 1.0
