"""bench_loaders: every candidate timed at every resolution in one interleaved run; ratios agree with the rates."""
from __future__ import annotations

import json

import pytest

from benchmarks import bench_loaders
from benchmarks.common import verdict

CANDIDATES = ("wds", "wds_nodraft", "imagefolder", "ffcv", "ffcv_bare", "ffcv_bare_u8")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_loaders")
    payload = bench_loaders.main(["--quick", "--workers", "1", "--results-dir", str(out)])
    return payload, json.loads((out / "bench_loaders_quick.json").read_text())


def test_all_candidates_at_all_resolutions(result):
    payload, doc = result
    keys = {f"{c}@{r}" for c in CANDIDATES for r in bench_loaders.RESOLUTIONS}
    assert set(payload["images_per_s"]) == keys == set(payload["spread"])
    assert all(v > 0 for v in payload["images_per_s"].values())
    assert doc["ratios"] == payload["ratios"] and doc["commit"]
    ms = payload["transform_ms_per_image"]
    assert set(ms) == {f"{p}@{r}" for p in ("timm", "ours") for r in bench_loaders.RESOLUTIONS}
    assert all(v > 0 for v in ms.values())


def test_ratios_and_verdicts_follow_from_the_rates(result):
    payload, _ = result
    ips, ratios = payload["images_per_s"], payload["ratios"]
    for r in bench_loaders.RESOLUTIONS:
        assert ratios[f"ffcv_vs_bare_{r}"] == pytest.approx(ips[f"ffcv@{r}"] / ips[f"ffcv_bare@{r}"])
    assert ratios["ffcv_vs_bare_min"] == min(ratios[f"ffcv_vs_bare_{r}"] for r in bench_loaders.RESOLUTIONS)
    assert ratios["wds_vs_imagefolder_224"] == pytest.approx(ips["wds@224"] / ips["imagefolder@224"])
    assert ratios["wds_128_over_224"] == pytest.approx(ips["wds@128"] / ips["wds@224"])
    for name, target in bench_loaders.TARGETS.items():
        assert payload["passed"][name] == (ratios[name] >= target)
        assert payload["verdicts"][name] == verdict(ratios[name], target, payload["ratio_spread"][name])
        assert payload["summary"][name].endswith(payload["verdicts"][name])
