"""The training hot path never waits on the host: a real 1-rank job whose every host read of a tensor
(``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``int()``) is recorded with the project function that asked
for it. Between two logging steps, ``pipeline`` code reads nothing; the only host reads in a step are DeepSpeed's
own (its overflow / grad-norm checks), and the trainer uses the flag they leave on the host to count skips."""
from __future__ import annotations

import json
import subprocess

from tests.helpers_train import PY, ROOT, job_env, tiny_data, tiny_recipe  # noqa: F401

SCRIPT = r"""
import collections, json, sys, traceback
from pathlib import Path
import torch

ROOT = Path(sys.argv[1]).resolve()
calls = []   # "file:function" of project code that read a tensor on the host inside the epoch loop
library = collections.Counter()   # the same reads made by DeepSpeed itself, by file:line
# the WebDataset stream decodes and collates host (CPU) tensors: in DataLoader workers in a real run
HOST_SIDE = {"webdataset_loader.py", "tar_samples.py", "transforms.py"}

def wrap(name):
    orig = getattr(torch.Tensor, name)
    def probe(self, *a, **k):
        stack = traceback.extract_stack()[:-1]
        caller = stack[-1]
        in_loop = any(f.name == "train_epoch" and f.filename.endswith("pipeline/train.py") for f in stack)
        if in_loop and caller.filename.startswith(str(ROOT / "pipeline")) \
                and Path(caller.filename).name not in HOST_SIDE:
            calls.append(f"{Path(caller.filename).name}:{caller.name}")
        elif in_loop and "/deepspeed/" in caller.filename:
            library[f"{caller.filename.split('/deepspeed/')[-1]}:{caller.lineno}"] += 1
        return orig(self, *a, **k)
    setattr(torch.Tensor, name, probe)

for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
    wrap(name)

from pipeline import train
summary = train.main(sys.argv[2:])
Path(summary["run_dir"], "host_reads.json").write_text(json.dumps({"calls": calls, "library": library,
                                                                  "steps": summary["global_step"]}))
"""


def test_no_host_reads_from_project_code_between_logging_steps(tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    log_every = 4
    args = ["--recipe", str(tiny_recipe), "--data", str(tiny_data), "--run-dir", str(run_dir),
            "--deepspeed_config", "deepspeed_configs/zero2.json", "data.batch_size=4", "run.max_steps=8",
            f"run.log_every={log_every}", "checkpoint.every_steps=0", "tracking.enabled=false"]
    proc = subprocess.run([PY, "-c", SCRIPT, str(ROOT), *args], cwd=ROOT, env=job_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    got = json.loads((run_dir / "host_reads.json").read_text())
    assert got["steps"] == 8
    # the reads that do happen are the logging ones, once per log_every steps: the loss mean and the grad norm
    # the reads that do happen are the logging ones, once per log_every steps: the loss mean, the grad norm and the
    # throughput sum; a read in train_step / after_step / stop_reason (or a per-step one anywhere) fails this
    want = ["logging_utils.py:mean", "train.py:log_train_metrics", "distributed.py:all_reduce_sum"] * (8 // log_every)
    assert got["calls"] == want, got["calls"]
