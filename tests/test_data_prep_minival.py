"""The minival carve: the rule on its own (size, strata, determinism), then both writers on a tiny real dataset
(disjoint from train, recorded in the index, the same on a rerun and in an array run, removed with fraction 0)."""
from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from data_prep.__main__ import build_parser
from data_prep.__main__ import main as data_prep_main
from data_prep.layout import Sample, discover_split
from data_prep.minival import MINIVAL, carve_keys, class_quotas
from data_prep.verify import verify
from data_prep.write_ffcv import FfcvSplitTask, write_ffcv
from data_prep.write_webdataset import write_webdataset
from helpers_data_prep import expected_labels, read_beton, read_split_plain, tiny_demo

FRACTION, SEED = 0.1, 3
PER_CLASS = 20          # 3 classes x 20 + 6 bad files (labelled) = 66 train files: round(6.6) = 7 carved


def _samples(counts: dict[int, int], unlabelled: int = 0) -> list[Sample]:
    out = [Sample(f"c{c}_{i}", f"/x/c{c}_{i}.JPEG", c) for c, n in counts.items() for i in range(n)]
    return out + [Sample(f"stray_{i}", f"/x/stray_{i}.JPEG", None, "file outside any class folder")
                  for i in range(unlabelled)]


# ----------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("counts,fraction", [({0: 1300, 1: 1300, 2: 732}, 0.01), ({0: 10, 1: 10, 2: 5}, 0.1),
                                              ({c: 20 + c for c in range(13)}, 0.05)])
def test_carve_size_and_strata(counts, fraction):
    """round(f * n) in all, every class the floor or the ceiling of its share; unlabelled files never carved."""
    samples = _samples(counts, unlabelled=5)
    keys = carve_keys(samples, fraction, SEED)
    n = sum(counts.values())
    assert len(keys) == int(fraction * n + 0.5) >= len(counts)
    per_class = Counter(s.label for s in samples if s.key in keys)
    for c, n_c in counts.items():
        assert int(fraction * n_c) <= per_class.get(c, 0) <= int(fraction * n_c) + 1, (c, per_class)
    assert not any(k.startswith("stray") for k in keys)
    assert sum(class_quotas(counts, fraction, SEED).values()) == len(keys)


def test_carve_depends_on_the_files_and_the_seed_only():
    samples = _samples({0: 50, 1: 40, 2: 30})
    keys = carve_keys(samples, FRACTION, SEED)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert carve_keys(shuffled, FRACTION, SEED) == keys              # order (train's shuffle) does not matter
    assert carve_keys(list(reversed(samples)), FRACTION, SEED) == keys
    assert carve_keys(samples, FRACTION, SEED + 1) != keys           # the seed picks another set
    assert carve_keys(samples, 0.0, SEED) == set()
    assert carve_keys(samples, 0.02, SEED) == set()   # round(2.4) = 2 images for 3 classes: none
    assert len(carve_keys(samples, 0.025, SEED)) == 3
    with pytest.raises(ValueError, match="minival_fraction"):
        carve_keys(samples, 0.9, SEED)


# ----------------------------------------------------------------------------------------- the writers
@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("minival") / "src"
    return path, tiny_demo(path, train_per_class=PER_CLASS)


def _wds(src_path: Path, out: Path, **kw) -> dict:
    args = dict(workers=1, progress=False, shard_max_count=10, minival_fraction=FRACTION, minival_seed=SEED)
    return write_webdataset(src_path, out, **(args | kw))


@pytest.fixture(scope="module")
def wds_out(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("minival_wds") / "out"
    return out, _wds(src[0], out)


def test_wds_minival_is_disjoint_stratified_and_recorded(src, wds_out):
    src_path, desc = src
    out, manifests = wds_out
    train_keys, train_labels, _ = read_split_plain(out, "train")
    mini_keys, mini_labels, _ = read_split_plain(out, MINIVAL)
    assert not set(train_keys) & set(mini_keys)
    assert train_labels | mini_labels == expected_labels(src_path, desc, "train")   # every written image, once
    found = discover_split(src_path, "train").samples
    carved = carve_keys(found, FRACTION, SEED)
    assert len(carved) == 7 and set(mini_keys) <= carved   # a carved bad file is skipped in minival, like in train
    assert max(Counter(mini_labels.values()).values()) - min(Counter(mini_labels.values()).values()) <= 1
    info = json.loads((out / "wds" / "_info.json").read_text())["splits"]
    for split in ("train", MINIVAL):
        rec = info[split][MINIVAL]
        assert (rec["fraction"], rec["seed"], rec["num_found"]) == (FRACTION, SEED, 7)
        assert manifests[split]["params"][MINIVAL] == rec
    assert MINIVAL not in info["val"]
    assert manifests["train"]["counts"]["found"] + manifests[MINIVAL]["counts"]["found"] == len(found)
    assert verify(out)["ok"]


def test_wds_minival_rerun_and_array_run_carve_the_same(src, wds_out, tmp_path):
    """A rerun reuses every shard; a 3-job array run (submitit's debug executor) writes the same bytes."""
    out, _ = wds_out
    before = json.loads((out / "wds" / "_info.json").read_text())["splits"]
    again = _wds(src[0], out)
    assert again[MINIVAL]["timings"]["shards_written"] == again["train"]["timings"]["shards_written"] == 0
    array = tmp_path / "array"
    _wds(src[0], array, cluster="debug", array_size=3, folder=tmp_path / "logs")
    after = json.loads((array / "wds" / "_info.json").read_text())["splits"]
    for split in ("train", MINIVAL, "val"):
        assert after[split]["shard_sha256"] == before[split]["shard_sha256"], split


def test_wds_without_minival_takes_the_images_back(src, tmp_path):
    out = tmp_path / "out"
    _wds(src[0], out, splits=("train",))
    assert (out / "wds" / "minival-000000.tar").is_file()
    m = _wds(src[0], out, splits=("train",), minival_fraction=0.0)
    info = json.loads((out / "wds" / "_info.json").read_text())["splits"]
    assert set(info) == {"train"} and MINIVAL not in m and MINIVAL not in m["train"]["params"]
    assert not list((out / "wds").glob("minival*"))
    assert m["train"]["counts"]["found"] == len(discover_split(src[0], "train").samples)


def test_verify_finds_an_image_in_both(src, tmp_path):
    out = tmp_path / "out"
    _wds(src[0], out, splits=("train",))
    info_path = out / "wds" / "_info.json"
    info = json.loads(info_path.read_text())
    entry, train = info["splits"][MINIVAL], info["splits"]["train"]
    for k in ("filenames", "shard_lengths", "shard_bytes", "shard_sha256"):   # minival also lists train's shard 0
        entry[k] = entry[k] + train[k][:1]
    entry["num_samples"] += train["shard_lengths"][0]
    info_path.write_text(json.dumps(info))
    errors = verify(out)["errors"]
    assert any(e.startswith(f"wds/{MINIVAL}: 10 sample(s) also in train") for e in errors), errors


def test_ffcv_tasks_carve_alone_the_same_set(src):
    """FFCV's train and minival tasks each discover and carve train (in separate array jobs): same carve, disjoint,
    equal to WebDataset's."""
    src_path, _ = src
    kw = dict(src=str(src_path), out="unused", classes=tuple(src[1]["classes"]), val_labels=None, meta=None,
              max_resolution=64, write_mode="raw", compress_probability=0.0, jpeg_quality=90, seed=0, workers=1,
              chunk_size=10, page_size=None, cluster="pool", progress=False, minival_fraction=FRACTION,
              minival_seed=SEED)
    train, rec_t = FfcvSplitTask(split="train", shuffle_seed=0, **kw).source()
    mini, rec_m = FfcvSplitTask(split=MINIVAL, shuffle_seed=None, **kw).source()
    assert rec_t == rec_m and rec_t["num_found"] == 7
    assert {s.key for s in mini.samples} == carve_keys(discover_split(src_path, "train").samples, FRACTION, SEED)
    assert not {s.key for s in train.samples} & {s.key for s in mini.samples}
    assert len(train.samples) + len(mini.samples) == len(discover_split(src_path, "train").samples)


def test_ffcv_writes_minival(src, wds_out, tmp_path):
    from pipeline.ffcv_compat import keep_torch_threads

    out = tmp_path / "out"
    with keep_torch_threads():
        m = write_ffcv(src[0], out, splits=("train",), workers=1, progress=False, write_mode="raw",
                       max_resolution=64, minival_fraction=FRACTION, minival_seed=SEED, cluster="debug",
                       folder=tmp_path / "logs")
    assert set(m) == {"train", MINIVAL} and m[MINIVAL]["params"][MINIVAL]["seed"] == SEED
    _, wds_mini_labels, _ = read_split_plain(wds_out[0], MINIVAL)
    mini = read_beton(out / "ffcv" / "minival.beton")
    assert sorted(r[0] for r in mini) == sorted(wds_mini_labels.values())
    train = read_beton(out / "ffcv" / "train.beton")
    assert len(train) == m["train"]["counts"]["written"] and not {r[4] for r in train} & {r[4] for r in mini}
    with keep_torch_threads():
        m = write_ffcv(src[0], out, splits=("train",), workers=1, progress=False, write_mode="raw",
                       max_resolution=64, minival_fraction=0.0)
    assert set(m) == {"train"} and not (out / "ffcv" / "minival.beton").exists()


def test_cli_option_and_its_errors(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert data_prep_main(["wds", "--src", str(src[0]), "--out", str(out), "--workers", "1", "--no-progress",
                           "--splits", "train", "--minival-fraction", "0.05", "--minival-seed", "7"]) == 0
    rec = json.loads((out / "wds" / "_info.json").read_text())["splits"][MINIVAL][MINIVAL]
    assert (rec["fraction"], rec["seed"], rec["num_found"]) == (0.05, 7, 3)   # round(0.05 * 66)
    capsys.readouterr()
    for bad, msg in ((["--minival-fraction", "0.9"], "--minival-fraction: 0.9 must be in [0.0, 0.5]"),
                     (["--splits", "train,minival"], "--splits: 'minival' is carved from 'train'")):
        assert data_prep_main(["wds", "--src", str(src[0]), "--out", str(out), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {msg}"), err
    for cmd in ("wds", "ffcv"):   # 1 % unless told otherwise
        args = build_parser().parse_args([cmd, "--src", str(src[0]), "--out", str(out)])
        assert (args.minival_fraction, args.minival_seed) == (0.01, 0)
