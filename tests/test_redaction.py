"""Credentials in a URL are never shown or stored (issue 23 item 8): the redaction rules, and a real training run
over an HTTP server that demands the user and token of its ``--data`` URL, after which no file the run wrote, no
MLflow record and no output line holds the token; the stored (masked) URL resumes with ``CPVT_DATA_ROOT``."""
from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
import requests

from helpers_remote import AuthHttpServer
from helpers_train import PY, ROOT, job_env, tiny_data, tiny_recipe, train_cmd  # noqa: F401 (fixtures)
from pipeline.net import free_port
from pipeline.redaction import is_redacted, redact, redact_url


@pytest.mark.parametrize("url, shown", [
    ("http://alice:TOKEN@host:8000/shards", "http://***@host:8000/shards"),
    ("https://TOKEN@host/shards", "https://***@host/shards"),
    ("https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261207&"
     "X-Amz-Signature=abc123&X-Amz-Security-Token=IQo", "https://b.s3.amazonaws.com/k.tar?X-Amz-Algorithm="
     "AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://acct.blob.core.windows.net/c/x.tar?sv=2022-11-02&sig=TOKEN", "https://acct.blob.core.windows.net/c/"
     "x.tar?sv=2022-11-02&sig=***"),
    ("https://host/x?token=TOKEN&page=2", "https://host/x?token=***&page=2"),
    ("s3://bucket/prefix", "s3://bucket/prefix"),
    ("/scratch/in1k", "/scratch/in1k"),
])
def test_urls_lose_their_credentials_and_nothing_else(url, shown):
    assert redact_url(url) == shown and redact(f"cannot read {url}: timed out") == f"cannot read {shown}: timed out"
    assert is_redacted(shown) == (shown != url) and not is_redacted(url)


def _files_holding(token: str, *folders: Path) -> list[str]:
    hits = []
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and token.encode() in path.read_bytes():
                hits.append(str(path))
    return hits


def test_a_run_over_an_authenticated_server_stores_no_token(tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    token = secrets.token_hex(16)
    server = AuthHttpServer(tiny_data, tmp_path / "http.log", "alice", token)
    real, masked = server.url_with_credentials, f"http://***@127.0.0.1:{server.port}"
    store = tmp_path / "store"
    run_dir = tmp_path / "run"
    extra = ("run.precision=fp32", "data.num_workers=1", f"tracking.uri=sqlite:///{store}/mlflow.db")
    try:
        assert requests.head(f"{server.url}/classes.json", timeout=30).status_code == 401   # the token is needed
        cmd = train_cmd(1, tiny_recipe, real, run_dir, "zero2", "run.epochs=1", *extra)
        first = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        # the stored config holds the masked URL: given back, it is refused in one line before anything starts
        cmd = train_cmd(1, tiny_recipe, masked, run_dir, "zero2", "run.epochs=2", "checkpoint.resume=auto", *extra)
        refused = subprocess.run(cmd, cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
            f"config error: data.root: '{masked}' has its credentials masked (stored that way): pass the URL "
            f"with them again, set CPVT_DATA_ROOT to it"), refused.stderr[-3000:]
        # ... and resumes with the real URL in the environment (the way slurm_submit passes it to its jobs)
        resumed = subprocess.run(cmd, cwd=ROOT, env={**job_env(), "CPVT_DATA_ROOT": real}, capture_output=True,
                                 text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout
        # a connection error names the URL masked too (a closed port: refused at once)
        closed = f"http://alice:{token}@127.0.0.1:{free_port()}/data"
        failed = subprocess.run([PY, "-m", "data_prep", "verify", closed], cwd=ROOT,
                                env={**job_env(), "CPVT_STORAGE_RETRIES": "1"}, capture_output=True, text=True,
                                timeout=300)
        assert failed.returncode != 0 and "http://***@127.0.0.1" in failed.stderr, failed.stderr[-2000:]
    finally:
        server.stop()
    refusals = [line for line in (tmp_path / "http.log").read_text().splitlines() if '" 401 ' in line]
    assert len(refusals) == 1, refusals   # the probe above; every request of the pipeline was authenticated
    outputs = [p.stdout + p.stderr for p in (first, refused, resumed, failed)]
    assert not [i for i, text in enumerate(outputs) if token in text]
    assert masked in (run_dir / "train_config.yaml").read_text()
    assert _files_holding(token, run_dir, store) == []
    assert os.environ.get("CPVT_DATA_ROOT") is None
