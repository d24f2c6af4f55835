"""Shared benchmark helpers: interleaved timing, medians, tables, and JSON results with machine + commit info.

Benchmarks on a shared machine are noisy, so candidates are never timed one after another in separate
blocks. :func:`measure_interleaved` runs every candidate once per round (rotating the order each round) for
several rounds and reports per-candidate medians; comparisons are then made as ratios of medians taken in
the same run, which cancels most of the drift caused by other load on the machine.

A ratio comes with its spread (:func:`ratio_spread` over the per-round ratios) and is judged against its target by
:func:`verdict`: PASS, FAIL, or inconclusive where the spread is larger than the ratio's distance to the target.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per call of one candidate over ``len(samples)`` interleaved rounds."""

    name: str
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median: a rough noise indicator for the table."""
        return (max(self.samples) - min(self.samples)) / self.median if self.samples else float("nan")


def measure_interleaved(candidates: Mapping[str, Callable[[], Any]], *, warmup: int = 1, rounds: int = 5,
                        calls_per_round: int = 1, sync: Callable[[], None] | None = None) -> dict[str, Timing]:
    """Time each candidate ``rounds`` times, interleaved: round r runs all candidates in a rotated order.

    Each sample is the mean wall time of ``calls_per_round`` back-to-back calls. ``warmup`` untimed calls per
    candidate come first (also interleaved). ``sync`` (e.g. ``torch.cuda.synchronize``) runs before every
    clock read.
    """
    if rounds < 1 or calls_per_round < 1 or warmup < 0:
        raise ValueError("rounds and calls_per_round must be >= 1 and warmup >= 0")
    names = list(candidates)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    out = {name: Timing(name) for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = candidates[name]
            sync()
            t0 = time.perf_counter()
            for _ in range(calls_per_round):
                fn()
            sync()
            out[name].samples.append((time.perf_counter() - t0) / calls_per_round)
    return out


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Round-by-round ratios ``num[i] / den[i]`` of two candidates timed in the same interleaved rounds (for a
    throughput ratio pass the times the other way round: ``paired_ratios(t_b, t_a)`` = rate_a / rate_b)."""
    if len(num) != len(den):
        raise ValueError(f"paired_ratios: {len(num)} vs {len(den)} rounds")
    return [ratio(a, b) for a, b in zip(num, den)]


def ratio_spread(ratios: Sequence[float]) -> float:
    """(max - min) / median of the per-round ratios; NaN with fewer than two rounds (no spread measured)."""
    if len(ratios) < 2:
        return float("nan")
    return (max(ratios) - min(ratios)) / statistics.median(ratios)


def verdict(value: float | None, target: float, spread: float, *, higher_is_better: bool = True) -> str:
    """"PASS" / "FAIL" for ``value`` against ``target`` (``>=`` when ``higher_is_better``, else ``<=``), or
    "inconclusive" when the measurement cannot tell: its relative spread is larger than its relative distance to
    the target, ``|value - target| / value``, or the spread is unknown (one round) or the value missing."""
    if value is None or not math.isfinite(value) or value == 0 or not math.isfinite(spread):
        return "inconclusive"
    if spread > abs(value - target) / abs(value):
        return "inconclusive"
    return "PASS" if (value >= target if higher_is_better else value <= target) else "FAIL"


def judged(value: float | None, target: float, spread: float, *, higher_is_better: bool = True) -> str:
    """One summary cell: ``0.981 (spread 4.2%, target >= 0.97) PASS``."""
    shown = "n/a" if value is None else f"{value:.3f}"
    spread_s = f"{spread:.1%}" if math.isfinite(spread) else "n/a"
    op = ">=" if higher_is_better else "<="
    word = verdict(value, target, spread, higher_is_better=higher_is_better)
    return f"{shown} (spread {spread_s}, target {op} {target}) {word}"


# ----------------------------------------------------------------------------------------- output
def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 floatfmt: str = "{:.3g}") -> str:
    """Plain-text table (markdown pipe style) of ``rows`` (dicts) over ``columns`` (default: first row's keys)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return floatfmt.format(v)
        return "" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(b) for b in body)])


def git_commit() -> str | None:
    """HEAD commit of the checkout (read-only git call); None outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip()
        if out.returncode != 0 or not commit:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_avg_1m"] = os.getloadavg()[0]
    except (ImportError, OSError):
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    for mod in ("timm", "deepspeed"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - version info is best effort, never fatal
            info[mod] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reruns a benchmark: ``python -m <module> <argv>`` (``argv`` None: this process's)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def write_result(name: str, payload: Mapping[str, Any], results_dir: str | Path | None = None,
                 command: str | None = None) -> Path:
    """Write ``{"benchmark", "timestamp", "commit", "machine", "command", **payload}`` to
    ``<results_dir>/<name>.json`` (``command``: :func:`command_line`, how the numbers were made)."""
    results_dir = Path(results_dir or os.environ.get("CPVT_BENCH_RESULTS", RESULTS_DIR))
    results_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": machine_info(),
        "command": command,
        **payload,
    }
    path = results_dir / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--quick`` (tiny sizes, for tests/smoke), ``--results-dir``."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few rounds (smoke test)")
    parser.add_argument("--results-dir", default=None, help=f"where <name>.json goes (default {RESULTS_DIR})")
    return parser
