"""Config resolution, one-line errors raised before any data or process group, checkpoint selection and the
optimizer's parameter groups (fast, in-process), plus the CLI's behaviour on a bad config."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import checkpointing
from pipeline.config import RECIPES, ConfigError, load_train_config, resolve_deepspeed_config
from tests.helpers_train import ROOT, TINY_RECIPE, job_env
from tests.helpers_train import tiny_data, tiny_recipe  # noqa: F401 - session fixtures (shared tiny dataset)

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
    assert names == ["zero1.json", "zero2.json", "zero3.json"]   # the precision is run.precision's
    for name in names:   # pure validation on any machine: fp16 included (the trainer checks the hardware)
        s = int(name[4])
        cfg, ds = load_train_config(recipe, [f"run.deepspeed_config=deepspeed_configs/{name}",
                                             "optim.grad_accum=2"], world_size=4)
        assert ds["train_batch_size"] == 4 * 2 * 4 and ds["train_micro_batch_size_per_gpu"] == 4
        assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == s
        assert ds["gradient_clipping"] == 1.0 and "auto" not in json.dumps(ds)   # the tiny recipe's optim.grad_clip
        assert "bf16" not in ds and "fp16" not in ds and "gradient_clipping" not in json.loads((DS / name).read_text())


def test_grad_clip_from_the_recipe_reaches_deepspeed(recipe):
    for name in ("zero1", "zero2", "zero3"):
        _, ds = load_train_config(recipe, [f"run.deepspeed_config=deepspeed_configs/{name}.json",
                                           "optim.grad_clip=0.25"], world_size=1)
        assert ds["gradient_clipping"] == 0.25, name
    _, ds = load_train_config(recipe, ["optim.grad_clip=0"], world_size=1)
    assert ds["gradient_clipping"] == 0.0   # DeepSpeed clips only when gradient_clipping > 0


def test_grad_clip_pinned_by_the_json_must_agree(recipe, tmp_path):
    pinned = json.loads((DS / "zero2.json").read_text()) | {"gradient_clipping": 1.0}
    (tmp_path / "pinned.json").write_text(json.dumps(pinned))
    ds_flag = f"run.deepspeed_config={tmp_path / 'pinned.json'}"
    assert load_train_config(recipe, [ds_flag, "optim.grad_clip=1.0"])[1]["gradient_clipping"] == 1.0
    with pytest.raises(ConfigError) as e:
        load_train_config(recipe, [ds_flag, "optim.grad_clip=0.25"])
    msg = _one_line(e)
    assert "gradient_clipping=1.0" in msg and "optim.grad_clip=0.25" in msg, msg


def test_imagenet_recipes_clip_like_deit():
    """DeiT's main.py does not clip (--clip-grad None); the demo keeps the 1.0 its accuracy was measured with."""
    for path in sorted(RECIPES.glob("*.yaml")):
        _, ds = load_train_config(path, ["data.root=/nonexistent"], world_size=8)
        assert ds["gradient_clipping"] == (1.0 if path.name in ("demo.yaml", "demo_fast.yaml") else 0.0), path.name


@pytest.mark.parametrize("recipe_name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_shipped_recipes_validate(recipe_name):
    cfg, ds = load_train_config(RECIPES / recipe_name, ["data.root=/nonexistent"], world_size=8)
    assert ds["train_batch_size"] == cfg.data.batch_size * cfg.optim.grad_accum * 8
    if recipe_name not in ("demo.yaml", "demo_fast.yaml"):   # ImageNet recipes: DeiT's global batch; demo: per rank
        assert cfg.data.global_batch_size == ds["train_batch_size"] == 1024


def test_paper_recipes_hold_deit_hyperparameters():
    cfg, _ = load_train_config(RECIPES / "cpvt_ti.yaml", [], world_size=8)
    assert (cfg.schedule.lr.lr, cfg.schedule.lr.ref_batch, cfg.optim.weight_decay) == (5e-4, 512, 0.05)
    assert (cfg.run.epochs, cfg.schedule.lr.warmup_epochs, cfg.schedule.lr.min_lr) == (300, 5, 1e-5)
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.aug.smoothing, cfg.aug.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert cfg.aug.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.model.drop_path_rate == 0.1
    assert (cfg.data.global_batch_size, cfg.data.max_batch_per_gpu, cfg.aug.repeats) == (1024, 128, 3)
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
        bad = json.loads((DS / "zero2.json").read_text()) | {"bf16": {"enabled": True}} | patch
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


def test_no_weight_decay_groups_follow_the_official_rule():
    """The official CPVT/Twins rule: no weight decay for every PEG parameter (``pos_block.*``, conv weights and
    biases), norms, biases, the class token (and a learned pos_embed); decay for everything else. The explicit
    ``optim.decay_peg_weights`` choice moves only the PEG conv weights to the decayed group."""
    import timm
    import torch

    import pipeline.models  # noqa: F401
    from pipeline.config import OptimConfig
    from pipeline.optim import build_optimizer, no_decay_names

    model = timm.create_model("cpvt_ti", num_classes=4, embed_dim=48, depth=2, num_heads=2,
                              peg_positions=(-1, 0, 1), pos_embed="learned")
    names = dict(model.named_parameters())
    official = {n for n in names if n.startswith("pos_block.") or n in ("cls_token", "pos_embed")
                or n.endswith(".bias") or ".norm" in n or n.startswith("norm.")}
    assert {"pos_block.0.proj.0.weight", "pos_block.2.proj.0.bias", "blocks.1.norm2.weight", "norm.weight",
            "cls_token"} <= official
    assert no_decay_names(model) == official
    opt = build_optimizer(model, OptimConfig())
    no_decay, decay = opt.param_groups
    by_id = {id(p): n for n, p in names.items()}
    assert {by_id[id(p)] for p in no_decay["params"]} == official and no_decay["weight_decay"] == 0.0
    assert {by_id[id(p)] for p in decay["params"]} == set(names) - official and decay["weight_decay"] == 0.05
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"} <= set(names) - official
    peg_w = {n for n in names if n.startswith("pos_block.") and n.endswith(".weight")}
    assert no_decay_names(model, decay_peg_weights=True) == official - peg_w
    assert all(p.ndim == 4 for n, p in names.items() if n in peg_w)   # depthwise conv kernels
    cfg, _ = load_train_config(RECIPES / "cpvt_ti.yaml", [], world_size=8)
    assert cfg.optim.decay_peg_weights is False   # the recipes keep the reference
    with pytest.raises(ConfigError, match=r"^optim\.decay_peg_weights: true needs implementation 'client'"):
        load_train_config(RECIPES / "cpvt_ti.yaml", ["optim.decay_peg_weights=true",
                                                     "optim.implementation=deepspeed"], world_size=8)
    assert isinstance(opt, torch.optim.AdamW)


def test_same_recipe_same_training_on_1_2_4_ranks():
    """The global batch, the LR schedule and the samples per optimizer step do not depend on the world size."""
    from pipeline.schedules import LRSchedule

    seen = {}
    for world in (1, 2, 4):
        cfg, ds = load_train_config(RECIPES / "cpvt_ti.yaml", [], world_size=world)
        micro, accum = cfg.data.batch_size, cfg.optim.grad_accum
        assert micro <= cfg.data.max_batch_per_gpu == 128 and micro % 2 == 0   # the cap; Mixup pairs samples
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (micro, accum)
        sched = LRSchedule(cfg.schedule.lr, cfg.run.epochs)
        lrs = [sched(t, micro * accum * world) for t in (0.0, 2.5, 5.0, 150.0, 299.9)]
        seen[world] = (ds["train_batch_size"], micro * accum * world, lrs)
    assert seen[1] == seen[2] == seen[4]
    assert seen[1][0] == 1024 and seen[1][2][2] == pytest.approx(5e-4 * 1024 / 512)   # peak lr 1e-3
    assert [load_train_config(RECIPES / "cpvt_ti.yaml", [], w)[0].optim.grad_accum for w in (1, 2, 4, 8, 32)] == \
        [8, 4, 2, 1, 1]


def test_derive_batch_refuses_with_the_numbers():
    from pipeline.config import derive_batch

    assert derive_batch(1024, 32, max_micro=128).line() == \
        "global batch 1024 = per-rank batch 32 x accumulation 1 x 32 ranks"
    with pytest.raises(ConfigError) as e:
        load_train_config(RECIPES / "cpvt_b.yaml", [], world_size=3)
    assert _one_line(e) == ("data.global_batch_size: global batch 1024 cannot be split over 3 ranks (1024 is not "
                            "divisible by 3); world sizes that can: [1, 2, 4, 8, 16, 32, 64, 128, 256]")
    with pytest.raises(ConfigError, match=r"^data\.global_batch_size: 6 cannot be formed on world size 2 as micro x "
                                          r"accumulation x 2 with micro <= 2 \(data\.max_batch_per_gpu\) and an "
                                          r"even micro-batch"):
        derive_batch(6, 2, max_micro=2, even=True)
    assert derive_batch(6, 2, max_micro=2).micro == 1   # 6 = 1 x 3 x 2 without the Mixup rule
    # a per-rank batch on the command line (smoke runs, benchmarks) turns the recipe's global batch off ...
    cfg, ds = load_train_config(RECIPES / "cpvt_ti.yaml", ["data.batch_size=64"], world_size=8)
    assert (cfg.data.global_batch_size, cfg.data.batch_size, ds["train_batch_size"]) == (None, 64, 512)
    # ... but not the schedule's global per-resolution batches silently
    with pytest.raises(ConfigError, match=r"^schedule\.resolution\.batch_sizes: \[\[160, 1536\], \[192, 1280\], "
                                          r"\[224, 1024\]\] are the recipe's global batches"):
        load_train_config(RECIPES / "cpvt_ti_peg0-4_progressive.yaml", ["data.batch_size=64"], world_size=8)


def test_progressive_batches_are_global_too():
    """[[160, 1536], [192, 1280], [224, 1024]] global; the cap grows at lower resolutions (same tokens per GPU)."""
    for world, accum, per_rank in ((32, 1, [(160, 48), (192, 40), (224, 32)]),
                                   (8, 1, [(160, 192), (192, 160), (224, 128)]),
                                   (4, 2, [(160, 192), (192, 160), (224, 128)])):
        cfg, ds = load_train_config(RECIPES / "cpvt_ti_peg0-4_progressive.yaml", [], world_size=world)
        assert (cfg.optim.grad_accum, list(cfg.schedule.resolution.batch_sizes)) == (accum, per_rank), world
        assert ds["train_batch_size"] == 1024
        assert [b * accum * world for _, b in per_rank] == [1536, 1280, 1024]


def test_loader_workers_fit_the_cpus():
    from pipeline.config import DataConfig
    from pipeline.data.workers import fit_num_workers, task_cpus

    assert fit_num_workers(DataConfig(num_workers=8), 2) == (
        DataConfig(num_workers=2), "data.num_workers: 8 lowered to 2, the CPUs this rank may use (its CPU affinity)")
    assert fit_num_workers(DataConfig(num_workers=None), 12)[0].num_workers == 11
    assert fit_num_workers(DataConfig(num_workers=0), 1) == (DataConfig(num_workers=0), None)
    mine = len(os.sched_getaffinity(0))
    assert task_cpus({}) == mine
    assert task_cpus({"LOCAL_WORLD_SIZE": "2"}) == (max(1, mine // 2) if mine >= os.cpu_count() else mine)


ISSUE_BAD_INPUTS = [   # what a new user typed (issue 15); each must stop with one line, exit 2, no process group
    (["model.peg_positions=[13]"], "model.peg_positions[0]: 13 is out of range for depth 12"),
    (["--resume", "/nonexistent/ckpt"], "checkpoint.resume: /nonexistent/ckpt is not a complete checkpoint"),
    (["eval.resolutions=[100]"], "eval.resolutions[0]: 100 must be a multiple of the patch size 16"),
    (["aug.auto_augment=rand-zz"], "aug.auto_augment: 'rand-zz' is not a timm auto-augment spec"),
    (["aug.mixup=2"], "aug.mixup: 2.0 must be in [0.0, 1.0]"),
    # issue 23: a URL without its bucket is named at once (it failed after the retries, as 's3:/classes.json')
    (["--data", "s3://"], "data.root: 's3://' is not a valid s3 URL: it names no bucket (s3://BUCKET/prefix)"),
]


def _cli_stops_at_config(monkeypatch, capsys, argv: list[str]) -> str:
    """``pipeline/train.py ARGV`` through the CLI entry point in this process, as rank 0 of 2 whose peer never
    comes (reaching the process group would hang): it must exit 2; returns what it printed on stderr."""
    from pipeline import train

    monkeypatch.setenv("CPVT_SITE", "")
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["pipeline/train.py", *argv])
    assert train.cli() == train.EXIT_CONFIG
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", ISSUE_BAD_INPUTS)
def test_issue_bad_inputs_stop_before_the_process_group(tiny_data, tmp_path, monkeypatch, capsys, extra, needle):
    """``pipeline/train.py --recipe cpvt_ti --data D`` (FFCV, workers from the CPUs) plus one bad value, through the
    CLI entry point in this process: one line, exit 2, no process group, nothing written."""
    import torch.distributed as dist

    err = _cli_stops_at_config(monkeypatch, capsys, ["--recipe", "cpvt_ti", "--data", str(tiny_data), "--run-dir",
                                                     str(tmp_path / "run"), "data.num_workers=64", *extra])
    assert err.startswith(f"config error: {needle}") and err.count("\n") == 1, err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_a_damaged_wds_index_stops_before_the_process_group(tiny_data, tmp_path, monkeypatch, capsys):
    """A corrupt ``wds/_info.json`` (issue 23: reported only after the engine was built) is read with the config:
    one line naming the file, exit 2, no process group, nothing written."""
    import torch.distributed as dist

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("ffcv"))
    (data / "wds" / "_info.json").write_text('{"splits": {"train": ')   # cut off mid-write
    err = _cli_stops_at_config(monkeypatch, capsys, ["--recipe", "cpvt_ti", "--data", str(data), "--run-dir",
                                                     str(tmp_path / "run"), "data.format=wds"])
    assert err.startswith(f"config error: data.root: {data}/wds/_info.json is not valid JSON") and \
        err.count("\n") == 1, err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_shard_stops_before_the_process_group(tiny_data, tmp_path, monkeypatch, capsys, damage):
    """A train shard cut to half its size (issue 23: a 40-line ``TarFormatError`` traceback 20 s into the epoch)
    or a missing val shard: the shard sizes are checked against ``_info.json`` with the config, one line naming
    the shard and ``python -m data_prep verify``, exit 2, no process group, nothing written."""
    import torch.distributed as dist

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("ffcv"))
    split, shard = ("train", data / "wds" / "train-000001.tar") if damage == "truncate" else \
        ("val", data / "wds" / "val-000000.tar")
    size = shard.stat().st_size
    n = len(json.loads((data / "wds" / "_info.json").read_text())["splits"][split]["filenames"])
    if damage == "truncate":
        os.truncate(shard, size // 2)
        what = f"{shard} ({size // 2} bytes, _info.json says {size})"
    else:
        shard.unlink()
        what = f"{shard} (missing)"
    err = _cli_stops_at_config(monkeypatch, capsys, ["--recipe", "cpvt_ti", "--data", str(data), "--run-dir",
                                                     str(tmp_path / "run"), "data.format=wds"])
    assert err == (f"config error: data.root: 1 of {n} {split} shards do not match _info.json: {what}; check "
                   f"them with `python -m data_prep verify {data}` and rewrite them with `python -m data_prep "
                   f"wds`\n"), err
    assert not dist.is_initialized() and not (tmp_path / "run").exists()


def test_too_many_workers_hide_no_later_check(tiny_data, tmp_path):
    """The issue's case as a subprocess: 64 FFCV threads on this machine used to die in numba ("number of threads
    must be between 1 and N") after the process group started, hiding every later check; the checks now all run
    first (the worker count is fitted to the CPUs afterwards, before FFCV is imported)."""
    run_dir = tmp_path / "run"
    env = job_env() | {"CPVT_SITE": "", "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    bad = subprocess.run([sys.executable, "pipeline/train.py", "--recipe", "cpvt_ti", "--data", str(tiny_data),
                          "--run-dir", str(run_dir), "data.num_workers=64", "eval.resolutions=[100]"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=180)
    assert bad.returncode == 2 and bad.stderr.startswith("config error: eval.resolutions[0]: 100"), bad.stderr
    assert bad.stderr.count("\n") == 1 and not run_dir.exists()


def _site_with_recipe(tmp_path: Path, data_root: Path, **recipe_data) -> Path:
    """A site file giving the data root, and a site recipe folder whose cpvt_ti.yaml narrows the shipped one."""
    import yaml

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "cpvt_ti.yaml").write_text(yaml.safe_dump({"_base_": str(RECIPES / "cpvt_ti.yaml"),
                                                                        **recipe_data}))
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"data_root": str(data_root), "recipe_dirs": [str(tmp_path / "recipes")],
                                    "runs_root": str(tmp_path / "runs"),
                                    "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}))
    return site


def test_model_flag_selects_the_recipe_and_the_site_gives_the_data(tmp_path, tiny_data):
    from pipeline import train

    site = tmp_path / "site.yaml"
    site.write_text(f"data_root: {tiny_data}\n")
    argv = ["--local_rank=0", "--deepspeed_config", "deepspeed_configs/zero2.json", "--model", "cpvt_b"]
    cmd = train.parse_args(argv, environ={"CPVT_SITE": str(site)})
    assert cmd.recipe == str(RECIPES / "cpvt_b.yaml")
    assert cmd.notes[0].startswith(f"recipe {RECIPES / 'cpvt_b.yaml'} (the paper's recipe for --model cpvt_b")
    cfg, ds = load_train_config(cmd.recipe, cmd.overrides, 8, defaults=cmd.defaults)
    assert (cfg.model.name, cfg.data.root, cfg.aug.repeats, ds["train_batch_size"]) == ("cpvt_b", str(tiny_data), 3,
                                                                                        1024)
    explicit = train.parse_args(["--recipe", "cpvt_ti", "--model", "cpvt_b"], environ={"CPVT_SITE": ""})
    assert explicit.recipe == "cpvt_ti" and "model.name=cpvt_b" in explicit.overrides and explicit.defaults == {}


@pytest.mark.slow
def test_card_command_deepspeed_train_py_with_a_site_file(tmp_path, tiny_data):
    """``deepspeed pipeline/train.py --deepspeed_config C --model cpvt_ti`` with only a site file (data root, a
    site recipe narrowing the shipped cpvt_ti to this CPU: 2 blocks, 32 px, global batch 16, one step)."""
    site = _site_with_recipe(tmp_path, tiny_data, model={"kwargs": {"embed_dim": 48, "depth": 2, "num_heads": 2}},
                             data={"format": "wds", "global_batch_size": 16, "max_batch_per_gpu": 8,
                                   "num_workers": 0, "shuffle_buffer": 16, "shuffle_initial": 4},
                             schedule={"resolution": {"kind": "fixed", "resolution": 32}},
                             eval={"every_epochs": 0, "resolutions": [32], "max_batches": 1},
                             tracking={"system_metrics": False}, run={"max_steps": 1, "progress_bar": False})
    from pipeline.net import free_port
    from tests.helpers_train import DEEPSPEED

    env = job_env() | {"CPVT_SITE": str(site)}
    proc = subprocess.run([DEEPSPEED, "--num_gpus", "1", "--master_port", str(free_port()), "pipeline/train.py",
                           "--deepspeed_config",
                           "deepspeed_configs/zero2.json", "--model", "cpvt_ti"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert f"config: recipe {tmp_path / 'recipes' / 'cpvt_ti.yaml'} (the site's" in proc.stdout
    assert "config: batch: global batch 16 = per-rank batch 8 x accumulation 2 x 1 ranks" in proc.stdout
    final = json.loads((tmp_path / "runs" / "default" / "final_metrics.json").read_text())
    assert (final["global_step"], final["exit_code"]) == (1, 0)
