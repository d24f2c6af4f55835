"""What checkpoint integrity costs per save: the sha256 of every file a rank wrote (:func:`pipeline.checkpointing
.file_records`, recorded in ``COMPLETE``) against the save itself (DeepSpeed's ``save_checkpoint`` + the RNG file),
interleaved in one process on one rank (ZeRO-2, fp32, DeepSpeed's CPU accelerator where there is no GPU).

    python -m benchmarks.bench_checkpoint                  # cpvt_ti and cpvt_s, 5 rounds
    python -m benchmarks.bench_checkpoint --quick          # a 2-block cpvt_ti, 2 rounds (smoke test)

Writes ``benchmarks/results/bench_checkpoint.json``; ``hash / save`` is the fraction a save gets longer. Resuming
verifies the same bytes once more (a stat per file, then the same sha256 pass) before anything starts.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import add_common_args, command_line, format_table, measure_interleaved, ratio, write_result

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def measure(model: str, kwargs: dict[str, Any], rounds: int, folder: Path) -> dict[str, Any]:
    # local: deepspeed only after the accelerator is chosen (DS_ACCELERATOR above, then init_distributed)
    import deepspeed
    import timm
    import torch

    import pipeline.models  # noqa: F401 - registers cpvt_* in timm
    from pipeline import checkpointing
    from pipeline.rng import rng_state

    net = timm.create_model(model, num_classes=1000, **kwargs)
    ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds)
    engine.train()
    loss = engine(torch.randn(1, 3, 32, 32)).float().logsumexp(-1).mean()
    engine.backward(loss)
    engine.step()   # Adam moments exist, as in a real checkpoint
    count = {"n": 0}

    def save():
        count["n"] += 1
        tag = f"step_{count['n']:08d}"
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
        torch.save(rng_state(), folder / tag / "rng_rank0.pt")
        for old in folder.glob("step_*"):   # keep only the newest (the one the hash candidate reads)
            if old.name != tag:
                shutil.rmtree(old)

    def newest() -> Path:
        return max(folder.glob("step_*"))

    save()
    timings = measure_interleaved({"save": save, "hash": lambda: checkpointing.file_records(newest(), 0)},
                                  warmup=1, rounds=rounds)
    nbytes = sum(f.stat().st_size for f in newest().iterdir())
    return {"model": model, "params": sum(p.numel() for p in net.parameters()), "checkpoint_MiB": nbytes / 2**20,
            "save_s": timings["save"].median, "hash_s": timings["hash"].median,
            "save_spread": timings["save"].spread, "hash_spread": timings["hash"].spread,
            "hash_over_save": ratio(timings["hash"].median, timings["save"].median),
            "hash_MiB_s": nbytes / 2**20 / timings["hash"].median}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["cpvt_ti", "cpvt_s"])
    p.add_argument("--rounds", type=int, default=5)
    add_common_args(p)
    args = p.parse_args(argv)
    models = {"cpvt_ti": {"depth": 2}} if args.quick else {m: {} for m in args.models}
    rounds = 2 if args.quick else args.rounds
    from pipeline import device as devices
    from pipeline.distributed import destroy, init_distributed

    init_distributed(devices.select_device())   # one rank; DeepSpeed needs a process group
    rows = []
    for model, kwargs in models.items():
        with tempfile.TemporaryDirectory(prefix="bench_checkpoint_") as tmp:
            rows.append(measure(model, kwargs, rounds, Path(tmp)))
    destroy()
    print(format_table(rows))
    summary = {f"{r['model']} hash / save": round(r["hash_over_save"], 3) for r in rows}
    path = write_result("bench_checkpoint" + ("_quick" if args.quick else ""),
                        {"rows": rows, "rounds": rounds, "summary": summary}, args.results_dir,
                        command=command_line("benchmarks.bench_checkpoint", argv))
    print(f"wrote {path}")
    return {"rows": rows, "summary": summary}


if __name__ == "__main__":
    main()
