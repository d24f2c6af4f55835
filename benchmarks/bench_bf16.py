"""The bf16 factor on this machine: one model's step time under bf16 autocast over its fp32 step time, interleaved.

On a CPU without AVX512-BF16/AMX torch emulates bf16 matmuls, so bf16 is much slower than fp32 there; this is the
number behind ``run.precision: auto`` choosing fp32 on such CPUs. Both candidates are the same architecture with
the same initial weights (:mod:`benchmarks.bench_model`'s steps), timed round by round
(:func:`benchmarks.common.measure_interleaved`); the factor comes with the spread of its per-round values.

    python -m benchmarks.bench_bf16                    # cpvt_ti, train step, 224 px, batch 4, 3 rounds
    python -m benchmarks.bench_bf16 --quick            # 32 px, batch 2, 2 rounds (smoke test)

Results: ``benchmarks/results/bench_bf16.json`` (``bench_bf16_quick.json`` with ``--quick``).
"""
from __future__ import annotations

import argparse
import copy
from typing import Any, Sequence

import timm
import torch

import pipeline.models  # noqa: F401  (registers cpvt_* in timm)
from benchmarks.bench_model import CPVT_KWARGS, Case, cpu_has_native_bf16, make_step
from benchmarks.common import (add_common_args, command_line, format_table, measure_interleaved, paired_ratios, ratio,
                               ratio_spread, write_result)


def measure(model_name: str, mode: str, res: int, batch: int, rounds: int, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    fp32 = timm.create_model(model_name, pretrained=False, num_classes=1000, img_size=res, **CPVT_KWARGS)
    bf16 = copy.deepcopy(fp32)   # same weights; autocast decides the dtype of each op
    steps = {"fp32": make_step(fp32, Case("ti", mode, "fp32", res, batch), torch.device("cpu")),
             "bf16": make_step(bf16, Case("ti", mode, "bf16", res, batch), torch.device("cpu"))}
    t = measure_interleaved(steps, warmup=warmup, rounds=rounds)
    factor = ratio(t["bf16"].median, t["fp32"].median)
    return {"model": model_name, "mode": mode, "res": res, "batch": batch, "fp32_step_s": t["fp32"].median,
            "bf16_step_s": t["bf16"].median, "bf16_over_fp32": factor,
            "ratio_spread": ratio_spread(paired_ratios(t["bf16"].samples, t["fp32"].samples)),
            "samples_s": {k: v.samples for k, v in t.items()}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--model", default="cpvt_ti")
    p.add_argument("--modes", nargs="+", default=["train"], choices=["train", "infer"])
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.res, args.batch, args.rounds = 32, 2, 2
    native = cpu_has_native_bf16()
    rows = [measure(args.model, m, args.res, args.batch, args.rounds, args.warmup) for m in args.modes]
    print(format_table(rows, ["model", "mode", "res", "batch", "fp32_step_s", "bf16_step_s", "bf16_over_fp32",
                              "ratio_spread"]))
    print(f"native bf16 on this CPU (AVX512-BF16/AMX): {native}; torch threads {torch.get_num_threads()}")
    summary = {f"bf16 / fp32 step time {r['model']} {r['mode']} {r['res']}":
               f"{r['bf16_over_fp32']:.2f} (spread {r['ratio_spread']:.1%})" for r in rows}
    payload = {"device": "cpu", "native_bf16": native, "rounds": args.rounds, "warmup": args.warmup,
               "cpvt_kwargs": CPVT_KWARGS, "rows": rows, "summary": summary}
    path = write_result("bench_bf16" + ("_quick" if args.quick else ""), payload, args.results_dir,
                        command=command_line("benchmarks.bench_bf16", argv))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
