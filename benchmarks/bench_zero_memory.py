"""ZeRO memory: measured per-rank bytes of parameters, gradients and optimizer states, beside DeepSpeed's estimate.

For ZeRO stage 0/1/2/3 (the project's ``deepspeed_configs/zero*.json`` in bf16, AdamW) and 1 and 2 ranks (CPU +
gloo, ranks started with ``torch.multiprocessing``), each rank builds a DeepSpeed engine around CPVT-Ti, runs one
training step (so Adam's moments exist) and a second forward/backward (so gradients are live), then walks the
engine's own objects and adds up the bytes of every distinct tensor storage it holds, in four classes:

* ``params``     - the 16-bit model weights this rank keeps (for ZeRO-3 the ``ds_tensor`` partitions),
* ``grads``      - gradient tensors/buffers (``param.grad`` and every optimizer attribute named ``*grad*``),
* ``optim``      - fp32 master weights (the inner optimizer's params, or optimizer attributes named ``*fp32*``)
                   + Adam's ``exp_avg``/``exp_avg_sq``,
* ``buffers``    - remaining tensors held by the ZeRO optimizer (communication/bucket buffers; not model
                   states: ZeRO-3 allocates a ``reduce_bucket_size``-element one up front -- 5e7 in the
                   project's configs, 5e8 = 954 MiB in bf16 with DeepSpeed's default).

Each storage is counted once (flat buffers are shared by many parameter views). The estimate column is
DeepSpeed's own ``estimate_zero2_model_states_mem_needs`` (stages 0-2; stage 0 = no partitioning, i.e. the
1-rank formula) / ``estimate_zero3_model_states_mem_needs`` (stage 3) without offload; it counts
"2 bytes params + 18 bytes/param partitioned" (+ largest layer for ZeRO-3) and excludes the 1.5x buffer factor
that only applies to CPU memory.

    python -m benchmarks.bench_zero_memory [--model cpvt_ti] [--stages 0 1 2 3] [--world-sizes 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from benchmarks.common import ROOT, add_common_args, command_line, format_table, write_result
from pipeline.deepspeed_compat import inner_optimizer, model_states_estimate, zero3_partition
from pipeline.net import free_port

CLASSES = ("params", "grads", "optim", "buffers")


# ----------------------------------------------------------------------------------------- measuring
def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _walk(obj: Any, path: str, depth: int, seen_objs: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (attribute path, tensor) for tensors reachable from ``obj`` through attributes/containers."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if depth <= 0 or id(obj) in seen_objs or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return
    if isinstance(obj, (torch.nn.Module, torch.distributed.ProcessGroup)) \
            or callable(obj) and not hasattr(obj, "__dict__"):
        return
    seen_objs.add(id(obj))
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple, set)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        items = vars(obj).items()
    else:
        return
    for k, v in items:
        k = f"<{type(k).__name__}>" if isinstance(k, torch.Tensor) else k
        yield from _walk(v, f"{path}.{k}" if path else str(k), depth - 1, seen_objs)


def measure_engine(engine: Any) -> dict[str, Any]:
    """Per-class bytes of distinct storages held by ``engine`` (see module docstring)."""
    counted: dict[tuple[int, int], str] = {}

    def add(t: torch.Tensor | None, cls: str) -> None:
        if t is None or t.numel() == 0:
            return
        key = _storage_key(t)
        if key[1] and key not in counted:
            counted[key] = cls

    module_params = list(engine.module.parameters())
    for p in module_params:  # ZeRO-3: the rank's partition is p.ds_tensor; p.data is empty between forwards
        add(zero3_partition(p), "params")
        add(p.data, "params")
    inner = inner_optimizer(engine)  # the torch AdamW inside DeepSpeed's wrapper
    for group in inner.param_groups:
        for p in group["params"]:
            add(p.data, "optim")  # fp32 master weights / fp32 partitions
    for state in inner.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                add(v, "optim")
    for p in module_params:
        add(p.grad, "grads")
    for path, t in _walk(engine.optimizer, "", 6, set()):
        name = path.lower()
        add(t, "grads" if "grad" in name else "optim" if ("fp32" in name or "master" in name) else "buffers")
    out = {c: 0 for c in CLASSES}
    for (_, nbytes), cls in counted.items():
        out[cls] += nbytes
    out["total"] = sum(out[c] for c in CLASSES)
    out["model_states"] = out["params"] + out["grads"] + out["optim"]
    out["optimizer_class"] = type(engine.optimizer).__name__
    return out


def ds_config(stage: int, micro_batch: int) -> dict[str, Any]:
    """The project's own ``deepspeed_configs/zero{1,2,3}.json`` in bf16 (``run.precision=bf16``; stage 0: the
    ZeRO-1 file with stage 0), batch sizes filled in as pipeline/train.py does, and torch's AdamW (no fused-op
    compile on CPU)."""
    path = ROOT / "deepspeed_configs" / f"zero{max(stage, 1)}.json"
    base = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")} if path.is_file() else {
        "zero_optimization": {"overlap_comm": False, "contiguous_gradients": True}}
    base["bf16"] = {"enabled": True}
    base["zero_optimization"] = dict(base.get("zero_optimization", {}), stage=stage)
    return dict(base, train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=1,
                optimizer={"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.05, "torch_adam": True}},
                steps_per_print=10**9, wall_clock_breakdown=False)


def _worker(rank: int, world_size: int, port: int, model_name: str, model_kwargs: dict[str, Any], stages: list[int],
            res: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import deepspeed
    import timm

    import pipeline.models  # noqa: F401

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    results = []
    for stage in stages:
        torch.manual_seed(0)
        model = timm.create_model(model_name, pretrained=False,
                                  **dict({"num_classes": 1000, "img_size": res}, **model_kwargs))
        est = model_states_estimate(model, stage, world_size)
        n_params = sum(p.numel() for p in model.parameters())
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(stage, 2))
        x = torch.randn(2, 3, res, res, dtype=torch.bfloat16)
        y = torch.randint(0, model.num_classes, (2,))
        for step in range(2):
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            if step == 0:
                engine.step()
        row = measure_engine(engine)
        row.update(stage=stage, world_size=world_size, rank=rank, n_params=n_params, estimate=est)
        results.append(row)
        engine.step()
        engine.destroy()
        del engine, model
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def measure(model_name: str, stages: Sequence[int], world_size: int, res: int = 64,
            model_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Spawn ``world_size`` ranks, each measuring every stage; returns one row per (stage, rank)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(world_size, free_port(), model_name, dict(model_kwargs or {}), list(stages),
                                          res, tmp),
                           nprocs=world_size, join=True, start_method="spawn")
        rows = []
        for rank in range(world_size):
            rows.extend(json.loads(Path(tmp, f"rank{rank}.json").read_text()))
    return sorted(rows, key=lambda r: (r["stage"], r["world_size"], r["rank"]))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="cpvt_ti")
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--world-sizes", nargs="+", type=int, default=[1, 2])
    p.add_argument("--res", type=int, default=64, help="input side for the measured step (memory of model "
                   "states does not depend on it)")
    add_common_args(p)
    args = p.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    rows = []
    for ws in args.world_sizes:
        rows.extend(measure(args.model, args.stages, ws, args.res))
    mib = 2**20
    table = [{"stage": r["stage"], "ranks": r["world_size"], "rank": r["rank"], "optimizer": r["optimizer_class"],
              **{f"{c}_MiB": r[c] / mib for c in (*CLASSES, "model_states")},
              "ds_estimate_MiB": r["estimate"] / mib, "measured/estimate": r["model_states"] / r["estimate"]}
             for r in rows]
    print(format_table(table, floatfmt="{:.2f}"))
    rank0 = {(r["stage"], r["world_size"]): r for r in rows if r["rank"] == 0}
    summary = {}
    for (stage, ws), r in sorted(rank0.items()):
        summary[f"zero{stage} x{ws} model-state MiB/rank (measured vs DS estimate)"] = \
            f"{r['model_states'] / mib:.1f} vs {r['estimate'] / mib:.1f}"
        base = rank0.get((0, ws))
        if base and stage:
            summary[f"zero{stage} x{ws} / zero0 x{ws} model states"] = round(r["model_states"]
                                                                               / base["model_states"], 3)
    payload = {"model": args.model, "rows": rows, "summary": summary}
    path = write_result("bench_zero_memory" + ("_quick" if args.quick else ""), payload, args.results_dir,
                        command=command_line("benchmarks.bench_zero_memory", argv))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
