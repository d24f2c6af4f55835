"""Many kills, not one, for the WebDataset writer: ``python -m data_prep wds`` SIGKILLed twice at seeded
moments -- once while the train split's shards are written, once while the val split's are (the train split's
``_info.json`` entry and manifest already there) -- and run again after each; the last run ends with exactly an
uninterrupted run's output: every shard byte for byte, ``_info.json`` byte for byte, the shard records and the
manifests the same but for their timings.

The moments are observed from outside (:mod:`tests.helpers_kills`): the seed picks how many of the split's
shards must be complete under their final names and a delay after that; the job is then frozen and killed at
the first freeze where one of the split's shards is half written (its temp file exists)."""
from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from data_prep.verify import verify
from helpers_data_prep import tiny_demo
from tests.helpers_kills import files_in, kill_when
from tests.helpers_train import PY, ROOT, job_env

pytestmark = pytest.mark.slow

SEED = 5
SPLITS = ("train", "val")


def wds_cmd(src: Path, out: Path) -> list[str]:
    return [PY, "-m", "data_prep", "wds", "--src", str(src), "--out", str(out), "--max-side", "96",
            "--shard-max-count", "3", "--workers", "2", "--no-progress"]


def shards(wd: Path, split: str) -> list[str]:
    return sorted(p.name for p in wd.glob(f"{split}-*.tar"))


def state(wd: Path) -> str:
    info = json.loads((wd / "_info.json").read_text()) if (wd / "_info.json").is_file() else {}
    being_written = [n for n in files_in(wd) if ".tmp." in n]
    return (", ".join(f"{s}: {len(shards(wd, s))} shards" for s in SPLITS) + f", {len(being_written)} being written"
            f", _info.json splits {sorted(info.get('splits', {}))}, manifests "
            f"{[s for s in SPLITS if (wd / f'{s}_manifest.json').is_file()]}")


def without_timings(doc: dict) -> dict:
    """A manifest or shard record less what differs between runs of the same plan: times, reuse, removals and
    the output folder's path."""
    drop = {"created", "timings", "seconds", "reused", "removed_stale", "dir"}
    return {k: without_timings(v) if isinstance(v, dict) else v for k, v in doc.items() if k not in drop}


def test_two_kills_at_seeded_moments_give_the_clean_runs_output(tmp_path):
    t0 = time.monotonic()
    src = tmp_path / "src"
    # images large enough to need downscaling: each 3-image shard takes a while to write
    tiny_demo(src, train_per_class=8, val_per_class=4, min_side=300, max_side=560, large_images=0)
    clean = tmp_path / "clean"
    subprocess.run(wds_cmd(src, clean), cwd=ROOT, env=job_env(), check=True, capture_output=True, timeout=300)
    cwd = clean / "wds"
    total = {s: len(shards(cwd, s)) for s in SPLITS}
    assert min(total.values()) >= 3, total

    rng = random.Random(SEED)
    out = tmp_path / "out"
    wd = out / "wds"
    report = []
    for i, split in enumerate(SPLITS):
        target = rng.randint(1, total[split] - 2)   # complete shards of the split before the kill

        def arm(text: str, split=split, target=target) -> bool:
            return len(shards(wd, split)) >= target

        def hit(text: str, split=split, target=target) -> str | None:   # a shard of the split half written
            if not any(n.startswith(f"{split}-") and ".tmp." in n for n in files_in(wd)):
                return None
            return f"{split} had {target} complete shards, then {state(wd)}"

        def missed(text: str, split=split) -> str | None:
            return f"{split} is done" if (wd / f"{split}_manifest.json").exists() else None

        killed = kill_when(wds_cmd(src, out), arm=arm, hit=hit, missed=missed, offset_s=rng.uniform(0.0, 0.02))
        assert killed.moment is not None, killed.missed
        report.append(f"kill {i + 1}: {killed.moment}")
        # killed inside the split: its index entry and manifest were not written yet, the earlier split's were
        assert not (wd / f"{split}_manifest.json").exists(), killed.output[-3000:]
        assert len(shards(wd, split)) < total[split]
        info = json.loads((wd / "_info.json").read_text()) if (wd / "_info.json").is_file() else {"splits": {}}
        assert sorted(info["splits"]) == list(SPLITS[:i])
    proc = subprocess.run(wds_cmd(src, out), cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print("\n".join([f"seed {SEED}:", *report, f"{time.monotonic() - t0:.0f} s"]))

    assert files_in(wd) == files_in(cwd) and files_in(wd / "_parts") == files_in(cwd / "_parts")
    assert not [p for p in out.rglob("*") if ".tmp." in p.name]
    assert (wd / "_info.json").read_bytes() == (cwd / "_info.json").read_bytes()
    for split in SPLITS:
        for name in shards(cwd, split):
            assert (wd / name).read_bytes() == (cwd / name).read_bytes(), name
        got = json.loads((wd / f"{split}_manifest.json").read_text())
        want = json.loads((cwd / f"{split}_manifest.json").read_text())
        assert without_timings(got) == without_timings(want)
        assert got["timings"]["shards_reused"] >= 1   # the kills' complete shards were kept, not redone
    for rec in files_in(cwd / "_parts"):
        got, want = (json.loads((d / "_parts" / rec).read_text()) for d in (wd, cwd))
        assert without_timings(got) == without_timings(want), rec
    assert verify(out)["ok"]
