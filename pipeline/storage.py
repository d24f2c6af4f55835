"""One place that reads, lists, stats and writes data locations: local paths, ``s3://bucket/key`` and
``http(s)://`` URLs.

Clients: boto3 for S3 (it reads the standard AWS set-up itself: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``~/.aws/config`` and ``~/.aws/credentials``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for MinIO, Ceph RGW or a local server, ``AWS_DEFAULT_REGION``), requests for HTTP(S).
``benchmarks/bench_remote.py`` measures them against the local folder and the alternatives.

Failures: every request is retried a bounded number of times (``CPVT_STORAGE_RETRIES``, default 4 attempts, with
backoff: botocore's "standard" retry mode, urllib3's ``Retry`` for HTTP), and a stream that breaks mid-way is
reopened at the byte it reached (a ``Range`` request) within the same budget. What still fails raises
:class:`StorageError`, one line naming the object and the cause. No message contains credentials: they never
enter a URL here, and errors carry only the client's error code/class and its (credential-free) message.

Writes (S3 and local only; HTTP is read-only): an object becomes visible only complete -- a single PUT is atomic
and s3transfer's multipart upload is completed or aborted (one that a kill left open is listed by
:func:`incomplete_uploads` and removed by :func:`abort_uploads`); local files go through a temp name + rename.
"""
from __future__ import annotations

import hashlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import boto3
import requests
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pipeline.atomic import write_atomic
from pipeline.redaction import is_redacted, redact

SCHEMES = ("s3", "http", "https")
CHUNK = 1 << 20
READ = 256 << 10   # bytes per read from a remote stream: at most this much is read again after a break


def _retries() -> int:
    try:
        return max(1, int(os.environ.get("CPVT_STORAGE_RETRIES", "4")))
    except ValueError:
        return 4


class StorageError(OSError):
    """A location that cannot be read or written after the bounded retries (one-line message naming it, any
    credentials in its URL masked)."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class NotFound(StorageError, FileNotFoundError):
    """The object (or file) does not exist."""


def is_url(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and urlparse(path).scheme in SCHEMES


def check_location(path: str | os.PathLike) -> None:
    """Raise :class:`StorageError` (one line) for a URL that names no bucket or host: ``s3://`` alone would
    otherwise become ``s3:/classes.json`` and fail only after the retries."""
    if is_url(path):
        u = urlparse(str(path))
        if not u.netloc:
            what, form = ("bucket", "s3://BUCKET/prefix") if u.scheme == "s3" else ("host", f"{u.scheme}://HOST/path")
            raise StorageError(f"{str(path)!r} is not a valid {u.scheme} URL: it names no {what} ({form})")
        if is_redacted(str(path)):
            raise StorageError(f"{str(path)!r} has its credentials masked (stored that way): pass the URL with "
                               f"them again, set CPVT_DATA_ROOT to it, or keep them out of the URL (~/.netrc for "
                               f"HTTP, the AWS environment for S3)")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (``Path`` would fold a URL's ``//``)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def _split_s3(url: str) -> tuple[str, str]:
    u = urlparse(url)
    if not u.netloc:
        raise StorageError(f"{url}: an S3 URL is s3://bucket/key")
    return u.netloc, u.path.lstrip("/")


# ----------------------------------------------------------------------------------------- clients
_local = threading.local()


def _s3():
    """One boto3 client per process and thread (clients must not cross a fork: DataLoader workers)."""
    key = os.getpid()
    client = getattr(_local, "s3", None)
    if client is None or _local.s3_pid != key:
        client = boto3.session.Session().client(
            "s3", config=Config(retries={"max_attempts": _retries(), "mode": "standard"}, connect_timeout=10,
                                read_timeout=60, max_pool_connections=32))
        _local.s3, _local.s3_pid = client, key
    return client


def _http():
    key = os.getpid()
    session = getattr(_local, "http", None)
    if session is None or _local.http_pid != key:
        session = requests.Session()
        retry = Retry(total=_retries() - 1, backoff_factor=0.2, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=("GET", "HEAD"), raise_on_status=False)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=32)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        _local.http, _local.http_pid = session, key
    return session


def _s3_error(url: str, e: Exception) -> StorageError:
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return NotFound(f"{url}: no such object")
        if code == "NoSuchBucket":
            return NotFound(f"{url}: no such bucket")
        return StorageError(f"{url}: S3 error {code or status} ({e.response.get('Error', {}).get('Message', '')})")
    return StorageError(f"{url}: {type(e).__name__}: {e} (after {_retries()} attempts)")


def _http_error(url: str, e: Exception | None = None, status: int | None = None) -> StorageError:
    if status == 404:
        return NotFound(f"{url}: no such object (HTTP 404)")
    if status is not None:
        return StorageError(f"{url}: HTTP {status}")
    return StorageError(f"{url}: {type(e).__name__}: {e} (after {_retries()} attempts)")


def _s3_call(url: str, fn, **kw):
    try:
        return fn(**kw)
    except (BotoCoreError, ClientError) as e:
        raise _s3_error(url, e) from None


def _http_request(method: str, url: str, headers: dict | None = None, stream: bool = False):
    try:
        r = _http().request(method, url, headers=headers, stream=stream, timeout=(10, 60))
    except requests.RequestException as e:
        raise _http_error(url, e) from None
    if r.status_code >= 400:
        r.close()
        raise _http_error(url, status=r.status_code)
    return r


# ----------------------------------------------------------------------------------------- reading
def stat(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "metadata": {...}}`` of a file or object (raises :class:`NotFound`)."""
    if not is_url(path):
        try:
            return {"size": os.stat(path).st_size, "metadata": {}}
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
    path = str(path)
    if path.startswith("s3://"):
        bucket, key = _split_s3(path)
        h = _s3_call(path, _s3().head_object, Bucket=bucket, Key=key)
        return {"size": int(h["ContentLength"]), "metadata": dict(h.get("Metadata", {}))}
    r = _http_request("HEAD", path)
    return {"size": int(r.headers.get("Content-Length", -1)), "metadata": {}}


def exists(path: str | os.PathLike) -> bool:
    try:
        stat(path)
        return True
    except NotFound:
        return False


def sizes(prefix: str | os.PathLike, paths: list[str]) -> dict[str, int | None]:
    """Byte size of each of ``paths`` (files or objects under ``prefix``), ``None`` for one that does not exist:
    one listing for an S3 prefix, a stat each for local files, a HEAD each (16 at a time) over HTTP."""
    prefix = str(prefix)
    if prefix.startswith("s3://"):
        bucket, key = _split_s3(prefix.rstrip("/") + "/")
        listed: dict[str, int] = {}
        try:
            for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
                listed.update({f"s3://{bucket}/{o['Key']}": int(o["Size"]) for o in page.get("Contents", [])})
        except (BotoCoreError, ClientError) as e:
            raise _s3_error(prefix, e) from None
        return {p: listed.get(p) for p in paths}

    def size(path: str) -> int | None:
        try:
            return int(stat(path)["size"])
        except NotFound:
            return None
    if not is_url(prefix):
        return {p: size(p) for p in paths}
    with ThreadPoolExecutor(16) as ex:
        return dict(zip(paths, ex.map(size, paths)))


def is_local_dir(path: str | os.PathLike) -> bool:
    return not is_url(path) and Path(path).is_dir()


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_url(path):
        try:
            return Path(path).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
    with open_read(path) as f:
        return f.read()


class _RemoteRaw(io.RawIOBase):
    """Sequential read of one object; a broken stream is reopened at the current offset (bounded)."""

    def __init__(self, url: str):
        self.url, self.pos, self.size, self.body = url, 0, None, None
        self.failures = 0
        self._open()

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.pos}-"} if self.pos else None
        if self.url.startswith("s3://"):
            bucket, key = _split_s3(self.url)
            kw = {"Range": headers["Range"]} if headers else {}
            r = _s3_call(self.url, _s3().get_object, Bucket=bucket, Key=key, **kw)
            if self.size is None:
                self.size = int(r["ContentLength"])
            self.body = r["Body"]
            return
        r = _http_request("GET", self.url, headers=headers, stream=True)
        if self.size is None:
            self.size = int(r.headers.get("Content-Length", -1))
        self.body = r.raw
        if self.pos and r.status_code != 206:   # the server ignored the Range header: skip what was read
            left = self.pos
            while left:
                got = self.body.read(min(left, CHUNK))
                if not got:
                    raise StorageError(f"{self.url}: stream ended early on reopening")
                left -= len(got)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while True:
            try:
                data = self.body.read(min(len(b), READ))
                if not data and self.size is not None and 0 <= self.size and self.pos < self.size:
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.size}")
            except StorageError:
                raise
            except Exception as e:   # connection reset, read timeout, truncated body: reopen where we are
                self.failures += 1
                if self.failures >= _retries():
                    raise StorageError(f"{self.url}: read failed at byte {self.pos} ({type(e).__name__}: {e}) "
                                       f"after {self.failures} attempts") from None
                self._close_body()
                self._open()
                continue
            n = len(data)
            b[:n] = data
            self.pos += n
            return n

    def _close_body(self) -> None:
        try:
            if self.body is not None:
                self.body.close()
        except Exception:  # closing a broken connection may itself fail; the object is read anew anyway
            pass

    def close(self) -> None:
        self._close_body()
        super().close()


def open_read(path: str | os.PathLike, buffering: int = CHUNK) -> IO[bytes]:
    """A buffered binary stream of a local file or a remote object (raises :class:`StorageError`)."""
    if not is_url(path):
        try:
            return open(path, "rb", buffering=buffering)
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
    return io.BufferedReader(_RemoteRaw(str(path)), buffer_size=buffering)


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
        for b in iter(lambda: f.read(CHUNK), b""):
            h.update(b)
    return h.hexdigest()


def listdir(prefix: str | os.PathLike) -> list[str]:
    """Names directly under a local folder or an ``s3://bucket/prefix/`` (HTTP has no listing: StorageError)."""
    if not is_url(prefix):
        p = Path(prefix)
        return sorted(e.name for e in p.iterdir()) if p.is_dir() else []
    prefix = str(prefix)
    if not prefix.startswith("s3://"):
        raise StorageError(f"{prefix}: HTTP servers have no listing")
    bucket, key = _split_s3(prefix.rstrip("/") + "/")
    names = []
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/")
    try:
        for page in pages:
            names += [o["Key"][len(key):] for o in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as e:
        raise _s3_error(prefix, e) from None
    return sorted(names)


# ----------------------------------------------------------------------------------------- writing
def _writable(url: str) -> tuple[str, str]:
    if not url.startswith("s3://"):
        raise StorageError(f"{url}: only local paths and s3:// URLs can be written (HTTP is read-only)")
    return _split_s3(url)


def write_bytes(path: str | os.PathLike, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """Whole-object write: one S3 PUT (atomic), or a local temp file + fsync + rename (:mod:`pipeline.atomic`)."""
    if not is_url(path):
        write_atomic(path, data)
        return
    bucket, key = _writable(str(path))
    _s3_call(str(path), _s3().put_object, Bucket=bucket, Key=key, Body=data, Metadata=metadata or {})


def upload_file(local: str | os.PathLike, url: str, metadata: dict[str, str] | None = None) -> None:
    """A local file -> an S3 object (s3transfer: one PUT below its multipart threshold, else a multipart upload
    that is completed, or aborted on error; the object is visible only once complete)."""
    bucket, key = _writable(url)
    try:
        _s3().upload_file(str(local), bucket, key, ExtraArgs={"Metadata": metadata or {}})
    except S3UploadFailedError as e:
        raise StorageError(f"{url}: upload failed ({e})") from None
    except (BotoCoreError, ClientError) as e:
        raise _s3_error(url, e) from None


def delete(path: str | os.PathLike) -> None:
    if not is_url(path):
        Path(path).unlink(missing_ok=True)
        return
    bucket, key = _writable(str(path))
    _s3_call(str(path), _s3().delete_object, Bucket=bucket, Key=key)


def incomplete_uploads(prefix: str) -> list[tuple[str, str]]:
    """(key, upload id) of multipart uploads under ``s3://bucket/prefix`` that were never completed/aborted."""
    bucket, key = _writable(prefix)
    out = []
    kw: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
    while True:
        page = _s3_call(prefix, _s3().list_multipart_uploads, **kw)
        out += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
        if not page.get("IsTruncated"):
            return out
        kw.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])


def abort_uploads(prefix: str) -> list[str]:
    """Abort the incomplete multipart uploads under ``prefix`` (left by killed writers); returns their keys."""
    bucket, _ = _writable(prefix)
    keys = []
    for key, upload_id in incomplete_uploads(prefix):
        _s3_call(prefix, _s3().abort_multipart_upload, Bucket=bucket, Key=key, UploadId=upload_id)
        keys.append(key)
    return keys


__all__ = ["NotFound", "StorageError", "abort_uploads", "delete", "exists", "incomplete_uploads", "is_local_dir",
           "is_url", "join", "listdir", "open_read", "read_bytes", "sha256", "sizes", "stat", "upload_file",
           "write_bytes"]
