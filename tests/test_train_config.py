"""Config resolution, one-line errors raised before any data or process group, checkpoint selection and the
optimizer's parameter groups (fast, in-process), plus the CLI's behaviour on a bad config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import checkpointing
from pipeline.config import ConfigError
from pipeline.recipe import RECIPES, load_train_config, resolve_deepspeed_config
from tests.helpers_train import ROOT, TINY_RECIPE, job_env

DS = ROOT / "deepspeed_configs"


@pytest.fixture
def recipe(tmp_path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(TINY_RECIPE)
    return p


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_shipped_deepspeed_configs_resolve(recipe):
    names = sorted(p.name for p in DS.glob("*.json"))
    assert names == sorted(f"zero{s}{p}.json" for s in (1, 2, 3) for p in ("", "_fp32", "_bf16", "_fp16"))
    for name in names:   # pure validation on any machine: fp16 included (the trainer checks the hardware)
        s = int(name[4])
        cfg, ds = load_train_config(recipe, [f"run.deepspeed_config=deepspeed_configs/{name}",
                                             "optim.grad_accum=2"], world_size=4)
        assert ds["train_batch_size"] == 4 * 2 * 4 and ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == s
        assert ds["gradient_clipping"] == 1.0 and "auto" not in json.dumps(ds)
        assert ds.get("bf16", {}).get("enabled", False) == name.endswith("_bf16.json")
    for s in (1, 2, 3):
        fp16 = json.loads((DS / f"zero{s}_fp16.json").read_text())
        assert fp16["fp16"]["loss_scale"] == 0 and fp16["gradient_clipping"] > 0  # dynamic loss scaling


@pytest.mark.parametrize("recipe_name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_validate(recipe_name):
    cfg, ds = load_train_config(RECIPES / recipe_name, ["data.root=/nonexistent"], world_size=8)
    assert ds["train_batch_size"] == cfg.data.batch_size * cfg.optim.grad_accum * 8


def test_paper_recipes_hold_deit_hyperparameters():
    cfg, _ = load_train_config(RECIPES / "cpvt_ti.yaml", [], world_size=8)
    assert (cfg.schedule.lr.lr, cfg.schedule.lr.ref_batch, cfg.optim.weight_decay) == (5e-4, 512, 0.05)
    assert (cfg.run.epochs, cfg.schedule.lr.warmup_epochs, cfg.schedule.lr.min_lr) == (300, 5, 1e-5)
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.smoothing, cfg.aug.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert cfg.aug.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.model.drop_path_rate == 0.1
    five, _ = load_train_config(RECIPES / "cpvt_ti_peg0-4.yaml", [], world_size=8)
    assert five.model.peg_positions == (0, 1, 2, 3, 4)
    gap, _ = load_train_config(RECIPES / "cpvt_s_gap.yaml", [], world_size=8)
    assert gap.model.name == "cpvt_s_gap"


def test_batch_mismatch_is_one_line(recipe, tmp_path):
    bad = json.loads((DS / "zero2.json").read_text()) | {"train_batch_size": 100}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError) as e:
        load_train_config(recipe, [f"run.deepspeed_config={tmp_path / 'bad.json'}"], world_size=2)
    msg = _one_line(e)
    assert "train_batch_size=100" in msg and "= 8" in msg and "world 2" in msg


@pytest.mark.parametrize("override,needle", [
    ("model.name=cpvt_xl", "model.name: 'cpvt_xl' is not one of"),
    ("data.format=tfrecord", "data.format: 'tfrecord' is not one of ['wds', 'ffcv']"),
    ("run.epochs=0", "run.epochs: 0 must be > 0"),
    ("optim.grad_accum=0", "optim.grad_accum"),
    ("schedule.resolution.resolution=33", "schedule.resolution.resolution: 33 must be a multiple of 16"),
    ("model.peg_kernel=4", "model.peg_kernel"),
    ("run.deepspeed_config=nope.json", "run.deepspeed_config: file not found"),
])
def test_field_errors_are_one_line(recipe, override, needle):
    with pytest.raises(ConfigError) as e:
        load_train_config(recipe, [override], world_size=1)
    assert needle in _one_line(e)


def test_bad_zero_stage_and_auto(recipe, tmp_path):
    cfg, _ = load_train_config(recipe, [], world_size=1)
    for patch, needle in (({"zero_optimization": {"stage": 7}}, "zero_optimization.stage: 7 is not one of"),
                          ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}},
                           "zero_optimization.reduce_bucket_size is 'auto'"),
                          ({"fp16": {"enabled": True}}, "both true")):
        bad = json.loads((DS / "zero2_bf16.json").read_text()) | patch
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        cfg.run.deepspeed_config = str(tmp_path / "bad.json")
        with pytest.raises(ConfigError) as e:
            resolve_deepspeed_config(cfg, 1)
        assert needle in _one_line(e)


def test_cli_config_error_before_process_group_and_data(recipe, tmp_path):
    """WORLD_SIZE=2 with no peer: had the job reached the process group it would hang, not fail fast."""
    run_dir = tmp_path / "run"
    env = job_env() | {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1"}
    cmd = [sys.executable, "pipeline/train.py", "--recipe", str(recipe), "--data", str(tmp_path / "missing"),
           "--run-dir", str(run_dir), "--deepspeed_config", "deepspeed_configs/zero2.json"]
    for extra, needle in ((["data.batch_size=3", "aug.mixup=0.8"], "data.batch_size: 3 must be even"),
                          (["run.deepspeed_config=deepspeed_configs/zero9.json"], "file not found"),
                          ([], "data.root")):
        p = subprocess.run(cmd + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr[-2000:]
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("config error:")]
        assert len(lines) == 1 and needle in lines[0], p.stderr[-2000:]
        assert not run_dir.exists()


def test_latest_complete_checkpoint_skips_partial_saves(tmp_path):
    ck = tmp_path / "checkpoints"
    for step, complete in ((3, True), (6, True), (9, False)):
        d = ck / checkpointing.tag_for(step)
        d.mkdir(parents=True)
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (d / checkpointing.MARKER).write_text("{}")
    assert checkpointing.find_latest(ck).name == "step_00000006"
    assert checkpointing.resolve_resume("auto", ck).name == "step_00000006"
    assert checkpointing.resolve_resume("none", ck) is None
    with pytest.raises(FileNotFoundError):
        checkpointing.resolve_resume(str(ck / "step_00000009"), ck)
    assert checkpointing.resolve_resume("auto", tmp_path / "empty") is None


def test_no_weight_decay_groups():
    import timm

    import pipeline.models  # noqa: F401
    from pipeline.optim import OptimConfig, build_optimizer, no_decay_names

    model = timm.create_model("cpvt_ti", num_classes=4, embed_dim=48, depth=2, num_heads=2,
                              peg_positions=(0, 1), pos_embed="learned")
    skip = no_decay_names(model)
    names = dict(model.named_parameters())
    assert {"cls_token", "pos_embed", "pos_block.0.proj.0.bias", "pos_block.1.proj.0.bias"} <= skip
    assert all(n in skip for n in names if "norm" in n or n.endswith(".bias"))
    assert "pos_block.0.proj.0.weight" not in skip and "blocks.0.attn.qkv.weight" not in skip
    opt = build_optimizer(model, OptimConfig())
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
