"""The test resolution is chosen on minival, never on val: the rule (best minival top-1; ties to the training
resolution, else the lowest), the config, and a real 1-rank training on data with a minival split whose final
line, ``final_metrics.json`` and MLflow run carry the choice and val's top-1 there (and ``pipeline.evaluate``
makes the same choice from the checkpoint)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from pipeline.config import ConfigError, load_train_config
from pipeline.evaluate import Evaluator, choose_on_minival, choose_test_resolution
from tests.helpers_tracking import suite_store
from tests.helpers_train import PY, run_job, run_train, tiny_data, tiny_recipe  # noqa: F401

LINE = re.compile(r"^test resolution (\d+) px chosen on minival \(top-1 ([\d.]+) %, [^)]*\); "
                  r"val top-1 at \1 px: ([\d.]+) %$", re.M)


def _results(top1: dict[int, float]) -> dict[int, dict[str, float]]:
    return {r: {"top1": v, "top5": 100.0, "loss": 1.0, "n": 8} for r, v in top1.items()}


# ----------------------------------------------------------------------------------------- the rule
def test_the_best_minival_top1_wins():
    assert choose_test_resolution({32: 50.0, 48: 62.5, 64: 60.0}, train_res=32) == (48, "best minival top-1")


def test_ties_go_to_the_training_resolution_else_the_lowest():
    assert choose_test_resolution({32: 50.0, 48: 62.5, 64: 62.5}, train_res=64) == (
        64, "tie at [48, 64] px: the training resolution")
    assert choose_test_resolution({32: 62.5, 48: 62.5, 64: 62.5}, train_res=48)[0] == 48
    assert choose_test_resolution({32: 50.0, 48: 62.5, 64: 62.5}, train_res=32) == (
        48, "tie at [48, 64] px: the lowest")
    assert choose_test_resolution({48: 62.5, 64: 62.5}, train_res=None)[0] == 48
    with pytest.raises(ValueError):
        choose_test_resolution({}, train_res=32)


def test_val_never_takes_part_in_the_choice():
    """Minival and val disagree: minival's best (48) is chosen although val is best at 64; val is read at 48."""
    minival = _results({32: 40.0, 48: 70.0, 64: 55.0})
    val = _results({32: 45.0, 48: 52.0, 64: 80.0})
    choice = choose_on_minival(minival, val, train_res=32)
    assert (choice.resolution, choice.minival_top1, choice.val_top1) == (48, 70.0, 52.0)
    assert choice.line() == ("test resolution 48 px chosen on minival (top-1 70.0 %, best minival top-1); "
                             "val top-1 at 48 px: 52.0 %")
    assert choice.metrics() == {"test_res/chosen": 48, "test_res/minival_top1": 70.0, "test_res/val_top1": 52.0,
                                "test_res/minival_top1_32px": 40.0, "test_res/minival_top1_48px": 70.0,
                                "test_res/minival_top1_64px": 55.0}
    # the same minival with any val: the same choice
    assert choose_on_minival(minival, _results({32: 99.0, 48: 1.0, 64: 1.0}), 32).resolution == 48


# ----------------------------------------------------------------------------------------- the config
@pytest.mark.parametrize("override,message", [
    ("eval.choose_test_res=always", "eval.choose_test_res: 'always'"),
    ("eval.minival_split=val", "eval.minival_split: 'val' is data.val_split or data.train_split"),
    ("eval.minival_split=", "eval.minival_split: must be a non-empty split name"),
])
def test_config_is_checked_up_front(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, [override], 1)


def test_without_minival_one_line_and_no_choice(tiny_data):  # noqa: F811
    """The shared tiny dataset has no minival split: one line says so, nothing is scored (forward is not called)."""
    cfg, _ = load_train_config(None, [f"data.root={tiny_data}", "data.num_workers=0"], 1)
    ev = Evaluator(cfg, rank=0, world_size=1, device=torch.device("cpu"), input_dtype=torch.float32)
    lines: list[str] = []
    assert ev.choose_test_res(None, 32, _results({32: 50.0}), lines.append) is None
    assert lines == [f"test resolution: not chosen, {tiny_data} has no 'minival' split (carve one from train with "
                     f"`python -m data_prep wds|ffcv ... --minival-fraction 0.01`); the val table stands as it is"]
    off, _ = load_train_config(None, [f"data.root={tiny_data}", "eval.choose_test_res=false"], 1)
    ev = Evaluator(off, rank=0, world_size=1, device=torch.device("cpu"), input_dtype=torch.float32)
    assert ev.choose_test_res(None, 32, _results({32: 50.0}), lines.append) is None and len(lines) == 1


# ----------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def minival_data(tmp_path_factory):
    """4 classes x 8 train images, a quarter carved as minival (2 per class), 4 val images per class."""
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_webdataset import write_webdataset

    base = tmp_path_factory.mktemp("minival_data")
    make_demo_dataset(base / "src", num_classes=4, train_per_class=8, val_per_class=4, min_side=32, max_side=56,
                      large_images=0, bad_files=False)
    write_webdataset(base / "src", base / "data", workers=1, progress=False, shard_max_count=8,
                     minival_fraction=0.25)
    return base / "data"


@pytest.mark.slow
def test_training_chooses_on_minival_and_reports_val_there(minival_data, tiny_recipe, tmp_path):  # noqa: F811
    import mlflow

    run_dir = tmp_path / "run"
    proc = run_train(1, tiny_recipe, minival_data, run_dir, "zero2", "run.epochs=2", "run.precision=fp32")
    [m] = LINE.findall(proc.stdout)
    final = json.loads((run_dir / "final_metrics.json").read_text())
    t = final["test_res"]
    chosen = int(m[0])
    assert t["chosen"] == chosen and chosen in (32, 48) and final["train_resolution"] == 32
    assert sorted(t["minival"]) == ["32", "48"] and all(v["n"] == 8 for v in t["minival"].values())
    assert t["minival_top1"] == max(v["top1"] for v in t["minival"].values()) == pytest.approx(float(m[1]), abs=0.05)
    assert t["val_top1"] == final["eval"][str(chosen)]["top1"] == pytest.approx(float(m[2]), abs=0.05)
    assert final["eval"][str(chosen)]["n"] == 16   # the val table is still val's
    metrics = mlflow.MlflowClient(suite_store()).get_run(final["mlflow_run_id"]).data.metrics
    assert metrics["test_res/chosen"] == chosen and metrics["test_res/val_top1"] == pytest.approx(t["val_top1"])
    assert metrics["test_res/minival_top1"] == pytest.approx(t["minival_top1"])
    assert metrics["final/top1_32px"] == pytest.approx(final["eval"]["32"]["top1"])   # the table as before

    # pipeline.evaluate over the run's checkpoint: the same minival scores, so the same choice
    out = tmp_path / "eval.json"
    ev = run_job([PY, "-m", "pipeline.evaluate", str(run_dir), "--json", str(out)])
    assert LINE.findall(ev.stdout) == [m]
    assert json.loads(out.read_text())["test_res"]["chosen"] == chosen
    off = run_job([PY, "-m", "pipeline.evaluate", str(run_dir), "--no-choose-test-res"])
    assert "test resolution" not in off.stdout
