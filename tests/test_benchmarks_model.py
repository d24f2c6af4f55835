"""bench_model: both models of a pair are timed in one interleaved run and the ratios are consistent."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_model
from benchmarks.bench_model import Case, default_cases, run_case


def test_run_case_reports_consistent_ratio():
    row = run_case(Case("ti", "infer", "fp32", 32, 1), torch.device("cpu"), warmup=0, rounds=2)
    assert row["deit_model"] == "vit_tiny_patch16_224" and row["cpvt_model"] == "cpvt_ti"
    assert row["deit_img_s"] > 0 and row["cpvt_img_s"] > 0
    assert row["cpvt_over_deit"] == pytest.approx(row["cpvt_img_s"] / row["deit_img_s"])
    assert row["peg_overhead"] == pytest.approx(1 - row["cpvt_over_deit"])
    assert row["within_target"] == (row["peg_overhead"] <= bench_model.PEG_OVERHEAD_TARGET)
    assert [len(v) for v in row["samples_s"].values()] == [2, 2]


def test_train_step_updates_weights():
    case = Case("ti", "train", "bf16", 32, 2)
    model = bench_model.build("cpvt_ti", 32, torch.device("cpu"))
    assert len(model.pos_block) == 5  # the paper's throughput model: PEGs after blocks 0-4
    before = model.pos_block[0].proj[0].weight.detach().clone()
    bench_model.make_step(model, case, torch.device("cpu"))()
    assert not torch.equal(before, model.pos_block[0].proj[0].weight)


def test_default_cases_cover_the_issue():
    cases = default_cases(["ti", "s"], ["train", "infer"], ["fp32", "bf16"], on_gpu=False, quick=False)
    assert {(c.mode, c.res) for c in cases} == {("train", 224), ("infer", 224), ("infer", 384)}
    assert {(c.size, c.dtype) for c in cases} == {("ti", "fp32"), ("ti", "bf16"), ("s", "fp32"), ("s", "bf16")}
    assert all(c.batch >= 4 for c in cases)   # per-op fixed costs must not dominate the ratio


def test_cpu_without_native_bf16_runs_only_ti_224_in_bf16():
    cases = default_cases(["ti", "s"], ["train", "infer"], ["fp32", "bf16"], on_gpu=False, quick=False,
                          native_bf16=False)
    bf16 = {(c.size, c.mode, c.res) for c in cases if c.dtype == "bf16"}
    assert bf16 == {("ti", "train", 224), ("ti", "infer", 224)}
    assert len([c for c in cases if c.dtype == "fp32"]) == 6


def test_cli_writes_json(tmp_path):
    payload = bench_model.main(["--quick", "--modes", "infer", "--dtypes", "fp32", "--rounds", "1",
                                "--results-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "bench_model_quick.json").read_text())
    assert doc["rows"][0]["res"] == 64 and doc["summary"] == payload["summary"]
    assert list(doc["summary"]) == ["cpvt/deit ti infer fp32 64"]
