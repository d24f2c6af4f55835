"""Benchmark plumbing: interleaved measurement order, medians, tables, JSON results, the run_all summary."""
from __future__ import annotations

import json
import time

import pytest

from benchmarks.common import Timing, format_table, measure_interleaved, write_result
from benchmarks.run_all import discover, summarize_result


def test_interleaved_rounds_rotate_and_count():
    calls: list[str] = []
    cands = {n: (lambda n=n: calls.append(n)) for n in ("a", "b", "c")}
    t = measure_interleaved(cands, warmup=1, rounds=3, calls_per_round=2)
    assert calls[:3] == ["a", "b", "c"]  # warm-up, once each
    timed = calls[3:]
    assert timed == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert all(len(v.samples) == 3 for v in t.values())


def test_timings_measure_the_candidate(monkeypatch):
    """Each sample is the clock time of that candidate's calls alone (per call), read around them and nothing
    else: on a clock that only the candidates move (1 and 5 units a call), the samples are exactly 1 and 5."""
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def cost(units: float):
        def call():
            clock[0] += units
        return call

    t = measure_interleaved({"fast": cost(1.0), "slow": cost(5.0)}, warmup=2, rounds=3, calls_per_round=2)
    assert t["fast"].samples == [1.0, 1.0, 1.0] and t["slow"].samples == [5.0, 5.0, 5.0]


def test_timing_stats():
    t = Timing("x", [1.0, 3.0, 2.0])
    assert t.median == 2.0 and t.spread == pytest.approx(1.0)
    with pytest.raises(ValueError):
        measure_interleaved({"a": lambda: None}, rounds=0)


def test_format_table():
    out = format_table([{"name": "a", "v": 1.23456}, {"name": "bbb", "v": None}], floatfmt="{:.2f}")
    assert out.splitlines() == ["| name | v    |", "|------|------|", "| a    | 1.23 |", "| bbb  |      |"]


def test_write_result_has_commit_and_machine(tmp_path):
    path = write_result("bench_x", {"summary": {"cpvt/deit": 0.99}, "rows": [1]}, tmp_path)
    doc = json.loads(path.read_text())
    assert path == tmp_path / "bench_x.json"
    assert doc["benchmark"] == "bench_x" and doc["rows"] == [1]
    assert doc["commit"] is None or len(doc["commit"].split("-")[0]) == 40
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["torch"]
    assert summarize_result(path) == [("cpvt/deit", "0.99")]


def test_summary_falls_back_to_ratio_keys(tmp_path):
    path = tmp_path / "bench_y.json"
    path.write_text(json.dumps({"rows": [{"name": "wds", "speedup": 1.5, "img_s": 100.0}], "ffcv_over_wds": 2.0}))
    assert summarize_result(path) == [("rows.0.speedup", "1.5"), ("ffcv_over_wds", "2")]


def test_discover_lists_this_areas_benchmarks_first():
    names = discover()
    assert names[:2] == ["bench_model", "bench_zero_memory"]
    assert all(n.startswith("bench_") for n in names)
