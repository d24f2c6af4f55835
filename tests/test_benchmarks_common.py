"""Benchmark plumbing: interleaved measurement order, medians, ratio spreads and verdicts, tables, JSON results, the
run_all summary, the markdown tables generated from result files."""
from __future__ import annotations

import json
import time

import pytest

from benchmarks.common import (Timing, command_line, format_table, judged, measure_interleaved, paired_ratios,
                               ratio_spread, verdict, write_result)
from benchmarks.run_all import discover, summarize_result
from benchmarks.tables import block, check_tables, result_names, update_tables


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
    path = write_result("bench_x", {"summary": {"cpvt/deit": 0.99}, "rows": [1]}, tmp_path,
                        command=command_line("benchmarks.bench_x", ["--rounds", "3", "--note", "a b"]))
    doc = json.loads(path.read_text())
    assert doc["command"] == "python -m benchmarks.bench_x --rounds 3 --note 'a b'"
    assert doc["timestamp"] and doc["machine"]["cpu_model"]
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


def test_ratio_spread_of_paired_rounds():
    # rates a/b from times: round ratios 2/1, 3/1.5, 2.2/1 -> 2.0, 2.0, 2.2; spread (2.2 - 2.0) / 2.0
    r = paired_ratios([2.0, 3.0, 2.2], [1.0, 1.5, 1.0])
    assert r == pytest.approx([2.0, 2.0, 2.2])
    assert ratio_spread(r) == pytest.approx(0.1)
    assert ratio_spread([1.5]) != ratio_spread([1.5])   # NaN: one round measures no spread
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


@pytest.mark.parametrize("value, target, spread, higher, want", [
    (1.10, 1.0, 0.05, True, "PASS"),           # margin 9 % > spread 5 %
    (0.90, 1.0, 0.05, True, "FAIL"),           # margin 11 % > spread 5 %, below the target
    (1.02, 1.0, 0.05, True, "inconclusive"),   # above the target, but by less than the spread
    (0.98, 1.0, 0.05, True, "inconclusive"),   # below the target, by less than the spread
    (0.98, 1.0, 0.01, True, "FAIL"),           # the same ratio, measured tightly enough
    (1.02, 1.0, 0.01, True, "PASS"),
    (0.50, 0.6, 0.10, False, "PASS"),          # lower is better: 0.50 <= 0.6, margin 20 %
    (0.70, 0.6, 0.10, False, "FAIL"),          # margin 14 % > 10 %
    (0.62, 0.6, 0.10, False, "inconclusive"),
    (1.50, 1.0, float("nan"), True, "inconclusive"),   # one round: no spread measured
    (None, 1.0, 0.01, True, "inconclusive"),
])
def test_verdict(value, target, spread, higher, want):
    assert verdict(value, target, spread, higher_is_better=higher) == want


def test_judged_cell_states_ratio_spread_target_verdict():
    assert judged(0.981, 0.97, 0.042) == "0.981 (spread 4.2%, target >= 0.97) inconclusive"
    assert judged(0.90, 0.97, 0.01) == "0.900 (spread 1.0%, target >= 0.97) FAIL"


def test_tables_catch_a_stale_table(tmp_path):
    results = tmp_path / "results"
    write_result("bench_x", {"summary": {"cpvt/deit ti": "0.981 (spread 1.0%, target >= 0.97) PASS"}}, results)
    write_result("bench_x_quick", {"summary": {"a": 1}}, results)
    assert result_names(results) == ["bench_x"]   # smoke results are not tables
    fresh = block("bench_x", results)
    assert "| cpvt/deit ti | 0.981 (spread 1.0%, target >= 0.97) PASS |" in fresh
    assert "bench_x.json" in fresh and "cores" in fresh
    page = tmp_path / "page.md"
    page.write_text(f"# Results\n\n{fresh}\n\nText after.\n")
    assert check_tables(page, results) == []

    page.write_text(page.read_text().replace("0.981", "1.186"))   # a number edited by hand
    stale = check_tables(page, results)
    assert len(stale) == 1 and "table bench_x differs from bench_x.json" in stale[0]
    assert update_tables(page, results) == 1 and check_tables(page, results) == []
    assert page.read_text().endswith("\n\nText after.\n")

    write_result("bench_x", {"summary": {"cpvt/deit ti": "0.990 (spread 1.0%, target >= 0.97) PASS"}}, results)
    assert len(check_tables(page, results)) == 1   # the file was rerun: the page is stale now
    page.write_text("<!-- table: bench_gone -->\n| x |\n<!-- /table -->\n")
    assert check_tables(page, results) == [f"{page}: table bench_gone: no result file bench_gone.json"]
