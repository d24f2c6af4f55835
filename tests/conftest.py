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
    from pipeline.mlflow_compat import forget_active_experiment

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    forget_active_experiment()   # no public API unsets set_experiment()


# The modules that take minutes (each starts several multi-rank trainings), longest first, from the suite's
# --durations report: under pytest-xdist they start first and the short modules fill the gaps at the end.
LONG_MODULES = ("test_train_elastic", "test_train_features", "test_train_deepspeed", "test_remote_shards",
                "test_slurm_train", "test_train_resume", "test_analysis_compare", "test_tracking_store",
                "test_mlflow_ui", "test_gpu_check", "test_train_nonfinite", "test_benchmarks_progressive",
                "test_analysis_ablations", "test_benchmarks_trainer", "test_slurm_card", "test_launcher_submit")


def pytest_collection_modifyitems(config, items):
    """Order for pytest-xdist (``-n N --dist loadfile``, the Makefile's test command: a module stays on one
    worker, so its module fixtures are built once): :data:`LONG_MODULES` first, then the other modules with slow
    tests, then the rest; stable, so each module's tests stay contiguous and in file order."""
    def rank(item) -> tuple[int, int]:
        name = Path(item.nodeid.split("::")[0]).stem
        if name in LONG_MODULES:
            return 0, LONG_MODULES.index(name)
        return (1 if name in slow else 2), 0

    slow = {Path(item.nodeid.split("::")[0]).stem for item in items if item.get_closest_marker("slow")}
    items.sort(key=rank)
