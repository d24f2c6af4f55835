"""Export a DeepSpeed checkpoint (ZeRO 1, 2 or 3) to one consolidated fp32 ``safetensors`` state dict that
``timm.create_model(name, **kwargs).load_state_dict(...)`` accepts; model name + kwargs go into the file's
metadata and a ``.json`` next to it, with the resolved training config (``pipeline.evaluate`` takes its eval
settings from there). ``--ema`` exports the checkpoint's EMA weights (``run.ema``) instead, the same way.

    python -m pipeline.export runs/demo/checkpoints/step_00000120 --out runs/demo/export/model.safetensors
    python -m pipeline.export runs/demo            # newest complete checkpoint -> runs/demo/export/
    python -m pipeline.export runs/demo --ema      # -> runs/demo/export/<model>_<tag>_ema.safetensors
    python -m pipeline.export runs/demo --register # + registered in MLflow's model registry as <model>

The export is also logged as an MLflow model (``--no-mlflow``: not) into the run that trained the checkpoint
(its id is in the checkpoint, its store in the checkpoint's config): ``mlflow.pyfunc.load_model(uri)`` serves
it, the UI's Models tab lists it.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline import checkpointing, tracking
from pipeline.config import TrainConfig, from_dict
from pipeline.data.shard_index import read_num_classes

from pipeline.atomic import fsync_replace, tmp_path


def checkpoint_model_spec(ckpt: Path) -> tuple[str, dict[str, Any]]:
    """(timm model name, create_model kwargs) from the ``train_config.yaml`` saved in the checkpoint folder."""
    cfg = from_dict(TrainConfig, yaml.safe_load((ckpt / "train_config.yaml").read_text()))
    kwargs = cfg.model.create_kwargs(read_num_classes(cfg))
    kwargs.pop("drop_path_rate", None)  # inference: no stochastic depth
    return cfg.model.name, kwargs


def resolve_checkpoint(path: str | Path) -> Path:
    path = Path(path)
    if checkpointing.is_complete(path):
        return path
    found = checkpointing.find_latest(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    return found


def consolidated_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """fp32 state dict merged from every rank's ZeRO partitions (DeepSpeed's zero_to_fp32)."""
    # local: deepspeed fixes its accelerator when imported, so only after pipeline.device.apply_device
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(ckpt)
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}


def ema_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 EMA weights the trainer saved in the checkpoint's client state (rank 0's model-states file)."""
    ckpt = Path(ckpt)
    files = [ckpt / f for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    state = torch.load(next((f for f in files if f.is_file()), files[0]), map_location="cpu", weights_only=False)
    if state.get("ema") is None:
        raise ValueError(f"{ckpt} holds no EMA weights (the run was trained without run.ema=true)")
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state["ema"].items()}


def export(ckpt: str | Path, out: str | Path | None = None, ema: bool = False) -> Path:
    ckpt = resolve_checkpoint(ckpt)
    name, kwargs = checkpoint_model_spec(ckpt)
    suffix = "_ema" if ema else ""
    out = Path(out) if out else ckpt.parent.parent / "export" / f"{name}_{ckpt.name}{suffix}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    sd = ema_state_dict(ckpt) if ema else consolidated_state_dict(ckpt)
    meta = {"model": name, "model_kwargs": kwargs, "checkpoint": str(ckpt.resolve()),
            "weights": "ema" if ema else "model", "train_config": (ckpt / "train_config.yaml").read_text()}
    tmp = tmp_path(out)
    save_file(sd, str(tmp), metadata={"cpvt": json.dumps(meta)})
    fsync_replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return out


def checkpoint_run(ckpt: Path) -> tuple[str | None, str | None]:
    """(MLflow run id, tracking.uri) of the training that wrote ``ckpt`` (None, None when tracking was off)."""
    cfg = from_dict(TrainConfig, yaml.safe_load((ckpt / "train_config.yaml").read_text()))
    if not cfg.tracking.enabled:
        return None, None
    files = [ckpt / f for f in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    state = torch.load(next((f for f in files if f.is_file()), files[0]), map_location="cpu", weights_only=False)
    return (state.get("train_state") or {}).get("mlflow_run_id"), cfg.tracking.uri


def _pyfunc_model():
    """An ``mlflow.pyfunc.PythonModel`` that serves an export: float32 images (N, 3, H, W), any H and W that are
    multiples of the patch size (the PEG needs no fixed grid) -> logits. Built lazily: mlflow stays out of
    ``import pipeline.export``; cloudpickle stores the class with the model."""
    import mlflow.pyfunc  # local: mlflow (~1 s) only when logging (not with --no-mlflow, nor to load an export)

    class CPVTExport(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.model = load_export(context.artifacts["weights"])[0].eval()

        def predict(self, context, model_input, params=None):
            with torch.no_grad():
                return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()

    return CPVTExport()


def log_mlflow_model(path: str | Path, run_id: str, *, tracking_uri: str | None = None,
                     registered_name: str | None = None) -> str:
    """Log the export at ``path`` into MLflow run ``run_id`` as a pyfunc model named ``model`` (the safetensors
    file and its .json as the model's artifacts; the UI's Models tab lists it), optionally registered as
    ``registered_name``. Returns the model URI."""
    # local: mlflow (~1 s) only when logging (not with --no-mlflow, nor to load an export)
    import mlflow
    from mlflow.models import ModelSignature  # local: as mlflow
    from mlflow.types.schema import Schema, TensorSpec  # local: as mlflow

    path = Path(path)
    meta = read_meta(path)
    num_classes = int(meta["model_kwargs"].get("num_classes", 1000))
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]))
    # explicit requirements: MLflow's inference would load the model in a subprocess (seconds, and a GPU)
    reqs = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={version('timm')}",
            f"safetensors=={version('safetensors')}", f"mlflow=={mlflow.__version__}"]
    mlflow.set_tracking_uri(tracking.prepare_store(tracking.default_uri(tracking_uri)))
    # start_run(run_id=...) refuses a run outside the process's active experiment: make the run's own one active
    mlflow.set_experiment(experiment_id=mlflow.get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=_pyfunc_model(), signature=signature, pip_requirements=reqs,
            artifacts={"weights": str(path), "meta": str(path.with_suffix(".json"))},
            code_paths=[str(Path(__file__).resolve().parent)],   # the model code (pipeline.models) travels along
            registered_model_name=registered_name, tags={"cpvt.model": meta["model"], "weights": meta["weights"]})
    return info.model_uri


def read_meta(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`export` stored in a ``.safetensors`` file (model name, kwargs, source, config)."""
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["cpvt"])


def load_export(path: str | Path):
    """Build the timm model recorded in an export and load its weights (strict)."""
    import timm  # local: timm (~1.3 s) only to load an export; the export CLI never builds a model

    import pipeline.models  # noqa: F401 - local, as timm: registers cpvt_* in timm

    meta = read_meta(path)
    kwargs = dict(meta["model_kwargs"])
    kwargs["peg_positions"] = tuple(kwargs.get("peg_positions", (0,)))
    model = timm.create_model(meta["model"], **kwargs)
    model.load_state_dict(load_file(str(path)))
    return model, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint folder (step_*), checkpoints folder or run dir (newest complete)")
    p.add_argument("--out", default=None,
                   help="output .safetensors (default: <run_dir>/export/<model>_<tag>[_ema].safetensors)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (runs trained with run.ema=true)")
    p.add_argument("--no-mlflow", action="store_true",
                   help="do not log the export as an MLflow model into the run that trained the checkpoint")
    p.add_argument("--register", nargs="?", const="", default=None, metavar="NAME",
                   help="also register the logged model (default name: the model's name, e.g. cpvt_ti)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, ema=args.ema)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    if not args.no_mlflow:
        run_id, uri = checkpoint_run(resolve_checkpoint(args.checkpoint))
        if run_id:
            name = (args.register or read_meta(out)["model"]) if args.register is not None else None
            print(f"MLflow model {log_mlflow_model(out, run_id, tracking_uri=uri, registered_name=name)}"
                  + (f" registered as {name}" if name else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
