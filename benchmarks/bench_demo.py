"""The demo's accuracy as a result file: runs ``python -m launchers.demo`` (what ``make demo`` runs) and records the
top-1/top-5 it reports, per evaluated resolution, with the run's steps and times.

    python -m benchmarks.bench_demo                         # the demo into runs/demo (as make demo)
    python -m benchmarks.bench_demo --existing runs/demo     # record a finished demo's demo_summary.json instead

``make bench`` runs it before ``bench_native_eval``, which evaluates the demo's export. Each demo adds a run to the
project's MLflow store, as ``make demo`` does. Results: ``benchmarks/results/bench_demo.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from benchmarks.common import ROOT, add_common_args, command_line, write_result


def summarize(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a demo's ``demo_summary.json``: top-1 of the DeepSpeed run (its WebDataset evaluation) and
    top-1/top-5 of the export, per resolution."""
    train, export_eval = summary["train"], summary["export_eval"]
    fmt = summary.get("export_eval_format", "ffcv")
    rows = [{"resolution": int(r), "train_resolution": int(r) == train.get("train_resolution"),
             "top1_deepspeed_wds": train["eval"][str(r)]["top1"],
             f"top1_export_{fmt}": export_eval[str(r)]["top1"], f"top5_export_{fmt}": export_eval[str(r)]["top5"]}
            for r in sorted(int(k) for k in export_eval)]
    return {"rows": rows, "export_eval_format": fmt, "global_step": train.get("global_step"),
            "world_size": train.get("world_size"), "seconds": summary.get("seconds"),
            "summary": {f"demo top-1 {row['resolution']}px (DeepSpeed / export)":
                        f"{row['top1_deepspeed_wds']:.1f} / {row[f'top1_export_{fmt}']:.1f}" for row in rows}}


def main(argv: Sequence[str] | None = None) -> int:
    p = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--existing", default=None, metavar="RUN_DIR", help="record this finished demo, run nothing")
    p.add_argument("demo_args", nargs="*", help="extra arguments for launchers.demo")
    args = p.parse_args(argv)
    if args.quick:
        p.error("--quick: the demo has no smaller mode here (record a small demo with --existing)")
    run_dir = Path(args.existing or args.run_dir)
    if not args.existing:
        cmd = [sys.executable, "-m", "launchers.demo", "--run-dir", str(run_dir), *args.demo_args]
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            print(f"bench_demo: the demo failed ({' '.join(cmd[1:])})", file=sys.stderr)
            return 1
    found = run_dir / "demo_summary.json"
    if not found.is_file():
        print(f"bench_demo: {found} does not exist: run `make demo` first or leave out --existing", file=sys.stderr)
        return 2
    payload = {"run_dir": str(run_dir), "recorded_existing": bool(args.existing),
               **summarize(json.loads(found.read_text()))}
    path = write_result("bench_demo", payload, args.results_dir, command=command_line("benchmarks.bench_demo", argv))
    for k, v in payload["summary"].items():
        print(f"{k}: {v}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
