"""``make gpu-check``: prove the GPU path on ONE GPU in at most 8 minutes; one JSON file and a table.

Rows (each one subprocess of the real CLIs, a per-row timeout, result ok / failed (last error line) / skipped (why);
a failing row never stops the others; rows that need an earlier row's output are skipped when it failed):

    environment         GPU, driver, torch + CUDA, bf16 support, DeepSpeed / timm / webdataset / FFCV / MLflow
    data                synthetic ImageNet-like JPEGs (data_prep's demo renderer, 320-500 px, all cores) ->
                        WebDataset shards (+ FFCV .beton where ``import ffcv`` works)
    flash_attention     the model's own SDPA call (shapes, dtype, mask) under sdpa_kernel(FLASH_ATTENTION), bf16
    bf16_zero2_ema      python pipeline/train.py, cpvt_ti @224, ZeRO-2 bf16, ~60 steps, run.ema=true, checkpoints
    resume_auto         the same run dir, --resume auto, continues to step 80 (across the epoch boundary)
    export, export_ema  python -m pipeline.export RUN [--ema]
    evaluate            python -m pipeline.evaluate EXPORT --resolutions 160 224 288
    fp16_zero2          ZeRO-2 fp16 with dynamic loss scaling: loss scale, skipped steps, loss finite
    zero3_cpvt_b        cpvt_b ZeRO-3 bf16, ~20 steps; zero3_export: its consolidated export
    steps_schedule      schedule.resolution.kind=steps 160 -> 224 with batch_sizes 256 -> 128, two short epochs
    bench_trainer       python -m benchmarks.bench_trainer on the GPU: the bare DeepSpeed engine's fwd/bwd/step
                        ceiling on a fixed device batch, and the real loop on the same in-memory batches
    throughput_wds      full pipeline.train img/s, WebDataset, CPU JPEG decode (DeiT recipe augmentation)
    throughput_wds_noaa the same without RandAugment (aug.auto_augment=null): the twin of the next row
    throughput_wds_device  data.decode=device (GPU JPEG decode; RandAugment off, which it excludes)
    throughput_ffcv     the same on FFCV (skipped where ffcv's compiled extension is not importable)

Throughput attribution (JSON ``attribution``, last table): each pipeline img/s over the bare-engine ceiling.
Training numbers come from ``<run_dir>/final_metrics.json`` (``exit_code``, ``global_step``,
``throughput_img_s``, ``data_wait_share``, ``precision``, fp16: ``loss_scale``, ``skipped_steps``); a key the
trainer does not write is taken from its log lines where possible (``step N ... img_s=...``, DeepSpeed's
``OVERFLOW! ... reducing to S``), else reported as "n/a".

Without CUDA (``torch.cuda.is_available()`` False) it prints one line saying so and exits 0.

On the H200 device machine (Python 3.12, its own torch/timm/numba/opencv, no DeepSpeed/webdataset/MLflow, no
network): build the wheelhouse here first, ``make gpu-wheelhouse`` (-> .whl/, git-ignored, ~5 MiB: deepspeed
built here as a py3-none-any wheel, hjson, pydantic + pydantic-core (cp312 manylinux), annotated-types,
typing-inspection, typing-extensions, webdataset, braceexpand), then one device ``run`` with ``carry: [".whl"]``
and ``timeout_s: 600``:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
    PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_check --out $OUT/gpu_check.json

(``--out`` also gets ``gpu_check_logs.tar.gz`` beside it: every row's full output.) Locally:
``make gpu-check [GPU_CHECK_ARGS="--only environment bf16_zero2_ema"]``; ``--cpu-smoke`` runs the same rows with
tiny sizes on a CPU (DeepSpeed's CPU accelerator) to test the script itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pipeline.atomic import write_atomic   # these two: standard library only, safe before the GPU stack is checked
from pipeline.net import free_port

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
NA = "n/a"
STATUSES = ("ok", "failed", "skipped")


# ----------------------------------------------------------------------------------------- rows
@dataclass
class Row:
    name: str
    status: str = "skipped"           # ok | failed | skipped
    seconds: float = 0.0
    summary: str = ""                 # one line for the table
    error: str | None = None          # failed: the last error line; skipped: why
    metrics: dict[str, Any] = field(default_factory=dict)
    cmd: list[str] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")


def format_rows(rows: Sequence[Row]) -> str:
    """The printed table: row | status | seconds | result (ok: the summary; failed/skipped: the reason)."""
    from benchmarks.common import format_table

    table = []
    for r in rows:
        text = r.summary if r.status == "ok" else r.error  # failed/skipped: the reason (partial numbers: JSON)
        table.append({"row": r.name, "status": r.status, "seconds": f"{r.seconds:.1f}", "result": _clip(text, 110)})
    return format_table(table, ["row", "status", "seconds", "result"])


def result_doc(env: Mapping[str, Any], rows: Sequence[Row], attribution: Mapping[str, Any], *, profile: str,
               budget_s: float, wall_s: float, complete: bool) -> dict[str, Any]:
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    return {"gpu_check": 1, "profile": profile, "complete": complete, "budget_s": budget_s,
            "wall_s": round(wall_s, 1), "counts": counts, "environment": dict(env),
            "rows": [dataclasses.asdict(r) for r in rows], "attribution": dict(attribution)}


def write_doc(doc: Mapping[str, Any], out: Path) -> None:
    write_atomic(out, json.dumps(doc, indent=2, default=str) + "\n")


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------------------- parsing
_STEP = re.compile(r"^step (\d+) (.*)$")
_EPOCH = re.compile(r"^epoch (\d+) start: resolution=(\d+) steps=(\d+)")
_OVERFLOW = re.compile(r"OVERFLOW!.*?loss scale:\s*([0-9.eE+-]+),\s*reducing to\s*([0-9.eE+-]+)")
_KV = re.compile(r"(\S+?)=(\S+)")
_EXC = re.compile(r"^([\w.]*(Error|Exception|Interrupt|Exit)|(config )?error)\b.*")
_ERRORISH = re.compile(r"error|exception|failed|killed|abort|timed out", re.I)


def _num(text: str) -> Any:
    try:
        v = float(text)
    except ValueError:
        return text
    return int(v) if v.is_integer() and "." not in text and "e" not in text.lower() else v


def parse_train_output(text: str) -> dict[str, Any]:
    """What a ``pipeline/train.py`` run printed: step lines (``step N k=v ...``), epoch starts, the resume line,
    DeepSpeed's fp16 overflow messages."""
    steps, epochs, overflows, resumed = [], [], [], None
    for line in text.splitlines():
        line = line.rstrip()
        m = _STEP.match(line)
        if m:
            kv = {k: _num(v) for k, v in _KV.findall(m.group(2))}
            steps.append({"step": int(m.group(1)), **kv})
            continue
        m = _EPOCH.match(line)
        if m:
            epochs.append({"epoch": int(m.group(1)), "resolution": int(m.group(2)), "steps": int(m.group(3))})
            continue
        m = _OVERFLOW.search(line)
        if m:
            overflows.append((float(m.group(1)), float(m.group(2))))
            continue
        if line.startswith("resumed from "):
            resumed = line
    losses = [s["loss"] for s in steps if isinstance(s.get("loss"), (int, float))]
    rates = [s["img_s"] for s in steps if isinstance(s.get("img_s"), (int, float))]
    waits = [s["data_wait_frac"] for s in steps if isinstance(s.get("data_wait_frac"), (int, float))]
    return {"steps": steps, "epochs": epochs, "resumed": resumed, "overflows": overflows, "losses": losses,
            # steady state: the first logging window (start-up, worker spin-up) excluded
            "img_s": _mean(rates[1:]) if len(rates) > 1 else None,
            "data_wait_frac": _mean(waits[1:]) if len(waits) > 1 else None,
            "loss_scale": overflows[-1][1] if overflows else None}


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def read_final_metrics(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(run_dir) / "final_metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def train_metrics(final: Mapping[str, Any], parsed: Mapping[str, Any]) -> dict[str, Any]:
    """One training row's numbers: ``final_metrics.json`` first, the log second, else "n/a"."""
    def pick(key: str, fallback: Any = None) -> Any:
        v = final.get(key)
        return v if v is not None else (fallback if fallback is not None else NA)

    losses = parsed.get("losses") or []
    out = {
        "exit_code": pick("exit_code"),
        "global_step": pick("global_step", parsed["steps"][-1]["step"] if parsed.get("steps") else None),
        "throughput_img_s": pick("throughput_img_s", parsed.get("img_s")),
        "throughput_source": "final_metrics" if final.get("throughput_img_s") is not None
        else ("log" if parsed.get("img_s") is not None else NA),
        "data_wait_share": pick("data_wait_share", parsed.get("data_wait_frac")),
        "precision": pick("precision"),
        "loss_scale": pick("loss_scale", parsed.get("loss_scale")),
        "skipped_steps": pick("skipped_steps", len(parsed["overflows"]) if parsed.get("overflows") else None),
        "nonfinite_skipped": pick("nonfinite_skipped"),
        "last_loss": losses[-1] if losses else NA,
        "losses_finite": all(math.isfinite(x) for x in losses) if losses else NA,
        "train_resolution": pick("train_resolution"),
        "eval_top1": {r: v.get("top1") for r, v in (final.get("eval") or {}).items() if isinstance(v, dict)} or NA,
    }
    return out


def last_error_line(text: str) -> str:
    """The most telling line of a failed command's output: the last line that looks like an error, else the last."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pattern in (_EXC.match, lambda ln: not ln.startswith("[") and _ERRORISH.search(ln)):
        for ln in reversed(lines):
            if pattern(ln):
                return _clip(ln, 300)
    return _clip(lines[-1], 300) if lines else "(no output)"


def fmt(v: Any, nd: int = 4) -> str:
    if v is None or v == NA:
        return NA
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


# ----------------------------------------------------------------------------------------- profiles
@dataclass
class Profile:
    """Sizes of every row. ``gpu``: the real check; ``cpu-smoke``: the same rows, tiny, on DeepSpeed's CPU
    accelerator (tests the script, measures nothing)."""

    name: str = "gpu"
    model_kwargs: dict | None = None          # None: the registered model (full width and depth)
    res: int = 224
    eval_res: tuple[int, ...] = (160, 224, 288)
    batch: int = 128
    eval_batch: int = 250
    steps: int = 60
    resume_steps: int = 80
    fp16_steps: int = 40
    z3_model: str = "cpvt_b"
    z3_batch: int = 64
    z3_steps: int = 20
    sched: tuple[tuple[int, int], ...] = ((0, 160), (1, 224))
    sched_batches: tuple[tuple[int, int], ...] = ((160, 256), (224, 128))
    tp_batch: int = 256
    tp_steps: int = 30
    tp_log_every: int = 5
    log_every: int = 10
    workers: int = 12
    classes: int = 10
    train_images: int = 8192
    val_images: int = 500
    min_side: int = 320
    max_side: int = 500
    eval_max_batches: int = 2
    bench_steps: int = 50
    bench_warmup: int = 10
    timeout_s: float = 120
    fp16: bool = True
    env: dict = field(default_factory=dict)

    @classmethod
    def gpu(cls, cores: int) -> "Profile":
        return cls(workers=max(1, min(14, cores - 2)))

    @classmethod
    def cpu_smoke(cls) -> "Profile":
        return cls(name="cpu-smoke", model_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2}, res=32,
                   eval_res=(32, 48), batch=8, eval_batch=16, steps=6, resume_steps=9, fp16_steps=4,
                   z3_model="cpvt_ti", z3_batch=8, z3_steps=3, sched=((0, 32), (1, 48)),
                   sched_batches=((32, 16), (48, 8)), tp_batch=8, tp_steps=6, tp_log_every=2, log_every=2,
                   workers=1, classes=4, train_images=64, val_images=16, min_side=40, max_side=72,
                   eval_max_batches=1, bench_steps=4, bench_warmup=2, timeout_s=240, fp16=False,
                   env={"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})


# ----------------------------------------------------------------------------------------- running rows
class Runner:
    """Runs rows against one time budget; every row's output goes to ``work/logs/<row>.log``."""

    def __init__(self, work: Path, profile: Profile, budget_s: float, on_row: Callable[[Row], None]):
        self.work, self.profile, self.budget_s = work, profile, budget_s
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.rows: list[Row] = []
        self.on_row = on_row

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def env(self) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        if self.profile.name == "gpu" and env.get("DS_ACCELERATOR") == "cpu":
            env.pop("DS_ACCELERATOR")   # the Makefile's no-nvidia-smi default must not hide the GPU
        env.update(self.profile.env)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # as the Makefile
        env.pop("MLFLOW_TRACKING_URI", None)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        return env

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.on_row(row)
        return row

    def skip(self, name: str, why: str) -> Row:
        return self.add(Row(name, "skipped", error=why))

    def command(self, name: str, cmd: list[str], timeout: float | None = None) -> tuple[int | str, str, float]:
        """Run one subprocess; (returncode or "timeout", combined output, seconds)."""
        limit = min(timeout or self.profile.timeout_s, self.remaining())
        t0 = time.monotonic()
        log = self.logs / f"{name}.log"
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc: int | str = proc.wait(timeout=max(limit, 1))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            finally:  # the row's whole process group (DataLoader workers too), so the next row gets the GPU
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        text = log.read_text(errors="replace")
        if rc == "timeout":
            text += f"\nrow timed out after {limit:.0f} s"
        return rc, text, time.monotonic() - t0

    def run(self, name: str, cmd: list[str], judge: Callable[[str], tuple[str, str, dict]], *,
            timeout: float | None = None, needs: Iterable[str] = ()) -> Row:
        """``judge(output) -> (status, summary, metrics)``, called only when the command exited 0."""
        for dep in needs:
            prev = next((r for r in self.rows if r.name == dep), None)
            if prev is None or prev.status != "ok":
                return self.skip(name, f"needs row {dep} ({prev.status if prev else 'not run'})")
        if self.remaining() < 15:
            return self.skip(name, f"time budget of {self.budget_s:.0f} s spent")
        rc, text, secs = self.command(name, cmd, timeout)
        row = Row(name, cmd=cmd, seconds=round(secs, 1))
        if rc != 0:
            row.status, row.error = "failed", f"rc={rc}: {last_error_line(text)}"
            if rc == "timeout":
                row.error = f"timed out after {secs:.0f} s: {last_error_line(text[:-30])}"
            try:
                _, row.summary, row.metrics = judge(text)
            except Exception:  # noqa: BLE001 - a partial result is only a bonus
                pass
            return self.add(row)
        try:
            row.status, row.summary, row.metrics = judge(text)
        except Exception as e:  # noqa: BLE001 - a judging bug fails this row only
            row.status, row.error = "failed", f"could not read the result: {type(e).__name__}: {e}"
        if row.status == "failed" and row.error is None:
            row.error = row.summary
        return self.add(row)

    def call(self, name: str, fn: Callable[[], tuple[str, str, dict]]) -> Row:
        """An in-process row (environment)."""
        t0 = time.monotonic()
        try:
            status, summary, metrics = fn()
            row = Row(name, status, round(time.monotonic() - t0, 1), summary, metrics=metrics)
        except Exception as e:  # noqa: BLE001
            row = Row(name, "failed", round(time.monotonic() - t0, 1), error=f"{type(e).__name__}: {e}")
        return self.add(row)


# ----------------------------------------------------------------------------------------- environment
def environment() -> dict[str, Any]:
    import platform

    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "hostname": platform.node(),
                           "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                   capability=f"{p.major}.{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   bf16_supported=torch.cuda.is_bf16_supported(), driver=_driver_version())
    for mod in ("deepspeed", "timm", "webdataset", "mlflow", "ffcv", "numba", "opencv-python-headless",
                "pydantic", "nvidia-ml-py", "safetensors"):
        try:
            env[mod] = importlib.metadata.version(mod)
        except importlib.metadata.PackageNotFoundError:
            env[mod] = None
    found = _importable(["ffcv", "deepspeed"])
    env["ffcv_importable"], env["deepspeed_importable"] = found["ffcv"], found["deepspeed"]
    env["mlflow_importable"] = importlib.util.find_spec("mlflow") is not None
    return env


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001 - fall back to nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _importable(mods: Sequence[str]) -> dict[str, bool | str]:
    """``import mod`` in fresh interpreters, side by side (FFCV's compiled extension may be there but fail to
    load): {mod: True or "no: <last error line>"}."""
    procs = {m: subprocess.Popen([sys.executable, "-c", f"import {m}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for m in mods}
    out: dict[str, bool | str] = {}
    for m, p in procs.items():
        try:
            _, err = p.communicate(timeout=120)
            out[m] = True if p.returncode == 0 else f"no: {last_error_line(err)}"
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            out[m] = "no: import took over 120 s"
    return out


# ----------------------------------------------------------------------------------------- data
def make_data(out: Path, *, train_images: int, val_images: int, classes: int, min_side: int, max_side: int,
              workers: int, ffcv: bool) -> dict[str, Any]:
    """Synthetic ImageNet-layout JPEGs rendered by data_prep's demo generator in ``workers`` processes (a chunk
    each, own seed), merged into one tree, then WebDataset shards (and FFCV when asked)."""
    from concurrent.futures import ProcessPoolExecutor

    from data_prep.write_webdataset import write_webdataset

    t0 = time.time()
    src, chunks = out / "src", out / "chunks"
    n = max(1, min(workers, train_images // classes))
    tr = math.ceil(train_images / (classes * n))
    va = max(1, math.ceil(val_images / (classes * n)))
    with ProcessPoolExecutor(n) as pool:
        list(pool.map(_render_chunk, [(str(chunks / f"c{j}"), classes, tr, va, min_side, max_side, j)
                                      for j in range(n)]))
    for j in range(n):
        c = chunks / f"c{j}"
        for split in ("train", "val"):
            for d in sorted((c / split).iterdir()):
                dest = src / split / d.name
                dest.mkdir(parents=True, exist_ok=True)
                for f in d.iterdir():
                    f.rename(dest / f"c{j}_{f.name}")
        if j == 0:
            for extra in c.glob("*.txt"):
                shutil.copy(extra, src / extra.name)
    shutil.rmtree(chunks)
    t_render = time.time() - t0
    data = out / "data"
    shard = max(8, (classes * n * tr) // max(2 * workers, 1))
    write_webdataset(src, data, cluster="pool", workers=workers, progress=False, shard_max_count=shard)
    t_wds = time.time() - t0 - t_render
    info: dict[str, Any] = {"train": classes * n * tr, "val": classes * n * va, "classes": classes,
                            "render_s": round(t_render, 1), "wds_s": round(t_wds, 1), "ffcv": False}
    if ffcv:
        from data_prep.write_ffcv import write_ffcv

        write_ffcv(src, data, workers=workers, progress=False)
        info["ffcv"] = True
        info["ffcv_s"] = round(time.time() - t0 - t_render - t_wds, 1)
    info["bytes"] = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    return info


def _render_chunk(a) -> None:
    from data_prep.demo_dataset import make_demo_dataset

    out, classes, tr, va, lo, hi, seed = a
    make_demo_dataset(out, num_classes=classes, train_per_class=tr, val_per_class=va, min_side=lo, max_side=hi,
                      large_images=0, bad_files=False, val_layout="folders", seed=seed)


# ----------------------------------------------------------------------------------------- flash attention
def probe_flash(model: str, batch: int, res: int, model_kwargs: dict | None, device: str = "cuda",
                reps: int = 10) -> dict[str, Any]:
    """Capture the model's own SDPA call (q/k/v shapes, dtype, mask, dropout) in a bf16 forward (DeepSpeed bf16
    casts the module), then run it under ``sdpa_kernel(FLASH_ATTENTION)`` alone, and time it per backend."""
    import timm
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import pipeline.models  # noqa: F401

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    m = timm.create_model(model, num_classes=1000, **(model_kwargs or {})).to(dev, torch.bfloat16).train()
    x = torch.randn(batch, 3, res, res, device=dev, dtype=torch.bfloat16)
    seen: list[dict[str, Any]] = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        if not seen:
            seen.append({"q": q.detach(), "k": k.detach(), "v": v.detach(), "mask": attn_mask is not None,
                         "dropout_p": dropout_p, "is_causal": is_causal, "kw": sorted(kw)})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            m(x)
    finally:
        F.scaled_dot_product_attention = real
    if not seen:
        return {"captured": False, "flash_eligible": False, "why": "the model made no SDPA call"}
    call = seen[0]
    q, k, v = call["q"], call["k"], call["v"]
    out: dict[str, Any] = {"captured": True, "shape_bhnd": list(q.shape), "dtype": str(q.dtype),
                           "attn_mask": call["mask"], "dropout_p": call["dropout_p"]}

    def attempt(backend) -> tuple[bool, str, float | None]:
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        try:
            with sdpa_kernel(backend):
                for _ in range(2):
                    real(qq, kk, vv, dropout_p=call["dropout_p"]).sum().backward()
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    real(qq, kk, vv, dropout_p=call["dropout_p"]).sum().backward()
                sync()
            return True, "", (time.perf_counter() - t0) / reps * 1000
        except Exception as e:  # noqa: BLE001 - "not eligible" is the answer
            return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", None

    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("cudnn", getattr(SDPBackend, "CUDNN_ATTENTION", None)), ("math", SDPBackend.MATH)):
        if backend is None:
            continue
        ok, why, ms = attempt(backend)
        out[f"{name}_ok"], out[f"{name}_fwd_bwd_ms"] = ok, ms
        if why:
            out[f"{name}_error"] = why
    # the whole model's forward + backward with only the flash kernel allowed: does the real call qualify?
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            m(x[: min(batch, 32)]).float().sum().backward()
        sync()
        out["model_fwd_bwd_flash_only"] = True
    except Exception as e:  # noqa: BLE001
        out["model_fwd_bwd_flash_only"] = False
        out["model_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    out["flash_eligible"] = bool(out.get("flash_ok") and out.get("model_fwd_bwd_flash_only"))
    return out


# ----------------------------------------------------------------------------------------- the rows
def yaml_flow(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


class Check:
    def __init__(self, runner: Runner, profile: Profile, work: Path, env: dict[str, Any]):
        self.r, self.p, self.work, self.env = runner, profile, work, env
        self.data = work / "data" / "data"
        self.tracking = bool(env.get("mlflow_importable"))
        self.ffcv = env.get("ffcv_importable") is True
        self.py = sys.executable

    # ---- commands
    def train_cmd(self, run: str, ds: str, *overrides: str, recipe: str = "cpvt_ti", resume: bool = False) -> list[str]:
        p = self.p
        stage, _, precision = ds.partition("_")   # "zero2_bf16": deepspeed_configs/zero2.json, run.precision=bf16
        cmd = [self.py, "pipeline/train.py", "--recipe", recipe, "--data", str(self.data), "--run-dir",
               str(self.work / "runs" / run), "--deepspeed_config", f"deepspeed_configs/{stage}.json"]
        if resume:
            cmd += ["--resume", "auto"]
        base = ["data.format=wds", f"data.num_workers={p.workers}", f"data.eval_batch_size={p.eval_batch}",
                f"tracking.enabled={str(self.tracking).lower()}", "tracking.system_metrics=false",
                "run.progress_bar=false", f"run.log_every={p.log_every}", "eval.every_epochs=0",
                f"eval.resolutions={yaml_flow(list(p.eval_res[:1]))}", f"eval.max_batches={p.eval_max_batches}",
                "checkpoint.every_steps=0", "checkpoint.keep_last=2"]
        if precision:
            base.append(f"run.precision={precision}")
        if p.model_kwargs is not None:
            base.append(f"model.kwargs={yaml_flow(p.model_kwargs)}")
        return cmd + base + list(overrides)

    def fixed(self, res: int, batch: int, steps: int) -> list[str]:
        return ["schedule.resolution.kind=fixed", f"schedule.resolution.resolution={res}",
                f"data.batch_size={batch}", "optim.grad_accum=1", f"run.max_steps={steps}", "run.epochs=300"]

    def judge_train(self, run: str, expect_step: int, extra: Callable[[dict, dict], str | None] | None = None):
        def judge(text: str) -> tuple[str, str, dict]:
            parsed = parse_train_output(text)
            m = train_metrics(read_final_metrics(self.work / "runs" / run), parsed)
            m["resumed"] = parsed["resumed"]
            m["epochs"] = parsed["epochs"]
            summary = (f"step {fmt(m['global_step'])}, {fmt(m['throughput_img_s'])} img/s, data wait "
                       f"{fmt(m['data_wait_share'], 2)}, precision {fmt(m['precision'])}, loss {fmt(m['last_loss'])}")
            problem = None
            if m["global_step"] != expect_step:
                problem = f"global_step {m['global_step']} != {expect_step}"
            elif m["losses_finite"] is False:
                problem = "non-finite loss in the log"
            elif extra is not None:
                problem = extra(m, parsed)
            if isinstance(m.get("eval_top1"), dict) and m["eval_top1"]:
                summary += ", top1 " + " ".join(f"{k}:{fmt(v, 3)}" for k, v in m["eval_top1"].items())
            return ("failed" if problem else "ok"), (problem + "; " + summary if problem else summary), m
        return judge

    # ---- rows
    def all(self, only: set[str] | None, skip: set[str]) -> None:
        rows: list[tuple[str, Callable[[], Row]]] = [
            ("data", self.row_data), ("flash_attention", self.row_flash),
            ("bf16_zero2_ema", self.row_bf16), ("resume_auto", self.row_resume), ("export", self.row_export),
            ("export_ema", self.row_export_ema), ("evaluate", self.row_evaluate), ("fp16_zero2", self.row_fp16),
            ("zero3_cpvt_b", self.row_zero3), ("zero3_export", self.row_zero3_export),
            ("steps_schedule", self.row_steps), ("bench_trainer", self.row_bench_trainer),
            ("throughput_wds", self.row_tp_wds), ("throughput_wds_noaa", self.row_tp_wds_noaa),
            ("throughput_wds_device", self.row_tp_wds_device),
            ("throughput_ffcv", self.row_tp_ffcv)]
        for name, fn in rows:
            if (only and name not in only and name != "data") or name in skip:
                self.r.skip(name, "not selected (--only/--skip)")
                continue
            fn()

    def row_data(self) -> Row:
        p = self.p
        out = self.work / "data"
        if (self.data / "wds" / "_info.json").is_file() and (not self.ffcv or (self.data / "ffcv").is_dir()):
            info = json.loads((out / "data_info.json").read_text()) if (out / "data_info.json").is_file() else {}
            return self.r.add(Row("data", "ok", summary=f"reused {self.data}", metrics=info))
        shutil.rmtree(out, ignore_errors=True)
        cmd = [self.py, "-m", "benchmarks.gpu_check", "make-data", "--out", str(out), "--train-images",
               str(p.train_images), "--val-images", str(p.val_images), "--classes", str(p.classes), "--min-side",
               str(p.min_side), "--max-side", str(p.max_side), "--workers", str(max(1, (os.cpu_count() or 1)))]
        if self.ffcv:
            cmd.append("--ffcv")

        def judge(text: str):
            info = json.loads((out / "data_info.json").read_text())
            return "ok", (f"{info['train']} train + {info['val']} val JPEGs, {info['bytes'] / 2**20:.0f} MiB, "
                          f"render {info['render_s']} s, wds {info['wds_s']} s"
                          + (f", ffcv {info.get('ffcv_s')} s" if info["ffcv"] else ", no ffcv")), info
        return self.r.run("data", cmd, judge, timeout=max(self.p.timeout_s, 150))

    def row_flash(self) -> Row:
        if self.p.name != "gpu":
            return self.r.skip("flash_attention", "needs CUDA (cpu-smoke profile)")
        cmd = [self.py, "-m", "benchmarks.gpu_check", "probe-flash", "--model", "cpvt_ti", "--batch",
               str(self.p.tp_batch), "--res", str(self.p.res)]

        def judge(text: str):
            doc = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
            times = " ".join(f"{b} {fmt(doc.get(f'{b}_fwd_bwd_ms'), 3)} ms" for b in ("flash", "efficient", "cudnn",
                                                                                     "math") if doc.get(f"{b}_ok"))
            s = (f"flash {'eligible' if doc['flash_eligible'] else 'NOT eligible'} for {doc.get('shape_bhnd')} "
                 f"{doc.get('dtype')}; fwd+bwd {times}")
            if not doc["flash_eligible"]:
                s += f"; {doc.get('flash_error') or doc.get('model_error')}"
            return "ok", s, doc
        return self.r.run("flash_attention", cmd, judge, timeout=90, needs=())

    def row_bf16(self) -> Row:
        p = self.p
        ov = [*self.fixed(p.res, p.batch, p.steps), "run.ema=true", "run.ema_decay=0.99",
              f"checkpoint.every_steps={max(1, p.steps // 2)}"]
        return self.r.run("bf16_zero2_ema", self.train_cmd("bf16", "zero2_bf16", *ov),
                          self.judge_train("bf16", p.steps, self._has_checkpoints("bf16")), needs=["data"])

    def _has_checkpoints(self, run: str):
        def extra(m, parsed):
            ck = self.work / "runs" / run / "checkpoints"
            n = len([d for d in ck.glob("*") if d.is_dir()]) if ck.is_dir() else 0
            m["checkpoints"] = n
            return None if n else "no checkpoint folder written"
        return extra

    def row_resume(self) -> Row:
        p = self.p
        ov = [*self.fixed(p.res, p.batch, p.resume_steps), "run.ema=true", "run.ema_decay=0.99",
              f"checkpoint.every_steps={max(1, p.steps // 2)}"]

        def extra(m, parsed):
            return None if parsed["resumed"] else "no 'resumed from' line: the run started from scratch"
        return self.r.run("resume_auto", self.train_cmd("bf16", "zero2_bf16", *ov, resume=True),
                          self.judge_train("bf16", p.resume_steps, extra), needs=["bf16_zero2_ema"])

    def _export_row(self, name: str, run: str, ema: bool, needs: str) -> Row:
        cmd = [self.py, "-m", "pipeline.export", str(self.work / "runs" / run)] + (["--ema"] if ema else [])

        def judge(text: str):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip().endswith(".safetensors")]
            path = Path(lines[-1]) if lines else None
            if path is None or not path.is_file():
                return "failed", "no .safetensors path printed", {}
            return "ok", f"{path.name} ({path.stat().st_size / 2**20:.1f} MiB)", {"path": str(path)}
        return self.r.run(name, cmd, judge, needs=[needs])

    def row_export(self) -> Row:
        return self._export_row("export", "bf16", False, "resume_auto")

    def row_export_ema(self) -> Row:
        return self._export_row("export_ema", "bf16", True, "resume_auto")

    def row_evaluate(self) -> Row:
        exp = next((r for r in self.r.rows if r.name == "export" and r.status == "ok"), None)
        path = exp.metrics["path"] if exp else "(export failed)"
        out = self.work / "evaluate.json"
        cmd = [self.py, "-m", "pipeline.evaluate", path, "--resolutions", *map(str, self.p.eval_res), "--json",
               str(out), "--workers", str(self.p.workers), "--batch-size", str(self.p.eval_batch)]

        def judge(text: str):
            res = json.loads(out.read_text())
            missing = [r for r in self.p.eval_res if str(r) not in res]
            s = "top1 " + " ".join(f"{r}:{fmt(v.get('top1'), 3)}" for r, v in res.items()) + \
                f" (n={next(iter(res.values())).get('n')})"
            return ("failed" if missing else "ok"), (f"missing {missing}; " if missing else "") + s, res
        return self.r.run("evaluate", cmd, judge, needs=["export"])

    def row_fp16(self) -> Row:
        p = self.p
        if not p.fp16:
            return self.r.skip("fp16_zero2", "DeepSpeed refuses fp16 on CPU (cpu-smoke profile)")

        def extra(m, parsed):
            m["overflow_messages"] = len(parsed["overflows"])
            return None if m["losses_finite"] is not False else "non-finite loss"
        judge = self.judge_train("fp16", p.fp16_steps, extra)

        def judge_fp16(text: str):
            status, summary, m = judge(text)
            summary += f", loss scale {fmt(m['loss_scale'])}, skipped steps {fmt(m['skipped_steps'])}"
            return status, summary, m
        return self.r.run("fp16_zero2", self.train_cmd("fp16", "zero2_fp16", *self.fixed(p.res, p.batch,
                                                                                        p.fp16_steps)),
                          judge_fp16, needs=["data"])

    def row_zero3(self) -> Row:
        p = self.p
        cmd = self.train_cmd("zero3", "zero3_bf16", *self.fixed(p.res, p.z3_batch, p.z3_steps), "run.ema=false",
                             recipe=p.z3_model)
        return self.r.run("zero3_cpvt_b", cmd, self.judge_train("zero3", p.z3_steps), timeout=p.timeout_s + 60,
                          needs=["data"])

    def row_zero3_export(self) -> Row:
        return self._export_row("zero3_export", "zero3", False, "zero3_cpvt_b")

    def row_steps(self) -> Row:
        p = self.p
        (e0, r0), (e1, r1) = p.sched
        ov = ["schedule.resolution.kind=steps", f"schedule.resolution.steps={yaml_flow([list(s) for s in p.sched])}",
              f"schedule.resolution.batch_sizes={yaml_flow([list(b) for b in p.sched_batches])}",
              f"data.batch_size={p.sched_batches[-1][1]}", "optim.grad_accum=1", "run.epochs=2",
              "schedule.lr.warmup_epochs=0.5"]
        batch_of = dict(p.sched_batches)

        def extra(m, parsed):
            ep = parsed["epochs"]
            res = [e["resolution"] for e in ep]
            m["epoch_resolutions"], m["epoch_steps"] = res, [e["steps"] for e in ep]
            globals_ = sorted({s.get("batch_global") for s in parsed["steps"] if s.get("batch_global")})
            m["batch_global_seen"] = globals_
            if res != [r0, r1]:
                return f"epoch resolutions {res}, expected [{r0}, {r1}]"
            if globals_ and set(globals_) != {batch_of[r0], batch_of[r1]}:
                return f"batch sizes {globals_}, expected {sorted({batch_of[r0], batch_of[r1]})}"
            if not globals_ and batch_of[r0] != batch_of[r1] and ep[0]["steps"] == ep[1]["steps"]:
                return f"steps per epoch {m['epoch_steps']} did not change with the batch sizes {batch_of}"
            return None

        def judge(text: str):
            parsed = parse_train_output(text)
            steps = sum(e["steps"] for e in parsed["epochs"])
            status, summary, m = self.judge_train("steps", steps, extra)(text)
            return status, (f"epochs at {m.get('epoch_resolutions')} px, steps {m.get('epoch_steps')}, batch "
                            f"{m.get('batch_global_seen') or '?'}; " + summary), m
        return self.r.run("steps_schedule", self.train_cmd("steps", "zero2_bf16", *ov), judge, needs=["data"])

    def row_bench_trainer(self) -> Row:
        p = self.p
        out = self.work / "bench"
        dev = "cuda" if p.name == "gpu" else "cpu"
        cmd = [self.py, "-m", "benchmarks.bench_trainer", "--device", dev, "--model", "cpvt_ti", "--model-kwargs",
               yaml_flow(p.model_kwargs or {}), "--resolution", str(p.res), "--batch-size", str(p.tp_batch),
               "--precision", "bf16" if p.name == "gpu" else "fp32", "--steps", str(p.bench_steps), "--warmup",
               str(p.bench_warmup), "--rounds", "1", "--results-dir", str(out)]

        def judge(text: str):
            doc = json.loads((out / "bench_trainer.json").read_text())
            img = doc["img_s"]
            s = (f"bare engine {fmt(img.get('bare'))} img/s, pipeline.train loop on the same batches "
                 f"{fmt(img.get('trainer'))} img/s, ratio {fmt(doc.get('ratio'), 3)} (target >= 0.9)")
            if doc.get("trainer_skipped"):
                s += f"; trainer side skipped: {doc['trainer_skipped']}"
            return "ok", s, {k: doc.get(k) for k in ("img_s", "ratio", "trainer_reported_img_s", "trainer_skipped",
                                                      "settings")}
        return self.r.run("bench_trainer", cmd, judge, timeout=p.timeout_s + 60)

    def _tp(self, name: str, run: str, fmt_: str, *extra_ov: str) -> Row:
        p = self.p
        ov = [*self.fixed(p.res, p.tp_batch, p.tp_steps), f"data.format={fmt_}", f"run.log_every={p.tp_log_every}",
              "eval.max_batches=1", *extra_ov]
        return self.r.run(name, self.train_cmd(run, "zero2_bf16", *ov), self.judge_train(run, p.tp_steps),
                          needs=["data"])

    def row_tp_wds(self) -> Row:
        return self._tp("throughput_wds", "tp_wds", "wds")

    def row_tp_wds_noaa(self) -> Row:
        return self._tp("throughput_wds_noaa", "tp_wds_noaa", "wds", "aug.auto_augment=null")

    def row_tp_wds_device(self) -> Row:
        # device decode ships JPEG bytes: RandAugment (which needs decoded pixels in the workers) is off, as in
        # throughput_wds_noaa, its CPU-decode twin
        return self._tp("throughput_wds_device", "tp_wds_device", "wds", "data.decode=device",
                        "aug.auto_augment=null")

    def row_tp_ffcv(self) -> Row:
        if not self.ffcv:
            return self.r.skip("throughput_ffcv", "import ffcv fails here (its compiled extension is built for the "
                                                  f"dev machine's Python): {self.env.get('ffcv_importable')}")
        return self._tp("throughput_ffcv", "tp_ffcv", "ffcv")


def attribution(rows: Sequence[Row]) -> dict[str, Any]:
    """Each measured img/s of cpvt_ti @224 and its share of the bare engine's ceiling."""
    by = {r.name: r for r in rows}
    bench = by.get("bench_trainer")
    bare = trainer = None
    if bench is not None and bench.status == "ok":
        bare = (bench.metrics.get("img_s") or {}).get("bare")
        trainer = (bench.metrics.get("img_s") or {}).get("trainer")
    out: dict[str, Any] = {"bare_engine_img_s": bare, "trainer_in_memory_img_s": trainer}
    for key, row in (("wds", "throughput_wds"), ("wds_noaa", "throughput_wds_noaa"),
                     ("wds_device_decode", "throughput_wds_device"), ("ffcv", "throughput_ffcv")):
        r = by.get(row)
        v = r.metrics.get("throughput_img_s") if r is not None and r.status == "ok" else None
        out[f"{key}_img_s"] = v if isinstance(v, (int, float)) else None
        out[f"{key}_data_wait_share"] = r.metrics.get("data_wait_share") if r is not None and r.metrics else None
    for key in ("trainer_in_memory", "wds", "wds_noaa", "wds_device_decode", "ffcv"):
        v = out.get(f"{key}_img_s")
        out[f"{key}_over_bare"] = (v / bare) if isinstance(v, (int, float)) and bare else None
    return out


def format_attribution(a: Mapping[str, Any]) -> str:
    from benchmarks.common import format_table

    rows = [{"what": "bare DeepSpeed engine (fixed device batch)", "img_s": fmt(a.get("bare_engine_img_s")),
             "of_bare": "1" if a.get("bare_engine_img_s") else NA, "data_wait": ""}]
    for key, label in (("trainer_in_memory", "pipeline.train loop, in-memory batches"),
                       ("wds", "pipeline.train, WebDataset (CPU decode, recipe aug)"),
                       ("wds_noaa", "pipeline.train, WebDataset (CPU decode, no RandAugment)"),
                       ("wds_device_decode", "pipeline.train, WebDataset decode=device (no RandAugment)"),
                       ("ffcv", "pipeline.train, FFCV")):
        rows.append({"what": label, "img_s": fmt(a.get(f"{key}_img_s")), "of_bare": fmt(a.get(f"{key}_over_bare"), 3),
                     "data_wait": fmt(a.get(f"{key}_data_wait_share"), 2) if key != "trainer_in_memory" else ""})
    return format_table(rows, ["what", "img_s", "of_bare", "data_wait"])


# ----------------------------------------------------------------------------------------- main
def no_cuda_line() -> str | None:
    """The one line for a machine without CUDA, or None when CUDA is usable."""
    try:
        import torch
    except ImportError as e:
        return f"gpu-check: skipped, torch is not importable here ({e}); nothing to check without CUDA"
    if torch.cuda.is_available():
        return None
    return (f"gpu-check: skipped, no CUDA device here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}: torch.cuda.is_available() is False); nothing to check")


def run_check(args) -> int:
    profile = Profile.cpu_smoke() if args.cpu_smoke else Profile.gpu(os.cpu_count() or 1)
    for kv in args.set or []:
        k, _, v = kv.partition("=")
        if not hasattr(profile, k):
            raise SystemExit(f"--set: Profile has no field {k!r}")
        setattr(profile, k, v if isinstance(getattr(profile, k), str) else json.loads(v))
    work = Path(args.work_dir).resolve()
    if not args.keep_work:
        shutil.rmtree(work / "runs", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out).resolve()
    t0 = time.monotonic()
    env: dict[str, Any] = {}
    state = {"rows": []}

    def save(complete: bool = False) -> None:
        doc = result_doc(env, state["rows"], attribution(state["rows"]), profile=profile.name, budget_s=args.budget_s,
                         wall_s=time.monotonic() - t0, complete=complete)
        write_doc(doc, out)

    def on_row(row: Row) -> None:
        print(f"[{time.monotonic() - t0:6.1f} s] {row.name}: {row.status} ({row.seconds:.1f} s) "
              f"{row.summary if row.status == 'ok' else row.error}", flush=True)
        save()

    runner = Runner(work, profile, args.budget_s, on_row)
    state["rows"] = runner.rows

    def env_row():
        env.update(environment())
        s = (f"{env.get('gpu')} (cc {env.get('capability')}, {env.get('gpu_memory_gib')} GiB), driver "
             f"{env.get('driver')}, torch {env['torch']} CUDA {env['torch_cuda']}, bf16 "
             f"{env.get('bf16_supported')}, deepspeed {env.get('deepspeed')}, timm {env.get('timm')}, webdataset "
             f"{env.get('webdataset')}, ffcv {'yes' if env['ffcv_importable'] is True else 'no'}, mlflow "
             f"{'yes' if env['mlflow_importable'] else 'no (tracking off)'}")
        return "ok", s, dict(env)
    runner.call("environment", env_row)
    Check(runner, profile, work, env).all(set(args.only) if args.only else None, set(args.skip or []))
    save(complete=True)
    print("\n" + format_rows(runner.rows))
    print("\nthroughput attribution, cpvt_ti @%d px (img/s, share of the bare engine's ceiling):" % profile.res)
    print(format_attribution(attribution(runner.rows)))
    logs = out.with_name(out.stem + "_logs.tar.gz")
    with tarfile.open(logs, "w:gz") as tar:
        for f in sorted(runner.logs.glob("*.log")):
            data = f.read_bytes()[-400_000:]
            info = tarfile.TarInfo(f"logs/{f.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    print(f"\nwrote {out} and {logs} ({time.monotonic() - t0:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"result JSON (default {DEFAULT_OUT})")
    p.add_argument("--work-dir", default="/tmp/cpvt_gpu_check", help="data, run dirs, logs (data is reused)")
    p.add_argument("--budget-s", type=float, default=450, help="the whole check's time budget (rows after it: skipped)")
    p.add_argument("--only", nargs="+", default=None, help="run these rows (data and environment always run)")
    p.add_argument("--skip", nargs="+", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on DeepSpeed's CPU accelerator (tests)")
    p.add_argument("--set", nargs="+", default=None, metavar="FIELD=JSON", help="override a Profile field")
    p.add_argument("--keep-work", action="store_true", help="keep earlier run dirs under --work-dir")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "wheelhouse":   # kept for `make gpu-wheelhouse` muscle memory: the same command
        from benchmarks.gpu_wheelhouse import main as wheelhouse_main

        return wheelhouse_main(argv[1:])
    if argv and argv[0] == "make-data":
        q = argparse.ArgumentParser(prog="gpu_check make-data")
        q.add_argument("--out", required=True)
        for k in ("train-images", "val-images", "classes", "min-side", "max-side", "workers"):
            q.add_argument(f"--{k}", type=int, required=True)
        q.add_argument("--ffcv", action="store_true")
        a = q.parse_args(argv[1:])
        out = Path(a.out)
        info = make_data(out, train_images=a.train_images, val_images=a.val_images, classes=a.classes,
                         min_side=a.min_side, max_side=a.max_side, workers=a.workers, ffcv=a.ffcv)
        (out / "data_info.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info))
        return 0
    if argv and argv[0] == "probe-flash":
        q = argparse.ArgumentParser(prog="gpu_check probe-flash")
        q.add_argument("--model", default="cpvt_ti")
        q.add_argument("--batch", type=int, default=256)
        q.add_argument("--res", type=int, default=224)
        q.add_argument("--model-kwargs", default=None)
        a = q.parse_args(argv[1:])
        print(json.dumps(probe_flash(a.model, a.batch, a.res, json.loads(a.model_kwargs) if a.model_kwargs else None),
                         default=str))
        return 0
    args = build_parser().parse_args(argv)
    if not args.cpu_smoke:
        line = no_cuda_line()
        if line is not None:
            print(line)
            return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
