"""benchmarks/gpu_check.py (`make gpu-check`): the no-CUDA path end to end, and its pure parts (row table, result
JSON, parsing of a training run's output and final_metrics.json, the wheelhouse plan and its checks)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MAKEFLAGS", None)
    return env


# ----------------------------------------------------------------------------------------- no CUDA
@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA: the no-CUDA path does not apply")
def test_make_gpu_check_without_cuda_prints_one_line_and_exits_0(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", f"GPU_CHECK_ARGS=--out {out}"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    assert lines[0].startswith("gpu-check: skipped, no CUDA device here") and "is_available() is False" in lines[0]
    assert not out.exists()  # nothing was run, nothing written


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_module_without_cuda_prints_one_line_and_exits_0():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1 and "no CUDA device" in proc.stdout


def test_no_cuda_line_matches_torch():
    line = gc.no_cuda_line()
    assert (line is None) == torch.cuda.is_available()
    if line is not None:
        assert "\n" not in line and torch.__version__ in line


# ----------------------------------------------------------------------------------------- rows, table, JSON
def _rows() -> list[gc.Row]:
    return [gc.Row("environment", "ok", 0.5, "NVIDIA H200, driver 580"),
            gc.Row("fp16_zero2", "failed", 12.25, error="rc=1: RuntimeError: CUDA error: out of memory"),
            gc.Row("throughput_ffcv", "skipped", error="import ffcv fails here")]


def test_row_status_is_checked():
    with pytest.raises(ValueError, match="status"):
        gc.Row("x", "maybe")


def test_format_rows_shows_status_and_reason():
    text = gc.format_rows(_rows())
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["row", "status", "seconds", "result"]
    assert "| environment " in text and "| ok " in text and "NVIDIA H200, driver 580" in text
    assert "| failed " in text and "12.2" in text and "RuntimeError: CUDA error: out of memory" in text
    assert "| skipped " in text and "import ffcv fails here" in text
    assert len(lines) == 2 + 3 and len({len(ln) for ln in lines}) == 1  # aligned


def test_format_rows_clips_long_results():
    text = gc.format_rows([gc.Row("a", "failed", error="x" * 500)])
    assert "..." in text and max(len(ln) for ln in text.splitlines()) < 200


def test_result_doc_is_json_with_counts(tmp_path):
    rows = _rows()
    doc = gc.result_doc({"gpu": "H200"}, rows, gc.attribution(rows), profile="gpu", budget_s=450, wall_s=12.34,
                        complete=True)
    out = tmp_path / "r" / "gpu_check.json"
    gc.write_doc(doc, out)
    back = json.loads(out.read_text())
    assert back["counts"] == {"ok": 1, "failed": 1, "skipped": 1}
    assert back["complete"] is True and back["environment"] == {"gpu": "H200"} and back["wall_s"] == 12.3
    assert [r["name"] for r in back["rows"]] == ["environment", "fp16_zero2", "throughput_ffcv"]
    assert back["rows"][1]["error"].startswith("rc=1") and back["rows"][2]["status"] == "skipped"
    assert not list(out.parent.glob("*.tmp*"))   # written atomically: no temp file left


def test_attribution_ratios_over_the_bare_engine():
    rows = [gc.Row("bench_trainer", "ok", metrics={"img_s": {"bare": 10000.0, "trainer": 9500.0}}),
            gc.Row("throughput_wds", "ok", metrics={"throughput_img_s": 2500.0, "data_wait_share": 0.7}),
            gc.Row("throughput_wds_device", "skipped", error="no data.decode"),
            gc.Row("throughput_ffcv", "ok", metrics={"throughput_img_s": gc.NA})]
    a = gc.attribution(rows)
    assert a["bare_engine_img_s"] == 10000.0 and a["trainer_in_memory_over_bare"] == pytest.approx(0.95)
    assert a["wds_over_bare"] == pytest.approx(0.25) and a["wds_data_wait_share"] == 0.7
    assert a["wds_device_decode_img_s"] is None and a["wds_device_decode_over_bare"] is None
    assert a["ffcv_img_s"] is None  # "n/a" from a trainer without the key is no number
    table = gc.format_attribution(a)
    assert "0.95" in table and "0.25" in table and "n/a" in table


# ----------------------------------------------------------------------------------------- training output
TRAIN_LOG = """\
[2026-12-01 09:00:00,000] [INFO] [real_accelerator.py:1:get_accelerator] Setting ds_accelerator to cuda
model cpvt_ti (5.68M params) world=1 precision=fp16 zero=2 run_dir=/tmp/x
resumed from /tmp/x/checkpoints/step_00000060 at epoch 0 step 60 (global 60)
epoch 0 start: resolution=160 steps=32 resume_at=0
[2026-12-01 09:00:01] [INFO] [deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 65536, reducing to 32768
step 10 loss=6.91 lr=1e-05 resolution=160 batch_global=256 epoch=0 img_s_rank=900 img_s=900 data_wait_frac=0.9
[2026-12-01 09:00:02] [INFO] [deepspeed] OVERFLOW! Rank 0 Skipping step. Attempted loss scale: 32768, reducing to 16384
step 20 loss=6.80 lr=2e-05 resolution=160 batch_global=256 epoch=0 img_s_rank=3000 img_s=3000 data_wait_frac=0.5
epoch 1 start: resolution=224 steps=64 resume_at=0
step 30 loss=6.70 lr=3e-05 resolution=224 batch_global=128 epoch=1 img_s_rank=2000 img_s=2000 data_wait_frac=0.3
"""


def test_parse_train_output():
    p = gc.parse_train_output(TRAIN_LOG)
    assert [s["step"] for s in p["steps"]] == [10, 20, 30]
    assert p["steps"][0]["batch_global"] == 256 and p["steps"][2]["resolution"] == 224
    assert p["losses"] == [6.91, 6.80, 6.70]
    assert p["epochs"] == [{"epoch": 0, "resolution": 160, "steps": 32}, {"epoch": 1, "resolution": 224, "steps": 64}]
    assert p["resumed"].startswith("resumed from /tmp/x/checkpoints/step_00000060")
    assert p["overflows"] == [(65536.0, 32768.0), (32768.0, 16384.0)] and p["loss_scale"] == 16384.0
    assert p["img_s"] == pytest.approx(2500.0)           # the first logging window is excluded
    assert p["data_wait_frac"] == pytest.approx(0.4)


def test_parse_train_output_of_nothing():
    p = gc.parse_train_output("Traceback (most recent call last):\nRuntimeError: boom\n")
    assert p["steps"] == [] and p["img_s"] is None and p["loss_scale"] is None and p["resumed"] is None


def test_train_metrics_prefers_final_metrics_and_says_na_for_missing_keys():
    parsed = gc.parse_train_output(TRAIN_LOG)
    old = gc.train_metrics({"exit_code": 0, "global_step": 30, "eval": {"224": {"top1": 12.5, "top5": 40.0}}},
                           parsed)  # today's trainer: no throughput / precision keys -> the log, else n/a
    assert old["exit_code"] == 0 and old["global_step"] == 30
    assert old["throughput_img_s"] == pytest.approx(2500.0) and old["throughput_source"] == "log"
    assert old["precision"] == gc.NA and old["loss_scale"] == 16384.0 and old["skipped_steps"] == 2
    assert old["losses_finite"] is True and old["last_loss"] == 6.70 and old["eval_top1"] == {"224": 12.5}
    new = gc.train_metrics({"exit_code": 0, "global_step": 30, "throughput_img_s": 4321.0, "data_wait_share": 0.1,
                            "precision": "fp16", "loss_scale": 1024.0, "skipped_steps": 5}, parsed)
    assert new["throughput_img_s"] == 4321.0 and new["throughput_source"] == "final_metrics"
    assert new["data_wait_share"] == 0.1 and new["precision"] == "fp16"
    assert new["loss_scale"] == 1024.0 and new["skipped_steps"] == 5
    empty = gc.train_metrics({}, gc.parse_train_output(""))
    assert {empty[k] for k in ("exit_code", "global_step", "throughput_img_s", "precision", "loss_scale",
                               "skipped_steps", "last_loss", "losses_finite")} == {gc.NA}


def test_train_metrics_flags_nonfinite_losses():
    log = "step 1 loss=nan img_s=1\nstep 2 loss=inf img_s=1\n"
    m = gc.train_metrics({}, gc.parse_train_output(log))
    assert m["losses_finite"] is False and math.isinf(m["last_loss"])


def test_read_final_metrics(tmp_path):
    assert gc.read_final_metrics(tmp_path) == {}
    (tmp_path / "final_metrics.json").write_text(json.dumps({"global_step": 7}))
    assert gc.read_final_metrics(tmp_path) == {"global_step": 7}
    (tmp_path / "final_metrics.json").write_text("{broken")
    assert gc.read_final_metrics(tmp_path) == {}


@pytest.mark.parametrize("text, expected", [
    ("step 1 loss=2\nTraceback (most recent call last):\n  File x\nRuntimeError: CUDA error: invalid device ordinal\n"
     "[2026] [INFO] exiting\n", "RuntimeError: CUDA error: invalid device ordinal"),
    ("config error: data.decode: 'gpu' is not one of ['cpu', 'device']\n", "config error: data.decode"),
    ("[2026] [WARNING] something\nthe job failed on rank 1\nbye\n", "the job failed on rank 1"),
    ("just output\nlast line\n", "last line"),
    ("", "(no output)"),
])
def test_last_error_line(text, expected):
    assert gc.last_error_line(text).startswith(expected)


# ----------------------------------------------------------------------------------------- profiles and commands
def test_gpu_profile_matches_the_issue():
    p = gc.Profile.gpu(16)
    assert p.res == 224 and p.eval_res == (160, 224, 288) and p.model_kwargs is None
    assert p.steps == 60 and p.resume_steps > p.steps and p.z3_model == "cpvt_b" and p.z3_steps == 20
    assert [r for _, r in p.sched] == [160, 224] and dict(p.sched_batches) == {160: 256, 224: 128}
    assert p.workers == 14 and p.fp16


def test_train_commands_are_the_real_cli(tmp_path):
    runner = gc.Runner(tmp_path, gc.Profile.gpu(16), 100, lambda row: None)
    check = gc.Check(runner, runner.profile, tmp_path, {"mlflow_importable": False, "ffcv_importable": "no: x"})
    cmd = check.train_cmd("bf16", "zero2_bf16", "run.ema=true")
    assert cmd[1:3] == ["pipeline/train.py", "--recipe"] and "deepspeed_configs/zero2.json" in cmd
    assert "run.precision=bf16" in cmd
    assert "tracking.enabled=false" in cmd and cmd[-1] == "run.ema=true" and "--resume" not in cmd
    assert "--resume" in check.train_cmd("bf16", "zero2_bf16", resume=True)
    env = runner.env()
    assert env["WORLD_SIZE"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
    assert "DS_ACCELERATOR" not in env or os.environ.get("DS_ACCELERATOR") != "cpu"


def test_runner_row_outcomes(tmp_path):
    seen = []
    runner = gc.Runner(tmp_path, gc.Profile.cpu_smoke(), 100, seen.append)
    ok = runner.run("ok_row", [sys.executable, "-c", "print('step 3 loss=1.0')"],
                    lambda text: ("ok", f"saw {len(gc.parse_train_output(text)['steps'])} step", {}))
    bad = runner.run("bad_row", [sys.executable, "-c", "raise SystemExit('error: it broke')"],
                     lambda text: ("ok", "", {}))
    slow = runner.run("slow_row", [sys.executable, "-c", "import time; time.sleep(30)"], lambda t: ("ok", "", {}),
                      timeout=1)
    dep = runner.run("dep_row", [sys.executable, "-c", "pass"], lambda t: ("ok", "", {}), needs=["bad_row"])
    assert (ok.status, ok.summary) == ("ok", "saw 1 step")
    assert bad.status == "failed" and "error: it broke" in bad.error
    assert slow.status == "failed" and slow.error.startswith("timed out")
    assert dep.status == "skipped" and "needs row bad_row" in dep.error
    assert [r.name for r in seen] == ["ok_row", "bad_row", "slow_row", "dep_row"]
    assert (tmp_path / "logs" / "bad_row.log").is_file()


def test_probe_flash_captures_the_models_sdpa_call():
    """On CPU (torch has a CPU flash kernel too): the capture, the per-backend attempts and the model pass run."""
    doc = gc.probe_flash("cpvt_ti", 2, 32, {"embed_dim": 32, "depth": 1, "num_heads": 2}, device="cpu", reps=1)
    assert doc["captured"] and doc["shape_bhnd"] == [2, 2, 5, 16] and doc["dtype"] == "torch.bfloat16"
    assert doc["attn_mask"] is False and isinstance(doc["flash_eligible"], bool)
    assert all(isinstance(doc[f"{b}_ok"], bool) for b in ("flash", "efficient", "math"))
    assert doc["math_ok"] and doc["math_fwd_bwd_ms"] > 0
    json.dumps(doc)


@pytest.mark.slow
def test_cpu_smoke_rows_end_to_end(tmp_path):
    """The real rows at tiny sizes on DeepSpeed's CPU accelerator: train with EMA + checkpoints, resume, export,
    evaluate; JSON with every row, the logs archive beside it."""
    out = tmp_path / "out" / "gpu_check.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--cpu-smoke", "--work-dir", str(tmp_path / "work"), "--out",
           str(out), "--budget-s", "800", "--only", "bf16_zero2_ema", "resume_auto", "export", "evaluate"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    status = {r["name"]: r["status"] for r in doc["rows"]}
    wanted = ["environment", "data", "bf16_zero2_ema", "resume_auto", "export", "evaluate"]
    assert {k: status[k] for k in wanted} == dict.fromkeys(wanted, "ok"), proc.stdout[-3000:]
    assert status["zero3_cpvt_b"] == "skipped" and doc["complete"] is True
    rows = {r["name"]: r for r in doc["rows"]}
    assert rows["bf16_zero2_ema"]["metrics"]["global_step"] == 6 and rows["bf16_zero2_ema"]["metrics"]["checkpoints"]
    assert rows["resume_auto"]["metrics"]["global_step"] == 9 and rows["resume_auto"]["metrics"]["resumed"]
    assert set(rows["evaluate"]["metrics"]) == {"32", "48"}
    assert (out.parent / "gpu_check_logs.tar.gz").is_file()
    assert "| bf16_zero2_ema" in proc.stdout and "throughput attribution" in proc.stdout
