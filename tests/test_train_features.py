"""Training features that the ZeRO / resume tests do not reach, each checked on real jobs over the tiny dataset:

* the ``deepspeed`` launcher with the README's command line (2 ranks), training end to end on the FFCV loader
  (every other training test reads WebDataset): loss goes down, accuracy recorded, checkpoint + export,
* the EMA of weights: kept in fp32, updated with the configured decay after every optimizer step, saved in the
  checkpoint, evaluated at the training resolution as the trainer says (``eval_ema/top1``), and restored by
  ``--resume auto`` so that a resumed job ends with the EMA (and weights) of an uninterrupted one,
* checkpoint retention "last K + best": exactly which folders remain, ``best.json``, and ``--resume auto``
  picking the newest complete one,
* ``pipeline/evaluate.py`` as a command, over a checkpoint, a run directory and an export, at 2 resolutions, in
  1 process, under ``torchrun --nproc_per_node 2`` and under ``deepspeed --num_gpus 2``: the numbers agree with
  each other and with the trainer's own final evaluation, and every val sample is counted exactly once; it
  evaluates with the run's own (non-default) eval settings, and ``--ema`` / ``pipeline.export --ema`` give the
  trainer's ``eval_ema/top1`` exactly,
* a crashing trainer: its MLflow run ends FAILED with the error recorded (KILLED on Ctrl-C), and no torch
  function keeps the process group alive through a default argument.

The EMA / retention / evaluate checks use a WebDataset run: FFCV training is not bitwise reproducible (FFCV's
random crop draws from numba's unseeded per-thread RNGs, see pipeline/data/ffcv_loader.py), and exact resume
is what the EMA check needs.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline import checkpointing
from pipeline.net import free_port
from tests.helpers_tracking import runs_of, suite_store
from tests.helpers_train import (DEEPSPEED, NUM_CLASSES, PY, ROOT, TORCHRUN, TRAIN_PER_CLASS, VAL_PER_CLASS,
                                 data_with_damaged_shard, final_params, job_env, model_states, run_job,
                                 run_train, step_losses, tiny_data, tiny_recipe, train_cmd)  # noqa: F401

pytestmark = pytest.mark.slow

VAL_SIZE = NUM_CLASSES * VAL_PER_CLASS                 # 16
STEPS_PER_EPOCH = NUM_CLASSES * TRAIN_PER_CLASS // 8   # 32 train images, global batch 8
EPOCHS = 3
TOTAL_STEPS = STEPS_PER_EPOCH * EPOCHS                 # 12
TRAIN_RES, TEST_RES = 32, 48                           # the tiny recipe: fixed 32 px, evaluated also at 48 px
KEEP_LAST = 2
EMA_DECAY = 0.8

# One rank, ZeRO-2 bf16, EMA on, an evaluation (so a best-checkpoint candidate) at every epoch end, a checkpoint
# after every step and only the last 2 (+ the best) kept. Non-default eval settings (pipeline.evaluate must take
# them from the run's config).
EVAL_SETTINGS = "crop_pct=0.75 interpolation=bilinear mean=[0.45, 0.45, 0.45] std=[0.25, 0.25, 0.25]"
EMA_RUN = ("data.batch_size=8", "run.ema=true", f"run.ema_decay={EMA_DECAY}", "eval.every_epochs=1",
           "checkpoint.every_steps=1", f"checkpoint.keep_last={KEEP_LAST}", f"run.epochs={EPOCHS}",
           "aug.crop_pct=0.75", "aug.eval_interpolation=bilinear", "aug.mean=[0.45,0.45,0.45]",
           "aug.std=[0.25,0.25,0.25]")


def _step_dirs(ckpt_dir) -> dict[int, bool]:
    """{step: complete?} of every step_* folder under ``ckpt_dir``."""
    return {int(p.name.split("_")[1]): checkpointing.is_complete(p) for p in ckpt_dir.iterdir()
            if p.name.startswith("step_")}


def _mlflow_history(run_dir, key: str) -> dict[int, float]:
    import mlflow

    final = json.loads((run_dir / "final_metrics.json").read_text())
    mlflow.set_tracking_uri(suite_store())
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(final["mlflow_run_id"], key)}


def _ckpt(run_dir, step: int):
    return run_dir / "checkpoints" / checkpointing.tag_for(step)


@pytest.fixture(scope="module")
def ema_run(tiny_data, tiny_recipe, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    return run_dir, run_train(1, tiny_recipe, tiny_data, run_dir, "zero2_bf16", *EMA_RUN)


@pytest.fixture(scope="module")
def launcher_run(tiny_data, tiny_recipe, tmp_path_factory):  # noqa: F811
    """The README's command ``deepspeed --num_gpus 2 pipeline/train.py --deepspeed_config ...``, on FFCV. Without
    GPUs DeepSpeed's launcher still spawns 2 local processes (RANK/LOCAL_RANK/WORLD_SIZE + ``--local_rank``);
    the trainer runs them on gloo with DeepSpeed's CPU accelerator."""
    run_dir = tmp_path_factory.mktemp("launcher") / "run"
    proc = run_job([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "pipeline/train.py",
                    "--deepspeed_config", "deepspeed_configs/zero2.json", "--recipe", str(tiny_recipe),
                    "--data", str(tiny_data), "--run-dir", str(run_dir), "data.format=ffcv",
                    f"run.epochs={EPOCHS}", "checkpoint.every_steps=0"])
    return run_dir, proc


# ----------------------------------------------------------------------------------------- launcher + FFCV
def test_deepspeed_launcher_two_ranks(launcher_run):
    import mlflow

    run_dir, proc = launcher_run
    out = proc.stdout + proc.stderr
    assert "world=2" in out and out.count("exits successfully") == 2, out[-3000:]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["world_size"] == 2 and final["exit_code"] == 0
    ckpt = _ckpt(run_dir, TOTAL_STEPS)
    assert final["checkpoint"] == str(ckpt) and checkpointing.is_complete(ckpt)
    assert sorted(p.name.removeprefix("bf16_") for p in ckpt.glob("*optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]   # ZeRO-2 partitions of 2 ranks
    assert sorted(p.name for p in ckpt.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    mlflow.set_tracking_uri(suite_store())
    runs = runs_of(run_dir)
    assert len(runs) == 1 and runs[0].info.run_id == final["mlflow_run_id"]   # rank 1 created no run
    p = runs[0].data.params
    assert p["world_size"] == "2" and p["deepspeed.train_batch_size"] == "8" and p["data.batch_size"] == "4"
    assert p["data.format"] == "ffcv"


def test_ffcv_training_end_to_end(launcher_run, tmp_path):
    from pipeline.export import export, load_export

    run_dir, proc = launcher_run
    assert "format: ffcv" in (run_dir / "train_config.yaml").read_text()
    losses = step_losses(proc.stdout)
    assert len(losses) == TOTAL_STEPS, proc.stdout[-2000:]
    assert all(math.isfinite(x) for x in losses), losses
    first, last = losses[:STEPS_PER_EPOCH], losses[-STEPS_PER_EPOCH:]
    assert sum(last) / len(last) < sum(first) / len(first) - 0.05, f"loss did not decrease: {losses}"

    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["global_step"] == TOTAL_STEPS
    assert set(final["eval"]) == {str(TRAIN_RES), str(TEST_RES)}
    for r in final["eval"].values():
        assert r["n"] == VAL_SIZE and 0.0 <= r["top1"] <= r["top5"] <= 100.0 and math.isfinite(r["loss"])
    assert _mlflow_history(run_dir, "eval/top1") == {TOTAL_STEPS: final["eval"][str(TRAIN_RES)]["top1"]}
    assert set(_mlflow_history(run_dir, "train/loss")) == set(range(1, TOTAL_STEPS + 1))

    out = export(run_dir, tmp_path / "model.safetensors")
    model, meta = load_export(out)
    assert meta["checkpoint"] == str(_ckpt(run_dir, TOTAL_STEPS).resolve())
    want, got = final_params(run_dir), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ----------------------------------------------------------------------------------------- EMA
def test_ema_is_fp32_follows_the_decay_and_is_saved(ema_run):
    run_dir, _ = ema_run
    prev, last = model_states(_ckpt(run_dir, TOTAL_STEPS - 1)), model_states(_ckpt(run_dir, TOTAL_STEPS))
    live = final_params(run_dir)  # fp32 master weights
    ema, ema_prev, module = last["ema"], prev["ema"], last["module"]
    assert ema.keys() == live.keys()
    moved = 0.0
    for k, v in ema.items():
        assert v.dtype == torch.float32, f"{k}: EMA kept in {v.dtype}"
        # one EMA step: ema_t = d * ema_{t-1} + (1 - d) * (the engine's weights after step t)
        want = ema_prev[k] * EMA_DECAY + module[k].float() * (1 - EMA_DECAY)
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        moved = max(moved, float((v - ema_prev[k]).abs().max()))
    assert moved > 1e-4, "the EMA did not move in the last step"
    assert max(float((ema[k] - live[k]).abs().max()) for k in live) > 1e-3, "EMA weights equal the live weights"


def test_ema_is_evaluated_at_the_training_resolution(ema_run):
    """The trainer logs ``eval_ema/top1`` at every evaluation: it must be the top-1 of the saved EMA weights."""
    import timm
    import yaml

    import pipeline.models  # noqa: F401
    from pipeline import evaluate as evaluation
    from pipeline.config import TrainConfig, from_dict
    from pipeline.export import checkpoint_model_spec

    run_dir, proc = ema_run
    hist = _mlflow_history(run_dir, "eval_ema/top1")
    assert sorted(hist) == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    ckpt = _ckpt(run_dir, TOTAL_STEPS)
    name, kwargs = checkpoint_model_spec(ckpt)
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(model_states(ckpt)["ema"])
    cfg = from_dict(TrainConfig, yaml.safe_load((ckpt / "train_config.yaml").read_text()))
    res = evaluation.evaluate(model.eval(), cfg.data, resolutions=(TRAIN_RES,), rank=0, world_size=1,
                              crop_pct=cfg.aug.crop_pct, device=torch.device("cpu"), aug_cfg=cfg.aug,
                              patch_size=model.patch_size)
    assert res[TRAIN_RES]["n"] == VAL_SIZE
    assert hist[TOTAL_STEPS] == pytest.approx(res[TRAIN_RES]["top1"])
    assert f"EMA top-1 at {TRAIN_RES}px: {res[TRAIN_RES]['top1']:.2f}" in proc.stdout


def test_resume_restores_the_ema_exactly(ema_run, tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    """A job restarted from the uninterrupted run's step-11 checkpoint (a crash after it: step 12's folder has
    no completeness marker) ends with exactly that run's EMA and weights: the EMA comes back from the checkpoint
    and keeps following the same updates."""
    full, full_proc = ema_run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for step in (TOTAL_STEPS - 1, TOTAL_STEPS):
        shutil.copytree(_ckpt(full, step), _ckpt(resumed, step))
    (_ckpt(resumed, TOTAL_STEPS) / checkpointing.MARKER).unlink()

    proc = run_train(1, tiny_recipe, tiny_data, resumed, "zero2_bf16", "--resume", "auto", *EMA_RUN,
                     "tracking.enabled=false")
    assert f"resumed from {_ckpt(resumed, TOTAL_STEPS - 1)} " in proc.stdout
    assert step_losses(proc.stdout) == step_losses(full_proc.stdout)[-1:]   # one step left, the same loss
    want = model_states(_ckpt(full, TOTAL_STEPS))["ema"]
    got = model_states(_ckpt(resumed, TOTAL_STEPS))["ema"]
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"EMA {k}: max diff {float((want[k] - got[k]).abs().max())}"
    a, b = final_params(full), final_params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- retention
def test_epoch_time_is_each_epochs_own(ema_run):
    """``epoch/time_s`` is the time of that epoch alone (its steps, evaluation and save), not the time since the
    run started: the epochs' times add up to at most the run's wall time (running totals would exceed it)."""
    run_dir, _ = ema_run
    times = _mlflow_history(run_dir, "epoch/time_s")
    assert sorted(times) == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)], times
    wall = json.loads((run_dir / "final_metrics.json").read_text())["wall_time_s"]
    assert all(t > 0 for t in times.values()) and sum(times.values()) <= wall, (times, wall)


def test_retention_keeps_last_k_plus_best(ema_run):
    """12 checkpoints saved, kept: the last 2 and the best by eval top-1 at the training resolution (on this
    deterministic WebDataset run the best is epoch 1's, step 8, older than the last 2)."""
    run_dir, _ = ema_run
    ckpts = run_dir / "checkpoints"
    top1 = _mlflow_history(run_dir, "eval/top1")                      # epoch ends: steps 4, 8, 12
    assert sorted(top1) == [STEPS_PER_EPOCH * (e + 1) for e in range(EPOCHS)]
    best_value = max(top1.values())
    best_step = min(s for s, v in top1.items() if v == best_value)   # a later tie does not replace the best
    want = set(range(TOTAL_STEPS - KEEP_LAST + 1, TOTAL_STEPS + 1)) | {best_step}
    assert _step_dirs(ckpts) == {s: True for s in want}              # 12 saved, nothing else left behind
    assert json.loads((ckpts / "best.json").read_text()) == {"tag": checkpointing.tag_for(best_step),
                                                            "metric": best_value}
    marker = json.loads((ckpts / checkpointing.tag_for(best_step) / checkpointing.MARKER).read_text())
    assert (marker["step"], marker["metric"]) == (best_step, best_value)   # (+ the layout: pipeline.resume)
    assert checkpointing.resolve_resume("auto", ckpts) == _ckpt(run_dir, TOTAL_STEPS)


# ----------------------------------------------------------------------------------------- evaluate.py
def test_evaluate_command_checkpoint_and_export_1_and_2_processes(ema_run, tiny_data, tmp_path):  # noqa: F811
    """Over the final checkpoint in one process, over its export under torchrun with 2 processes and over the run
    directory (-> newest complete checkpoint) under the deepspeed launcher with 2 processes: the same numbers at
    both resolutions, each val sample counted once, and the trainer's own final evaluation of the same weights
    (in bf16) within one flipped prediction."""
    from pipeline.export import export

    run_dir, _ = ema_run
    final = json.loads((run_dir / "final_metrics.json").read_text())
    ckpt = _ckpt(run_dir, TOTAL_STEPS)
    exported = export(ckpt, tmp_path / "model.safetensors")
    common = ["--data", str(tiny_data), "--workers", "0", "--resolutions", str(TRAIN_RES), str(TEST_RES)]

    jobs = {  # 2 processes with batches of 3 / 5: each rank's 8 samples end in a padded batch
        "single": [PY, "pipeline/evaluate.py", str(ckpt), *common],
        "torchrun": [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), "pipeline/evaluate.py",
                     str(exported), *common, "--batch-size", "3"],
        "deepspeed": [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "pipeline/evaluate.py",
                      str(run_dir), *common, "--batch-size", "5"],
    }
    procs, results = {}, {}
    for name, cmd in jobs.items():
        procs[name] = run_job([*cmd, "--json", str(tmp_path / f"{name}.json")])
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    a = results["single"]
    assert set(a) == {str(TRAIN_RES), str(TEST_RES)}
    for res in a:
        trainer = final["eval"][res]
        for name, b in results.items():
            assert b[res]["n"] == VAL_SIZE, name   # each val sample exactly once, padding ignored
            assert (b[res]["top1"], b[res]["top5"]) == (a[res]["top1"], a[res]["top5"]), name
            assert b[res]["loss"] == pytest.approx(a[res]["loss"], rel=1e-5), name
        # the trainer evaluated the same weights in bf16: at most one of the 16 predictions may flip
        assert abs(a[res]["top1"] - trainer["top1"]) <= 100.0 / VAL_SIZE + 1e-9, (a[res], trainer)
        assert a[res]["loss"] == pytest.approx(trainer["loss"], abs=0.05)
    for name, path in (("single", ckpt), ("torchrun", exported), ("deepspeed", run_dir)):
        out = procs[name].stdout
        # rank 0 prints
        assert out.count("cpvt_ti from") == 1 and f"cpvt_ti from {path}, center_crop evaluation\n" in out, out[-2000:]
        rows = {int(line.split()[0]): line.split() for line in out.splitlines()
                if line.strip() and line.split()[0].isdigit()}
        assert set(rows) == {TRAIN_RES, TEST_RES}
        for res, cols in rows.items():
            assert float(cols[1]) == pytest.approx(a[str(res)]["top1"], abs=0.005) and int(cols[3]) == VAL_SIZE


def _settings_line(out: str) -> str:
    [line] = [x for x in out.splitlines() if x.startswith("eval settings (")]
    return line


@pytest.fixture(scope="module")
def ema_eval(ema_run, tmp_path_factory):
    """``pipeline/evaluate.py RUN --ema`` with no other flags: (stdout, results)."""
    run_dir, _ = ema_run
    out = tmp_path_factory.mktemp("ema_eval") / "ema.json"
    proc = run_job([PY, "pipeline/evaluate.py", str(run_dir), "--ema", "--json", str(out)])
    return proc.stdout, json.loads(out.read_text())


def test_evaluate_uses_the_runs_eval_settings(ema_run, ema_eval, tiny_data, tmp_path, capsys):  # noqa: F811
    """Without flags the command evaluates like the trainer (the run's crop_pct, interpolation, mean/std, data
    section and resolutions), so over the same fp32 weights (the EMA) it gives the trainer's top-1 exactly; a
    flag overrides one setting; an export carries the settings; an export without them uses the defaults."""
    from safetensors.torch import load_file, save_file

    from pipeline import evaluate, export

    run_dir, _ = ema_run
    stdout, results = ema_eval
    ckpt = _ckpt(run_dir, TOTAL_STEPS)
    assert _settings_line(stdout) == (f"eval settings (from {ckpt}/train_config.yaml): {EVAL_SETTINGS} "
                                      f"resolutions=[{TRAIN_RES}, {TEST_RES}] format=wds val_split=val batch_size=8 "
                                      f"dtype=float32 channels_last=False jpeg_draft=True mode=center_crop")
    assert results[str(TRAIN_RES)]["top1"] == _mlflow_history(run_dir, "eval_ema/top1")[TOTAL_STEPS]
    assert set(results) == {str(TRAIN_RES), str(TEST_RES)} and results[str(TEST_RES)]["n"] == VAL_SIZE

    # --crop-pct 0.875 (the default): only that setting changes, and so do the inputs (the loss moves)
    evaluate.main([str(run_dir), "--ema", "--crop-pct", "0.875", "--resolutions", str(TRAIN_RES),
                   "--json", str(tmp_path / "crop.json")])
    line = _settings_line(capsys.readouterr().out)
    assert line.startswith(f"eval settings (from {ckpt}/train_config.yaml; command line: aug.crop_pct, resolutions): "
                           f"crop_pct=0.875 interpolation=bilinear mean=[0.45, 0.45, 0.45]"), line
    crop = json.loads((tmp_path / "crop.json").read_text())[str(TRAIN_RES)]
    assert abs(crop["loss"] - results[str(TRAIN_RES)]["loss"]) > 1e-3, (crop, results)

    # an export carries the run's settings: the same numbers; without them (an older export): the defaults
    exported = export.export(run_dir, tmp_path / "model_ema.safetensors", ema=True)
    evaluate.main([str(exported), "--json", str(tmp_path / "export.json")])
    assert f"eval settings (from {exported} (export metadata)): {EVAL_SETTINGS} " in capsys.readouterr().out
    for res, r in json.loads((tmp_path / "export.json").read_text()).items():
        assert (r["top1"], r["top5"], r["n"]) == (results[res]["top1"], results[res]["top5"], results[res]["n"])
        assert r["loss"] == pytest.approx(results[res]["loss"], rel=1e-5)
    meta = export.read_meta(exported)
    del meta["train_config"]
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(exported)), str(bare), metadata={"cpvt": json.dumps(meta)})
    evaluate.main([str(bare), "--data", str(tiny_data), "--resolutions", str(TRAIN_RES), "--workers", "0"])
    assert _settings_line(capsys.readouterr().out) == (
        f"eval settings (defaults: no training config stored with {bare}; command line: data.num_workers, "
        f"resolutions): crop_pct=0.875 interpolation=bicubic mean=[0.485, 0.456, 0.406] std=[0.229, 0.224, 0.225] "
        f"resolutions=[{TRAIN_RES}] format=wds val_split=val batch_size=128 dtype=float32 channels_last=False "
        f"jpeg_draft=True mode=center_crop")


def test_ema_export_and_evaluate(ema_run, ema_eval, tmp_path):
    """``pipeline.export RUN --ema``: exactly the checkpoint's EMA tensors, a strict timm load like the normal
    export; ``pipeline.evaluate RUN --ema`` scores them: the trainer's ``eval_ema/top1`` of that step."""
    import timm
    from safetensors.torch import load_file

    import pipeline.models  # noqa: F401
    from pipeline import export

    run_dir, _ = ema_run
    assert export.main([str(run_dir), "--ema", "--out", str(tmp_path / "model_ema.safetensors")]) == 0
    want = model_states(_ckpt(run_dir, TOTAL_STEPS))["ema"]
    got = load_file(str(tmp_path / "model_ema.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    meta = json.loads((tmp_path / "model_ema.json").read_text())
    assert (meta["model"], meta["weights"]) == ("cpvt_ti", "ema")
    model = timm.create_model(meta["model"], **{**meta["model_kwargs"],
                                                "peg_positions": tuple(meta["model_kwargs"]["peg_positions"])})
    model.load_state_dict(got)  # strict

    stdout, results = ema_eval
    assert f"cpvt_ti from {run_dir} (EMA weights), center_crop evaluation\n" in stdout
    assert results[str(TRAIN_RES)]["n"] == VAL_SIZE
    assert results[str(TRAIN_RES)]["top1"] == _mlflow_history(run_dir, "eval_ema/top1")[TOTAL_STEPS]


# ----------------------------------------------------------------------------------------- a crashing trainer
_CRASH_PROBE = """
import sys, types
import torch.distributed as dist
from pipeline import train
rc = train.cli()
held = sorted(f"{m}.{n}" for m, mod in list(sys.modules.items()) if m.startswith("torch.distributed")
              for n, f in list(vars(mod).items()) if isinstance(f, types.FunctionType)
              and any(isinstance(d, dist.ProcessGroup) for d in f.__defaults__ or ()))
print("process group in the defaults of:", held)
sys.exit(rc)
"""


def test_crashed_training_ends_its_mlflow_run_failed(tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    """The trainer started directly (no launcher) on a data folder with a damaged shard of the right size --
    found only when the reader reaches it, after the MLflow run started and a checkpoint was saved: one line
    naming the shard, what to check and the checkpoint to resume from, exit :data:`EXIT_SHARD`, no traceback;
    the run ends FAILED (not FINISHED by MLflow's atexit hook) with the error in its ``error`` tag. With the
    shard rewritten, ``--resume auto`` continues from that checkpoint to the end. The same process, after the
    trainer set up and destroyed its process group, has no torch function holding that group in a default
    argument (timm was imported before it)."""
    import mlflow

    from pipeline.checkpointing import read_meta
    from pipeline.train import EXIT_SHARD

    bad = data_with_damaged_shard(tiny_data, tmp_path / "data")
    run_dir = tmp_path / "run"
    cmd = train_cmd(1, tiny_recipe, bad, run_dir, "zero2")
    proc = subprocess.run([PY, "-c", _CRASH_PROBE, *cmd[2:]], cwd=ROOT, env=job_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == EXIT_SHARD, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    cause = f"{bad}/wds/train-000000.tar: tar header checksum mismatch (not a tar file, or damaged)"
    found = re.fullmatch(rf"error: a shard could not be read at step (\d+): {re.escape(cause)}\. Check the "
                         rf"shards with `python -m data_prep verify {re.escape(str(bad))}`, rewrite the damaged "
                         rf"ones, then resume from the last complete checkpoint (\S+) with --resume auto", line)
    assert found, line
    ckpt = Path(found.group(2))
    assert ckpt.parent == run_dir / "checkpoints" and (ckpt / "COMPLETE").is_file()
    assert 0 < read_meta(ckpt)["step"] <= int(found.group(1))
    assert "process group in the defaults of: []" in proc.stdout, proc.stdout[-3000:]
    mlflow.set_tracking_uri(suite_store())
    [run] = runs_of(run_dir)
    assert run.info.status == "FAILED" and run.data.tags["error"] == f"ShardReadError: {line[len('error: '):]}"
    assert run.data.params["data.root"] == str(bad)   # the run was under way when the shard failed

    shutil.copy(tiny_data / "wds" / "train-000000.tar", bad / "wds")
    resumed = run_job(train_cmd(1, tiny_recipe, bad, run_dir, "zero2", "checkpoint.resume=auto"))
    assert f"resumed from {ckpt}" in resumed.stdout, resumed.stdout[-3000:]


def test_interrupted_run_ends_killed(tmp_path):
    """Ctrl-C (KeyboardInterrupt) through the trainer's handler: KILLED; nothing to do without an open run."""
    import mlflow

    from pipeline import tracking

    tracking.end_run_after_error(KeyboardInterrupt())  # no run open: a no-op
    previous_uri = mlflow.get_tracking_uri()
    # a fresh store, and an explicit experiment in it: earlier tests in this process may have left another
    # store's experiment id as MLflow's process-wide default
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        experiment_id = mlflow.create_experiment("interrupted")
        run_id = mlflow.start_run(experiment_id=experiment_id).info.run_id
        try:
            tracking.end_run_after_error(KeyboardInterrupt())
        finally:
            if mlflow.active_run() is not None:
                mlflow.end_run()
        run = mlflow.get_run(run_id)
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert run.info.status == "KILLED" and run.data.tags["error"] == "KeyboardInterrupt"
