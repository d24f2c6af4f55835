"""The lean tar reader yields exactly what webdataset's tarfile_to_samples yields, and refuses damaged shards."""
from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from pipeline.data.tar_samples import TarFormatError, tar_samples
from tests.helpers_loaders import loader_dataset, split_info


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return loader_dataset(tmp_path_factory.getbasetemp() / "loader_data")


def _reference(urls):
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def _ours(urls):
    return list(tar_samples({"url": u} for u in urls))


def _comparable(samples):
    return [{k: v for k, v in s.items() if k != "__local_path__"} for s in samples]


@pytest.mark.parametrize("split", ["train", "val"])
def test_same_samples_as_webdataset_on_data_prep_shards(root, split):
    urls = [str(root / "wds" / f) for f in split_info(root, split)["filenames"]]
    ours = _ours(urls)
    assert len(ours) == split_info(root, split)["num_samples"]
    assert _comparable(ours) == _comparable(_reference(urls))
    assert {k for s in ours for k in s} == {"__key__", "__url__", "jpg", "cls"}


def _write_tar(path, members, fmt):
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("a_directory")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_pax_gnu_ustar_prefix_meta_and_directories(tmp_path, fmt):
    deep = "d" * 60 + "/" + "e" * 60 + "/"                     # > 100 chars: ustar prefix / GNU 'L' / pax path
    members = [("__meta__", b"{}"), ("__meta__/x.json", b"{}"), ("noext", b"1"),
               ("a.jpg", b"\xff\xd8jpeg"), ("a.cls", b"3"), ("a.JSON", b"{}"),
               (deep + "b.x.jpg", b"j" * 513), (deep + "b.x.cls", b"1"), ("c.cls", b"")]
    if fmt == tarfile.PAX_FORMAT:
        members.append(("ünïcode_" + "k" * 120 + ".cls", b"7"))   # non-ASCII + long: pax 'path' record
    path = tmp_path / f"f{fmt}.tar"
    _write_tar(path, members, fmt)
    ours = _ours([str(path)])
    assert _comparable(ours) == _comparable(_reference([str(path)]))
    assert len(ours) == 3 + (fmt == tarfile.PAX_FORMAT)          # meta, extension-less, directory: skipped
    assert ours[0] == {"__key__": "a", "__url__": str(path), "jpg": b"\xff\xd8jpeg", "cls": b"3", "json": b"{}"}
    assert ours[1]["__key__"] == deep + "b" and ours[1]["x.jpg"] == b"j" * 513


def test_damaged_shards_raise_with_the_shard_name(tmp_path, root):
    url = str(root / "wds" / split_info(root, "val")["filenames"][0])
    data = open(url, "rb").read()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(TarFormatError, match="truncated.tar: truncated"):
        _ours([str(truncated)])
    with tarfile.open(url) as tf:                         # where the last member ends (the marker follows)
        last = tf.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512
    for n in range(end - 512 * 8, end + 1, 512):         # every block boundary up to just before the marker
        truncated.write_bytes(data[:n])
        with pytest.raises(TarFormatError, match="truncated"):
            _ours([str(truncated)])
    garbled = tmp_path / "garbled.tar"
    with tarfile.open(url) as tf:
        second = tf.getmembers()[1].offset                # a header block, not member data
    garbled.write_bytes(data[:second + 10] + b"X" + data[second + 11:])
    with pytest.raises(TarFormatError, match="garbled.tar: tar header checksum"):
        _ours([str(garbled)])
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"\x89PNG" + bytes(2000))
    with pytest.raises(TarFormatError, match="checksum"):
        _ours([str(not_tar)])
