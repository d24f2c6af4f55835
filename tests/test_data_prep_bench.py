"""The data-prep benchmark stays runnable (tiny sizes; no timing assertions)."""
from __future__ import annotations

import json

import pytest

from benchmarks.bench_data_prep import main

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.mark.slow
def test_benchmark_writes_json_with_every_row(tmp_path, capsys):
    out = tmp_path / "data_prep.json"
    assert main(["--images", "12", "--large", "2", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["per_core"]) == {"read_only", "read_decode", "wds_write", "ffcv_write"}
    assert all(v["images_per_s"] > 0 and v["images_per_cpu_s"] > 0 for v in r["per_core"].values())
    assert {"wds_vs_read_only", "ffcv_vs_read_only", "draft_speedup_wall", "draft_speedup_cpu"} <= set(r["ratios"])
    assert r["draft"]["images"] == 2 and r["setup"]["images"] == 12
    assert "ratios:" in capsys.readouterr().out
