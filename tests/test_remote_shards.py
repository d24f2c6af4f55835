"""Shards on an object store and behind HTTP, against real servers on 127.0.0.1 (moto's S3 server and
``python -m http.server``, started by this module): data prep to a bucket (kill a run with SIGKILL, rerun:
identical objects), remote verify, a 2-rank training run streamed from S3 resumed mid-epoch to exactly the
parameters of an uninterrupted run streamed over HTTP, evaluation from S3, and one clear line (without the
secret key) for an unreachable endpoint, a missing object and a broken stream."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pipeline import checkpointing
from pipeline.net import free_port

from data_prep.__main__ import main as data_prep_main
from data_prep.verify import verify
from data_prep.write_webdataset import write_webdataset
from helpers_data_prep import tiny_demo
from tests.helpers_remote import SECRET, HttpServer, S3Server, restore_env, set_aws_env
from tests.helpers_train import (ROOT, PY, SHARD, final_params, job_env, run_and_kill, run_job, run_train,  # noqa: F401
                                 tiny_data, tiny_recipe)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]
BUCKET = "cpvt-data"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto"))
    old = set_aws_env(server.aws_files())   # this process and every child: the standard AWS files + profile
    try:
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        restore_env(old)
        server.stop()


@pytest.fixture(scope="module")
def remote_tiny(s3, tiny_data, tmp_path_factory):
    """The training tests' tiny dataset written by data_prep straight into the bucket, and the local copy behind
    HTTP: (s3 root, http root, local root)."""
    root = f"s3://{BUCKET}/tiny"
    write_webdataset(tiny_data.parent / "src", root, workers=1, progress=False, shard_max_count=SHARD)
    http = HttpServer(tiny_data, tmp_path_factory.mktemp("http") / "http.log")
    try:
        yield root, http.url, tiny_data
    finally:
        http.stop()


def _objects(s3, prefix: str) -> dict[str, bytes]:
    c = s3.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]
    return {k[len(prefix):]: c.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def _env(**extra: str) -> dict[str, str]:
    env = dict(job_env(), **extra)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_written_to_a_bucket_equals_local_and_streams_back(remote_tiny, s3):
    """Same shards, bytes and index on S3 as in the local folder; the loader's index and tar reader read them
    from S3 and HTTP; ``verify`` re-reads counts and checksums remotely."""
    from pipeline.data.shard_index import load_split_index, read_classes
    from pipeline.data.tar_samples import tar_samples

    s3_root, http_root, local = remote_tiny
    objects = _objects(s3, "tiny/")
    local_info = json.loads((local / "wds" / "_info.json").read_text())
    assert json.loads(objects["wds/_info.json"]) == local_info
    assert objects["classes.json"] == (local / "classes.json").read_bytes()
    for name in local_info["splits"]["train"]["filenames"]:
        assert objects[f"wds/{name}"] == (local / "wds" / name).read_bytes()
    assert not [k for k in objects if ".tmp." in k]
    keys = {}
    for root in (s3_root, http_root, str(local)):
        assert read_classes(root) == json.loads((local / "classes.json").read_text())["classes"]
        index = load_split_index(root, "val", field="data.val_split")
        keys[root] = [(s["__key__"], s["cls"], hashlib.sha256(s["jpg"]).hexdigest())
                      for s in tar_samples({"url": u} for u in index.urls)]
    assert keys[s3_root] == keys[http_root] == keys[str(local)] and len(keys[s3_root]) == 16
    report = verify(s3_root, decode=True)
    assert report["ok"], report["errors"]
    assert report["formats"]["wds"]["train"] == {"shards": 4, "samples_read": 32, "num_samples": 32}
    assert verify(http_root)["ok"]


def test_submitit_array_tasks_upload_the_same_objects(remote_tiny, s3, tiny_data, tmp_path):
    """The array-job path (submitit's local executor: each job a subprocess with the caller's AWS set-up, as
    SLURM array tasks inherit it): the same objects as the in-process run."""
    root = f"s3://{BUCKET}/array"
    m = write_webdataset(tiny_data.parent / "src", root, cluster="local", array_size=2, folder=tmp_path / "logs",
                         progress=False, shard_max_count=SHARD, executor_params={"timeout_min": 10})
    assert m["train"]["params"]["cluster"] == "local"
    assert len(list((tmp_path / "logs").glob("*_result.pkl"))) >= 2
    got, want = _objects(s3, "array/wds/"), _objects(s3, "tiny/wds/")
    assert sorted(got) == sorted(want)
    assert all(got[k] == want[k] for k in want if k.endswith(".tar") or k == "_info.json")
    with pytest.raises(ValueError, match="folder: a local log folder is needed"):
        write_webdataset(tiny_data.parent / "src", root, cluster="local", progress=False)


def test_verify_finds_a_rewritten_object_and_an_unlisted_one(remote_tiny, s3, capsys):
    s3_root, _, local = remote_tiny
    c = s3.client()
    for key, obj in _objects(s3, "tiny/").items():
        c.put_object(Bucket=BUCKET, Key=f"tampered/{key}", Body=obj)
    shard = bytearray((local / "wds" / "val-000000.tar").read_bytes())
    shard[600] ^= 0xFF
    c.put_object(Bucket=BUCKET, Key="tampered/wds/val-000000.tar", Body=bytes(shard))
    c.put_object(Bucket=BUCKET, Key="tampered/wds/val-000099.tar", Body=bytes(shard))
    c.delete_object(Bucket=BUCKET, Key="tampered/wds/train-000001.tar")
    assert data_prep_main(["verify", f"s3://{BUCKET}/tampered"]) == 1
    errors = json.loads(capsys.readouterr().out)["errors"]
    assert "wds/val: shard val-000000.tar sha256 mismatch (corrupted or rewritten)" in errors
    assert "wds/val: unlisted shard val-000099.tar" in errors
    assert "wds/train: shard train-000001.tar is missing" in errors


def test_kill_data_prep_midway_and_rerun_gives_identical_objects(s3, tmp_path):
    """A real ``python -m data_prep wds --out s3://...`` SIGKILLed once some shards are uploaded (and an upload a
    killed task left open): the rerun aborts the open upload, reuses the uploaded shards whose sha256 matches
    and ends with exactly the objects of a clean run; the index appears only at the end."""
    src = tmp_path / "src"
    tiny_demo(src, train_per_class=12, val_per_class=2, min_side=300, max_side=480, large_images=0)
    out = f"s3://{BUCKET}/killed"
    args = ["wds", "--src", str(src), "--out", out, "--max-side", "96", "--shard-max-count", "3",
            "--workers", "2", "--splits", "train", "--minival-fraction", "0"]
    c = s3.client()
    log = tmp_path / "run1.log"
    proc = subprocess.Popen([PY, "-m", "data_prep", *args], cwd=ROOT, env=_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)

    def shards() -> list[str]:
        return sorted(k for k in _objects_keys(c, "killed/wds/") if k.endswith(".tar"))

    deadline = time.time() + 180
    while not shards() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    done = shards()
    assert 1 <= len(done) < 14, done   # 42 files in 14 shards: killed part-way
    assert "_info.json" not in _objects_keys(c, "killed/wds/")
    # a multipart upload that a killed task left open (invisible as an object)
    upload = c.create_multipart_upload(Bucket=BUCKET, Key="killed/wds/train-000013.tar")["UploadId"]
    c.upload_part(Bucket=BUCKET, Key="killed/wds/train-000013.tar", UploadId=upload, PartNumber=1, Body=b"part")
    assert data_prep_main([*args, "--no-progress"]) == 0
    manifest = json.loads(_objects(s3, "killed/wds/")["train_manifest.json"])
    assert manifest["timings"]["shards_reused"] >= 1 and manifest["timings"]["shards_written"] >= 1
    assert "train-000013.tar" in manifest["outputs"]["removed_stale"]
    assert not c.list_multipart_uploads(Bucket=BUCKET, Prefix="killed/").get("Uploads")
    write_webdataset(src, f"s3://{BUCKET}/clean", splits=("train",), max_side=96, shard_max_count=3, workers=1,
                     progress=False)
    got, want = _objects(s3, "killed/wds/"), _objects(s3, "clean/wds/")
    assert sorted(got) == sorted(want)
    for key in want:
        if key.endswith(".tar") or key == "_info.json":
            assert got[key] == want[key], key
    assert verify(out)["ok"]


def _objects_keys(c, prefix: str) -> list[str]:
    return [o["Key"][len(prefix):] for o in c.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def test_two_ranks_from_s3_resume_exactly_like_an_uninterrupted_run_over_http(remote_tiny, tiny_recipe, tmp_path):
    """2 ranks stream from S3, SIGKILL at step 7 (last checkpoint: step 6, mid-epoch), resume from S3; the final
    parameters and the final evaluation equal those of an uninterrupted 2-rank run streamed over HTTP. The
    evaluate command then scores the checkpoint from S3 as the trainer did."""
    s3_root, http_root, _ = remote_tiny
    over = ("data.batch_size=4", "run.epochs=2")
    full = tmp_path / "full"
    run_train(2, tiny_recipe, http_root, full, "zero2", *over)
    killed = tmp_path / "killed"
    text = run_and_kill(2, tiny_recipe, s3_root, killed, "zero2", 7, *over)
    assert SECRET not in text
    proc = run_train(2, tiny_recipe, s3_root, killed, "zero2", "--resume", "auto", *over)
    assert f"resumed from {killed / 'checkpoints' / checkpointing.tag_for(6)} at epoch 1 step 2" in proc.stdout
    want, got = final_params(full), final_params(killed)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    a = json.loads((full / "final_metrics.json").read_text())
    b = json.loads((killed / "final_metrics.json").read_text())
    assert a["global_step"] == b["global_step"] == 8 and a["eval"] == b["eval"]
    res = tmp_path / "eval.json"
    out = run_job([PY, "pipeline/evaluate.py", str(killed), "--data", s3_root, "--resolutions", "32",
                   "--workers", "0", "--json", str(res)])
    assert SECRET not in out.stdout + out.stderr
    results = json.loads(res.read_text())
    assert set(results) == {"32"} and abs(results["32"]["top1"] - b["eval"]["32"]["top1"]) <= 100 / 16


def _one_line(proc: subprocess.CompletedProcess, prefix: str, *needles: str) -> str:
    text = proc.stdout + proc.stderr
    assert SECRET not in text
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1, proc.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_unreachable_endpoint_is_one_line_without_the_secret(remote_tiny, tiny_recipe, tmp_path):
    s3_root, _, _ = remote_tiny
    dead = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    env = _env(AWS_ENDPOINT_URL=dead, AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY=SECRET,
               CPVT_STORAGE_RETRIES="2")
    for k in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        env.pop(k, None)
    cmd = [PY, "pipeline/train.py", "--recipe", str(tiny_recipe), "--data", s3_root, "--run-dir",
           str(tmp_path / "run"), "--deepspeed_config", "deepspeed_configs/zero2.json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    _one_line(proc, "config error:", f"{s3_root}/classes.json", "EndpointConnectionError", dead)
    proc = subprocess.run([PY, "-m", "data_prep", "verify", s3_root], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    _one_line(proc, "verify:", "classes.json", "EndpointConnectionError")
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    proc = subprocess.run([PY, "-m", "data_prep", "wds", "--src", str(src), "--out", s3_root, "--splits", "train"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    _one_line(proc, "error:", f"{s3_root}/wds", "EndpointConnectionError")


def test_missing_object_is_one_line_naming_it(remote_tiny, s3, tmp_path):
    """A shard listed in the index but missing behind HTTP (a HEAD each), or cut short in a bucket (one listing):
    the loader stops with the trainer's one-line config error before reading data (the trainer prints it as
    ``config error: ...`` before its process group, tests/test_train_config.py), ``verify`` names it; an object
    that disappears after the index was read: the tar reader names it."""
    from pipeline.config import AugConfig, ConfigError, DataConfig, from_dict
    from pipeline.data.loader import build_train_loader
    from pipeline.data.shard_index import load_split_index
    from pipeline.storage import NotFound
    from pipeline.data.tar_samples import tar_samples

    s3_root, _, local = remote_tiny
    bad = tmp_path / "bad"
    shutil.copytree(local, bad, ignore=shutil.ignore_patterns("ffcv"))
    (bad / "wds" / "train-000001.tar").unlink()
    http = HttpServer(bad, tmp_path / "http.log")
    try:
        data = from_dict(DataConfig, {"format": "wds", "root": http.url, "num_workers": 0})
        with pytest.raises(ConfigError) as e:
            build_train_loader(data, AugConfig(), num_classes=4, rank=0, world_size=1, seed=0)
        n = len(json.loads((bad / "wds" / "_info.json").read_text())["splits"]["train"]["filenames"])
        assert str(e.value) == (f"data.root: 1 of {n} train shards do not match _info.json: {http.url}/wds/"
                                f"train-000001.tar (missing); check them with `python -m data_prep verify "
                                f"{http.url}` and rewrite them with `python -m data_prep wds`")
        proc = subprocess.run([PY, "-m", "data_prep", "verify", http.url], cwd=ROOT, env=_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        _one_line(proc, "verify:", "wds/train: shard train-000001.tar is missing")
    finally:
        http.stop()
    c = s3.client()
    for key, obj in _objects(s3, "tiny/").items():
        short_obj = obj[:len(obj) // 2] if key == "wds/val-000000.tar" else obj
        c.put_object(Bucket=BUCKET, Key=f"short/{key}", Body=short_obj)
    short = f"s3://{BUCKET}/short"
    full = len(_objects(s3, "tiny/wds/val-000000.tar")[""])
    with pytest.raises(ConfigError, match=re.escape(f"{short}/wds/val-000000.tar ({full // 2} bytes, _info.json "
                                                    f"says {full})")):
        load_split_index(short, "val", field="data.val_split")
    missing = f"{s3_root}/wds/train-000099.tar"
    with pytest.raises(NotFound, match=f"^{missing}: no such object$"):
        list(tar_samples([{"url": missing}]))


class _Flaky(BaseHTTPRequestHandler):
    """Serves one file; the first GET of each run of ``fail`` requests sends half the body and drops the
    connection (a real broken stream), later ones honour ``Range``."""
    data = b""
    fail = 1
    gets = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        rng = self.headers.get("Range")
        type(self).gets.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = self.data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if len(type(self).gets) <= self.fail:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


def test_a_broken_stream_is_resumed_at_its_offset_and_bounded(tmp_path, monkeypatch):
    from webdataset import TarWriter

    from pipeline import storage
    from pipeline.data.tar_samples import tar_samples

    shard = tmp_path / "big.tar"   # 2.4 MB: the break comes after several reads
    with TarWriter(str(shard)) as tw:
        for i in range(8):
            tw.write({"__key__": f"s{i}", "jpg": os.urandom(300_000), "cls": b"1"})
    _Flaky.data, _Flaky.fail, _Flaky.gets = shard.read_bytes(), 1, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/val-000000.tar"
    try:
        want = list(tar_samples([{"url": str(shard)}]))
        got = list(tar_samples([{"url": url}]))
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in got] == \
            [{k: v for k, v in s.items() if k != "__url__"} for s in want]
        assert _Flaky.gets[0] is None and _Flaky.gets[1].startswith("bytes=") and _Flaky.gets[1] != "bytes=0-"
        monkeypatch.setenv("CPVT_STORAGE_RETRIES", "3")
        _Flaky.fail, _Flaky.gets = 100, []
        with pytest.raises(storage.StorageError, match=f"^{url}: read failed at byte .* after 3 attempts$"):
            list(tar_samples([{"url": url}]))
    finally:
        server.shutdown()


def test_launcher_plans_a_run_on_a_bucket(remote_tiny, tiny_recipe, tmp_path, capsys):
    """``slurm_submit.py --data s3://...`` validates the remote data (classes.json, the train size for the
    time-limit check) instead of asking for a local folder."""
    from launchers import slurm_submit

    s3_root, _, _ = remote_tiny
    argv = ["--cluster", "local", "--recipe", str(tiny_recipe), "--data", s3_root, "--run-dir", str(tmp_path / "run"),
            "--step-time-s", "1", "--dry-run", "checkpoint.every_steps=0"]
    assert slurm_submit.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"root: {s3_root}" in out and "one epoch = 8 steps" in out, out[-3000:]
    assert slurm_submit.main([*argv[:5], f"s3://{BUCKET}/nothing-here", *argv[6:]]) == 2
    assert "classes.json not found at" in capsys.readouterr().err
