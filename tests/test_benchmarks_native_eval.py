"""bench_native_eval --quick: both modes measured side by side on a tiny real WebDataset, JSON written."""
from __future__ import annotations

import json

from benchmarks import bench_native_eval


def test_quick_run_writes_both_modes(tmp_path, capsys):
    assert bench_native_eval.main(["--quick", "--results-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench_native_eval_quick.json").read_text())
    per = doc["per_resolution"]["32"]
    assert per["center_crop"]["n"] == per["native"]["n"] == 18
    assert per["center_crop"]["tokens_per_img"] == 4.0 and per["native"]["tokens_per_img"] > 4.0
    assert all(min(s) == 32 and max(s) <= 64 for s in per["native"]["shapes"])
    assert set(doc["summary"]) == {f"{k} 32px" for k in (
        "top1 native - crop", "native/crop pass img/s", "native/crop pass tokens/s", "native/crop fwd img/s",
        "native/crop fwd tokens/s")}
    assert "native/crop pass tokens/s 32px" in capsys.readouterr().out


def test_missing_demo_export_is_one_line(tmp_path, capsys):
    missing = tmp_path / "runs" / "demo" / "export" / "cpvt_demo.safetensors"
    assert bench_native_eval.main(["--checkpoint", str(missing), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "make demo" in err
    assert not list(tmp_path.glob("*.json"))
