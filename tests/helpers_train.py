"""Shared pieces of the training tests: one tiny real dataset (WebDataset + FFCV shards written by data_prep),
a tiny CPVT recipe, and a launcher that runs pipeline/train.py as real 1- or 2-rank DeepSpeed jobs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.net import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))

# 4 classes x 8 train images in 4 WebDataset shards of 8 (with 2 ranks each rank owns exactly 2 shards)
NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, SHARD = 4, 8, 4, 8

TINY_RECIPE = """\
model: {name: cpvt_ti, drop_path_rate: 0.1, kwargs: {embed_dim: 48, depth: 2, num_heads: 2}}
data: {format: wds, batch_size: 4, eval_batch_size: 8, num_workers: 0, shuffle_buffer: 16, shuffle_initial: 4}
aug: {auto_augment: null, reprob: 0.0, mixup: 0.0, cutmix: 0.0, smoothing: 0.1}
schedule:
  resolution: {kind: fixed, resolution: 32}
  lr: {lr: 2.0e-3, ref_batch: 8, warmup_epochs: 0.5, warmup_lr: 1.0e-5, min_lr: 1.0e-5}
optim: {grad_clip: 1.0}   # the calibrated resume and non-finite tests were measured with clipping at 1.0
checkpoint: {every_steps: 3, keep_last: 2}
tracking: {system_metrics: false}
eval: {every_epochs: 0, resolutions: [48]}
run: {epochs: 3, log_every: 1, seed: 0, progress_bar: false}
"""


def make_tiny_data(out: Path) -> Path:
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_ffcv import write_ffcv
    from data_prep.write_webdataset import write_webdataset
    from pipeline.ffcv_compat import keep_torch_threads

    src = out / "src"
    make_demo_dataset(src, num_classes=NUM_CLASSES, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                      min_side=32, max_side=56, large_images=0, bad_files=False)
    data = out / "data"
    write_webdataset(src, data, cluster="pool", workers=1, progress=False, shard_max_count=SHARD)
    with keep_torch_threads():  # importing ffcv sets 1 thread
        write_ffcv(src, data, workers=1, progress=False)
    return data


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    return env


def train_cmd(nproc: int, recipe: Path, data: Path, run_dir: Path, ds: str, *overrides: str) -> list[str]:
    """``ds``: a shipped JSON's name, optionally with a precision (``zero2_bf16``: zero2.json, run.precision=bf16)."""
    stage, _, precision = ds.partition("_")
    args = ["pipeline/train.py", "--recipe", str(recipe), "--data", str(data), "--run-dir", str(run_dir),
            "--deepspeed_config", f"deepspeed_configs/{stage}.json",
            *([f"run.precision={precision}"] if precision else []), *overrides]
    if nproc == 1:
        return [PY, *args]
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *args]


def run_train(nproc: int, recipe: Path, data: Path, run_dir: Path, ds: str = "zero2", *overrides: str,
              timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(nproc, recipe, data, run_dir, ds, *overrides), cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"training failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_job(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run any command of the pipeline (evaluate, export, a launcher) like a training job; fail on a non-zero exit."""
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:4])} ... failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return proc


def kill_job(p: subprocess.Popen) -> None:
    """SIGKILL a job like a preemption: its process group *and* every descendant's. torchrun starts each rank in
    a session of its own, so killing torchrun's group alone leaves the ranks training on as orphans."""
    import psutil

    try:
        procs = psutil.Process(p.pid).children(recursive=True)   # before the kill: orphans cannot be found after
    except psutil.NoSuchProcess:
        procs = []
    groups = {p.pid}
    for proc in procs:
        try:
            groups.add(os.getpgid(proc.pid))
        except ProcessLookupError:
            pass
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:   # a rank in a group of its own that the loop missed
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    p.wait()
    _, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"still running after SIGKILL: {alive}"


def run_and_kill(nproc: int, recipe: Path, data: Path, run_dir: Path, ds: str, kill_at_step: int, *overrides: str,
                 timeout: int = 300) -> str:
    """Start a job and SIGKILL all its processes (:func:`kill_job`) once rank 0 printed ``step <kill_at_step>``."""
    p = subprocess.Popen(train_cmd(nproc, recipe, data, run_dir, ds, *overrides), cwd=ROOT, env=job_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, deadline = [], time.time() + timeout
    try:
        for line in p.stdout:
            out.append(line)
            if line.startswith(f"step {kill_at_step} "):
                break
            if time.time() > deadline:
                break
    finally:
        kill_job(p)
    text = "".join(out)
    assert f"step {kill_at_step} " in text, text[-3000:]
    return text


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 master weights of the newest complete checkpoint, consolidated over ZeRO partitions."""
    from pipeline import checkpointing
    from pipeline.export import consolidated_state_dict

    ckpt = checkpointing.find_latest(run_dir / "checkpoints")
    assert ckpt is not None, f"no complete checkpoint in {run_dir}"
    return consolidated_state_dict(ckpt)


def model_states(ckpt: Path) -> dict:
    """DeepSpeed's model-states file of a checkpoint: ``module`` (the engine's working-precision weights) plus
    the trainer's client state (``ema``, ``global_step``, ...)."""
    return torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def data_with_damaged_shard(data: Path, dest: Path, shard: str = "train-000000.tar", member: int = 2) -> Path:
    """A copy of ``data`` whose WebDataset ``shard`` has the tar header of its ``member``-th member overwritten
    with 0xFF bytes: same size, so it passes every check made before a job starts (the index and the shard
    sizes), and only the job, when its reader reaches that header, finds out."""
    shutil.copytree(data, dest, ignore=shutil.ignore_patterns("ffcv"))
    path = dest / "wds" / shard
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[member].offset
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 512)
    return dest


def step_losses(stdout: str) -> list[float]:
    return [float(line.split("loss=")[1].split()[0]) for line in stdout.splitlines()
            if line.startswith("step ") and "loss=" in line]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """The tiny dataset, built once per session even when several test modules import this fixture."""
    base = tmp_path_factory.getbasetemp() / "train_tiny_data"
    if not (base / "data" / "wds" / "_info.json").is_file() or not (base / "data" / "ffcv" / "val.beton").is_file():
        base.mkdir(parents=True, exist_ok=True)
        make_tiny_data(base)
    return base / "data"


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.getbasetemp() / "train_tiny_recipe.yaml"
    path.write_text(TINY_RECIPE)
    return path
