"""Run every ``benchmarks/bench_*.py`` (each in its own process) and print one summary of the ratios.

``make bench`` = ``python -m benchmarks.run_all``. Each benchmark prints its own table and writes
``benchmarks/results/<name>.json`` (commit + machine info included) so runs can be compared across commits;
this runner then prints every result's ``summary`` (or, for results without one, the numbers whose key names a
ratio/speedup) and the wall time of each benchmark.

    python -m benchmarks.run_all                        # all, in a fixed order (model first)
    python -m benchmarks.run_all --only bench_model bench_zero_memory
    python -m benchmarks.run_all --args bench_model="--sizes ti --modes infer"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from benchmarks.common import RESULTS_DIR, ROOT, format_table

BENCH_DIR = Path(__file__).resolve().parent
# bench_demo before bench_native_eval: it runs the demo, whose export bench_native_eval evaluates
ORDER = ["bench_model", "bench_zero_memory", "bench_bf16", "bench_progressive", "bench_data_prep", "bench_loaders",
         "bench_remote", "bench_trainer", "bench_demo", "bench_native_eval"]
RATIO_WORDS = ("ratio", "speedup", "over", "vs", "overhead")
# run only when named with --only: bench_time_to_accuracy trains several runs for about half an hour
OPT_IN = ["bench_time_to_accuracy"]


def discover() -> list[str]:
    found = sorted(p.stem for p in BENCH_DIR.glob("bench_*.py") if p.stem not in OPT_IN)
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def _ratios(obj: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(dotted key, number) for numbers whose key mentions a ratio/speedup, in a result without a summary."""
    if depth > 4:
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and any(w in str(k).lower() for w in RATIO_WORDS):
                yield key, v
            elif isinstance(v, (dict, list)):
                yield from _ratios(v, key + ".", depth + 1)
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            yield from _ratios(v, f"{prefix}{i}.", depth + 1)


def summarize_result(path: Path) -> list[tuple[str, str]]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return [(path.name, f"unreadable: {e}")]
    if isinstance(doc.get("summary"), dict) and doc["summary"]:
        return [(k, str(v)) for k, v in doc["summary"].items()]
    return [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in _ratios(doc)][:40]


def run_one(name: str, extra: Sequence[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *extra]
    print(f"\n=== {name}: {shlex.join(cmd[1:])}", flush=True)
    t0 = time.time()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return {"name": name, "rc": rc, "seconds": round(time.time() - t0, 1)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", default=None, help="benchmark module names (default: all found)")
    p.add_argument("--skip", nargs="+", default=[])
    p.add_argument("--args", nargs="+", default=[], metavar="NAME=ARGS", help="extra CLI args for one benchmark")
    p.add_argument("--timeout", type=float, default=600, help="seconds per benchmark")
    p.add_argument("--results-dir", default=None, help=f"default {RESULTS_DIR}")
    args = p.parse_args(argv)
    names = [n for n in (args.only or discover()) if n not in args.skip]
    missing = [n for n in names if not (BENCH_DIR / f"{n}.py").is_file()]
    if missing:
        p.error(f"--only: {missing} not found; available: {discover()}")
    extra = {}
    for item in args.args:
        name, _, rest = item.partition("=")
        extra[name] = shlex.split(rest)
    results_dir = Path(args.results_dir or os.environ.get("CPVT_BENCH_RESULTS", RESULTS_DIR)).resolve()
    env = dict(os.environ, CPVT_BENCH_RESULTS=str(results_dir))
    if not _has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator + gloo
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    start = time.time()
    runs = []
    for name in names:
        before = {p: p.stat().st_mtime_ns for p in results_dir.glob("*.json")}
        run = run_one(name, extra.get(name, []), args.timeout, env)
        # the result files this benchmark wrote: new ones, or ones whose mtime changed during its run
        run["results"] = sorted(p for p in results_dir.glob("*.json") if before.get(p) != p.stat().st_mtime_ns)
        runs.append(run)
    print("\n" + "=" * 100 + f"\nbenchmark summary (results in {results_dir}; total {time.time() - start:.0f} s)")
    print(format_table([{"benchmark": r["name"], "exit": r["rc"], "seconds": r["seconds"],
                         "json": ", ".join(p.name for p in r["results"])} for r in runs]))
    for r in runs:
        for path in r["results"]:
            lines = summarize_result(path)
            if lines:
                print(f"\n{path.stem}:")
                width = max(len(k) for k, _ in lines)
                for k, v in lines:
                    print(f"  {k.ljust(width)}  {v}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
