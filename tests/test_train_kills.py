"""Many kills, not one: a real 2-rank DeepSpeed job SIGKILLed three times at seeded moments -- one inside a
checkpoint save, one inside an evaluation, one anywhere -- and restarted with ``--resume auto`` after each,
ends bitwise equal to an uninterrupted run: the final parameters, the final evaluation, and every training
loss any segment logged (a step that a killed segment had done is done again by the next one, and must give
the same loss).

The moments are observed from outside (:mod:`tests.helpers_kills`): a save is hit while its checkpoint folder
exists without its ``COMPLETE`` marker, an evaluation after rank 0 printed the epoch's last step and before it
printed the evaluation's table. The seed picks the events on the uninterrupted run's timeline and each kill's
delay (where the freezes fall in the job's time)."""
from __future__ import annotations

import json
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch

from pipeline import checkpointing
from tests.helpers_kills import files_in, kill_when
from tests.helpers_tracking import runs_of, suite_store
from tests.helpers_train import final_params, run_train, train_cmd
from tests.helpers_train import tiny_data, tiny_recipe  # noqa: F401 - session fixtures

pytestmark = pytest.mark.slow

SEED = 8
KILLS = 3
ATTEMPTS = 3   # a moment missed between two freezes (a loaded machine) is tried again from the same files
# tiny recipe: 32 images, global batch 8 -> 4 steps per epoch, 3 epochs; saves every 3 steps and at each epoch's
# end (3, 4, 6, 8, 9, 12), an evaluation at each epoch's end (after steps 4, 8, 12), before that epoch's save
OVERRIDES = ("data.batch_size=4", "eval.every_epochs=1")
STEPS_PER_EPOCH = 4

STEP_LINE = re.compile(r"^step (\d+) ", re.M)
LOSS_LINE = re.compile(r"^step (\d+) loss=(\S+) ", re.M)
EPOCH_LINE = re.compile(r"^epoch (\d+) start: .* resume_at=(\d+)$", re.M)
EVAL_LINE = re.compile(r"^(?:epoch \d+|final) eval:$", re.M)
CKPT_LINE = re.compile(r"^checkpoint .*/step_(\d+)$", re.M)


@dataclass(frozen=True)
class Event:
    kind: str   # "step" (after the step's line), "save" (inside the step's save), "eval" (after the step)
    step: int

    def __str__(self) -> str:
        return {"step": f"after step {self.step}", "save": f"inside the save of step {self.step}",
                "eval": f"inside the evaluation after step {self.step}"}[self.kind]


def timeline(stdout: str) -> list[Event]:
    """The uninterrupted run's events in order: every step, evaluation and checkpoint save (a save's line is
    printed when it is done, after the epoch's evaluation at an epoch's end)."""
    events, step = [], 0
    for line in stdout.splitlines():
        if m := STEP_LINE.match(line):
            step = int(m.group(1))
            events.append(Event("step", step))
        elif EVAL_LINE.match(line):
            events.append(Event("eval", step))
        elif m := CKPT_LINE.match(line):
            events.append(Event("save", int(m.group(1))))
    return events


def kill_plan(events: list[Event], rng: random.Random) -> list[Event]:
    """``KILLS`` events in timeline order, at least one save and one evaluation among them."""
    while True:
        picked = [events[i] for i in sorted(rng.sample(range(len(events)), KILLS))]
        if {"save", "eval"} <= {e.kind for e in picked}:
            return picked


def progress(text: str) -> int:
    """The global step the segment has reached (its resume point until it printed a step)."""
    done = [int(m.group(1)) * STEPS_PER_EPOCH + int(m.group(2)) for m in EPOCH_LINE.finditer(text)]
    done += [int(m.group(1)) for m in STEP_LINE.finditer(text)]
    return max(done, default=-1)


def checks(event: Event, ckpts: Path):
    """(arm, hit, missed) for ``event``: armed once the segment is past the step before it."""
    def arm(text: str) -> bool:
        return progress(text) >= event.step - 1

    def after_step(text: str) -> str | None:
        m = re.search(rf"^step {event.step} .*$", text, re.M)
        return None if m is None else text[m.end():]

    if event.kind == "save":
        folder = ckpts / checkpointing.tag_for(event.step)

        def hit(text: str) -> str | None:
            if folder.is_dir() and not checkpointing.is_complete(folder):
                return f"{folder.name} holds {files_in(folder)}, no {checkpointing.MARKER}"
            return None

        def missed(text: str) -> str | None:
            return f"{folder.name} is complete" if checkpointing.is_complete(folder) else None
    elif event.kind == "eval":
        def hit(text: str) -> str | None:
            rest = after_step(text)
            return None if rest is None or EVAL_LINE.search(rest) else f"step {event.step} printed, no eval table"

        def missed(text: str) -> str | None:
            rest = after_step(text)
            return "the eval table was printed" if rest is not None and EVAL_LINE.search(rest) else None
    else:
        def hit(text: str) -> str | None:
            rest = after_step(text)
            return None if rest is None else f"step {event.step} printed"

        def missed(text: str) -> str | None:
            return None
    return arm, hit, missed


def mlflow_losses(run_dir: Path, run_id: str | None = None) -> tuple[str, list[tuple[int, float]]]:
    """``train/loss`` of the run of ``run_dir`` (``run_id``: that one; a missed kill attempt, run again from
    the files before it, leaves the run it had started beside the one that continues)."""
    mlflow.set_tracking_uri(suite_store())
    if run_id is None:
        [run] = runs_of(run_dir)
        run_id = run.info.run_id
    history = mlflow.MlflowClient().get_metric_history(run_id, "train/loss")
    return run_id, sorted((m.step, m.value) for m in history)


def test_three_kills_at_seeded_moments_resume_bitwise(tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    t0 = time.monotonic()
    full = tmp_path / "full"
    ref = run_train(2, tiny_recipe, tiny_data, full, "zero2", *OVERRIDES, timeout=600).stdout
    events = timeline(ref)
    assert {"save", "eval"} <= {e.kind for e in events}, ref[-3000:]
    want_loss = {int(m.group(1)): m.group(2) for m in LOSS_LINE.finditer(ref)}

    rng = random.Random(SEED)
    plan = kill_plan(events, rng)
    run_dir, ckpts = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    segments, report = [], []
    for i, event in enumerate(plan):
        resume = ("--resume", "auto") if i else ()
        cmd = train_cmd(2, tiny_recipe, tiny_data, run_dir, "zero2", *OVERRIDES, *resume)
        arm, hit, missed = checks(event, ckpts)
        offset = rng.uniform(0.0, 0.005)
        snapshot = tmp_path / f"before_kill{i + 1}"
        if run_dir.exists():
            shutil.copytree(run_dir, snapshot)
        for attempt in range(1, ATTEMPTS + 1):
            killed = kill_when(cmd, arm=arm, hit=hit, missed=missed, offset_s=offset)
            segments.append(killed.output)   # a missed attempt's losses must match too
            if killed.moment is not None:
                break
            report.append(f"kill {i + 1}, attempt {attempt}: missed ({killed.missed}), run again from the same files")
            assert attempt < ATTEMPTS, "\n".join(report)
            shutil.rmtree(run_dir)
            if snapshot.exists():
                shutil.copytree(snapshot, run_dir)
        newest = checkpointing.find_latest(ckpts)
        report.append(f"kill {i + 1}: {event} ({killed.moment}; {killed.frozen} freezes), newest complete "
                      f"checkpoint {newest.name if newest else None}")
        if event.kind == "save":   # the partial folder never becomes what resume or DeepSpeed's pointer names
            assert newest is None or newest.name != checkpointing.tag_for(event.step)
            if newest is not None:
                assert (ckpts / checkpointing.LATEST).read_text() == newest.name
    proc = run_train(2, tiny_recipe, tiny_data, run_dir, "zero2", *OVERRIDES, "--resume", "auto", timeout=600)
    segments.append(proc.stdout)
    print("\n".join([f"seed {SEED}:", *report, f"{time.monotonic() - t0:.0f} s"]))

    want, got = final_params(full), final_params(run_dir)
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), f"{k}: max diff {float((want[k] - got[k]).abs().max())}"
    a = json.loads((full / "final_metrics.json").read_text())
    b = json.loads((run_dir / "final_metrics.json").read_text())
    assert a["global_step"] == b["global_step"] == len(want_loss)
    assert a["eval"] == b["eval"]

    # every loss any segment printed, a redone step's included, is the uninterrupted run's
    printed = [(int(m.group(1)), m.group(2)) for text in segments for m in LOSS_LINE.finditer(text)]
    assert {s for s, _ in printed} == set(want_loss)
    assert [(s, want_loss[s]) for s, _ in printed] == printed
    assert len(printed) > len(want_loss)   # at least the step of the killed save was done again
    # and so is every value the one MLflow run holds (full precision)
    _, ref_hist = mlflow_losses(full)
    run_id, hist = mlflow_losses(run_dir, b["mlflow_run_id"])
    assert run_id in {r.info.run_id for r in runs_of(run_dir)}
    ref_by_step = dict(ref_hist)
    assert {s for s, _ in hist} == set(ref_by_step) == set(want_loss)
    assert [(s, ref_by_step[s]) for s, _ in hist] == hist
