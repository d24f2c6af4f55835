"""bench_demo records a demo's accuracies from its demo_summary.json; a missing demo is one line."""
from __future__ import annotations

import json

from benchmarks import bench_demo

SUMMARY = {"train": {"train_resolution": 64, "global_step": 120, "world_size": 2,
                     "eval": {"48": {"top1": 61.0}, "64": {"top1": 72.5}, "96": {"top1": 55.25}}},
           "export_eval": {"48": {"top1": 60.5, "top5": 95.0}, "64": {"top1": 72.0, "top5": 98.0},
                           "96": {"top1": 55.0, "top5": 90.0}},
           "export_eval_format": "wds", "export": "runs/demo/export/cpvt_demo.safetensors", "seconds": 300.0}


def test_existing_demo_is_recorded(tmp_path, capsys):
    run = tmp_path / "demo"
    run.mkdir()
    (run / "demo_summary.json").write_text(json.dumps(SUMMARY))
    assert bench_demo.main(["--existing", str(run), "--results-dir", str(tmp_path / "res")]) == 0
    doc = json.loads((tmp_path / "res" / "bench_demo.json").read_text())
    assert [r["resolution"] for r in doc["rows"]] == [48, 64, 96]
    row64 = doc["rows"][1]
    assert row64 == {"resolution": 64, "train_resolution": True, "top1_deepspeed_wds": 72.5, "top1_export_wds": 72.0,
                     "top5_export_wds": 98.0}
    assert doc["summary"]["demo top-1 96px (DeepSpeed / export)"] == "55.2 / 55.0"
    assert doc["recorded_existing"] and doc["global_step"] == 120 and doc["commit"] is not None
    assert "demo top-1 64px (DeepSpeed / export): 72.5 / 72.0" in capsys.readouterr().out


def test_missing_demo_is_one_line(tmp_path, capsys):
    assert bench_demo.main(["--existing", str(tmp_path / "nope"), "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "demo_summary.json does not exist" in err
