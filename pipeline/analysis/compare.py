"""Compare runs from the MLflow store in one figure: top-1 vs test resolution, one line per run (the paper's
resolution figure), which MLflow's own charts cannot draw (they plot a metric against steps, not a key suffix).

Runs are given by run id or run name (a name matches the newest run of that name in any experiment). Each run's
curve is its last logged ``eval/top1_<r>px`` / ``eval/top5_<r>px`` per resolution ``r``. The PNG and a JSON of
the plotted numbers are logged to a new comparison run (in the first run's experiment, tag
``compare.runs``) unless ``--no-log``.

    python -m pipeline.analysis.compare RUN [RUN ...] [--out compare.png] [--paper] [--tracking-uri URI]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from mlflow.exceptions import MlflowException

from pipeline import tracking

_RES_KEY = re.compile(r"^eval/(top1|top5)_(\d+)px$")


class RunNotFound(LookupError):
    pass


def resolve_run(client, ref: str):
    """The run with id ``ref``, else the newest run named ``ref`` (any experiment)."""
    if re.fullmatch(r"[0-9a-f]{32}", ref):
        try:
            return client.get_run(ref)
        except MlflowException:
            pass
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"attributes.run_name = '{ref}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if exps else []
    if not runs:
        raise RunNotFound(f"run {ref!r}: no run with this id or name in {client.tracking_uri}")
    return runs[0]


def resolution_curve(run) -> dict[int, dict[str, float]]:
    """{resolution: {"top1": ..., "top5": ...}} from the run's last ``eval/top{1,5}_<r>px`` values."""
    curve: dict[int, dict[str, float]] = {}
    for key, value in run.data.metrics.items():
        m = _RES_KEY.match(key)
        if m:
            curve.setdefault(int(m.group(2)), {})[m.group(1)] = float(value)
    return {r: v for r, v in sorted(curve.items()) if "top1" in v}


def _labels(runs) -> list[str]:
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    return [f"{n} ({r.info.run_id[:6]})" if names.count(n) > 1 else n for n, r in zip(names, runs)]


def compare(refs: Sequence[str], out: str | Path, *, tracking_uri: str | None = None, paper: bool = False,
            log: bool = True) -> dict[str, Any]:
    """Resolve ``refs``, plot their resolution curves into ``out`` (PNG; the numbers go to ``<out>.json``) and
    log both to a comparison run. Returns {"curves", "plotted", "png", "json", "run_ids", "mlflow_run_id"}."""
    # local: pipeline.analysis.resolution imports torch and the loaders (~2 s); comparing MLflow runs needs neither
    from pipeline.analysis.resolution import PAPER_TOP1, plot_resolution_curves

    client = tracking.client_for(tracking_uri)
    runs = [resolve_run(client, ref) for ref in refs]
    curves = {label: resolution_curve(run) for label, run in zip(_labels(runs), runs)}
    empty = [label for label, c in curves.items() if not c]
    if empty:
        raise RunNotFound(f"runs {empty} have no eval/top1_<r>px metrics (evaluated at no resolution yet)")
    if paper:
        curves |= {f"paper {k}": {r: {"top1": v} for r, v in m.items()} for k, m in PAPER_TOP1.items()
                   if k in ("CPVT-Ti", "DeiT-tiny")}
    train_res = {run.data.metrics.get("train/resolution") for run in runs}
    out = Path(out)
    plotted = plot_resolution_curves(curves, out, train_res=int(train_res.pop()) if len(train_res) == 1 and
                                     None not in train_res else None,
                                     title="top-1 vs test resolution (no fine-tuning)")
    json_path = out.with_suffix(".json")
    run_ids = [r.info.run_id for r in runs]
    json_path.write_text(json.dumps({"runs": dict(zip(curves, run_ids)), "plotted": plotted}, indent=2))
    mlflow_run_id = None
    if log:
        from pipeline.analysis.common import log_to_mlflow  # local: imports torch and the loaders, as above

        exp = client.get_experiment(runs[0].info.experiment_id).name
        mlflow_run_id = log_to_mlflow(run_id=None, experiment=exp, tracking_uri=client.tracking_uri,
                                      artifacts=[out, json_path], run_name="compare: " + " vs ".join(
                                          label for label in curves if not label.startswith("paper ")))
        client.set_tag(mlflow_run_id, "compare.runs", ",".join(run_ids))
    return {"curves": curves, "plotted": plotted, "png": str(out), "json": str(json_path), "run_ids": run_ids,
            "mlflow_run_id": mlflow_run_id}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="MLflow run ids or run names")
    p.add_argument("--out", default="compare_resolution.png", help="PNG path (a .json of the numbers goes next)")
    p.add_argument("--paper", action="store_true", help="add the paper's CPVT-Ti and DeiT-tiny ImageNet curves")
    p.add_argument("--tracking-uri", default=None, help="store (default: $MLFLOW_TRACKING_URI or the project's)")
    p.add_argument("--no-log", action="store_true", help="do not log the figure to a comparison run")
    args = p.parse_args(argv)
    try:
        res = compare(args.runs, args.out, tracking_uri=args.tracking_uri, paper=args.paper, log=not args.no_log)
    except RunNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for label, curve in res["curves"].items():
        print(f"{label:40s} " + "  ".join(f"{r}px {v['top1']:.1f}" for r, v in curve.items()))
    print(f"wrote {res['png']} and {res['json']}" +
          (f"; logged to MLflow run {res['mlflow_run_id']}" if res["mlflow_run_id"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
