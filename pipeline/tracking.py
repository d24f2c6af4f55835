"""MLflow tracking on rank 0 only: one run per training job, resumed jobs continue the same run id.

Default store: ``sqlite:///<run_dir>/mlflow.db`` (``MLFLOW_TRACKING_URI`` or ``tracking.uri`` override it);
``make ui`` serves it. Other ranks get a :class:`NullTracker` and never create runs.
Without a run id from a checkpoint, ``MLFLOW_RUN_ID`` (MLflow's own variable; the SLURM launcher creates the
run at submission and passes its id this way) names an existing run to continue instead of creating one.
A run whose trainer raised ends FAILED (KILLED on Ctrl-C) with the error in its ``error`` tag, see
:func:`end_run_after_error`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import flatten

_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 5000   # MLflow's limit on a tag value


def default_uri(run_dir: str | Path, uri: str | None = None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_dir).resolve()}/mlflow.db"


class NullTracker:
    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_dict(self, data: Any, name: str) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class MLflowTracker(NullTracker):
    def __init__(self, run_dir: str | Path, *, uri: str | None, experiment: str, run_name: str | None,
                 run_id: str | None, system_metrics: bool):
        import mlflow

        self.mlflow = mlflow
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(default_uri(run_dir, uri))
        if run_id is None:
            mlflow.set_experiment(experiment)
        if system_metrics:
            mlflow.set_system_metrics_sampling_interval(5)
            mlflow.set_system_metrics_samples_before_logging(1)
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                               log_system_metrics=system_metrics)
        self.run_id = run.info.run_id
        self.client = mlflow.MlflowClient()

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        flat = {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(dict(params)).items()}
        new = {k: v for k, v in flat.items() if k not in existing}  # resumed runs: params are immutable
        if new:
            self.mlflow.log_params(new)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_text(self, text: str, name: str) -> None:
        self.mlflow.log_text(text, name)

    def log_dict(self, data: Any, name: str) -> None:
        self.mlflow.log_dict(data, name)

    def log_artifact(self, path: str | Path) -> None:
        self.mlflow.log_artifact(str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


def end_run_after_error(exc: BaseException) -> None:
    """End the MLflow run this process has open after ``exc`` escaped the trainer: KILLED for a
    KeyboardInterrupt, else FAILED, with ``"<type>: <message>"`` in the run's ``error`` tag (otherwise MLflow's
    atexit hook would end it FINISHED). No-op without an open run (other ranks, tracking off, already ended)."""
    mlflow = sys.modules.get("mlflow")  # imported by MLflowTracker only
    if mlflow is None or mlflow.active_run() is None:
        return
    try:
        mlflow.set_tag("error", (type(exc).__name__ + (f": {exc}" if str(exc) else ""))[:_MAX_TAG_LEN])
    except Exception as e:  # noqa: BLE001 - the training error is the one to report
        print(f"warning: could not record the error in MLflow: {e}", file=sys.stderr)
    mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")


def make_tracker(cfg, *, rank: int, run_id: str | None) -> NullTracker:
    """``cfg`` is the TrainConfig; returns a no-op tracker off rank 0 or when tracking is disabled."""
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or None
    return MLflowTracker(cfg.run.run_dir, uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                         run_name=cfg.tracking.run_name or Path(cfg.run.run_dir).name, run_id=run_id,
                         system_metrics=cfg.tracking.system_metrics)


def resolution_plot(results: Mapping[int, Mapping[str, float]], out: str | Path, train_res: int | None = None,
                    title: str = "top-1 vs test resolution") -> Path:
    """PNG of top-1/top-5 against evaluation resolution (one run; see pipeline.analysis.resolution)."""
    from pipeline.analysis.resolution import plot_resolution_curves

    plot_resolution_curves({"this run": results}, out, train_res=train_res, title=title)
    return Path(out)


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path
