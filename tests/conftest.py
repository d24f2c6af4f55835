"""Suite-wide settings. Area-specific fixtures live in tests/helpers_<area>.py or the test files themselves."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed on machines without a GPU: CPU accelerator + gloo. Compiled ops are cached per checkout.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
except ImportError:  # pragma: no cover - the Makefile always installs torch
    pass
# Never let a test talk to a tracking server configured in the caller's shell.
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Nor read the caller's site file (~/.config/cpvt/site.yaml): tests that use one set CPVT_SITE themselves.
os.environ["CPVT_SITE"] = ""


# Session fixtures shared by several test modules are registered here, once: a fixture imported into each module
# is a separate fixture per module, and its session scope then runs it once per module.
from tests.helpers_tracking import shared_store  # noqa: E402,F401 - the MLflow store of two trainings and a demo


@pytest.fixture(scope="session", autouse=True)
def suite_runs_root(tmp_path_factory) -> Path:
    """The suite's own runs root, so the default MLflow store (pipeline.tracking.default_uri) of every training a
    test starts is ``<pytest tmp>/runs/mlflow.db``, never the checkout's ``runs/mlflow.db``. Tests that count
    runs use a store of their own (``tracking.uri=...``) or filter by the ``run_dir`` tag."""
    root = tmp_path_factory.getbasetemp() / "runs"
    os.environ["CPVT_RUNS_ROOT"] = str(root)
    return root


@pytest.fixture(autouse=True)
def no_leaked_tracking_uri():
    """``mlflow.set_tracking_uri()`` / ``set_experiment()`` also export ``MLFLOW_TRACKING_URI`` /
    ``MLFLOW_EXPERIMENT_ID`` and keep the active experiment in-process: a test that calls them must not move the
    store or the experiment of the tests (and the trainings they start) after it."""
    import mlflow.tracking.fluent as fluent

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    fluent._active_experiment_id = None   # no public API unsets set_experiment()


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n N --dist loadgroup``, the Makefile's test command) a test module runs on one
    worker, so its module fixtures are built once; the SLURM modules share one worker and its one cluster."""
    for item in items:
        module = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group("slurm" if Path(module).name.startswith("test_slurm") else module))
