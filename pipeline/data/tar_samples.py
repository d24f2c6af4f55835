"""WebDataset samples from local tar shards: a lean reader of the tar headers, for the training hot path.

``webdataset.tarfile_to_samples()`` walks a shard with Python's ``tarfile`` module, whose general header
parsing costs ~0.14 ms per sample here -- 5-7 % of a sample's whole CPU budget at 128 px, and paid again for
every sample a shuffle buffer reads ahead (``benchmarks/bench_loaders.py``). Shards from ``data_prep`` are plain
ustar/pax archives of regular files, so :func:`tar_samples` reads the 512-byte headers itself (0.025 ms per
sample) and yields exactly what ``wds.tarfile_to_samples()`` yields: one dict per run of consecutive members
with the same key -- ``__key__``, ``__url__`` and one ``bytes`` entry per (lower-cased) extension, the key being
the member path up to the first dot of its file name (webdataset's rule). Members named ``__*__`` (webdataset
metadata) and anything that is not a regular file are skipped.

Every header's checksum is verified, pax extended headers (``path``/``size`` records) and GNU long names are
honoured, and a shard that ends early (inside a member, or without the end-of-archive marker every tar writer
puts last) raises :class:`TarFormatError` naming the shard: a damaged shard stops the job loudly instead of
silently yielding fewer samples (``python -m data_prep verify``
checks the shards' sha256 against ``_info.json``).

A shard ``url`` is a local path or an ``s3://`` / ``http(s)://`` URL, opened by :func:`pipeline.storage.open_read`
(bounded retries; a stream that breaks is resumed at its byte offset); a shard that stays unreadable raises
:class:`pipeline.storage.StorageError` naming it.
"""
from __future__ import annotations

import re
from typing import IO, Iterable, Iterator

from pipeline.redaction import redact
from pipeline.storage import open_read

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")          # regular file (old "\0", contiguous "7")
# WebDataset's member naming: "<key>.<ext>" (the key may hold a folder), and "__name__" metadata members
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
META_NAME = re.compile(r"__[^/]*__($|/)")


class TarFormatError(ValueError):
    """A shard that is not a readable tar archive (bad checksum, truncated member, ...); credentials masked."""

    def __init__(self, message: str):
        super().__init__(redact(message))


class ShardReadError(RuntimeError):
    """Training stopped because a shard could not be read after the start (one line: the shard, the cause, the
    checkpoint to resume from)."""


def worker_message(error: BaseException) -> str:
    """The one-line message of ``error``; an exception a DataLoader worker raised is re-raised in the main process
    with the worker's traceback in its text, and its own message is then the last line (``module.Type: message``)."""
    text = str(error).strip()
    if "Original Traceback" not in text:
        return text.splitlines()[0] if text else type(error).__name__
    last = text.splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if field[:1] and field[0] & 0x80:                       # GNU base-256 for large numbers
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    return int(field or b"0", 8)


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def tar_members(f: IO[bytes], url: str = "") -> Iterator[tuple[str, bytes]]:
    """(path, data) of every regular-file member of the tar stream ``f``, in archive order."""
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        hdr = f.read(BLOCK)
        if hdr == bytes(BLOCK):                              # end-of-archive marker
            return
        if len(hdr) < BLOCK:   # every writer (tarfile, webdataset's TarWriter, GNU tar) ends with zero blocks
            raise TarFormatError(f"{url}: truncated tar archive (ends without its end-of-archive marker)")
        if _octal(hdr[148:156]) != sum(hdr) - sum(hdr[148:156]) + 8 * 32:
            raise TarFormatError(f"{url}: tar header checksum mismatch (not a tar file, or damaged)")
        size = int(pax.get("size", _octal(hdr[124:136])))
        data = f.read(size)
        if len(data) < size:
            raise TarFormatError(f"{url}: truncated tar member")
        if size % BLOCK and len(f.read(BLOCK - size % BLOCK)) < BLOCK - size % BLOCK:
            raise TarFormatError(f"{url}: truncated tar member")
        kind = hdr[156:157]
        if kind == b"x":                                     # pax header for the next member
            pax = _pax_records(data)
            continue
        if kind == b"L":                                     # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind == b"g":                                     # pax global header: nothing we use
            continue
        name = pax.get("path") or long_name
        if name is None:
            name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        long_name, pax = None, {}
        if kind in _REGULAR:
            yield name, data


def tar_samples(sources: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: ``{"url": path or URL}`` dicts -> webdataset samples (see the module docstring)."""
    for source in sources:
        url = source["url"]
        with open_read(url) as f:
            sample: dict | None = None
            for name, data in tar_members(f, url):
                if META_NAME.match(name):
                    continue
                match = KEY_EXT.match(name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample = {"__key__": key, "__url__": url}
                if ext in sample:
                    raise TarFormatError(f"{url}: duplicate member {name} (webdataset refuses these too)")
                sample[ext] = data
            if sample is not None:
                yield sample


__all__ = ["KEY_EXT", "META_NAME", "ShardReadError", "TarFormatError", "tar_members", "tar_samples", "worker_message"]
