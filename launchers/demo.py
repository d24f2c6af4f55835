"""`make demo`: the whole pipeline end to end on the built-in synthetic dataset, on CPU, in minutes.

1. demo dataset (ImageNet layout) -> WebDataset shards + FFCV .beton files (data_prep; FFCV where installed;
   5 % of train held out as minival, on which the training chooses its test resolution),
2. 2-rank DeepSpeed training (ZeRO-2, precision auto: fp32 on a CPU without native bf16, progressive resolution
   48 -> 64 px) of CPVT-Ti,
   launched as ``torchrun --nproc_per_node 2 pipeline/train.py`` with MLflow tracking,
3. export to safetensors and evaluation of the export at 3 resolutions (from the FFCV val split, else WebDataset's),
4. the export logged as an MLflow model of the run (registered as ``cpvt_ti``),
5. a summary table: accuracies, where the checkpoint / export / MLflow store are, the UI's training-view URL.

Each demo adds a run to the project's MLflow store (:func:`pipeline.tracking.default_uri`); nothing is wiped.

    python -m launchers.demo --run-dir runs/demo

It sits on top of the layers (data_prep, then pipeline's training, export and evaluation), hence in launchers/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from data_prep.demo_dataset import make_demo_dataset
from data_prep.write_ffcv import write_ffcv
from data_prep.write_webdataset import write_webdataset
from pipeline import tracking
from pipeline.config import DataConfig, ffcv_installed, from_dict
from pipeline.device import select_device
from pipeline.evaluate import evaluate, load_model
from pipeline.export import export, log_mlflow_model, read_meta
from pipeline.ffcv_compat import keep_torch_threads
from pipeline.net import free_port

ROOT = Path(__file__).resolve().parents[1]
# minival, on which the training chooses its test resolution: 5 % of the 1000 train images (5 per class; the
# command line's 1 % would leave one image per class)
MINIVAL_FRACTION = 0.05
# the export is scored on the FFCV val split where FFCV is installed (an optional extra), else on the WebDataset one
EVAL_FORMAT = "ffcv" if ffcv_installed() else "wds"


def prepare_data(run_dir: Path, workers: int) -> Path:
    src, data = run_dir / "src", run_dir / "data"
    if not (src / "demo_dataset.json").is_file():
        make_demo_dataset(src)
    # a data folder already in place is used as it is (with or without a minival split)
    if not (data / "wds" / "_info.json").is_file():
        write_webdataset(src, data, cluster="pool", workers=workers, progress=False, shard_max_count=250,
                         minival_fraction=MINIVAL_FRACTION)
    if EVAL_FORMAT == "ffcv" and not (data / "ffcv" / "val.beton").is_file():
        with keep_torch_threads():
            write_ffcv(src, data, workers=workers, progress=False, minival_fraction=MINIVAL_FRACTION)
    return data


def train(run_dir: Path, data: Path, recipe: str, nproc: int, extra: list[str]) -> dict:
    # a fresh training each time (the dataset is kept); the MLflow store is the project's, so every demo adds a run
    if (run_dir / "checkpoints").is_dir():
        shutil.rmtree(run_dir / "checkpoints")
        (run_dir / "final_metrics.json").unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "pipeline/train.py", "--recipe", recipe, "--data", str(data), "--run-dir",
           str(run_dir), "tracking.system_metrics=true", "run.progress_bar=false", *extra]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return json.loads((run_dir / "final_metrics.json").read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line; without --nproc: 2 ranks on CPU, one per GPU (at most 2) on GPUs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--recipe", default=str(ROOT / "pipeline" / "recipes" / "demo.yaml"))
    p.add_argument("--nproc", type=int, default=None,
                   help="training ranks (default 2 on CPU; on GPUs one per GPU, at most 2: NCCL needs a GPU per rank)")
    p.add_argument("--workers", type=int, default=2, help="data-prep processes")
    p.add_argument("overrides", nargs="*", help="extra section.field=value for the training run")
    args = p.parse_args(argv)
    if args.nproc is None:
        gpus = torch.cuda.device_count() if select_device().kind == "cuda" else 0
        args.nproc = min(2, gpus) if gpus else 2
    return args


def export_and_evaluate(run_dir: Path, data: Path, final: dict) -> tuple[Path, str | None, list[int], dict]:
    """Export the final checkpoint, log the export as the run's MLflow model (when the run is tracked) and score it
    on the EVAL_FORMAT val split at the resolutions the training evaluated: (export, model URI, resolutions,
    results)."""
    out = export(final["checkpoint"], run_dir / "export" / "cpvt_demo.safetensors")
    model_uri = None
    if final.get("mlflow_run_id"):   # the export as an MLflow model of the run, registered under the model's name
        model_uri = log_mlflow_model(out, final["mlflow_run_id"], registered_name=read_meta(out)["model"])
    model, _ = load_model(out)
    resolutions = sorted(int(r) for r in final["eval"])
    data_cfg = from_dict(DataConfig, {"format": EVAL_FORMAT, "root": str(data), "eval_batch_size": 100,
                                      "num_workers": 1}, prefix="data.")
    export_eval = evaluate(model.eval(), data_cfg, resolutions=resolutions, rank=0, world_size=1,
                           crop_pct=0.875, device=torch.device("cpu"), patch_size=model.patch_size)
    return out, model_uri, resolutions, export_eval


def print_accuracy_table(final: dict, export_eval: dict, resolutions: list[int]) -> None:
    """Top-1 of the DeepSpeed run (wds) next to top-1/top-5 of its export (EVAL_FORMAT), one row per resolution."""
    train_res = final["train_resolution"]
    rows = [("resolution", "top-1 (DeepSpeed, wds)", f"top-1 (export, {EVAL_FORMAT})", "top-5 (export)")]
    for r in resolutions:
        rows.append((f"{r}px" + (" (train)" if r == train_res else ""), f"{final['eval'][str(r)]['top1']:.1f}",
                     f"{export_eval[r]['top1']:.1f}", f"{export_eval[r]['top5']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def training_view(final: dict, uri: str) -> str:
    """The MLflow UI's training-view URL of the run (served by `make ui`), or just "make ui" when untracked."""
    view = "make ui"
    if final.get("mlflow_run_id"):
        exp = tracking.client_for(uri).get_run(final["mlflow_run_id"]).info.experiment_id
        view = tracking.training_view_url("http://127.0.0.1:5000", exp) + "   (after: make ui)"
    return view


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    print("== 1/4 demo dataset -> WebDataset" + (" + FFCV" if EVAL_FORMAT == "ffcv" else ""), flush=True)
    data = prepare_data(run_dir, args.workers)
    t_data = time.time() - t0

    print(f"== 2/4 DeepSpeed training ({args.nproc} ranks, ZeRO-2, precision auto, progressive resolution)",
          flush=True)
    final = train(run_dir, data, args.recipe, args.nproc, args.overrides)
    t_train = time.time() - t0 - t_data

    print(f"== 3/4 export + evaluation of the export ({EVAL_FORMAT} val split)", flush=True)
    out, model_uri, resolutions, export_eval = export_and_evaluate(run_dir, data, final)
    num_classes = len(json.loads((data / "classes.json").read_text())["classes"])

    print("== 4/4 summary", flush=True)
    print_accuracy_table(final, export_eval, resolutions)
    if final.get("test_res"):
        t = final["test_res"]
        print(f"test resolution {t['chosen']} px chosen on minival (top-1 {t['minival_top1']:.1f} %); "
              f"val top-1 there: {t['val_top1']:.1f} %")
    uri = tracking.default_uri()
    view = training_view(final, uri)
    print(f"""
chance level         {100 / num_classes:.1f}% ({num_classes} classes); steps {final['global_step']}, world size {final['world_size']}
time                 data prep {t_data:.0f}s, training {t_train:.0f}s, total {time.time() - t0:.0f}s
checkpoint           {final['checkpoint']}
export (safetensors) {out}
plot                 {run_dir / 'resolution_vs_accuracy.png'}
MLflow run           {final['mlflow_run_id']} in {uri} (every demo and training of this checkout)
MLflow model         {model_uri}
MLflow UI            {view}
evaluate again       python -m pipeline.evaluate {out} --data {data} --resolutions {' '.join(map(str, resolutions))}
""", flush=True)  # noqa: E501 - a table printed as it reads
    (run_dir / "demo_summary.json").write_text(json.dumps({"train": final, "export_eval": export_eval,
                                                            "export_eval_format": EVAL_FORMAT,
                                                            "export": str(out), "seconds": time.time() - t0},
                                                           indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
