"""Native-aspect evaluation (eval.mode: native): the bucket rule, the rank schedule, the real WebDataset/FFCV
loaders on 1 and 2 real ranks (every val sample exactly once, same shapes in the same order on every rank), a
learned-PE model through native evaluation, and the analysis table with both columns."""
from __future__ import annotations

import json
import random
import subprocess

import pytest
import torch
import torch.multiprocessing as mp

from helpers_analysis import tiny_cpvt, tiny_wds
from helpers_train import PY, ROOT, job_env
from pipeline.config import ConfigError
from pipeline.data.aspect_buckets import bucket_shapes, native_shape, plan_native_batches
from pipeline.data.loader import build_eval_loader
from pipeline.net import free_port
from tests.helpers_loaders import data_cfg, loader_dataset, split_info

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return loader_dataset(tmp_path_factory.getbasetemp() / "loader_data")


def test_shape_rule_multiples_of_patch_within_bound():
    rng = random.Random(0)
    for res in (32, 64, 224):
        buckets = set(bucket_shapes(res))
        assert len(buckets) == len(bucket_shapes(res)) == 2 * (res // 16) + 1
        for _ in range(300):
            w, h = rng.randint(8, 2000), rng.randint(8, 2000)
            hh, ww = native_shape(w, h, res)
            assert (hh, ww) in buckets
            assert hh % 16 == ww % 16 == 0 and min(hh, ww) == res and max(hh, ww) <= 2 * res
            assert (hh >= ww) == (h >= w) or w == h or hh == ww
            aspect = max(w, h) / min(w, h)
            if aspect * res <= 2 * res - 8:   # not clamped: the long side is the nearest multiple of 16
                assert abs(max(hh, ww) - aspect * res) <= 8 + 1e-9
    assert native_shape(500, 375, 224) == (224, 304) and native_shape(375, 500, 224) == (304, 224)
    assert native_shape(1000, 100, 224) == (224, 448)   # squeezed to the 2x bound, not cropped
    assert native_shape(300, 100, 64, max_aspect=1.5) == (64, 96)


def test_schedule_every_sample_once_same_shapes_on_every_rank():
    rng = random.Random(1)
    shapes = [native_shape(rng.randint(40, 400), rng.randint(40, 400), 64) for _ in range(157)]
    for world in (1, 2, 3):
        plans = [plan_native_batches(shapes, resolution=64, batch_size=8, rank=r, world_size=world)
                 for r in range(world)]
        assert len({len(p) for p in plans}) == 1
        for batches in zip(*plans):
            assert len({(b.shape, b.size) for b in batches}) == 1   # same shape and size on every rank
        seen = [i for p in plans for b in p for i in b.indices]
        assert sorted(seen) == list(range(len(shapes)))
        for p in plans:
            for b in p:
                assert all(shapes[i] == b.shape for i in b.indices) and len(b.indices) <= b.size
                assert b.size * b.shape[0] * b.shape[1] <= 8 * 64 * 64 or b.size == 1


def _check_native_batches(batches, num_samples):
    keys = [k for _, _, ks in batches for k in ks if k]
    assert len(keys) == len(set(keys)) == num_samples
    for x, y, ks in batches:
        assert x.shape[2] % 16 == 0 and x.shape[3] % 16 == 0 and min(x.shape[2:]) == 32
        assert max(x.shape[2:]) <= 64 and x.dtype == torch.float32
        assert [k == "" for k in ks] == (y == -1).tolist()
    return keys


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_one_rank_covers_every_val_sample_once(root, fmt):
    ev = build_eval_loader(data_cfg(root, fmt, num_workers=1), resolution=32, rank=0, world_size=1, mode="native")
    batches = list(ev.iter_with_keys())
    assert len(batches) == len(ev)
    keys = _check_native_batches(batches, split_info(root, "val")["num_samples"])
    assert len({tuple(x.shape[2:]) for x, _, _ in batches}) > 1   # the demo images have several aspect ratios
    assert ev.num_tokens() > ev.num_samples * 4   # more tokens than the 2x2 grid of a 32 px center crop
    if fmt == "ffcv":
        assert sorted(keys, key=int) == [str(i) for i in range(ev.num_samples)]


def test_native_config_errors_before_data_is_read(root, tmp_path):
    with pytest.raises(ConfigError, match="multiple of the patch size 16"):
        build_eval_loader(data_cfg(tmp_path / "missing"), resolution=40, rank=0, world_size=1, mode="native")
    with pytest.raises(ConfigError, match="eval.mode"):
        build_eval_loader(data_cfg(root), resolution=32, rank=0, world_size=1, mode="letterbox")
    from pipeline.config import load_train_config

    with pytest.raises(ConfigError, match=r"eval\.resolutions\[0\]: 40 must be a multiple of the patch size 16"):
        load_train_config(None, ["eval.mode=native", "eval.resolutions=[40]", "data.root=/x"], 1)


def _rank_worker(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    import datetime
    import os
    from pathlib import Path

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    result = {}
    try:
        for fmt in ("wds", "ffcv"):
            ev = build_eval_loader(data_cfg(Path(root), fmt, num_workers=0), resolution=32,
                                   rank=rank, world_size=world_size, mode="native")
            keys, shapes = [], []
            for x, y, k in ev.iter_with_keys():
                shape = torch.tensor(x.shape)
                gathered = [torch.zeros_like(shape) for _ in range(world_size)]
                dist.all_gather(gathered, shape)   # a ZeRO-3 forward is collective: shapes must agree
                assert all(torch.equal(g, shape) for g in gathered), (gathered, shape)
                keys += k
                shapes.append(list(x.shape))
                assert [kk == "" for kk in k] == (y == -1).tolist()
            result[fmt] = {"keys": keys, "shapes": shapes, "len": len(ev)}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_ranks_cover_every_val_sample_once(root, tmp_path):
    mp.spawn(_rank_worker, args=(2, free_port(), str(root), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    n = split_info(root, "val")["num_samples"]
    for fmt in ("wds", "ffcv"):
        r0, r1 = ranks[0][fmt], ranks[1][fmt]
        assert r0["shapes"] == r1["shapes"] and len(r0["shapes"]) == r0["len"] == r1["len"]
        keys = [k for r in (r0, r1) for k in r["keys"] if k]
        assert len(keys) == len(set(keys)) == n
        assert r0["keys"] and r1["keys"] and any(r0["keys"]) and any(r1["keys"])


@pytest.fixture(scope="module")
def wds_root(tmp_path_factory):
    return tiny_wds(tmp_path_factory.mktemp("native_res_data"))


def test_learned_pe_model_and_analysis_table_both_modes(wds_root, tmp_path):
    from pipeline.analysis.resolution import evaluate_resolutions, format_table, plot_resolution_curves

    curves, native = {}, {}
    for label, kw in (("cpvt", {}), ("learned", {"pos_embed": "learned", "img_size": 32})):
        model = tiny_cpvt("cpvt_ti", seed=2, **kw)
        curves[label] = evaluate_resolutions(model, wds_root, [32, 48], batch_size=4)
        native[label] = evaluate_resolutions(model, wds_root, [32, 48], batch_size=4, mode="native")
        for r in (32, 48):
            assert native[label][r]["n"] == curves[label][r]["n"] == 9
            assert native[label][r]["tokens"] > curves[label][r]["tokens"]   # non-square images: more tokens
        assert native[label][48]["loss"] != pytest.approx(curves[label][48]["loss"])
    table = format_table(curves, native)
    assert table.splitlines()[0] == "| run | 32 crop | 32 native | 48 crop | 48 native |"
    row = next(line for line in table.splitlines() if line.startswith("| learned |"))
    assert row == ("| learned | " + " | ".join(f"{m[r]['top1']:.1f}" for r in (32, 48)
                                            for m in (curves["learned"], native["learned"])) + " |")
    plotted = plot_resolution_curves(curves, tmp_path / "res.png", native=native)
    assert plotted["learned"]["native_top1"] == [native["learned"][r]["top1"] for r in (32, 48)]
    assert (tmp_path / "res.png").stat().st_size > 0


def test_trainer_evaluator_follows_eval_mode(root):
    """The trainer's Evaluator scores in the recipe's eval.mode, one cached loader per (mode, resolution)."""
    from pipeline.evaluate import Evaluator
    from pipeline.config import load_train_config

    model = tiny_cpvt("cpvt_ti", num_classes=4, seed=1)
    results = {}
    for mode in ("center_crop", "native"):
        cfg, _ = load_train_config(None, [f"data.root={root}", "data.num_workers=0", "data.eval_batch_size=6",
                                          f"eval.mode={mode}", "eval.resolutions=[32]"], 1)
        ev = Evaluator(cfg, rank=0, world_size=1, device=torch.device("cpu"), input_dtype=torch.float32)
        results[mode] = ev(model, (32,))[32]
        assert list(ev.loaders) == [(mode, 32)] and ev.loaders[(mode, 32)].mode == mode
    n = split_info(root, "val")["num_samples"]
    assert results["center_crop"]["n"] == results["native"]["n"] == n
    assert results["native"]["tokens"] > results["center_crop"]["tokens"] == n * 4
    assert results["native"]["loss"] != pytest.approx(results["center_crop"]["loss"])


def test_a_missing_model_is_one_line(tmp_path):
    """``python -m pipeline.evaluate PATH`` where PATH holds neither an export nor a complete checkpoint: argparse's
    one error line (exit 2), no traceback."""
    proc = subprocess.run([PY, "-m", "pipeline.evaluate", str(tmp_path / "nothing")], cwd=ROOT, env=job_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"evaluate.py: error: model: no complete checkpoint at "
                                                    f"{tmp_path / 'nothing'} (give an export .safetensors, a run "
                                                    f"folder or a checkpoint folder)")
