"""run_all runs a benchmark in its own process and prints the summary from the JSON it wrote."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_one_benchmark(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.run_all", "--only", "bench_model", "--results-dir", str(tmp_path),
           "--args", "bench_model=--quick --modes infer --dtypes fp32 --rounds 1 --warmup 0"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "bench_model_quick.json").read_text())
    ratio = doc["summary"]["cpvt/deit ti infer fp32 64"]
    assert "benchmark summary" in proc.stdout and f"cpvt/deit ti infer fp32 64  {ratio}" in proc.stdout


def test_run_all_rejects_unknown_benchmark():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--only", "bench_nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bench_nope" in proc.stderr
