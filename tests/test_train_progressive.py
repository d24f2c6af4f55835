"""A budgeted progressive-resolution run under DeepSpeed: 2 ranks, two stages at one global batch with a different
per-rank batch and accumulation (32 px: 4 x 1 step, 48 px: 2 x 2 steps, 8 samples per step), RandAugment rising
from magnitude 0 to 9 with the stages; SIGKILLed inside the second stage and resumed with ``--resume auto``, it
ends bitwise equal to the uninterrupted run (CPU kernels and gloo's 2-rank all-reduce are deterministic)."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import checkpointing
from tests.helpers_train import final_params, run_and_kill, run_train, tiny_data, tiny_recipe  # noqa: F401

pytestmark = pytest.mark.slow

# 32 train images, 8 per optimizer step: 4 steps per epoch. [32, 48] px at half the compute of 4 epochs at 48 px:
# 2 epochs at 32 px (cost 0.89) then 1 at 48 px (cumulative 1.89 of the 2 asked for) = 12 steps; checkpoints every
# 3 steps and at epoch ends, so step 9 is a checkpoint inside the second stage (epoch 2, its step 1)
BUDGETED = ("data.batch_size=2", "optim.grad_accum=2", "schedule.resolution.kind=budgeted",
            "schedule.resolution.resolution=48", "schedule.resolution.resolutions=[32,48]",
            "schedule.resolution.budget=0.5", "schedule.resolution.reference_epochs=4",
            "schedule.resolution.batch_sizes=[[32,4]]", "aug.auto_augment=rand-m9-mstd0.5-inc1",
            "aug.strength_ramp=stages", "eval.resolutions=[48]")


def test_budgeted_two_stage_run_resumes_bitwise_inside_the_second_stage(tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    full = tmp_path / "full"
    proc = run_train(2, tiny_recipe, tiny_data, full, "zero2", *BUDGETED, timeout=600)
    plan = [line.split() for line in proc.stdout.splitlines() if line.startswith("config:   ")]
    assert "config: budgeted schedule: 2 stages, 3 epochs, 0.472 of the compute of 4 epochs at 48 px" in proc.stdout
    # stage, res, epochs, per-rank batch, accumulation, global batch, tokens per step, RandAugment m, share
    assert [row[1:10] for row in plan[1:]] == [["1", "32", "0-1", "(2)", "4", "1", "8", "32", "0"],
                                              ["2", "48", "2-2", "(1)", "2", "2", "8", "72", "9"]], plan

    killed = tmp_path / "killed"
    run_and_kill(2, tiny_recipe, tiny_data, killed, "zero2", 10, *BUDGETED, timeout=600)
    last = checkpointing.find_latest(killed / "checkpoints")
    assert last is not None and last.name == checkpointing.tag_for(9)
    meta = checkpointing.read_meta(last)
    assert (meta["epoch"], meta["step_in_epoch"], meta["micro_batch"], meta["grad_accum"], meta["global_batch"]) \
        == (2, 1, 2, 2, 8)

    proc = run_train(2, tiny_recipe, tiny_data, killed, "zero2", "--resume", "auto", *BUDGETED, timeout=600)
    assert f"resumed from {last}" in proc.stdout

    want, got = final_params(full), final_params(killed)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k}: max diff {float((want[k] - got[k]).abs().max())}"
    a = json.loads((full / "final_metrics.json").read_text())
    b = json.loads((killed / "final_metrics.json").read_text())
    assert a["global_step"] == b["global_step"] == 12 and a["train_resolution"] == 48
    assert a["eval"] == b["eval"]

    import mlflow

    from tests.helpers_tracking import suite_store

    mlflow.set_tracking_uri(suite_store())
    client = mlflow.MlflowClient()
    run = client.get_run(a["mlflow_run_id"])
    assert run.data.params["plan.stages"] == "32x2 48x1" and run.data.params["plan.budget_share"] == "0.4722"
    rows = json.loads(open(client.download_artifacts(run.info.run_id, "config/progressive_plan.json",
                                                     str(tmp_path))).read())
    assert [(r["resolution"], r["per_rank_batch"], r["accumulation"], r["global_batch"]) for r in rows] == \
        [(32, 4, 1, 8), (48, 2, 2, 8)]
    # the lr follows the constant global batch on one curve; the resolution metric shows both stages
    res = [m.value for m in client.get_metric_history(a["mlflow_run_id"], "train/resolution")]
    assert set(res) == {32.0, 48.0}
    batches = {m.value for m in client.get_metric_history(a["mlflow_run_id"], "train/batch_global")}
    assert batches == {8.0}
