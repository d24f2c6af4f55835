"""2 real ranks (gloo): equal training batch counts over an odd number of shards, exact padded validation."""
from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp

from pipeline.net import free_port
from tests.helpers_loaders import distributed_worker, loader_dataset, split_info

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    return loader_dataset(tmp_path_factory.getbasetemp() / "loader_data")


def test_two_ranks_equal_batches_and_exact_eval(root, tmp_path):
    assert len(split_info(root, "train")["filenames"]) % 2 == 1
    formats = ("wds", "ffcv")
    mp.spawn(distributed_worker, args=(2, free_port(), str(root), str(tmp_path), formats), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    val = split_info(root, "val")
    for fmt in formats:
        r0, r1 = ranks[0][fmt], ranks[1][fmt]
        # training: both ranks ran every epoch to the end with identical batch counts (48 // (bs * 2))
        assert r0["epochs"] == r1["epochs"] == [{"len": 3, "batches": 3}, {"len": 4, "batches": 4}]
        # validation: same batch count, every sample exactly once, padding labelled -1
        assert r0["eval_batches"] == r1["eval_batches"] == r0["eval_len"] == 2
        keys = [k for r in (r0, r1) for k in r["keys"] if k]
        assert len(keys) == len(set(keys)) == val["num_samples"] == r0["num_samples"] == 20
        for r in (r0, r1):
            assert [k == "" for k in r["keys"]] == [lab == -1 for lab in r["labels"]]
            assert len(r["labels"]) == 2 * 6
