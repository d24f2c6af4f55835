"""Layout discovery on real files: train folders, val folders, flat val + LOC csv, flat val + devkit txt/meta.mat."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import scipy.io

from data_prep.layout import LayoutError, class_list, discover_split, read_devkit_meta
from data_prep.sharding import make_tasks, plan_shards
from helpers_data_prep import expected_labels, tiny_demo


def _labels(source) -> dict[str, int | None]:
    return {s.key: s.label for s in source.samples}


@pytest.mark.parametrize("val_layout, layout", [("loc_csv", "flat+loc_csv"), ("devkit", "flat+devkit"),
                                                ("folders", "folders")])
def test_val_layouts_give_the_generated_labels(tmp_path, val_layout, layout):
    src = tmp_path / "src"
    desc = tiny_demo(src, val_layout=val_layout, bad_files=False)
    val = discover_split(src, "val")
    assert val.layout == layout
    assert val.classes == sorted(desc["classes"]) == class_list(src)
    gt = expected_labels(src, desc, "val") if val_layout != "devkit" else None
    if gt is None:  # devkit: compare with the LOC csv the same generator would have written
        src2 = tmp_path / "src2"
        desc2 = tiny_demo(src2, val_layout="loc_csv", bad_files=False)
        gt = expected_labels(src2, desc2, "val")
    assert _labels(val) == gt
    order = sorted(gt, key=lambda k: (gt[k], k)) if layout == "folders" else sorted(gt)
    assert [s.key for s in val.samples] == order   # val is never shuffled: folder, then file name order
    train = discover_split(src, "train")
    assert train.layout == "folders"
    assert _labels(train) == expected_labels(src, desc, "train")


def test_devkit_meta_maps_ids_not_by_position(tmp_path):
    src = tmp_path / "src"
    desc = tiny_demo(src, val_layout="devkit", bad_files=False)
    meta = src / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    ids = read_devkit_meta(meta)
    # generator assigns IDs in reverse wnid order and adds one internal (non-leaf) synset that must be ignored
    assert ids == {3 - i: w for i, w in enumerate(desc["classes"])}
    # val-only flat layout with the devkit files passed explicitly, no train/ to take classes from
    only_val = tmp_path / "only_val"
    shutil.copytree(src / "val", only_val / "val")
    with pytest.raises(LayoutError, match="ground truth"):
        discover_split(only_val, "val")
    gt = src / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    val = discover_split(only_val, "val", val_labels=gt, meta=meta)
    assert val.classes == desc["classes"]   # all leaf synsets of meta.mat, sorted
    assert _labels(val) == _labels(discover_split(src, "val"))


def test_hand_built_meta_mat_with_scipy(tmp_path):
    """A meta.mat written directly with scipy.io.savemat (struct array as a list of dicts)."""
    val = tmp_path / "root" / "val"
    val.mkdir(parents=True)
    for i in range(1, 4):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"x")
    synsets = [{"ILSVRC2012_ID": 1, "WNID": "n02000000", "num_children": 0},
               {"ILSVRC2012_ID": 2, "WNID": "n01000000", "num_children": 0},
               {"ILSVRC2012_ID": 3, "WNID": "n00000001", "num_children": 2}]
    scipy.io.savemat(str(tmp_path / "root" / "meta.mat"), {"synsets": synsets})
    (tmp_path / "root" / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n2\n1\n")
    s = discover_split(tmp_path / "root", "val")
    assert s.layout == "flat+devkit" and s.classes == ["n01000000", "n02000000"]
    assert [x.label for x in s.samples] == [1, 0, 1]


def test_imagefolder_tree_unlabeled_files_and_errors(tmp_path):
    root = tmp_path / "tree"
    for cls in ("zebra", "apple", "mango"):
        (root / "train" / cls).mkdir(parents=True)
        (root / "train" / cls / f"{cls}.1.png").write_bytes(b"x")   # dots in names -> sanitised keys
    (root / "train" / "apple" / ".hidden").write_bytes(b"x")       # dotfiles are not samples
    (root / "train" / "stray.jpg").write_bytes(b"x")               # found, but has no class
    s = discover_split(root, "train")
    assert s.classes == ["apple", "mango", "zebra"]
    labels = _labels(s)
    assert labels == {"apple_1": 0, "mango_1": 1, "zebra_1": 2, "stray": None}
    assert all("." not in k for k in labels)
    # val folders with a class that train does not have: found, unlabeled with a reason
    (root / "val" / "kiwi").mkdir(parents=True)
    (root / "val" / "kiwi" / "k.jpg").write_bytes(b"x")
    v = discover_split(root, "val")
    assert v.samples[0].label is None and "kiwi" in v.samples[0].reason
    # duplicate stems across classes -> keys from relative paths
    (root / "train" / "mango" / "apple.1.png").write_bytes(b"x")
    keys = {x.key for x in discover_split(root, "train").samples}
    assert {"apple_apple_1", "mango_apple_1"} <= keys
    with pytest.raises(LayoutError, match="not found"):
        discover_split(root, "test")
    (root / "empty").mkdir()
    with pytest.raises(LayoutError, match="empty"):
        discover_split(root, "empty")


def test_flat_val_missing_ground_truth_rows_are_reported(tmp_path):
    src = tmp_path / "src"
    tiny_demo(src, bad_files=False)
    extra = src / "val" / "ILSVRC2012_val_99999999.JPEG"
    shutil.copy(next((src / "val").iterdir()), extra)
    s = discover_split(src, "val")
    by_key = {x.key: x for x in s.samples}
    assert by_key[extra.stem].label is None and by_key[extra.stem].reason == "no ground-truth label"


def test_train_order_is_a_seeded_shuffle_and_sharding_is_deterministic(tmp_path):
    src = tmp_path / "src"
    tiny_demo(src, bad_files=False, train_per_class=6)
    a = discover_split(src, "train", shuffle_seed=3)
    b = discover_split(src, "train", shuffle_seed=3)
    c = discover_split(src, "train", shuffle_seed=None)
    assert [x.key for x in a.samples] == [x.key for x in b.samples] != [x.key for x in c.samples]
    assert sorted(x.key for x in a.samples) == sorted(x.key for x in c.samples)
    shards = plan_shards(a.samples, max_count=5)
    assert [len(g) for g in shards] == [5, 5, 5, 3]
    sizes = [Path(x.path).stat().st_size for x in a.samples]
    by_bytes = plan_shards(a.samples, max_count=100, max_bytes=max(sizes) * 2)
    for g in by_bytes:
        assert len(g) == 1 or sum(Path(x.path).stat().st_size for x in g) <= max(sizes) * 2
    t1 = make_tasks("train", a.samples, "o", max_count=5, max_bytes=None, max_side=64, quality=90)
    t2 = make_tasks("train", b.samples, "o", max_count=5, max_bytes=None, max_side=64, quality=90)
    t3 = make_tasks("train", b.samples, "o", max_count=5, max_bytes=None, max_side=65, quality=90)
    assert [t.plan_id for t in t1] == [t.plan_id for t in t2]
    assert all(x.plan_id != y.plan_id for x, y in zip(t1, t3))
    assert [t.name for t in t1] == [f"train-{i:06d}.tar" for i in range(4)]
