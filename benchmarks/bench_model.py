"""Model throughput: CPVT vs timm's DeiT of the same size, measured side by side in one run.

For each case (size, mode, dtype, resolution) both models are built with random init and timed interleaved
(:func:`benchmarks.common.measure_interleaved`); the table reports images/s, the ratio CPVT/DeiT and the PEG
overhead ``1 - ratio`` against the target of <= 3% (the paper: CPVT-Ti 2500.7 vs DeiT-tiny 2536.5 img/s on a
V100, -1.4%), with the ratio's spread over the rounds and its verdict (:func:`benchmarks.common.verdict`:
inconclusive where the spread exceeds the margin to the target). Modes: ``train`` (forward + backward + AdamW
step) and ``infer`` (forward under inference_mode).

    python -m benchmarks.bench_model                 # default cases for this device
    python -m benchmarks.bench_model --sizes ti --modes infer --dtypes fp32 --rounds 5
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import timm
import torch
import torch.nn.functional as F

import pipeline.models  # noqa: F401  (registers cpvt_* in timm)
from benchmarks.common import (add_common_args, command_line, format_table, judged, measure_interleaved, paired_ratios,
                               ratio, ratio_spread, verdict, write_result)

PEG_OVERHEAD_TARGET = 0.03
PAPER = {"ti": {"deit": 2536.5, "cpvt": 2500.7}, "s": {"deit": 940.4, "cpvt": 930.5}}
PAIRS = {"ti": ("vit_tiny_patch16_224", "cpvt_ti"), "s": ("vit_small_patch16_224", "cpvt_s")}
# The paper's Table 5 throughput compares DeiT against CPVT with PEGs after blocks 0-4.
CPVT_KWARGS: dict[str, Any] = {"peg_positions": (0, 1, 2, 3, 4), "peg_kernel": 3}


@dataclass(frozen=True)
class Case:
    size: str  # "ti" | "s"
    mode: str  # "train" | "infer"
    dtype: str  # "fp32" | "bf16"
    res: int
    batch: int


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without them torch emulates bf16 matmuls on the CPU (~8-17x slower than fp32 here)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def default_cases(sizes: Sequence[str], modes: Sequence[str], dtypes: Sequence[str], on_gpu: bool,
                  quick: bool, native_bf16: bool = True) -> list[Case]:
    """Batch sizes scaled to the device. On a CPU the batches are large enough (Ti: 16 train / 32 infer at 224,
    8 at 384; S: half) that per-op fixed costs do not dominate; on a CPU without native bf16 only CPVT-Ti at
    224 is run in bf16 (small batches: emulated bf16 costs ~10 s per 8-image train step on 2 cores)."""
    cases = []
    for size in sizes:
        for mode in modes:
            for dtype in dtypes:
                for res in ((64,) if quick else (224, 384) if mode == "infer" else (224,)):
                    if quick:
                        batch = 2
                    elif on_gpu:
                        batch = {"train": 128, "infer": 256}[mode] // (4 if size == "s" and res > 224 else 1)
                    elif dtype == "bf16" and not native_bf16:
                        if size != "ti" or res > 224:
                            continue
                        batch = {"train": 4, "infer": 8}[mode]
                    else:   # CPVT-S: half the batch (its ops are 4x larger; keeps make bench < 15 min)
                        batch = ({"train": 16, "infer": 32}[mode] if res <= 224 else 8) // (2 if size == "s" else 1)
                    cases.append(Case(size, mode, dtype, res, batch))
    return cases


def build(name: str, res: int, device: torch.device) -> torch.nn.Module:
    kwargs = dict(CPVT_KWARGS) if name.startswith("cpvt") else {}
    return timm.create_model(name, pretrained=False, num_classes=1000, img_size=res, **kwargs).to(device)


def make_step(model: torch.nn.Module, case: Case, device: torch.device) -> Callable[[], None]:
    """A closure running one timed unit of work (one batch) for ``model``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, 3, case.res, case.res, generator=g).to(device)
    y = torch.randint(0, 1000, (case.batch,), generator=g).to(device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=case.dtype == "bf16")  # noqa: E731
    if case.mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast():
                model(x)

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def train() -> None:
        with autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return train


def run_case(case: Case, device: torch.device, warmup: int, rounds: int) -> dict[str, Any]:
    deit_name, cpvt_name = PAIRS[case.size]
    torch.manual_seed(0)
    steps = {"deit": make_step(build(deit_name, case.res, device), case, device),
             "cpvt": make_step(build(cpvt_name, case.res, device), case, device)}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    t = measure_interleaved(steps, warmup=warmup, rounds=rounds, sync=sync)
    deit_ips, cpvt_ips = case.batch / t["deit"].median, case.batch / t["cpvt"].median
    r = ratio(cpvt_ips, deit_ips)
    spread = ratio_spread(paired_ratios(t["deit"].samples, t["cpvt"].samples))   # per-round CPVT/DeiT rates
    return {"size": case.size, "mode": case.mode, "dtype": case.dtype, "res": case.res, "batch": case.batch,
            "deit_model": deit_name, "cpvt_model": cpvt_name, "deit_img_s": deit_ips, "cpvt_img_s": cpvt_ips,
            "cpvt_over_deit": r, "peg_overhead": 1.0 - r,
            "within_target": bool(1.0 - r <= PEG_OVERHEAD_TARGET), "ratio_spread": spread,
            "verdict": verdict(r, 1.0 - PEG_OVERHEAD_TARGET, spread),
            "spread_deit": t["deit"].spread, "spread_cpvt": t["cpvt"].spread,
            "samples_s": {k: v.samples for k, v in t.items()}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=None, choices=sorted(PAIRS))
    p.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--rounds", type=int, default=None, help="interleaved timed rounds per case")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--budget-s", type=float, default=None if torch.cuda.is_available() else 420.0,
                   help="start no new case after this many seconds (keeps make bench bounded on slow CPUs)")
    add_common_args(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sizes = args.sizes or (["ti"] if args.quick else ["ti", "s"])
    rounds = args.rounds or (2 if args.quick else 10 if on_gpu else 4)
    native_bf16 = on_gpu or cpu_has_native_bf16()
    cases = default_cases(sizes, args.modes, args.dtypes, on_gpu, args.quick, native_bf16=native_bf16)
    # cheapest, most informative first (fp32 before bf16, Ti before S), so a time budget cuts the tail
    cases.sort(key=lambda c: (c.dtype != "fp32", c.size != "ti"))
    rows, skipped, t0 = [], [], time.time()
    for case in cases:
        if args.budget_s and time.time() - t0 > args.budget_s:
            skipped.append(case)
            print(f"[bench_model] skipped (over --budget-s {args.budget_s:.0f}): {case}", file=sys.stderr)
            continue
        row = run_case(case, device, args.warmup, rounds)
        rows.append(row)
        print(f"[bench_model] {case}: cpvt/deit = {row['cpvt_over_deit']:.3f}", file=sys.stderr, flush=True)
    cols = ["size", "mode", "dtype", "res", "batch", "deit_img_s", "cpvt_img_s", "cpvt_over_deit", "ratio_spread",
            "verdict", "peg_overhead", "spread_deit", "spread_cpvt"]
    print(format_table(rows, cols))
    print(f"PEG overhead target <= {PEG_OVERHEAD_TARGET:.0%}; paper (V100, Ti): "
          f"{PAPER['ti']['cpvt']} vs {PAPER['ti']['deit']} img/s = {PAPER['ti']['cpvt'] / PAPER['ti']['deit']:.3f}")
    if not native_bf16:
        print("this CPU has no native bf16 (no AVX512-BF16/AMX): bf16 rows measure torch's emulation, not a "
              "deployment setting; the target applies to fp32 here")
    summary = {f"cpvt/deit {r['size']} {r['mode']} {r['dtype']} {r['res']}":
               judged(r["cpvt_over_deit"], 1.0 - PEG_OVERHEAD_TARGET, r["ratio_spread"]) for r in rows}
    payload = {"device": str(device), "native_bf16": native_bf16, "rounds": rounds, "warmup": args.warmup,
               "cpvt_kwargs": CPVT_KWARGS,
               "target_peg_overhead": PEG_OVERHEAD_TARGET, "paper": PAPER, "rows": rows, "summary": summary,
               "skipped_cases": [dataclasses.asdict(c) for c in skipped]}
    path = write_result("bench_model" + ("_quick" if args.quick else ""), payload, args.results_dir,
                        command=command_line("benchmarks.bench_model", argv))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
