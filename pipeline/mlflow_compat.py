"""Every use of MLflow beyond its documented client API, in one place (tested against the installed version by
``tests/test_library_internals.py``: an MLflow upgrade that changes any of these fails there, not in a run).

Documented and used directly elsewhere: ``mlflow.MlflowClient``, the fluent ``start_run`` / ``log_*`` /
``set_tag(s)`` / ``log_input`` / ``end_run`` / ``active_run``, ``mlflow.exceptions.MlflowException``,
``mlflow.models.ModelSignature``. Used here beyond it:

* ``mlflow.store.tracking.sqlalchemy_store.SqlAlchemyStore``: constructing one creates (or migrates) a SQL
  store's schema, which :func:`create_store` does under the caller's file lock;
* ``mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor``: its ``node_id`` / ``resume_logging`` /
  ``tracking_uri`` arguments (:func:`start_system_metrics`) and ``collect_metrics`` / ``aggregate_metrics`` /
  ``publish_metrics`` (:func:`stop_system_metrics` publishes a last sample before ``finish``);
* ``mlflow.data.meta_dataset.MetaDataset``, subclassed with a profile, and
  ``mlflow.data.dataset_source_registry.resolve_dataset_source`` (:class:`ShardDataset`);
* ``mlflow.tracking.fluent._active_experiment_id``: no public API unsets ``mlflow.set_experiment()``
  (:func:`forget_active_experiment`, for the test suite).

Imported only where MLflow is used (:mod:`pipeline.tracking` imports it inside the functions that need it).
"""
from __future__ import annotations

import json
import sys
from typing import Any

import mlflow.tracking.fluent as fluent
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

TESTED_VERSIONS = ("3.17",)   # the major.minor versions tests/test_library_internals.py was written against


def create_store(uri: str, artifact_root: str | None) -> None:
    """Create a SQL tracking store at ``uri`` (or migrate an older schema to this MLflow's)."""
    SqlAlchemyStore(uri, artifact_root)


def start_system_metrics(run_id: str, uri: str, node_id: str | None, interval_s: float) -> SystemMetricsMonitor:
    """MLflow's own monitor (``system/<node_id>/...`` metrics every ``interval_s``), continuing the run's steps on
    a resumed run; started."""
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True, node_id=node_id,
                                   tracking_uri=uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor: SystemMetricsMonitor) -> None:
    """Publish one last sample, then stop: MLflow's monitor publishes only after a full sampling interval, so a
    node whose part of the job is shorter than that would otherwise leave no series at all."""
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
    except Exception as e:  # noqa: BLE001 - metrics must never fail the training's exit
        print(f"warning: last system-metrics sample not logged: {e}", file=sys.stderr)
    monitor.finish()   # flushes while the run is still RUNNING


class ShardDataset(MetaDataset):
    """A :class:`MetaDataset` (metadata only: the files stay where they are) with a profile, which
    ``MetaDataset`` lacks; the UI shows it in the dataset drawer."""

    def __init__(self, source: str, *, name: str, digest: str | None, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(resolve_dataset_source(source), name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def forget_active_experiment() -> None:
    """Undo ``mlflow.set_experiment()`` in this process (the next run goes to the default experiment again)."""
    fluent._active_experiment_id = None


__all__ = ["TESTED_VERSIONS", "ShardDataset", "create_store", "forget_active_experiment", "start_system_metrics",
           "stop_system_metrics"]
