"""The one device rule (pipeline.device): device / backend / DeepSpeed accelerator over (visible GPUs, local
ranks, DS_ACCELERATOR, SLURM variables), the precision rule, the hardware-dependent DeepSpeed tweaks, every shipped
DeepSpeed config on a real 1-rank CPU engine, the fp16 dry-run from a machine without a GPU, and the one-line
refusal of a GPU job whose CUDA is unusable (real ``python pipeline/train.py``)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_train_config
from pipeline.device import (DeviceChoice, DeviceError, apply_device, cpu_has_native_bf16, decide_device,
                             finalize_deepspeed_config, json_precision_request, resolve_precision, select_device)
from tests.helpers_train import PY, ROOT, TINY_RECIPE, job_env, tiny_data, tiny_recipe  # noqa: F401

DS = ROOT / "deepspeed_configs"
CPU = DeviceChoice("cpu", None, "gloo", "cpu", "cpu: test")
GPU = DeviceChoice("cuda", 0, "nccl", "cuda", "cuda:0 (test)")
PROBLEM = "Found no NVIDIA driver on your system; NVIDIA driver 535.104.05; torch 2.14.1 built for CUDA 13.0"


def _decide(env: dict[str, str], gpus: int = 0, problem: str | None = PROBLEM) -> DeviceChoice:
    return decide_device(env, cuda_available=gpus > 0, cuda_count=gpus, cuda_problem=None if gpus else problem)


# ----------------------------------------------------------------------------------------- decide_device
@pytest.mark.parametrize("env, gpus, want", [
    ({}, 0, ("cpu", None, "gloo", "cpu")),
    ({"LOCAL_RANK": "3"}, 8, ("cuda", 3, "nccl", "cuda")),                    # 8 visible GPUs, rank 3 of the node
    ({"LOCAL_RANK": "5"}, 1, ("cuda", 0, "nccl", "cuda")),                    # --gpus-per-task=1: each sees one
    ({"SLURM_LOCALID": "3", "SLURM_GPUS_PER_TASK": "2"}, 2, ("cuda", 1, "nccl", "cuda")),   # srun, 2 per task
    ({"CPVT_NODE_LOCAL_RANK": "5", "LOCAL_RANK": "0"}, 1, ("cuda", 0, "nccl", "cuda")),    # after apply_device
    ({"DS_ACCELERATOR": "cpu"}, 8, ("cpu", None, "gloo", "cpu")),             # explicit cpu wins over CUDA
    ({"DS_ACCELERATOR": "cpu", "SLURM_JOB_GPUS": "0,1"}, 0, ("cpu", None, "gloo", "cpu")),  # ... and over SLURM
    ({"DS_ACCELERATOR": "cuda", "LOCAL_RANK": "1"}, 2, ("cuda", 1, "nccl", "cuda")),
    ({"CUDA_VISIBLE_DEVICES": ""}, 0, ("cpu", None, "gloo", "cpu")),          # hidden GPUs are not allocated ones
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_GPUS_ON_NODE": "0"}, 0, ("cpu", None, "gloo", "cpu")),
    # `deepspeed --num_gpus 2` exports CUDA_VISIBLE_DEVICES=0,1 (and CROSS_RANK) on a CPU machine too
    ({"CUDA_VISIBLE_DEVICES": "0,1", "CROSS_RANK": "0", "LOCAL_RANK": "1"}, 0, ("cpu", None, "gloo", "cpu")),
], ids=["cpu-only", "8gpus-rank3", "1gpu-per-task-rank5", "srun-2-per-task", "remapped", "ds-cpu-wins",
        "ds-cpu-wins-slurm", "ds-cuda", "cvd-empty", "slurm-zero-gpus", "deepspeed-launcher-on-cpu"])
def test_decide_device(env, gpus, want):
    choice = _decide(env, gpus)
    assert (choice.kind, choice.index, choice.backend, choice.accelerator) == want
    assert choice.reason and "\n" not in choice.reason
    assert choice.torch_device == (torch.device("cuda", want[1]) if want[0] == "cuda" else torch.device("cpu"))


def test_shared_gpus_say_so_in_the_reason():
    assert "local rank 5 >= 4 visible: ordinal local_rank % 4" in _decide({"LOCAL_RANK": "5"}, 4).reason


@pytest.mark.parametrize("var, value, extra", [
    ("SLURM_GPUS_ON_NODE", "8", {}), ("SLURM_JOB_GPUS", "0,1,2,3", {}), ("SLURM_STEP_GPUS", "2", {}),
    ("SLURM_GPUS_PER_TASK", "1", {}), ("CUDA_VISIBLE_DEVICES", "0,1", {}),
    ("CUDA_VISIBLE_DEVICES", "0,1", {"SLURM_JOB_ID": "7", "CROSS_RANK": "0"}),   # deepspeed launcher in a job
])
def test_allocated_gpus_without_cuda_is_one_line_error(var, value, extra):
    with pytest.raises(DeviceError) as e:
        _decide({var: value, "LOCAL_RANK": "0", **extra})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"GPUs allocated ({var}={value}) but CUDA is unusable: {PROBLEM}")
    assert "DS_ACCELERATOR=cpu" in msg and "TORCH_INDEX_URL" in msg


def test_ds_accelerator_cuda_without_cuda_and_unknown_accelerator():
    with pytest.raises(DeviceError, match=r"^DS_ACCELERATOR=cuda but CUDA is unusable: Found no NVIDIA driver"):
        _decide({"DS_ACCELERATOR": "cuda"})
    with pytest.raises(DeviceError, match=r"DS_ACCELERATOR=xpu: not supported .* allowed: cuda, cpu or unset"):
        _decide({"DS_ACCELERATOR": "xpu"}, 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only path of select_device")
def test_select_device_here_reports_why_cuda_is_unusable():
    choice = select_device({})
    assert choice.kind == "cpu" and choice.backend == "gloo"
    assert f"built for CUDA {torch.version.cuda or 'none'}" in choice.reason and "NVIDIA driver" in choice.reason
    with pytest.raises(DeviceError, match=r"^GPUs allocated \(SLURM_GPUS_ON_NODE=4\) but CUDA is unusable: .*"
                                          r"NVIDIA driver .*torch .* built for CUDA"):
        select_device({"SLURM_GPUS_ON_NODE": "4"})


def test_apply_device_makes_deepspeed_use_the_chosen_ordinal(monkeypatch):
    """One visible GPU per task, node-local rank 5: LOCAL_RANK (what DeepSpeed's engine and init_distributed bind
    to) becomes 0, the node-local rank survives for detect_env, and deciding again gives the same device."""
    import importlib

    from pipeline.distributed import detect_env

    ds_comm_utils = importlib.import_module("deepspeed.comm.utils")   # how deepspeed.comm reads the local rank

    for key, value in {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("CPVT_NODE_LOCAL_RANK", "")   # recorded, so the value apply_device sets is undone too
    monkeypatch.delenv("CPVT_NODE_LOCAL_RANK")
    choice = decide_device({"LOCAL_RANK": "5"}, cuda_available=True, cuda_count=1)
    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)   # no GPU on this machine to select
    monkeypatch.setattr("pipeline.device.enable_tf32", lambda: selected.append("tf32"))
    apply_device(choice)
    assert selected == [0, "tf32"]
    assert os.environ["LOCAL_RANK"] == "0" and os.environ["CPVT_NODE_LOCAL_RANK"] == "5"
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    assert ds_comm_utils.get_local_rank_from_launcher() == 0   # what deepspeed.comm reports as the device id
    assert detect_env().local_rank == 5
    assert decide_device(dict(os.environ), cuda_available=True, cuda_count=1) == choice

    env = {"LOCAL_RANK": "1"}
    apply_device(CPU, env)
    assert env == {"LOCAL_RANK": "1", "DS_ACCELERATOR": "cpu"}


def test_rendezvous_ports_are_outside_the_ephemeral_range():
    from pipeline.distributed import PORT_BASE, PORT_SPAN, port_for_job

    assert 1024 < PORT_BASE and PORT_BASE + PORT_SPAN <= 32768
    ports = {port_for_job(f"{job}_{task}", step) for job in range(0, 10**6, 9973) for task in (0, 7)
             for step in (0, 3)}
    assert min(ports) >= PORT_BASE and max(ports) < PORT_BASE + PORT_SPAN


# ----------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("requested, choice, native, want", [
    ("auto", GPU, True, "bf16"), ("auto", GPU, False, "fp32"), ("auto", CPU, True, "bf16"),
    ("auto", CPU, False, "fp32"), ("bf16", CPU, False, "bf16"), ("fp32", GPU, True, "fp32"),
    ("fp16", GPU, True, "fp16"), ("fp16", GPU, False, "fp16"),
])
def test_resolve_precision(requested, choice, native, want):
    prec, why = resolve_precision(requested, choice, native_bf16=native)
    assert prec == want and why and "\n" not in why
    if requested == "bf16" and not native:
        assert "emulated" in why


@pytest.mark.parametrize("requested, choice, native, needle", [
    ("fp16", CPU, True, "run.precision: 'fp16' (run.precision) needs a CUDA GPU"),
    ("bf16", GPU, False, "run.precision: 'bf16' (run.precision) is not supported by this GPU"),
    ("fp8", GPU, True, "run.precision: 'fp8' is not one of ['auto', 'bf16', 'fp16', 'fp32']"),
])
def test_resolve_precision_errors_are_one_line(requested, choice, native, needle):
    with pytest.raises(ConfigError) as e:
        resolve_precision(requested, choice, native_bf16=native)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cpu_native_bf16_from_cpuinfo_flags():
    assert cpu_has_native_bf16("processor: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16("flags : fpu avx512f amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags : fpu sse avx2 avx512f avx512bw\n")
    assert isinstance(cpu_has_native_bf16(), bool)


def test_run_fields_validate_up_front(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    cfg, _ = load_train_config(recipe, [], world_size=1)
    assert (cfg.run.precision, cfg.run.compile, cfg.run.dist_timeout_s) == ("auto", False, 600)
    assert cfg.run.deepspeed_config == "deepspeed_configs/zero2.json"
    cfg, _ = load_train_config(recipe, ["run.precision=bf16", "run.compile=true", "run.dist_timeout_s=60"])
    assert (cfg.run.precision, cfg.run.compile, cfg.run.dist_timeout_s) == ("bf16", True, 60)
    for override, needle in (("run.precision=fp8", "run.precision: 'fp8' is not one of ['auto', 'bf16', 'fp16', "
                                                   "'fp32']"),
                             ("run.dist_timeout_s=0", "run.dist_timeout_s: 0 must be > 0")):
        with pytest.raises(ConfigError) as e:
            load_train_config(recipe, [override])
        assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------- finalize
SHIPPED = sorted(p.stem for p in DS.glob("*.json"))
# a user's JSON may add a precision section to a shipped one (run.precision decides it otherwise): zero2_fp16 is
# deepspeed_configs/zero2.json with the fp16 section below
PRECISION_SECTIONS = {"_fp32": {"bf16": {"enabled": False}}, "_bf16": {"bf16": {"enabled": True}},
                      "_fp16": {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                                         "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}}}
VARIANTS = sorted(f"{name}{p}" for name in SHIPPED for p in ["", *PRECISION_SECTIONS])


def ds_json(tmp_path: Path, name: str) -> str:
    """The path of JSON ``name``: a shipped one, or a shipped one plus a precision section written to tmp_path."""
    stage, _, prec = name.partition("_")
    if not prec:
        return f"deepspeed_configs/{name}.json"
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(json.loads((DS / f"{stage}.json").read_text()) | PRECISION_SECTIONS[f"_{prec}"]))
    return str(path)


def test_shipped_config_set(tmp_path):
    assert SHIPPED == ["zero1", "zero2", "zero3"]
    for name in VARIANTS:
        ds = json.loads(Path(ROOT / ds_json(tmp_path, name)).read_text())
        assert ds["zero_optimization"]["overlap_comm"] is True and ds["communication_data_type"] == "fp32"
        # fp32 accumulation at ZeRO-2/3; at ZeRO-1 it would switch bf16 to BF16_Optimizer (see its _comment)
        assert ds.get("data_types", {}).get("grad_accum_dtype") == (None if name.startswith("zero1") else "fp32")
        assert json_precision_request(ds) == {"": None, "_fp32": "fp32", "_bf16": "bf16", "_fp16": "fp16"}[name[5:]]


def _finalize(recipe: Path, name: str, choice: DeviceChoice, native: bool, *overrides: str, world: int = 2):
    path = ds_json(recipe.parent, name)
    cfg, ds = load_train_config(recipe, [f"run.deepspeed_config={path}", *overrides], world)
    return finalize_deepspeed_config(ds, cfg, choice, native_bf16=native)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("where", ["cpu", "cpu-native-bf16", "gpu-bf16", "gpu-no-bf16"])
def test_finalize_shipped_configs(tmp_path, name, where):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    choice, native = {"cpu": (CPU, False), "cpu-native-bf16": (CPU, True), "gpu-bf16": (GPU, True),
                      "gpu-no-bf16": (GPU, False)}[where]
    asked = name[6:] or None
    if asked == "fp16" and choice is CPU:
        with pytest.raises(ConfigError) as e:
            _finalize(recipe, name, choice, native)
        assert str(e.value).startswith(f"run.precision: 'fp16' (run.deepspeed_config {name}.json) needs a CUDA GPU")
        return
    if asked == "bf16" and choice is GPU and not native:
        with pytest.raises(ConfigError, match=r"^run.precision: 'bf16' .* is not supported by this GPU"):
            _finalize(recipe, name, choice, native)
        return
    ds, prec, line = _finalize(recipe, name, choice, native)
    assert prec == (asked or ("bf16" if native else "fp32"))
    assert ds.get("bf16", {}).get("enabled", False) == (prec == "bf16")
    assert ds.get("fp16", {}).get("enabled", False) == (prec == "fp16")
    assert ds["zero_optimization"]["overlap_comm"] is (choice is GPU)
    assert ("overlap_comm off (gloo on CPU cannot overlap communication)" in line) is (choice is CPU)
    assert line.startswith(f"precision {prec}: ") and "\n" not in line and f"ZeRO-{name[4]}" in line


def test_explicit_precision_wins_over_the_json(tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    ds, prec, line = _finalize(recipe, "zero2_bf16", CPU, False, "run.precision=fp32")
    assert prec == "fp32" and ds["bf16"] == {"enabled": False} and "run.precision=fp32" in line
    ds, prec, _ = _finalize(recipe, "zero2", GPU, True, "run.precision=fp16")
    assert prec == "fp16" and ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0   # dynamic loss scaling
    ds, prec, _ = _finalize(recipe, "zero3_fp32", GPU, True)     # an explicit fp32 JSON is not "auto"
    assert prec == "fp32" and not ds["bf16"]["enabled"]
    zero1_fp32_accum = r"^run.deepspeed_config: \S+bad.json: data_types.grad_accum_dtype 'fp32' with ZeRO-1 and bf16"
    with pytest.raises(ConfigError, match=zero1_fp32_accum):
        bad = json.loads((DS / "zero1.json").read_text()) | {"bf16": {"enabled": True},
                                                             "data_types": {"grad_accum_dtype": "fp32"}}
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        cfg, ds = load_train_config(recipe, [f"run.deepspeed_config={tmp_path / 'bad.json'}"], 1)
        finalize_deepspeed_config(ds, cfg, GPU, native_bf16=True)


def test_fp16_configs_pass_deepspeeds_config_checker(tmp_path):
    """fp16 cannot run on DeepSpeed's CPU accelerator: check what it will be given on a GPU with its own parser."""
    from deepspeed.runtime.config import DeepSpeedConfig

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(TINY_RECIPE)
    for s in (1, 2, 3):
        ds, prec, _ = _finalize(recipe, f"zero{s}_fp16", GPU, True, "optim.grad_accum=2", world=1)
        checked = DeepSpeedConfig(ds)
        assert prec == "fp16" and checked.float16_config.enabled and not checked.bfloat16_config.enabled
        assert checked.float16_config.loss_scale == 0   # dynamic loss scaling
        assert checked.zero_optimization_stage == s and checked.zero_config.overlap_comm
        assert checked.communication_data_type == torch.float32
        assert checked.grad_accum_dtype == (None if s == 1 else "fp32")
        assert checked.train_batch_size == 4 * 2   # micro x accumulation x world (1: no process group here)


ENGINE_SCRIPT = r"""
import json, os, sys, tempfile
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import torch
torch.set_num_threads(1)
from pipeline.device import finalize_deepspeed_config, select_device
from pipeline.distributed import init_distributed
from pipeline.config import load_train_config
import timm, pipeline.models
choice = select_device()
init_distributed(choice, timeout_s=120)
import deepspeed
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from pipeline.optim import build_optimizer
out = {}
for path in sys.argv[3:]:
    name = os.path.basename(path)[:-len(".json")]
    cfg, ds = load_train_config(sys.argv[1], [f"run.deepspeed_config={path}", "optim.grad_accum=2"], 1)
    ds, prec, line = finalize_deepspeed_config(ds, cfg, choice)
    torch.manual_seed(0)
    model = timm.create_model("cpvt_ti", num_classes=4, embed_dim=48, depth=2, num_heads=2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim), config=ds)
    dtype = next(engine.module.parameters()).dtype
    for opt_group in engine.optimizer.param_groups:
        opt_group["lr"] = 1e-3
    for _ in range(4):   # 2 optimizer steps of 2 micro-batches
        x, y = torch.randn(4, 3, 32, 32, dtype=dtype), torch.randint(0, 4, (4,))
        loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag="t")
        sd = get_fp32_state_dict_from_zero_checkpoint(tmp, tag="t")
    moved = sum(not torch.equal(before[k], sd[k].float()) for k in sd)
    out[name] = {"precision": prec, "dtype": str(dtype).replace("torch.", ""), "loss": float(loss),
                 "optimizer": type(engine.optimizer).__name__, "moved": moved, "n": len(sd),
                 "overlap_comm": engine.zero_overlap_comm(), "line": line}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_shipped_configs_initialise_a_real_cpu_engine(tiny_recipe, tmp_path):  # noqa: F811
    """Every fp32/bf16 config (and the precision-neutral ones under auto) builds a 1-rank DeepSpeed engine on
    CPU, trains 2 steps of 2 micro-batches, and its checkpoint consolidates to fp32 (pipeline.export's path)."""
    from pipeline.net import free_port

    names = [n for n in VARIANTS if not n.endswith("_fp16")]
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    env = job_env()
    env.pop("DS_ACCELERATOR", None)   # the rule decides (no GPU here: cpu)
    paths = [ds_json(tmp_path, n) for n in names]
    p = subprocess.run([PY, str(script), str(tiny_recipe), str(free_port()), *paths], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    out = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert sorted(out) == names
    native = cpu_has_native_bf16() and not torch.cuda.is_available()
    for name, r in out.items():
        want = name[6:] or ("bf16" if native else "fp32")
        assert r["precision"] == want and r["dtype"] == {"bf16": "bfloat16", "fp32": "float32"}[want], (name, r)
        assert r["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if name[4] == "3" else "DeepSpeedZeroOptimizer")
        assert r["moved"] == r["n"] > 0 and r["loss"] == r["loss"], (name, r)   # every tensor trained, finite
        assert r["overlap_comm"] is False and "overlap_comm off" in r["line"], (name, r)


# ----------------------------------------------------------------------------------------- entry points
def test_fp16_dry_run_without_a_gpu(capsys, tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    """fp16 is the trainer's check, not the submitter's: a login node without a GPU plans an fp16 job."""
    from launchers import slurm_submit

    fp16_json = ds_json(tmp_path, "zero2_fp16")
    rc = slurm_submit.main(["--nodes", "2", "--gpus-per-node", "8", "--recipe", str(tiny_recipe), "--data",
                            str(tiny_data), "--run-dir", str(tmp_path / "run"), "--deepspeed_config",
                            fp16_json, "--dry-run"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "world size: 16" in out.out and f"deepspeed_config: {fp16_json}" in out.out
    ds = json.loads(out.out.split("deepspeed config:\n", 1)[1])
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and ds["train_batch_size"] == 4 * 16
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is unusable")
def test_train_refuses_cpu_when_slurm_allocated_gpus(tiny_data, tiny_recipe, tmp_path):  # noqa: F811
    """A real ``python pipeline/train.py`` on a node that SLURM gave GPUs which torch cannot use: one line on
    stderr (allocation, torch's reason, driver, the wheel's CUDA version), a non-zero exit, nothing trained."""
    run_dir = tmp_path / "run"
    env = job_env() | {"SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7",
                       "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    env.pop("DS_ACCELERATOR", None)
    p = subprocess.run([PY, "pipeline/train.py", "--recipe", str(tiny_recipe), "--data", str(tiny_data),
                        "--run-dir", str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if "GPUs allocated" in ln]
    assert len(lines) == 1, p.stderr[-3000:]
    assert lines[0].startswith("error: GPUs allocated (SLURM_GPUS_ON_NODE=8 SLURM_JOB_GPUS=0,1,2,3,4,5,6,7 "
                               "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7) but CUDA is unusable: "), lines[0]
    assert "NVIDIA driver" in lines[0] and f"built for CUDA {torch.version.cuda or 'none'}" in lines[0]
    assert "Traceback" not in p.stderr and not (run_dir / "checkpoints").exists()
