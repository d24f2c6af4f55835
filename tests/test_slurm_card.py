"""The card's SLURM command exactly as written, on the real local two-node cluster: ``python
launchers/slurm_submit.py --nodes 2 --model cpvt_ti`` with nothing else than a site file (``CPVT_SITE``) pointing at
demo data. It submits, trains a few steps with the cpvt_ti recipe at the recipe's global batch (1024) and the run
lands in the site's MLflow store.

The cluster has two 2-core CPU "nodes" sharing this machine, where the paper's CPVT-Ti at 224 px and 1024 images
per step would take minutes per step. The site file keeps what is a site's business: its ``recipe_dirs`` hold this
site's ``cpvt_ti.yaml``, which inherits the shipped recipe (global batch 1024, the DeiT schedule and augmentation,
repeated augmentation) and narrows only what a small CPU site must: a 2-block width-48 model at 32 px on
WebDataset, no mid-run evaluation, ``run.max_steps: 2``. A site recipe is a real feature (clusters keep local
variants of the shipped recipes), named in the plan with its source, not a test hook.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import yaml

from launchers.executor import wait_for
from pipeline.config import RECIPES
from tests.slurm.fixtures import slurm_cluster  # noqa: F401 - fixture

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES = 1040   # one global batch of 1024 per epoch, on any world size


SITE_RECIPE = f"""\
# this site's cpvt_ti: the shipped recipe, narrowed for two 2-core CPU nodes
_base_: {RECIPES / 'cpvt_ti.yaml'}
model: {{kwargs: {{embed_dim: 48, depth: 2, num_heads: 2}}}}
data: {{format: wds, max_batch_per_gpu: 256, eval_batch_size: 64, num_workers: 0, shuffle_buffer: 64,
       shuffle_initial: 16}}
schedule: {{resolution: {{kind: fixed, resolution: 32}}}}
eval: {{every_epochs: 0, resolutions: [32], max_batches: 1}}
tracking: {{system_metrics: false}}
run: {{max_steps: 2, log_every: 1, progress_bar: false}}
"""


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> Path:
    """A WebDataset demo split with more than one global batch of training images."""
    from data_prep.demo_dataset import make_demo_dataset
    from data_prep.write_webdataset import write_webdataset

    base = tmp_path_factory.mktemp("card_data")
    make_demo_dataset(base / "src", num_classes=4, train_per_class=TRAIN_IMAGES // 4, val_per_class=4,
                      min_side=32, max_side=40, large_images=0, bad_files=False)
    write_webdataset(base / "src", base / "data", cluster="pool", workers=1, progress=False, shard_max_count=520)
    return base / "data"


def test_card_command_on_two_nodes(slurm_cluster, demo_data, tmp_path):
    recipes = tmp_path / "site_recipes"
    recipes.mkdir()
    (recipes / "cpvt_ti.yaml").write_text(SITE_RECIPE)
    store = tmp_path / "mlflow" / "mlflow.db"
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"data_root": str(demo_data), "runs_root": str(tmp_path / "runs"), "time": "15",
                                    "mlflow_uri": f"sqlite:///{store}", "recipe_dirs": [str(recipes)]}))
    env = {**os.environ, "CPVT_SITE": str(site), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    cmd = [sys.executable, "launchers/slurm_submit.py", "--nodes", "2", "--model", "cpvt_ti"]

    dry = subprocess.run([*cmd, "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert dry.returncode == 0, dry.stderr
    assert f"recipe: {recipes / 'cpvt_ti.yaml'}  [the site's recipe for --model cpvt_ti" in dry.stdout
    assert "gpus_per_node: 0  [sinfo -p debug -o %G]" in dry.stdout   # asked SLURM: a CPU partition
    assert "cpus_per_task: 2  [sinfo -p debug -o %c: 2 CPUs per node / 1 tasks]" in dry.stdout
    assert ("world size 2 = 2 nodes x 1 tasks; global batch 1024 = per-rank batch 256 x accumulation 2 x 2 ranks "
            "(data.global_batch_size)") in dry.stdout

    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"^submitted job (\d+) on slurm \(2 tasks\)$", proc.stdout, re.M).group(1)
    run_dir = Path(re.search(r"^run dir: (.+)$", proc.stdout, re.M).group(1))
    run_id = re.search(rf"^MLflow: sqlite:///{re.escape(str(store))} experiment 'cpvt' run (\w+)$", proc.stdout,
                       re.M).group(1)
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("cpvt_ti-")
    job = submitit.SlurmJob(run_dir / "submitit", job_id, tasks=(0, 1))
    summaries = wait_for(job, timeout=600)
    assert [(s["world_size"], s["global_step"], s["exit_code"]) for s in summaries] == [(2, 2, 0)] * 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    [run] = client.search_runs([client.get_experiment_by_name("cpvt").experiment_id])
    assert run.info.run_id == run_id == summaries[0]["mlflow_run_id"] and run.info.status == "FINISHED"
    p = run.data.params
    assert (p["data.global_batch_size"], p["data.batch_size"], p["optim.grad_accum"]) == ("1024", "256", "2")
    assert (p["aug.repeats"], p["schedule.lr.lr"], p["world_size"]) == ("3", "0.0005", "2")   # the DeiT recipe
    batches = [m.value for m in client.get_metric_history(run_id, "train/batch_global")]
    assert batches == [1024.0, 1024.0]
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["mlflow_run_id"] == run_id
