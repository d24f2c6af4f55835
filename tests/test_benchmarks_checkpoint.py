"""bench_checkpoint: the hash candidate reads the checkpoint the save candidate wrote, and the result file holds
the ratio with both spreads (a real DeepSpeed save in a subprocess, --quick)."""
from __future__ import annotations

import json
import subprocess

from tests.helpers_train import PY, ROOT, job_env


def test_quick_run_writes_the_ratio_and_the_bytes_hashed(tmp_path):
    proc = subprocess.run([PY, "-m", "benchmarks.bench_checkpoint", "--quick", "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "bench_checkpoint_quick.json").read_text())
    (row,) = doc["rows"]
    assert row["model"] == "cpvt_ti" and row["checkpoint_MiB"] > 4 * row["params"] / 2**20   # weights + Adam
    assert row["hash_over_save"] == row["hash_s"] / row["save_s"] > 0
    assert row["hash_MiB_s"] == row["checkpoint_MiB"] / row["hash_s"]
    assert doc["summary"] == {"cpvt_ti hash / save": round(row["hash_over_save"], 3)} and doc["commit"]
