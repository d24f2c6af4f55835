"""Real object-store and HTTP servers on 127.0.0.1 for the remote-shard tests and the benchmark.

* :class:`S3Server`: moto's standalone S3 server (``python -m moto.server``, a separate process on a free port);
  clients reach it through the standard AWS convention only: :meth:`S3Server.aws_files` writes an
  ``~/.aws/config``-style file (profile with ``endpoint_url``) and a credentials file, selected by
  ``AWS_CONFIG_FILE`` / ``AWS_SHARED_CREDENTIALS_FILE`` / ``AWS_PROFILE``.
* :class:`HttpServer`: ``python -m http.server`` (threaded) over a folder, a separate process;
  :class:`AuthHttpServer` the same behind HTTP Basic authentication (401 without the user and token).

Both are started by the test set-up, stopped at teardown and never reached from outside the machine.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.net import free_port


PY = sys.executable
# distinctive, so a test can assert that no output contains it
SECRET = "cpvtSECRETkey0123456789abcdefghijklmnopqrs"
ACCESS_KEY = "cpvttestaccesskey"


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server on port {port} did not start in {timeout} s: {log.read_text()[-2000:]}")


class _Process:
    def __init__(self, cmd: list[str], port: int, log: Path, cwd: Path | None = None):
        self.port, self.log = port, log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=cwd)
        _wait_port(port, self.proc, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class S3Server(_Process):
    def __init__(self, workdir: Path):
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        super().__init__([PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                         workdir / "moto.log", cwd=workdir)
        self.workdir = workdir

    def aws_files(self, profile: str = "cpvt-test") -> dict[str, str]:
        """Environment selecting a profile from AWS config + credentials files that point at this server."""
        config, creds = self.workdir / "aws_config", self.workdir / "aws_credentials"
        config.write_text(f"[profile {profile}]\nregion = us-east-1\nendpoint_url = {self.url}\n")
        creds.write_text(f"[{profile}]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET}\n")
        return {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(creds), "AWS_PROFILE": profile}

    def client(self):
        import boto3

        return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
                                     region_name="us-east-1").client("s3", endpoint_url=self.url)


class HttpServer(_Process):
    def __init__(self, folder: Path, log: Path):
        port = free_port()
        super().__init__([PY, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
                         port, log)


_AUTH_SERVER = """
import base64, functools, http.server, sys
port, folder, user, token = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
want = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()

class Handler(http.server.SimpleHTTPRequestHandler):
    def _allowed(self):
        if self.headers.get("Authorization") == want:
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="shards"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_GET(self):
        if self._allowed():
            super().do_GET()

    def do_HEAD(self):
        if self._allowed():
            super().do_HEAD()

http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=folder)).serve_forever()
"""


class AuthHttpServer(_Process):
    """A folder behind HTTP Basic authentication: :attr:`url_with_credentials` reads it, :attr:`url` gets 401."""

    def __init__(self, folder: Path, log: Path, user: str, token: str):
        port = free_port()
        self.user, self.token = user, token
        super().__init__([PY, "-c", _AUTH_SERVER, str(port), str(folder), user, token], port, log)

    @property
    def url_with_credentials(self) -> str:
        return f"http://{self.user}:{self.token}@127.0.0.1:{self.port}"


AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE",
            "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION", "AWS_REGION")


def set_aws_env(values: dict[str, str]) -> dict[str, str | None]:
    """Replace every AWS_* variable of this process (children inherit them) by ``values``; returns the old ones."""
    old = {k: os.environ.get(k) for k in AWS_VARS}
    for k in AWS_VARS:
        os.environ.pop(k, None)
    os.environ.update(values)
    return old


def restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
