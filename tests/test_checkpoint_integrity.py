"""Checkpoints are verified before a resume: ``COMPLETE`` records every file's size and sha256 (each rank hashes
the files it wrote), ``--resume auto`` skips a damaged newest checkpoint with one line and continues from the
previous complete one, bitwise as if nothing had happened; a damaged checkpoint named with ``--resume PATH`` is
refused in one line; ``python -m pipeline.checkpointing verify RUN_DIR`` checks a run on demand; a file system
that fills up during a save ends the job with one line and the previous checkpoint intact. Real 1-rank DeepSpeed
runs, real damage (flipped bytes, a truncated file, a full tmpfs)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from pipeline import checkpointing
from pipeline.train import EXIT_CONFIG, EXIT_DISK_FULL
from tests.helpers_train import (PY, ROOT, final_params, job_env, run_train, tiny_data, tiny_recipe,  # noqa: F401
                                 train_cmd)

pytestmark = pytest.mark.slow

# 32 train images, global batch 8: 4 steps per epoch. A checkpoint after every step, the tiny recipe keeps the
# last 2 (+ the best): the run stopped by max_steps at step 10 holds step 9 and step 10.
RUN = ("data.batch_size=8", "run.epochs=4", "checkpoint.every_steps=1")
STOP_AT, TOTAL = 10, 16


@pytest.fixture(scope="module")
def runs(tiny_data, tiny_recipe, tmp_path_factory):  # noqa: F811
    """An uninterrupted 16-step run, and the same run stopped at step 10 (its checkpoints are damaged by copies)."""
    root = tmp_path_factory.mktemp("integrity")
    run_train(1, tiny_recipe, tiny_data, root / "full", "zero2", *RUN)
    run_train(1, tiny_recipe, tiny_data, root / "stopped", "zero2", *RUN, f"run.max_steps={STOP_AT}")
    return root / "full", root / "stopped"


def _copy(run_dir, dest):
    shutil.copytree(run_dir, dest)
    return dest, dest / "checkpoints" / checkpointing.tag_for(STOP_AT)


def _verify(path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pipeline.checkpointing", "verify", str(path)], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=120)


def test_complete_records_every_file_with_size_and_sha256(runs):
    _, stopped = runs
    newest = checkpointing.find_latest(stopped / "checkpoints")
    files = json.loads((newest / checkpointing.MARKER).read_text())["files"]
    on_disk = {p.name for p in newest.iterdir() if p.is_file() and p.name != checkpointing.MARKER}
    assert set(files) == on_disk and "rng_rank0.pt" in files and "train_config.yaml" in files
    for name, rec in files.items():
        assert rec["bytes"] == (newest / name).stat().st_size
        assert rec["sha256"] == checkpointing.sha256_file(newest / name)
    proc = _verify(stopped)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split()[-1] for line in proc.stdout.splitlines()] == ["ok", "ok"]


def test_flipped_bytes_are_skipped_and_the_resume_is_exact(runs, tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    full, stopped = runs
    run_dir, newest = _copy(stopped, tmp_path / "run")
    optim = next(newest.glob("*optim_states.pt"))
    blob = bytearray(optim.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])   # same size, other bytes
    optim.write_bytes(bytes(blob))

    proc = _verify(run_dir)
    assert proc.returncode == 1
    assert f"{newest}  DAMAGED: {optim.name} is not the file that was saved (sha256 differs)" in proc.stdout

    proc = run_train(1, tiny_recipe, tiny_data, run_dir, "zero2", *RUN, "--resume", "auto")
    previous = newest.with_name(checkpointing.tag_for(STOP_AT - 1))
    assert (f"checkpoint {newest} is damaged ({optim.name} is not the file that was saved (sha256 differs)): "
            f"skipped, an earlier complete checkpoint is used") in proc.stdout
    assert f"resumed from {previous} " in proc.stdout
    want, got = final_params(full), final_params(run_dir)
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k}: max diff {float((want[k] - got[k]).abs().max())}"
    assert json.loads((run_dir / "final_metrics.json").read_text())["global_step"] == TOTAL


def test_truncated_model_states_are_named_in_one_line(runs, tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    _, stopped = runs
    run_dir, newest = _copy(stopped, tmp_path / "run")
    states = newest / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    with open(states, "r+b") as f:
        f.truncate(size // 2)

    # named explicitly, a damaged checkpoint is refused before anything starts
    named = run_dir / "named"
    shutil.copytree(newest, named / "checkpoints" / newest.name)
    cmd = train_cmd(1, tiny_recipe, tiny_data, named, "zero2", *RUN, "--resume",
                    str(named / "checkpoints" / newest.name))
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_CONFIG, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("config error:")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("config error: checkpoint.resume: ") and \
        f"is damaged: mp_rank_00_model_states.pt has {size // 2} bytes, {size} were saved" in lines[0], lines

    proc = run_train(1, tiny_recipe, tiny_data, run_dir, "zero2", *RUN, "--resume", "auto",
                     f"run.max_steps={STOP_AT + 1}")
    assert (f"checkpoint {newest} is damaged (mp_rank_00_model_states.pt has {size // 2} bytes, {size} were "
            f"saved): skipped") in proc.stdout
    assert f"resumed from {newest.with_name(checkpointing.tag_for(STOP_AT - 1))} " in proc.stdout


@pytest.fixture
def small_disk(runs, tmp_path):
    """A tmpfs with room for the run's files and one and a half checkpoints (mounting needs root: CI runs so)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the suite runs as root)")
    _, stopped = runs
    size = int(1.5 * checkpointing.checkpoint_bytes(checkpointing.find_latest(stopped / "checkpoints")))
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + (256 << 10)}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_that_fills_during_a_save_is_one_line_and_the_run_resumes(small_disk, tiny_data, tiny_recipe,  # noqa: F811
                                                                         tmp_path):
    run_dir = small_disk / "run"
    cmd = train_cmd(1, tiny_recipe, tiny_data, run_dir, "zero2", *RUN, "tracking.enabled=false")
    proc = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_DISK_FULL, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    first = checkpointing.tag_for(1)
    assert lines[0].startswith(f"error: no space left on the file system of {run_dir / 'checkpoints'} while "
                               f"saving checkpoint {checkpointing.tag_for(2)} (about ") and \
        f"the previous complete checkpoint {first} is intact: free space (or set run.run_dir elsewhere) and " \
        f"rerun with --resume auto" in lines[0], lines[0]
    assert [p.name for p in checkpointing.list_complete(run_dir / "checkpoints")] == [first]

    moved = tmp_path / "moved"   # the user frees space: here, the run folder moves to a roomier disk
    shutil.copytree(run_dir, moved)
    proc = run_train(1, tiny_recipe, tiny_data, moved, "zero2", *RUN, "--resume", "auto", "run.max_steps=3",
                     "tracking.enabled=false")
    assert f"resumed from {moved / 'checkpoints' / first} " in proc.stdout
