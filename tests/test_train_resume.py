"""Kill-and-resume exactness: a job SIGKILLed at an arbitrary step and restarted with ``--resume auto`` ends
with exactly the parameters of an uninterrupted run (1 and 2 ranks, ZeRO-2/3). Exactness is bitwise here:
on CPU every kernel and gloo's 2-rank all-reduce are deterministic, checkpoints hold the fp32 master weights
and optimizer state, RNG states per rank and the loader position, and the loader re-derives augmentation from
(seed, epoch, rank, batch). A newer checkpoint folder without its completeness marker (a crash during save)
must be ignored (DeepSpeed's ``latest`` keeps naming the complete one), and the resumed job continues the same
MLflow run."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline import checkpointing
from tests.helpers_train import final_params, run_and_kill, run_train, tiny_data, tiny_recipe  # noqa: F401

pytestmark = pytest.mark.slow

# 32 train images, global batch 8: 4 steps per epoch, 3 epochs; checkpoints every 3 steps + epoch ends.
# Random crops, flips and drop-path are on, so the RNG/loader state has to be restored too.
# Aspect buckets (64 px, crops' W/H in [1/2, 2]: 80x48, 64x64, 48x80, 48x96): each step's shape is drawn from
# (seed, epoch, step), so the resumed job has to find the same sequence mid-epoch.
BUCKETS = ("data.batch_size=4", "aug.aspect_buckets=true", "aug.ratio=[0.5,2.0]",
           "schedule.resolution.resolution=64")
CASES = [(1, "zero2", 7, ("data.batch_size=8",)), (2, "zero3", 5, ("data.batch_size=4",)), (2, "zero2", 6, BUCKETS)]


@pytest.mark.parametrize("nproc,ds,kill_at,overrides", CASES, ids=["1rank-zero2", "2rank-zero3", "2rank-buckets"])
def test_sigkill_then_resume_matches_uninterrupted(tiny_data, tiny_recipe, tmp_path, nproc, ds, kill_at,  # noqa: F811
                                                   overrides):
    full = tmp_path / "full"
    proc = run_train(nproc, tiny_recipe, tiny_data, full, ds, *overrides, timeout=900)
    if overrides == BUCKETS:
        assert "aspect buckets at 64 px (H x W), one per step: 80x48, 64x64, 48x80, 48x96" in proc.stdout

    killed = tmp_path / "killed"
    run_and_kill(nproc, tiny_recipe, tiny_data, killed, ds, kill_at, *overrides, timeout=900)
    ckpts = killed / "checkpoints"
    last = checkpointing.find_latest(ckpts)
    assert last is not None and checkpointing.tag_for(kill_at) != last.name
    # a crash in the middle of a newer save: shards on disk, but no completeness marker
    partial = ckpts / checkpointing.tag_for(kill_at + 100)
    shutil.copytree(last, partial)
    (partial / checkpointing.MARKER).unlink()
    assert checkpointing.find_latest(ckpts) == last
    assert (ckpts / checkpointing.LATEST).read_text() == last.name   # DeepSpeed's pointer: the complete one

    proc = run_train(nproc, tiny_recipe, tiny_data, killed, ds, "--resume", "auto", *overrides, timeout=900)
    assert f"resumed from {last}" in proc.stdout

    want, got = final_params(full), final_params(killed)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k}: max diff {float((want[k] - got[k]).abs().max())}"

    a = json.loads((full / "final_metrics.json").read_text())
    b = json.loads((killed / "final_metrics.json").read_text())
    assert a["global_step"] == b["global_step"] == 12
    assert a["eval"] == b["eval"]

    import mlflow

    from tests.helpers_tracking import runs_of, suite_store

    mlflow.set_tracking_uri(suite_store())
    runs = runs_of(killed)
    assert len(runs) == 1 and runs[0].info.run_id == b["mlflow_run_id"]
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(b["mlflow_run_id"], "train/loss")]
    assert max(steps) == 12 and set(range(1, 13)) <= set(steps)


def test_sigusr1_saves_and_exits_for_requeue(tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    """The preemption hook: SIGUSR1 -> checkpoint at the next step boundary, exit code EXIT_PREEMPTED."""
    import os
    import signal
    import subprocess

    from pipeline.train import EXIT_PREEMPTED
    from tests.helpers_train import ROOT, job_env, train_cmd

    run_dir = tmp_path / "preempt"
    cmd = train_cmd(1, tiny_recipe, tiny_data, run_dir, "zero1", "data.batch_size=8", "checkpoint.every_steps=0",
                    "tracking.enabled=false")
    p = subprocess.Popen(cmd, cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    for line in p.stdout:
        out.append(line)
        if line.startswith("step 2 "):
            os.kill(p.pid, signal.SIGUSR1)
    assert p.wait(timeout=120) == EXIT_PREEMPTED, "".join(out)[-3000:]
    last = checkpointing.find_latest(run_dir / "checkpoints")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["exit_code"] == EXIT_PREEMPTED and 2 <= final["global_step"] < 12  # 12 = a full run
    assert last is not None and last.name == checkpointing.tag_for(final["global_step"])
