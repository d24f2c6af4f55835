"""PEG ablations: every row's recipe validates and builds the intended model; the summary reads a real MLflow store;
one real tiny row run end to end feeds the summary and the resolution / attention-map commands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import timm

from helpers_analysis import tiny_wds
from pipeline.analysis import ablations
from pipeline.analysis.ablations import ROWS, collect, format_summary, train_argv, validate_recipes
from tests.helpers_tracking import suite_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_global_mlflow_uri(monkeypatch):
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI; keep it from leaking between tests."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(None)


def test_every_row_recipe_validates_and_builds_its_model():
    cfgs = validate_recipes()
    assert list(cfgs) == [r.name for r in ROWS]
    files = {p.stem for p in ablations.RECIPE_DIR.glob("*.yaml")} - {"_base"}
    assert files == {r.run_row for r in ROWS}  # no orphan recipe, no row without one
    expect = {"peg_pos_m1": ((-1,), 3, "none"), "peg_pos_10": ((10,), 3, "none"),
              "pegs_0_4": ((0, 1, 2, 3, 4), 3, "none"), "kernel_1": ((0,), 1, "none"), "kernel_3": ((0,), 3, "none"),
              "kernel_7": ((0,), 7, "none"),
              "no_peg": ((), 3, "none"), "learned_pe": ((), 3, "learned")}
    for name, (pos, k, pe) in expect.items():
        m = cfgs[name].model
        assert (m.name, tuple(m.peg_positions), m.peg_kernel, m.pos_embed) == ("cpvt_ti", pos, k, pe), name
    for name, cfg in cfgs.items():
        assert cfg.tracking.experiment == ablations.EXPERIMENT and cfg.run.epochs == 300  # the paper's recipe
        # narrow (fast to build) but the recipe's depth, so PEG positions up to 10 exist
        model = timm.create_model(cfg.model.name, **dict(cfg.model.create_kwargs(10), embed_dim=24, num_heads=1))
        assert len(model.pos_block) == len(cfg.model.peg_positions)
        assert (model.pos_embed is not None) == (cfg.model.pos_embed == "learned")
        if len(model.pos_block):
            assert model.pos_block[0].proj[0].kernel_size == (cfg.model.peg_kernel,) * 2


def test_train_argv_points_every_row_at_one_store(tmp_path):
    argv = train_argv(ablations.get_row("kernel_3"), data="D", root=tmp_path, tracking_uri="sqlite:///x.db",
                      overrides=["run.epochs=2"])
    assert argv[:4] == ["--recipe", str(ablations.RECIPE_DIR / "peg_pos_0.yaml"), "--run-dir",
                        str(tmp_path / "peg_pos_0")]
    assert argv[4:] == ["--data", "D", "tracking.uri=sqlite:///x.db", "tracking.experiment=cpvt-ablations",
                        "tracking.run_name=ablation-peg_pos_0", "run.epochs=2"]
    with pytest.raises(ValueError, match="row: 'nope' is not one of"):
        ablations.get_row("nope")


def _log_run(uri: str, row: str, top1: float, status: str = "FINISHED") -> str:
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(ablations.EXPERIMENT)
    with mlflow.start_run(run_name=f"ablation-{row}") as run:
        mlflow.log_params({"run.epochs": 300})
        mlflow.log_metrics({"eval/top1": top1 - 10, "eval/top1_224px": top1 - 10}, step=1)
        mlflow.log_metrics({"eval/top1": top1, "eval/top1_224px": top1, "eval/top1_384px": top1 + 0.5}, step=2)
    if status != "FINISHED":
        mlflow.MlflowClient(uri).set_terminated(run.info.run_id, status=status)
    return run.info.run_id


def test_summarise_reads_newest_finished_run_per_row(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _log_run(uri, "peg_pos_0", 60.0)
    newest = _log_run(uri, "peg_pos_0", 72.0)
    _log_run(uri, "no_peg", 99.0, status="FAILED")
    learned = _log_run(uri, "learned_pe", 70.0)
    table = {r["row"]: r for r in collect(uri)}
    assert list(table) == [r.name for r in ROWS]
    assert table["peg_pos_0"]["top1"] == 72.0 and table["peg_pos_0"]["run_id"] == newest
    assert table["peg_pos_0"]["top1_by_res"] == {224: 72.0, 384: 72.5}
    assert table["kernel_3"]["run_id"] == newest  # same model as peg_pos_0
    assert table["no_peg"]["top1"] is None and table["no_peg"]["paper_top1"] == 68.2  # failed run ignored
    assert table["learned_pe"]["run_id"] == learned and table["learned_pe"]["paper_top1"] == 72.2
    text = format_summary(list(table.values()))
    assert "| peg_pos_0 | PEG position | 1 PEG after block 0 (CPVT-Ti) | 72.0 | 72.0 | 72.5 | 72.4 |" in text
    assert "| no_peg |" in text and "not run" in text


def test_summarise_empty_store(tmp_path):
    table = collect(f"sqlite:///{tmp_path}/empty.db")
    assert all(r["run_id"] is None for r in table)


TINY_OVERRIDES = [
    "model.kwargs={embed_dim: 48, depth: 2, num_heads: 2}", "model.drop_path_rate=0.0",
    "data.format=wds", "data.batch_size=4", "data.eval_batch_size=8", "data.num_workers=0",
    "data.shuffle_buffer=16", "data.shuffle_initial=4",
    "aug.auto_augment=null", "aug.reprob=0.0", "aug.mixup=0.0", "aug.cutmix=0.0",
    "schedule.resolution.resolution=32", "schedule.lr.warmup_epochs=0", "schedule.lr.ref_batch=8",
    "eval.every_epochs=0", "eval.resolutions=[48]", "run.epochs=1", "run.log_every=1", "tracking.system_metrics=false",
]


@pytest.mark.slow
def test_row_run_summary_resolution_and_attention_end_to_end(tmp_path):
    data = tiny_wds(tmp_path)
    root = tmp_path / "abl"
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "pipeline.analysis.ablations", "run", "--row", "peg_pos_0", "--data", str(data),
           "--root", str(root), *TINY_OVERRIDES]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    uri = suite_store()   # the row ran with the default (project) store
    table = ablations.main(["summarise", "--root", str(root), "--tracking-uri", uri,
                            "--json", str(tmp_path / "abl.json")])
    row = {r["row"]: r for r in table}["peg_pos_0"]
    assert row["run_id"] and 0.0 <= row["top1"] <= 100.0 and sorted(row["top1_by_res"]) == [32, 48]
    assert mlflow.MlflowClient(uri).get_run(row["run_id"]).info.run_name == "ablation-peg_pos_0"

    # the demo checkpoint of that run: resolution analysis, logged into the same MLflow run
    from pipeline import export
    from pipeline.analysis import attention_maps, resolution

    run_dir = root / "peg_pos_0"
    exported = export.export(run_dir, tmp_path / "model.safetensors")
    res = resolution.main(["--checkpoint", str(run_dir), str(exported), "--label", "ckpt", "export",
                           "--data", str(data), "--resolutions", "32", "48", "64", "--train-res", "32",
                           "--out", str(tmp_path / "res.png"), "--tracking-uri", uri, "--mlflow-run-id", row["run_id"]])
    curve = res["curves"]["ckpt"]
    assert sorted(curve) == [32, 48, 64] and all(v["n"] == 9 for v in curve.values())
    # the DeepSpeed checkpoint and its fp32 export are the same model (the trainer's own eval ran in bf16)
    assert res["curves"]["export"] == curve
    assert res["plotted"]["ckpt"]["top1"] == [curve[r]["top1"] for r in (32, 48, 64)]
    run = mlflow.MlflowClient(uri).get_run(row["run_id"])
    assert run.data.metrics["res_top1_64_ckpt"] == curve[64]["top1"]
    assert {"res.png", "res.json"} <= {a.path for a in mlflow.MlflowClient(uri).list_artifacts(row["run_id"])}

    # attention maps: the checkpoint and its export side by side (same weights -> identical panels)
    att = attention_maps.main(["--checkpoint", str(run_dir), str(exported), "--label", "ckpt", "export",
                               "--data", str(data), "--layers", "0", "1", "--num-images", "2", "--res", "32",
                               "--out", str(tmp_path / "att.png")])
    assert (tmp_path / "att.png").stat().st_size > 0
    panels = att["plotted"]["panels"]
    assert len(panels) == 2 * 2 * 2 * 2  # images x runs x layers x heads
    np.testing.assert_allclose(panels[(1, "ckpt", 1, 0)], panels[(1, "export", 1, 0)], rtol=1e-5, atol=1e-6)
    assert att["maps"]["ckpt"][0].shape == (2, 2, 2, 2)
