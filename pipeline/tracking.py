"""MLflow tracking: one store per project, one run per training job, tags/dataset that compare well, per-node
system metrics.

Store (:func:`default_uri`): ``tracking.uri`` if set, else ``MLFLOW_TRACKING_URI``, else the project store
``sqlite:///<runs root>/mlflow.db`` with artifacts in ``<runs root>/mlartifacts`` -- the runs root is
``CPVT_RUNS_ROOT`` or ``<checkout>/runs``. Every training, evaluation, ablation and demo run of a checkout lands
there; ``make ui`` serves it (``python -m pipeline.tracking ui``). A multi-node site runs one ``mlflow server``
and points ``MLFLOW_TRACKING_URI`` (or ``tracking.uri``) at it.

A fresh SQLite store is created under a file lock (:func:`prepare_store`): MLflow's schema migration is not safe
against two processes creating the same database at once (measured: 3 of 3 concurrent first writers failed with
alembic/"table already exists" errors); afterwards MLflow's own ``busy_timeout`` (20 s per session) serialises
writers. The rollback journal is kept (WAL needs shared memory, so it breaks on the network file systems a
cluster's runs root lives on).

Runs: global rank 0 creates or continues the run (``MLFLOW_RUN_ID``: the run the SLURM launcher created at
submission; a checkpoint's run id wins on resume) and logs params, tags (:func:`run_tags`), the dataset
(:func:`dataset_input`) and metrics. The run id is broadcast once at set-up so that each node's local rank 0 runs
MLflow's system-metrics monitor (CPU, memory, disk, network; GPU utilisation/memory through NVML when there is a
GPU) into the same run, as ``system/node<k>/...`` on multi-node jobs. A run whose trainer raised ends FAILED
(KILLED on Ctrl-C) with the error in its ``error`` tag, see :func:`end_run_after_error`.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import unquote, urlparse

import torch
import torch.distributed as dist

from pipeline.config import flatten
from pipeline.distributed import detect_env
from pipeline.redaction import redact, redact_values

# mlflow (and pipeline.mlflow_compat) is imported inside the functions that talk to a store: it takes seconds to
# import, and the store paths, a tracking-off run and the launchers' URI look-ups need none of it.

ROOT = Path(__file__).resolve().parents[1]
RUNS_ROOT_ENV = "CPVT_RUNS_ROOT"
STORE_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
# MLflow's own experiment-kind tag (what the UI's experiment-type selector writes): "Machine learning"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
TRAINING_VIEW = "workflowType=machine_learning"   # MLflow 3's UI reads the view from the URL
SYSTEM_METRICS_INTERVAL_S = 5

_MAX_PARAM_LEN = 6000
_MAX_TAG_LEN = 5000   # MLflow's limit on a tag value


# ----------------------------------------------------------------------------------------- the store
def runs_root() -> Path:
    """Where runs and the project's MLflow store live: ``$CPVT_RUNS_ROOT``, else ``<checkout>/runs``."""
    return Path(os.environ.get(RUNS_ROOT_ENV) or ROOT / "runs").resolve()


def project_uri() -> str:
    return f"sqlite:///{runs_root() / STORE_NAME}"


def default_uri(uri: str | None = None) -> str:
    """``uri`` (``tracking.uri``) > ``$MLFLOW_TRACKING_URI`` > the project store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or project_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(urlparse(uri).path if uri.startswith("sqlite:////") else uri[len("sqlite:///"):]))


def artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live next to it (``<store dir>/mlartifacts``); a server decides its own."""
    db = sqlite_path(uri)
    return str(db.parent.resolve() / ARTIFACTS_NAME) if db is not None else None


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_PREPARED: set[str] = set()


def prepare_store(uri: str) -> str:
    """Create/upgrade a SQLite store once, under a file lock (concurrent first writers would race MLflow's schema
    migration); a no-op for servers and for stores this process prepared already. Returns ``uri``."""
    db = sqlite_path(uri)
    if db is None or uri in _PREPARED:
        return uri
    from pipeline import mlflow_compat   # local: mlflow (see the imports)

    with _file_lock(db.with_name(db.name + ".lock")):
        mlflow_compat.create_store(uri, artifact_root(uri))
    _PREPARED.add(uri)
    return uri


def experiment_id(client, name: str) -> str:
    """Id of experiment ``name`` (created with artifacts next to a SQLite store and MLflow's "machine learning"
    experiment kind; two processes creating it at once both get the same id)."""
    from mlflow.exceptions import MlflowException   # local: mlflow (see the imports)

    exp = client.get_experiment_by_name(name)
    if exp is None:
        root = artifact_root(client.tracking_uri)
        try:
            return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None,
                                            tags=EXPERIMENT_KIND)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.tags.get("mlflow.experimentKind") is None:
        client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return exp.experiment_id


def client_for(uri: str | None = None):
    """An :class:`mlflow.MlflowClient` on ``default_uri(uri)``, the store prepared."""
    import mlflow   # local: mlflow (see the imports)

    return mlflow.MlflowClient(prepare_store(default_uri(uri)))


def training_view_url(base: str, exp_id: str) -> str:
    """The runs page of an experiment in MLflow 3's model-training view (not the GenAI overview)."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs?{TRAINING_VIEW}"


# ----------------------------------------------------------------------------------------- run metadata
def git_state(root: Path = ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout; ("unknown", None) without git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return "unknown", None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def device_name(kind: str) -> str:
    """"NVIDIA H100 80GB HBM3" (the GPU this process uses) or "cpu"."""
    if kind == "cuda":
        return torch.cuda.get_device_name()
    return kind


def run_tags(cfg, *, precision: str, zero_stage: int, world_size: int, device_kind: str,
             environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The tags the runs table shows without opening the params (git via MLflow's own source tags too)."""
    env = os.environ if environ is None else environ
    commit, dirty = git_state()
    tags = {"model": cfg.model.name, "recipe": cfg.tracking.recipe or "(none)", "precision": precision,
            "zero_stage": str(zero_stage), "world_size": str(world_size), "device": device_name(device_kind),
            "git.commit": commit, "git.dirty": "unknown" if dirty is None else str(dirty).lower(),
            "mlflow.source.git.commit": commit, "run_dir": str(Path(cfg.run.run_dir).resolve()),
            "data.format": cfg.data.format}
    job = env.get("SLURM_JOB_ID")
    if job:
        array = env.get("SLURM_ARRAY_JOB_ID")
        tags["slurm.job_id"] = f"{array}_{env.get('SLURM_ARRAY_TASK_ID')}" if array else job
    return tags


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def dataset_summary(root: str | Path, fmt: str) -> dict[str, Any]:
    """{name, source, digest, profile} of a data_prep output folder from its manifests: the digest is a sha256 of
    the per-file sha256 the data-prep manifests record (WebDataset shards / FFCV files, all splits), so the same
    shards give the same digest on every machine; the profile holds the split sizes and the class count."""
    root_s = str(root)
    local = Path(root_s) if "://" not in root_s else None
    splits: dict[str, int] = {}
    hashes: list[str] = []
    name = Path(redact(root_s).rstrip("/")).name or redact(root_s)
    classes = _read_json(local / "classes.json") if local else None
    if local and fmt == "wds":
        info = _read_json(local / "wds" / "_info.json") or {}
        name = info.get("name") or name
        for split, entry in sorted(info.get("splits", {}).items()):
            splits[split] = int(entry.get("num_samples", 0))
            hashes += [f"{split}:{h}" for h in entry.get("shard_sha256", [])]
    elif local and fmt == "ffcv":
        for manifest in sorted((local / "ffcv").glob("*_manifest.json")):
            m = _read_json(manifest) or {}
            out = m.get("outputs", {})
            splits[m.get("split", manifest.name.split("_")[0])] = int(out.get("num_samples", 0))
            if out.get("sha256"):
                hashes.append(f"{m.get('split')}:{out['sha256']}")
    digest = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:10] if hashes else None
    profile = {"format": fmt, "splits": splits, "num_classes": len(classes["classes"]) if classes else None}
    source = str(local.resolve()) if local else root_s
    return {"name": f"{name}/{fmt}", "source": source, "digest": digest, "profile": profile}


def dataset_input(root: str | Path, fmt: str):
    """A :class:`pipeline.mlflow_compat.ShardDataset` (metadata only: the shards stay where they are) with the
    manifests' digest and the split sizes as its profile, for ``mlflow.log_input``."""
    from pipeline import mlflow_compat   # local: mlflow (see the imports)

    info = dataset_summary(root, fmt)
    return mlflow_compat.ShardDataset(redact(info["source"]), name=info["name"], digest=info["digest"],
                                      profile=info["profile"])


# ----------------------------------------------------------------------------------------- trackers
class NullTracker:
    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def log_dataset(self, root: str | Path, fmt: str) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, name: str) -> None: ...
    def log_dict(self, data: Any, name: str) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NodeMetricsTracker(NullTracker):
    """A node-local rank 0 other than global rank 0: only MLflow's system-metrics monitor, into rank 0's run."""

    def __init__(self, run_id: str, uri: str, node_id: str | None):
        from pipeline import mlflow_compat   # local: mlflow (see the imports)

        self.compat = mlflow_compat
        self.monitor = mlflow_compat.start_system_metrics(run_id, uri, node_id, SYSTEM_METRICS_INTERVAL_S)

    def finish(self, status: str = "FINISHED") -> None:
        self.compat.stop_system_metrics(self.monitor)


class MLflowTracker(NullTracker):
    def __init__(self, *, uri: str | None, experiment: str, run_name: str | None, run_id: str | None):
        import mlflow   # local: mlflow (see the imports)

        from pipeline import mlflow_compat

        self.mlflow, self.compat = mlflow, mlflow_compat
        self.uri = prepare_store(default_uri(uri))
        mlflow.set_tracking_uri(self.uri)
        self.client = mlflow.MlflowClient(self.uri)
        exp_id = None if run_id else experiment_id(self.client, experiment)
        run = mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=None if run_id else run_name,
                               log_system_metrics=False)
        self.run_id = run.info.run_id
        self.monitor = None

    def start_system_metrics(self, node_id: str | None) -> None:
        self.monitor = self.compat.start_system_metrics(self.run_id, self.uri, node_id, SYSTEM_METRICS_INTERVAL_S)

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        flat = {k: redact(str(v))[:_MAX_PARAM_LEN] for k, v in flatten(dict(params)).items()}
        new = {k: v for k, v in flat.items() if k not in existing}  # resumed runs: params are immutable
        if new:
            self.mlflow.log_params(new)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.mlflow.set_tags({k: redact(str(v))[:_MAX_TAG_LEN] for k, v in tags.items()})

    def log_dataset(self, root: str | Path, fmt: str) -> None:
        try:
            dataset = dataset_input(root, fmt)
        except Exception as e:  # noqa: BLE001 - metadata: the training itself must not stop for it
            print(redact(f"warning: dataset {root} not logged to MLflow ({type(e).__name__}: {e})"), file=sys.stderr)
            return
        for attempt in (1, 2):
            try:
                self.mlflow.log_input(dataset, context="training")
                return
            except Exception as e:  # noqa: BLE001 - two runs logging one new dataset at once race on the store's
                # unique key (experiment, name, digest); the second try finds the row the other run wrote
                if attempt == 2:
                    print(redact(f"warning: dataset {root} not logged to MLflow ({type(e).__name__}: {e})"),
                          file=sys.stderr)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k.replace("@", "_at_"): float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_text(self, text: str, name: str) -> None:
        self.mlflow.log_text(redact(text), name)

    def log_dict(self, data: Any, name: str) -> None:
        self.mlflow.log_dict(redact_values(data), name)

    def log_artifact(self, path: str | Path) -> None:
        self.mlflow.log_artifact(str(path))

    def finish(self, status: str = "FINISHED") -> None:
        if self.monitor is not None:
            self.compat.stop_system_metrics(self.monitor)
        self.mlflow.end_run(status=status)


def end_run_after_error(exc: BaseException) -> None:
    """End the MLflow run this process has open after ``exc`` escaped the trainer: KILLED for a
    KeyboardInterrupt, else FAILED, with ``"<type>: <message>"`` in the run's ``error`` tag (otherwise MLflow's
    atexit hook would end it FINISHED). No-op without an open run (other ranks, tracking off, already ended)."""
    mlflow = sys.modules.get("mlflow")  # imported by MLflowTracker only
    if mlflow is None or mlflow.active_run() is None:
        return
    try:
        mlflow.set_tag("error", redact(type(exc).__name__ + (f": {exc}" if str(exc) else ""))[:_MAX_TAG_LEN])
    except Exception as e:  # noqa: BLE001 - the training error is the one to report
        print(f"warning: could not record the error in MLflow: {e}", file=sys.stderr)
    mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")


def _node_layout(rank: int, world: int, local_rank: int) -> tuple[int, int]:
    """(this rank's node index, number of nodes): node k is the k-th rank with node-local rank 0 (one
    all_gather_object at set-up; several launcher "nodes" may share a host, so host names cannot tell)."""
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    local = [None] * world
    dist.all_gather_object(local, local_rank)
    heads = [r for r, lr in enumerate(local) if lr == 0]
    return sum(1 for h in heads if h <= rank) - 1, len(heads)


def _broadcast(value: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def make_tracker(cfg, *, rank: int, world_size: int, run_id: str | None) -> NullTracker:
    """``cfg`` is the TrainConfig. Global rank 0: the run (an :class:`MLflowTracker`); the other node-local
    ranks 0 with ``tracking.system_metrics``: a :class:`NodeMetricsTracker` on the same run; everyone else, or
    tracking disabled: a no-op. A collective on every rank when system metrics are on (same cfg everywhere)."""
    if not cfg.tracking.enabled:
        return NullTracker()
    per_node = cfg.tracking.system_metrics and world_size > 1
    node, nodes = _node_layout(rank, world_size, detect_env().local_rank) if per_node else (0, 1)
    node_id = f"node{node}" if nodes > 1 else None
    tracker: NullTracker = NullTracker()
    if rank == 0:
        try:
            tracker = MLflowTracker(uri=cfg.tracking.uri, experiment=cfg.tracking.experiment,
                                    run_name=cfg.tracking.run_name or Path(cfg.run.run_dir).name,
                                    run_id=run_id or os.environ.get("MLFLOW_RUN_ID") or None)
        except BaseException:
            if per_node:
                _broadcast(None)   # the other ranks must not wait for a run id that never comes
            raise
        if cfg.tracking.system_metrics:
            tracker.start_system_metrics(node_id)
            if nodes > 1:
                tracker.set_tags({f"{node_id}.host": socket.gethostname()})
    shared = _broadcast((tracker.run_id, getattr(tracker, "uri", None))) if per_node else None
    if rank != 0 and shared and shared[0] and detect_env().local_rank == 0:
        tracker = NodeMetricsTracker(shared[0], shared[1], node_id)
        import mlflow   # local: mlflow (see the imports)

        mlflow.MlflowClient(shared[1]).set_tag(shared[0], f"{node_id}.host", socket.gethostname())
    return tracker


def write_json(data: Any, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
    return path


# ----------------------------------------------------------------------------------------- make ui
def serve_ui(port: int, host: str = "127.0.0.1", uri: str | None = None) -> int:
    """Print the training-view URL of every experiment in the store, then run ``mlflow server`` on it (a remote
    tracking server is only listed: it serves its own UI)."""
    uri = default_uri(uri)
    base = uri if uri.startswith(("http://", "https://")) else f"http://{host}:{port}"
    client = client_for(uri)
    exps = [e for e in client.search_experiments() if e.name != "Default" or
            client.search_runs([e.experiment_id], max_results=1)]
    if not exps:
        experiment_id(client, "cpvt")   # an empty store still opens on the training view
        exps = [client.get_experiment_by_name("cpvt")]
    print(f"MLflow store: {uri}")
    for e in exps:
        experiment_id(client, e.name)   # experiment kind: machine learning
        print(f"  {e.name:20s} {training_view_url(base, e.experiment_id)}")
    print("(the training view is the URL's workflowType=machine_learning; the sidebar toggle switches it too)",
          flush=True)
    if base == uri:
        return 0
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    # one worker and no GenAI job runner (judges, evaluation jobs): a local training UI needs neither, and on a
    # busy machine the default 4 workers + huey consumers start slowly enough for uvicorn to recycle them
    args = [mlflow_bin, "server", "--host", host, "--port", str(port), "--backend-store-uri", uri,
            "--artifacts-destination", artifact_root(uri) or "./mlartifacts", "--workers", "1"]
    os.execve(mlflow_bin, args, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ})
    return 0  # pragma: no cover - execv does not return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The project's MLflow store: print its URLs and serve the UI.")
    sub = p.add_subparsers(dest="cmd", required=True)
    ui = sub.add_parser("ui", help="serve the store (MLflow server) and print each experiment's training view")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--uri", default=None, help="store (default: $MLFLOW_TRACKING_URI or the project store)")
    sub.add_parser("uri", help="print the default tracking URI")
    args = p.parse_args(argv)
    if args.cmd == "uri":
        print(default_uri())
        return 0
    return serve_ui(args.port, args.host, args.uri)


if __name__ == "__main__":
    sys.exit(main())
