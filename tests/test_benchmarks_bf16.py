"""bench_bf16 --quick: fp32 and bf16 steps of one model timed in one interleaved run; the factor follows from them."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_bf16


def test_quick_run_writes_factor_with_spread(tmp_path):
    payload = bench_bf16.main(["--quick", "--results-dir", str(tmp_path)])
    doc = json.loads((tmp_path / "bench_bf16_quick.json").read_text())
    row = doc["rows"][0]
    assert row["bf16_over_fp32"] == pytest.approx(row["bf16_step_s"] / row["fp32_step_s"])
    assert [len(v) for v in row["samples_s"].values()] == [2, 2] and row["ratio_spread"] >= 0
    assert doc["summary"] == payload["summary"] == {
        "bf16 / fp32 step time cpvt_ti train 32": f"{row['bf16_over_fp32']:.2f} (spread {row['ratio_spread']:.1%})"}
    assert doc["command"] == f"python -m benchmarks.bench_bf16 --quick --results-dir {tmp_path}"
