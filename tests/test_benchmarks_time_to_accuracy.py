"""bench_time_to_accuracy: the time-to-target interpolation, the FLOP accounting, the aggregation over seeds, the
run order, and a quick run whose result file is internally consistent (no accuracy or wall-clock thresholds)."""
from __future__ import annotations

import json
import math

import mlflow
import pytest
import torch

from benchmarks import bench_time_to_accuracy as tta
from benchmarks.bench_time_to_accuracy import (curve, data_wait_by_stage, epoch_metrics, forward_flops, ratio_cell,
                                               recipe_args, run_order, seed_stats, summarize, time_to_target)
from pipeline.config import load_train_config


@pytest.fixture(autouse=True)
def _no_global_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; keep it from leaking between tests."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def test_time_to_target_interpolates_between_epochs():
    xs, top1 = [0.0, 10.0, 20.0, 30.0], [10.0, 50.0, 70.0, 80.0]
    assert time_to_target(xs, top1, 60.0) == pytest.approx(15.0)
    assert time_to_target(xs, top1, 70.0) == pytest.approx(20.0)      # reached exactly at an epoch's end
    assert time_to_target(xs, top1, 30.0) == pytest.approx(5.0)       # from the untrained point
    assert time_to_target(xs, top1, 80.5) is None                     # never reached
    assert time_to_target(xs, [10.0, 75.0, 60.0, 90.0], 70.0) == pytest.approx(10 * 60 / 65)   # the first crossing
    assert time_to_target(xs, top1, 5.0) == 0.0


def test_forward_flops_counts_a_linear_layer():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(5))
    model(torch.zeros(1, 3, 8, 8))
    assert forward_flops(model, 8) == 2 * 3 * 8 * 8 * 5


def test_train_flops_grow_with_resolution():
    narrow = ["model.kwargs={embed_dim: 48, depth: 2, num_heads: 2}"]
    flops = tta.train_flops_per_image(tta.RECIPES / "demo.yaml", narrow, 10, [64, 32, 48, 64])
    assert list(flops) == [32, 48, 64]
    assert 0 < flops[32] < flops[48] < flops[64]
    # tokens: 4, 9, 16 patches (+ the class token); the FLOPs follow them, between linear and quadratic
    assert 16 / 4 * 0.7 < flops[64] / flops[32] < (16 / 4) ** 2


def test_curve_accumulates_time_and_flops():
    epochs = [{"resolution": 32, "train_s": 2.0, "top1": 30.0}, {"resolution": 64, "train_s": 5.0, "top1": 60.0}]
    c = curve(epochs, {32: 100, 64: 400}, images_per_epoch=10, chance=10.0)
    assert c == {"train_s": [0.0, 2.0, 7.0], "flops": [0.0, 1000.0, 5000.0], "top1": [10.0, 30.0, 60.0]}


def test_seed_stats_and_ratio_cell():
    s = seed_stats([1.0, 2.0, 3.0])
    assert (s["mean"], s["min"], s["max"], s["std"], s["n"]) == (2.0, 1.0, 3.0, 1.0, 3)
    assert math.isnan(seed_stats([4.0])["std"])
    out, cell = ratio_cell([0.40, 0.42, 0.41], 0.5)       # spread 4.9 % < distance 22 %
    assert out["mean"] == pytest.approx(0.41) and out["verdict"] == "PASS" and cell.startswith("0.410 ")
    assert ratio_cell([0.55, 0.60, 0.58], 0.5)[0]["verdict"] == "FAIL"
    assert ratio_cell([0.30, 0.60, 0.50], 0.5)[0]["verdict"] == "inconclusive"   # seeds disagree more than the margin
    out, cell = ratio_cell([0.4, None, 0.45], 0.5)
    assert out["verdict"] == "FAIL" and out["reached"] == 2 and "not reached by 1 of 3" in cell


def test_data_wait_pooled_per_stage():
    runs = [{"epochs": [{"resolution": 32, "train_s": 10.0, "data_wait_s": 1.0},
                        {"resolution": 64, "train_s": 10.0, "data_wait_s": 0.0}]},
            {"epochs": [{"resolution": 32, "train_s": 30.0, "data_wait_s": 1.0}]}]
    got = data_wait_by_stage(runs)
    assert got[32] == pytest.approx({"share": 2 / 40, "min": 1 / 30, "max": 0.1})
    assert got[64] == pytest.approx({"share": 0.0, "min": 0.0, "max": 0.0})


def _run(label, seed, times, top1, flops_scale=1.0, res=64):
    epochs = [{"resolution": res, "train_s": t, "data_wait_s": 0.01 * t, "eval_ckpt_s": 1.0, "top1": a}
              for t, a in zip(times, top1)]
    c = curve(epochs, {res: flops_scale}, images_per_epoch=1, chance=10.0)
    return {"label": label, "seed": seed, "plan": "p", "num_epochs": len(epochs), "epochs": epochs, "curve": c,
            "train_s": c["train_s"][-1], "flops": c["flops"][-1], "final_top1": c["top1"][-1],
            "eval_ckpt_s": float(len(epochs)), "process_s": 1.0}


def test_summarize_over_seeds():
    runs = [_run("fixed", 0, [10, 10], [50, 80]), _run("fixed", 1, [10, 10], [50, 90]),
            _run("progressive_0.5", 0, [4, 4], [70, 95], res=32), _run("progressive_0.5", 1, [4, 4], [60, 85], res=32)]
    target = 85.0
    for r in runs:
        r["train_s_to_target"] = time_to_target(r["curve"]["train_s"], r["curve"]["top1"], target)
        r["flops_to_target"] = time_to_target(r["curve"]["flops"], r["curve"]["top1"], target)
    numbers, summary = summarize(runs)
    assert numbers["target_top1"] == target and numbers["fixed_train_s"] == 20.0
    prog = numbers["recipes"]["progressive_0.5"]
    # seed 0 crosses 85 at 4 + 4 * 15 / 25 = 6.4 s, seed 1 at its last epoch, 8 s; the fixed runs take 20 s
    assert prog["train_s_to_target_ratio"]["per_seed"] == pytest.approx([0.32, 0.40])
    assert prog["train_s_to_target_ratio"]["verdict"] == "PASS"
    assert prog["final_top1"]["mean"] == 90.0 and numbers["recipes"]["fixed"]["final_top1"]["min"] == 80.0
    assert prog["data_wait"]["32"]["share"] == pytest.approx(0.01)
    assert summary["progressive_0.5: time to the fixed top-1 (85.00) / fixed time"].startswith("0.360 ")


def test_run_order_alternates_per_seed():
    assert run_order([0, 1, 2], 0.5, 0.33, 1) == [
        ("fixed", None, 0), ("progressive", 0.5, 0), ("progressive", 0.5, 1), ("fixed", None, 1),
        ("fixed", None, 2), ("progressive", 0.5, 2), ("progressive", 0.33, 0)]
    assert run_order([0], 0.5, None, 1) == [("fixed", None, 0), ("progressive", 0.5, 0)]


def test_recipes_are_the_fixed_reference_and_its_budgeted_counterpart(tmp_path):
    recipe, overrides = recipe_args("fixed", epochs=12)
    cfg, _ = load_train_config(recipe, [*overrides, f"data.root={tmp_path}"])
    assert (cfg.schedule.resolution.kind, cfg.schedule.resolution.resolution, cfg.run.epochs) == ("fixed", 64, 12)
    recipe, overrides = recipe_args("progressive", epochs=12, budget=0.33)
    cfg, _ = load_train_config(recipe, [*overrides, f"data.root={tmp_path}"])
    plan = cfg.schedule.resolution.stage_plan()
    assert (plan.reference_epochs, plan.budget, plan.resolution) == (12, 0.33, 64)
    assert cfg.run.epochs == plan.total_epochs and plan.share == pytest.approx(0.33, abs=0.05)
    with pytest.raises(ValueError, match="kind"):
        recipe_args("linear", epochs=12)


def test_epoch_metrics_from_mlflow(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("bench")
    with mlflow.start_run() as run:   # logged once per epoch of 4 steps, at the epoch's last step
        for step, (res, comp, wait, epoch_s, top1) in zip((4, 8), [(32, 100, 10, 1.0, 40.0), (64, 400, 0, 2.5, 70.0)]):
            mlflow.log_metrics({"train/resolution": res, "time/compute_ms": comp, "time/data_wait_ms": wait,
                                "epoch/time_s": epoch_s, "eval/top1_64px": top1}, step=step)
    got = epoch_metrics(tmp_path, run.info.run_id, steps_per_epoch=4)
    assert [e["resolution"] for e in got] == [32, 64] and [e["top1"] for e in got] == [40.0, 70.0]
    assert [e["train_s"] for e in got] == pytest.approx([0.44, 1.6])
    assert [e["data_wait_s"] for e in got] == pytest.approx([0.04, 0.0])
    assert [e["eval_ckpt_s"] for e in got] == pytest.approx([0.56, 0.9])


def test_quick_run_is_consistent(tmp_path):
    payload = tta.main(["--quick", "--cache", str(tmp_path / "cache"), "--results-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "bench_time_to_accuracy_quick.json").read_text())
    assert doc["summary"] == payload["summary"] and doc["order"] == ["fixed", "progressive_0.5"]
    flops = {int(k): v for k, v in doc["train_flops_per_image"].items()}
    for run in doc["runs"]:
        c = run["curve"]
        assert len(c["train_s"]) == len(c["flops"]) == len(c["top1"]) == run["num_epochs"] + 1
        assert all(b > a for a, b in zip(c["train_s"], c["train_s"][1:]))
        assert run["flops"] == sum(flops[e["resolution"]] for e in run["epochs"]) * doc["steps_per_epoch"] * \
            doc["global_batch"]
        assert all(0 <= e["data_wait_s"] <= e["train_s"] for e in run["epochs"])
        assert all(e["eval_ckpt_s"] > 0 for e in run["epochs"])
    fixed, prog = doc["runs"]
    assert [e["resolution"] for e in fixed["epochs"]] == [64, 64]
    assert [e["resolution"] for e in prog["epochs"]] == [32, 48, 64]
    assert doc["target_top1"] == fixed["final_top1"]
    ratio = doc["recipes"]["progressive_0.5"]["train_s_to_target_ratio"]
    to = prog["train_s_to_target"]
    assert ratio["per_seed"] == [None if to is None else pytest.approx(to / fixed["train_s"])]
