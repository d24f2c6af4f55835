"""FFCV is an optional extra: set-up skips it with one line where its libraries are missing, the WebDataset path
never imports it, and asking for FFCV without it is a one-line error (exit 2) before anything starts."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
FFCV_PIP = "install --no-build-isolation ffcv==1.0.2"

# Makes `import ffcv` (and importlib.util.find_spec("ffcv")) fail in the process that runs it, as where the extra
# was never installed; the shared .venv keeps its ffcv.
NO_FFCV = """
import importlib.abc, sys
class NoFfcv(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ffcv" or name.startswith("ffcv."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None
sys.meta_path.insert(0, NoFfcv())
"""


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def _fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A venv whose python finds no ffcv and whose pip only records its arguments (nothing is installed)."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")   # the find_spec('ffcv') probe: not found
    (venv / "bin" / "pip").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    for f in ("python", "pip"):
        (venv / "bin" / f).chmod(0o755)
    return venv, log


def _make_ffcv_extra(venv: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    # -o: the venv stamp and the apt step count as done (the test installs nothing, as a non-root user would)
    return subprocess.run([MAKE, "-s", "-o", f"{venv}/.cpvt-installed", "-o", "system-deps", "ffcv-extra",
                           f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(MAKE is None, reason="needs make")
def test_setup_skips_ffcv_in_one_line_without_its_libraries(tmp_path):
    venv, log = _fake_venv(tmp_path)
    empty = tmp_path / "no_pc"
    empty.mkdir()
    # pkg-config present, but it finds neither opencv4 nor libturbojpeg
    proc = _make_ffcv_extra(venv, dict(os.environ, PKG_CONFIG_LIBDIR=str(empty), PKG_CONFIG_PATH=str(empty)))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("ffcv skipped") and "opencv4, libturbojpeg" in line
    assert "apt-get install libopencv-dev libturbojpeg0-dev pkg-config" in line
    assert "conda-forge" in line and "opencv libjpeg-turbo pkg-config" in line
    assert not log.exists()   # pip never ran

    # no pkg-config at all (a PATH with only the shell tools the recipe uses)
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("bash", "sh", "grep", "env"):
        (bare / tool).symlink_to(shutil.which(tool))
    proc = _make_ffcv_extra(venv, dict(os.environ, PATH=str(bare)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and "lacks pkg-config" in proc.stdout, proc.stdout
    assert not log.exists()


@pytest.mark.skipif(MAKE is None or shutil.which("pkg-config") is None
                    or subprocess.run(["pkg-config", "--exists", "opencv4", "libturbojpeg"]).returncode != 0,
                    reason="needs pkg-config with opencv4 and libturbojpeg (FFCV's build libraries)")
def test_setup_installs_ffcv_where_its_libraries_are(tmp_path):
    venv, log = _fake_venv(tmp_path)
    proc = _make_ffcv_extra(venv, dict(os.environ))
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    assert FFCV_PIP in log.read_text()


def test_webdataset_path_runs_without_ffcv_and_ffcv_format_is_one_line(tmp_path):
    script = NO_FFCV + f"""
from pathlib import Path
from data_prep.demo_dataset import make_demo_dataset
from data_prep.write_webdataset import write_webdataset
from pipeline.config import AugConfig, ConfigError, DataConfig, from_dict
from pipeline.data.loader import build_eval_loader, build_train_loader

base = Path({str(tmp_path)!r})
make_demo_dataset(base / "src", num_classes=3, train_per_class=4, val_per_class=2, min_side=32, max_side=64,
                  large_images=0, bad_files=False, val_layout="folders")
write_webdataset(base / "src", base / "out", workers=1, progress=False)
cfg = from_dict(DataConfig, {{"format": "wds", "root": str(base / "out"), "batch_size": 4, "eval_batch_size": 4,
                             "num_workers": 0, "shuffle_buffer": 8, "shuffle_initial": 2}}, prefix="data.")
train = build_train_loader(cfg, AugConfig(), num_classes=3, rank=0, world_size=1, seed=0)
train.set_epoch(0, 32)
x, y = next(iter(train))
val = sum(int((yy >= 0).sum()) for _, yy in build_eval_loader(cfg, resolution=32, rank=0, world_size=1))
print("wds", tuple(x.shape), val)
assert "ffcv" not in sys.modules
try:
    from_dict(DataConfig, {{"format": "ffcv", "root": str(base / "out")}}, prefix="data.")
except ConfigError as e:
    print("error:", e)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert out[0] == "wds (4, 3, 32, 32) 6"
    assert out[1].startswith("error: data.format: 'ffcv' needs FFCV, but the ffcv package is not installed")
    assert out[1].endswith("use format 'wds'") and len(out) == 2


def test_data_prep_ffcv_without_ffcv_is_one_line_exit_2(tmp_path):
    (tmp_path / "src" / "train").mkdir(parents=True)
    script = NO_FFCV + f"""
import runpy
sys.argv = ["data_prep", "ffcv", "--src", {str(tmp_path / "src")!r}, "--out", {str(tmp_path / "out")!r}]
runpy.run_module("data_prep", run_name="__main__", alter_sys=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ffcv: the ffcv package is not installed")
    assert not (tmp_path / "out").exists()
