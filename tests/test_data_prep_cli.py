"""The ``python -m data_prep`` CLI: argument errors, demo + verify, and kill-and-resume of real subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep.verify import verify
from data_prep.write_webdataset import write_webdataset
from helpers_data_prep import PY, ROOT, read_beton, read_split_plain, tiny_demo

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([PY, "-m", "data_prep", *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"rc={p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.mark.parametrize("args, message", [
    (["wds", "--src", "/nonexistent", "--out", "o"], "error: --src: '/nonexistent' is not a directory"),
    (["wds", "--src", "{src}", "--out", "o", "--quality", "0"], "error: --quality: 0 must be in [1, 100]"),
    (["wds", "--src", "{src}", "--out", "o", "--cluster", "k8s"], "error: --cluster: 'k8s' is not one of"),
    (["wds", "--src", "{src}", "--out", "o", "--splits", "train,test"], "error: --splits: 'test' has no directory"),
    (["wds", "--src", "{src}", "--out", "o", "--shard-max-count", "x"], "invalid int value: 'x'"),
    (["ffcv", "--src", "{src}", "--out", "o", "--write-mode", "png"], "error: --write-mode: 'png' is not one of"),
    (["ffcv", "--src", "{src}", "--out", "o", "--compress-probability", "2"], "--compress-probability: 2.0 must be"),
    (["ffcv", "--src", "{src}", "--out", "o", "--cluster", "k8s"], "error: --cluster: 'k8s' is not one of"),
    (["ffcv", "--src", "{src}", "--out", "o", "--cluster", "slurm", "--array-size", "0"], "--array-size: 0 must be"),
    (["make_demo_dataset", "--out", "o", "--val-layout", "kaggle"], "error: --val-layout: 'kaggle' is not one of"),
    (["verify", "/nonexistent"], "error: out: '/nonexistent' is not a directory"),
    (["convert"], "invalid choice: 'convert'"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, args, message):
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    (src / "val").mkdir()
    p = cli(*[a.replace("{src}", str(src)) for a in args], check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert not (tmp_path / "o").exists() and not (ROOT / "o").exists()
    assert main([a.replace("{src}", str(src)) for a in args]) == 2   # same path in-process


@pytest.mark.slow
def test_demo_wds_verify_cli(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    p = cli("make_demo_dataset", "--out", str(src), "--classes", "3", "--train-per-class", "4",
            "--val-per-class", "2", "--min-side", "20", "--max-side", "40", "--large-images", "0")
    assert json.loads(p.stdout) == {"train": {"found": 18, "expected_written": 15},
                                    "val": {"found": 12, "expected_written": 9}}
    p = cli("wds", "--src", str(src), "--out", str(out), "--shard-max-count", "4", "--workers", "2")
    summary = json.loads(p.stdout)
    assert summary["train"]["counts"]["written"] == 15 and summary["val"]["counts"]["skipped"] == 3
    p = cli("verify", str(out), "--decode")   # (the ffcv CLI is exercised by test_ffcv_kill_and_rerun)
    report = json.loads(p.stdout)
    assert report["ok"] and set(report["formats"]) == {"wds"}
    assert report["formats"]["wds"]["val"] == {"shards": 3, "samples_read": 9, "num_samples": 9}
    (out / "wds" / "val-000000.tar").unlink()
    p = cli("verify", str(out), "--formats", "wds", check=False)
    assert p.returncode == 1 and "val-000000.tar is missing" in p.stderr


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([PY, "-m", "data_prep", *args], cwd=ROOT, env=_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL the process group of ``proc`` (it and its workers) as soon as ``ready()`` is true."""
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            break
        time.sleep(0.002)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def big_src(tmp_path_factory):
    """Images large enough to need downscaling, so a run takes long enough to be killed mid-way."""
    src = tmp_path_factory.mktemp("kill") / "src"
    tiny_demo(src, train_per_class=25, val_per_class=4, min_side=300, max_side=560, large_images=0)
    return src


@pytest.mark.slow
def test_wds_kill_and_resume_gives_a_clean_runs_shards(big_src, tmp_path):
    out = tmp_path / "out"
    args = ["wds", "--src", str(big_src), "--out", str(out), "--max-side", "96", "--shard-max-count", "3",
            "--workers", "2", "--splits", "train"]
    wd = out / "wds"
    proc = _start(args, tmp_path / "run1.log")
    _kill_when(proc, lambda: (wd / "train-000000.tar").exists())
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "run1.log").read_text()[-2000:]
    assert not (wd / "_info.json").exists() and not (wd / "train_manifest.json").exists()
    done = sorted(p.name for p in wd.glob("train-*.tar"))
    assert 1 <= len(done) < 27, done   # killed part-way: some shards complete, not all
    assert main([*args, "--no-progress"]) == 0   # resume (the CLI entry point, in-process)
    manifest = json.loads((wd / "train_manifest.json").read_text())
    assert manifest["timings"]["shards_reused"] >= 1 and manifest["timings"]["shards_written"] >= 1
    assert not list(wd.glob("*.tmp.*"))
    clean = tmp_path / "clean"
    write_webdataset(big_src, clean, splits=("train",), max_side=96, shard_max_count=3, workers=1, progress=False)
    keys, labels, shas = read_split_plain(out, "train")
    ckeys, clabels, cshas = read_split_plain(clean, "train")
    assert keys == ckeys and len(set(keys)) == len(keys) and labels == clabels
    assert shas == cshas
    assert verify(out)["ok"]


def _stamp(d: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(d.iterdir())}


@pytest.mark.slow
def test_ffcv_kill_and_rerun(big_src, tmp_path, capsys):
    """SIGKILL while val.beton is being written (train complete): the rerun keeps train.beton untouched, redoes
    val, and both files hold exactly a clean run's samples (labels, sizes, stored image bytes, order)."""
    out = tmp_path / "out"
    args = ["ffcv", "--src", str(big_src), "--out", str(out), "--max-resolution", "64", "--workers", "2",
            "--splits", "train,val"]
    fd = out / "ffcv"
    proc = _start(args, tmp_path / "run1.log")
    _kill_when(proc, lambda: fd.is_dir() and any(p.name.startswith("val.beton.tmp.") for p in fd.iterdir()))
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "run1.log").read_text()[-2000:]
    assert (fd / "train.beton").exists() and (fd / "train_manifest.json").exists()
    assert not (fd / "val.beton").exists() and not (fd / "val_manifest.json").exists()
    assert any(".tmp." in p.name for p in fd.iterdir())
    train_stamp = _stamp(fd)["train.beton"]
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 0   # rerun (the CLI entry point, in-process)
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["reused"] is True and summary["val"]["reused"] is False
    assert sorted(p.name for p in fd.iterdir()) == ["train.beton", "train_manifest.json", "val.beton",
                                                    "val_manifest.json"]
    assert _stamp(fd)["train.beton"] == train_stamp   # the complete split was not rewritten
    m = json.loads((fd / "val_manifest.json").read_text())
    assert len(m["outputs"]["removed_stale"]) >= 1 and m["outputs"]["redo_reason"] == "no manifest"
    assert json.loads((fd / "train_manifest.json").read_text())["counts"]["written"] == 75 + 6 - 3
    # a clean run, through the array-job path of the CLI (submitit's in-process executor)
    clean = tmp_path / "clean"
    assert main([*args[:4], str(clean), *args[5:], "--cluster", "debug", "--no-progress"]) == 0
    assert (clean / "logs" / "ffcv").is_dir()
    for split in ("train", "val"):
        got, ref = read_beton(fd / f"{split}.beton"), read_beton(clean / "ffcv" / f"{split}.beton")
        assert len(got) == json.loads((fd / f"{split}_manifest.json").read_text())["counts"]["written"]
        assert got == ref
    assert verify(out)["ok"]
    before = _stamp(fd)
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 0   # a third run finds everything complete
    assert all(v["reused"] for v in json.loads(capsys.readouterr().out).values())
    assert _stamp(fd) == before
