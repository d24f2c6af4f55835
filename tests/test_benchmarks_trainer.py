"""benchmarks/bench_trainer.py: the in-memory TrainLoader and its clock, the run order, and real (tiny) runs of the
benchmark: the trainer loop against the bare DeepSpeed loop (JSON structure, both rates positive; no timing
assertions)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_trainer as bt

ROOT = Path(__file__).resolve().parents[1]


def _loader(n=5, warmup=1, clock=None, sync=None):
    batches = bt.make_batches(2, 4, 32, bt.NUM_CLASSES, "cpu")
    return bt.InMemoryLoader(batches, n, warmup=warmup, clock=clock or iter(range(0, 1000, 2)).__next__, sync=sync,
                             cpu_clock=iter(range(0, 1000, 1)).__next__)


def test_in_memory_loader_contract():
    loader = _loader()
    assert len(loader) == 5 and loader.batch_size == 4 and loader.global_batch_size == 4
    loader.set_epoch(0, 32, batch_size=4, skip_batches=0)
    got = list(loader)
    assert len(got) == 5 and got[0][0].shape == (4, 3, 32, 32) and got[0][1].dtype == torch.int64
    assert got[0][0] is got[2][0] and got[0][0] is not got[1][0]   # the same pre-built tensors, cycled
    assert int(got[0][1].max()) < bt.NUM_CLASSES
    loader.set_epoch(1, 32, skip_batches=3)
    assert len(list(loader)) == 2
    with pytest.raises(ValueError, match="px"):
        loader.set_epoch(0, 48)
    with pytest.raises(ValueError, match="batches of 4"):
        loader.set_epoch(0, 32, batch_size=8)
    with pytest.raises(ValueError, match="warmup"):
        bt.InMemoryLoader(loader.batches, 3, warmup=3)


def test_in_memory_loader_clock_excludes_warmup():
    syncs = []
    loader = _loader(n=5, warmup=1, sync=lambda: syncs.append(1))
    loader.set_epoch(0, 32)
    assert loader.rate() is None
    list(loader)
    # stamps when batch 1 (warm-up done), batch 4 (last) and the batch after the last are asked for: t = 0, 2, 4
    assert sorted(loader.stamps) == [1, 4, 5] and len(syncs) == 3
    assert loader.timed_steps == 4 and loader.rate() == pytest.approx(4 * 4 / 4)
    assert loader.rate(cpu=True) == pytest.approx(4 * 4 / 2)


def test_in_memory_loader_consumer_that_stops_at_the_last_batch():
    loader = _loader(n=5, warmup=1)
    loader.set_epoch(0, 32)
    it = iter(loader)
    for _ in range(5):  # like itertools.islice(loader, 5): never asks for a 6th batch
        next(it)
    assert sorted(loader.stamps) == [1, 4] and loader.timed_steps == 3 and loader.rate() == pytest.approx(3 * 4 / 2)


def test_worker_order_alternates():
    assert bt.worker_order(2, ["trainer", "bare"]) == ["trainer", "bare", "bare", "trainer"]
    assert bt.worker_order(3, ["bare"]) == ["bare"] * 3


def test_defaults_on_cpu_are_small():
    args = bt.resolve_defaults(bt.build_parser().parse_args(["--device", "cpu"]))
    assert (args.resolution, args.batch_size, args.precision, args.threads) == (64, 32, "fp32", 1)
    assert json.loads(args.model_kwargs) == bt.CPU_MODEL_KWARGS and args.rounds == 2


def _run(tmp_path, *extra) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_trainer", "--quick", "--device", "cpu", "--results-dir",
           str(tmp_path), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads((tmp_path / "bench_trainer_quick.json").read_text())
    assert doc["benchmark"] == "bench_trainer_quick" and doc["settings"]["precision"] == "fp32"
    assert all(r["rc"] == 0 and r["img_s"] > 0 and r["img_s_wall"] > 0 and r["timed_steps"] >= 1 for r in doc["runs"])
    assert doc["clock"] == "process_cpu" and doc["img_s_wall"]["bare"] > 0
    assert doc["img_s"]["bare"] > 0 and "bare img/s" in doc["summary"]
    return doc


def test_bench_trainer_bare_only(tmp_path):
    doc = _run(tmp_path, "--bare-only")
    assert [r["kind"] for r in doc["runs"]] == ["bare"] and doc["ratio"] is None
    assert doc["trainer_skipped"] == "--bare-only"


def test_bench_trainer_trainer_vs_bare(tmp_path):
    doc = _run(tmp_path)
    assert [r["kind"] for r in doc["runs"]] == ["trainer", "bare"]
    assert doc["img_s"]["trainer"] > 0 and doc["ratio"] > 0 and doc["trainer_skipped"] is None
    trainer = doc["runs"][0]
    assert trainer["set_epoch_calls"][0][:2] == [0, doc["settings"]["resolution"]]
