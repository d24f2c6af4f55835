"""What a user sees, captured from the code of this checkout for the docs: the demo's summary, ``slurm_submit.py
--dry-run``, the URL lines of ``make ui``, and the plots (resolution vs accuracy, run comparison, attention maps).

    python docs/capture.py                          # runs `make demo`'s command into runs/demo first (minutes)
    python docs/capture.py --demo-log runs/demo_stdout.txt   # reuse a finished demo run and its printed output

Writes ``docs/captures/*.txt`` and ``docs/images/*.png``. Paths under this checkout are shown as ``~/cpvt-pipeline``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CAPTURES, IMAGES = ROOT / "docs" / "captures", ROOT / "docs" / "images"
SHOWN_ROOT = "~/cpvt-pipeline"


def tidy(text: str) -> str:
    """Paths under the checkout shown as a user's clone would print them; trailing blanks dropped."""
    text = text.replace(str(ROOT), SHOWN_ROOT)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()) + "\n"


def run(*argv: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if proc.returncode:
        sys.exit(f"capture: {' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def demo_summary(run_dir: Path, demo_log: Path | None) -> None:
    if demo_log is None:
        demo_log = run_dir.parent / f"{run_dir.name}_stdout.txt"
        demo_log.write_text(run("-m", "launchers.demo", "--run-dir", str(run_dir)))
    text = demo_log.read_text()
    summary = text[text.index("== 4/4 summary"):].split("\nrc=")[0]   # (a log saved by hand may end in its exit code)
    (CAPTURES / "demo_summary.txt").write_text(tidy(summary))


def dry_run(run_dir: Path) -> None:
    """The SLURM command of the README with --dry-run, on a site file describing 8-GPU nodes."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site.yaml"
        site.write_text(yaml.safe_dump({"data_root": str(run_dir / "data"), "partition": "gpu", "account": "my-lab",
                                        "gpus_per_node": 8, "cpus_per_task": 12, "time": "24:00:00",
                                        "runs_root": str(ROOT / "runs")}))
        out = run("launchers/slurm_submit.py", "--nodes", "4", "--model", "cpvt_b", "--dry-run",
                  env={"CPVT_SITE": str(site)})
        out = out.replace(str(site), "~/.config/cpvt/site.yaml")
    (CAPTURES / "slurm_dry_run.txt").write_text(
        tidy("$ python launchers/slurm_submit.py --nodes 4 --model cpvt_b --dry-run\n" + out))


def ui_urls() -> None:
    """The lines `make ui` prints before it serves the store (the server is stopped right after them)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.tracking", "ui", "--port", "5000"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("(the training view"):
                break
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    (CAPTURES / "make_ui.txt").write_text(tidy("$ make ui\n" + "".join(lines)))


def plots(run_dir: Path) -> None:
    summary = json.loads((run_dir / "demo_summary.json").read_text())
    shutil.copyfile(run_dir / "resolution_vs_accuracy.png", IMAGES / "resolution_vs_accuracy.png")
    run("-m", "pipeline.analysis.compare", summary["train"]["mlflow_run_id"], "--paper", "--no-log",
        "--out", str(IMAGES / "compare.png"))
    run("-m", "pipeline.analysis.attention_maps", "--checkpoint", summary["export"], "--label", "demo CPVT-Ti",
        "--data", str(run_dir / "data"), "--res", "64", "--layers", "0", "5", "11", "--num-images", "2",
        "--out", str(IMAGES / "attention_maps.png"))
    for side in IMAGES.glob("*.json"):   # the numbers the analysis commands write beside each PNG
        side.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs/demo", help="the demo's run folder")
    p.add_argument("--demo-log", default=None, help="the printed output of a finished demo (else the demo runs)")
    args = p.parse_args(argv)
    run_dir = (ROOT / args.run_dir).resolve()
    CAPTURES.mkdir(exist_ok=True)
    IMAGES.mkdir(exist_ok=True)
    demo_summary(run_dir, Path(args.demo_log) if args.demo_log else None)
    plots(run_dir)
    dry_run(run_dir)
    ui_urls()
    print(f"captures in {CAPTURES.relative_to(ROOT)}, images in {IMAGES.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
