"""Shared plumbing for the analysis commands: load a trained model, read validation images, log to MLflow.

A "checkpoint" argument may be a ``.safetensors`` export (:mod:`pipeline.export`), a DeepSpeed checkpoint
folder (``<run_dir>/checkpoints/step_*``) or a run dir / checkpoints folder (newest complete checkpoint).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from pipeline import distributed, tracking
from pipeline.config import from_dict
from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, AugConfig, DataConfig
from pipeline.evaluate import load_model as load_checkpoint_model


def analysis_device() -> torch.device:
    """The device the analysis commands compute on: the trainer's rule (:func:`pipeline.device.select_device`)."""
    return distributed.device()


def load_model(path: str | Path, device: torch.device | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(fp32 model in eval mode on ``device``, {"model": timm name, "source": path}) via
    :func:`pipeline.evaluate.load_model`."""
    model, name = load_checkpoint_model(path)
    return model.to(device or torch.device("cpu")).eval(), {"model": name, "source": str(path)}


def eval_batches(data_root: str | Path, resolution: int, *, fmt: str = "wds", batch_size: int = 64,
                 crop_pct: float | None = None, num_workers: int = 0, split: str = "val",
                 max_batches: int | None = None, mode: str = "center_crop",
                 max_aspect: float = 2.0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (images, labels) batches of one split at ``resolution`` through the project's eval loader
    (single process: rank 0 of 1); ``mode="native"``: whole images, one aspect bucket (HxW) per batch. Padding
    samples carry label -1."""
    # local: the loaders import timm, torchvision and webdataset (~2 s); --help and argument errors come first
    from pipeline.data.loader import build_eval_loader

    data = from_dict(DataConfig, {"format": fmt, "root": str(data_root), "eval_batch_size": batch_size,
                                  "num_workers": num_workers, "val_split": split})
    crop = crop_pct if crop_pct is not None else AugConfig().crop_pct
    loader = build_eval_loader(data, resolution=resolution, rank=0, world_size=1, crop_pct=crop, mode=mode,
                               max_aspect=max_aspect)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        yield batch[0], batch[1]


def denormalize(images: torch.Tensor, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> torch.Tensor:
    """Normalised (B, 3, H, W) -> float (B, H, W, 3) in [0, 1] for display."""
    m = torch.tensor(mean or IMAGENET_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(std or IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1)


def log_to_mlflow(*, run_id: str | None, experiment: str | None, tracking_uri: str | None,
                  metrics: Mapping[str, float] = {}, artifacts: Sequence[str | Path] = (),
                  params: Mapping[str, Any] = {}, run_name: str | None = None) -> str | None:
    """Log to an existing run (``run_id``) or a new run in ``experiment``; no-op (None) if neither is given.
    Returns the run id."""
    if run_id is None and experiment is None:
        return None
    import mlflow  # local: mlflow (~1 s) only when logging is asked for (--mlflow-run-id / --mlflow-experiment)

    client = tracking.client_for(tracking_uri)   # default: the project store
    mlflow.set_tracking_uri(client.tracking_uri)
    exp_id = None if run_id else tracking.experiment_id(client, experiment)
    with mlflow.start_run(run_id=run_id, experiment_id=exp_id, run_name=None if run_id else run_name) as run:
        if params:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        for a in artifacts:
            mlflow.log_artifact(str(a))
        return run.info.run_id


def add_mlflow_args(parser) -> None:
    parser.add_argument("--mlflow-run-id", default=None, help="log PNG/JSON/metrics into this existing run")
    parser.add_argument("--mlflow-experiment", default=None, help="or: log into a new run of this experiment")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the project store)")


def run_labels(parser, labels: Sequence[str] | None, checkpoints: Sequence[str]) -> list[str]:
    """``--label`` values (possibly none), one per ``--checkpoint``; a count mismatch is a usage error."""
    labels = list(labels or [])
    if labels and len(labels) != len(checkpoints):
        parser.error(f"--label: got {len(labels)} labels for {len(checkpoints)} checkpoints")
    return labels
