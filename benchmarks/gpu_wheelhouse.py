"""The wheelhouse for the GPU device machine (Python 3.12, manylinux x86_64, no network): wheels of what the
trainer imports there and that machine lacks, built or downloaded here, checked, and carried as ``.whl/``.

    make gpu-wheelhouse                              # = python -m benchmarks.gpu_wheelhouse --dir .whl
    python -m benchmarks.gpu_wheelhouse --list       # the plan and the pip commands only

How ``benchmarks/gpu_check.py`` installs it there is in that module's docstring.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

ROOT = Path(__file__).resolve().parents[1]

# What the GPU machine lacks of what the trainer imports unconditionally (checked against KINDS.md's package list
# of the 'cuda' image): deepspeed (Requires-Dist: einops hjson msgpack ninja numpy packaging psutil py-cpuinfo
# pydantic torch tqdm -> there: all but hjson and pydantic), pydantic (annotated-types pydantic-core
# typing-extensions typing-inspection), webdataset (braceexpand numpy pyyaml -> braceexpand). typing-extensions
# is there but may be older than pydantic needs, so it travels too. mlflow (large) stays behind: the rows run with
# tracking.enabled=false where it is missing. FFCV's compiled extension cannot travel (built for Python 3.11).
WHEEL_PACKAGES = ["hjson", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
                  "webdataset", "braceexpand"]
GPU_MACHINE_HAS = {
    "einops", "msgpack", "ninja", "numpy", "packaging", "psutil", "py-cpuinfo", "torch", "tqdm", "pyyaml",
    "typing-extensions", "pillow", "timm", "safetensors", "scipy", "matplotlib", "opencv-python-headless",
    "nvidia-ml-py", "numba", "torchvision", "huggingface-hub", "filelock", "requests", "jinja2", "sympy",
    "networkx", "fsspec", "setuptools", "triton"}
WHEEL_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(text: str) -> dict[str, str]:
    """``name==version`` lines of a requirements lock -> {normalised name: version}."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def wheelhouse_plan(lock_text: str, deepspeed_pin: str, packages: Sequence[str] = WHEEL_PACKAGES) -> dict[str, Any]:
    pins = lock_pins(lock_text)
    missing = [p for p in packages if normalize(p) not in pins]
    if missing:
        raise ValueError(f"not pinned in requirements.lock: {missing}")
    if not re.match(r"^deepspeed==\S+$", deepspeed_pin):
        raise ValueError(f"deepspeed pin {deepspeed_pin!r} must look like deepspeed==X.Y.Z")
    return {"build": [deepspeed_pin], "download": [f"{p}=={pins[normalize(p)]}" for p in packages]}


def wheelhouse_commands(plan: Mapping[str, Sequence[str]], dest: Path, python: str = sys.executable) -> list[list[str]]:
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    cmds = [[*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), *plan["build"]]]
    plat = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    cmds.append([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                 "--implementation", "cp", *plat, "-d", str(dest), *plan["download"]])
    return cmds


def wheel_requirements(whl: Path) -> list[str]:
    """Names in a wheel's Requires-Dist (extras skipped)."""
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode(errors="replace")
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            m = re.match(r"Requires-Dist:\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
            if m:
                names.append(normalize(m.group(1)))
    return names


def wheel_name(whl: Path) -> str:
    return normalize(whl.name.split("-")[0])


def check_wheelhouse(dest: Path, has: Iterable[str] = GPU_MACHINE_HAS) -> list[str]:
    """Problems: a package twice, a requirement neither in the wheelhouse nor on the GPU machine."""
    wheels = sorted(dest.glob("*.whl"))
    names = [wheel_name(w) for w in wheels]
    problems = [f"{n}: {names.count(n)} wheels" for n in sorted(set(names)) if names.count(n) > 1]
    have = set(names) | {normalize(h) for h in has}
    for w in wheels:
        for req in wheel_requirements(w):
            if req not in have:
                problems.append(f"{w.name} needs {req}: neither in the wheelhouse nor on the GPU machine")
    return problems


def build_wheelhouse(dest: Path, deepspeed_pin: str, max_mib: float, lock: Path = ROOT / "requirements.lock") -> int:
    plan = wheelhouse_plan(lock.read_text(), deepspeed_pin)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):  # one version of each: two stop the install on the GPU machine
        old.unlink()
    for cmd in wheelhouse_commands(plan, dest):
        print("$ " + " ".join(cmd), flush=True)
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if p.returncode != 0:
            print((p.stdout + p.stderr)[-3000:], file=sys.stderr)
            return p.returncode
    wheels = sorted(dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"  {w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"wheelhouse {dest}: {len(wheels)} wheels, {total / 2**20:.1f} MiB")
    problems = check_wheelhouse(dest)
    for prob in problems:
        print(f"problem: {prob}", file=sys.stderr)
    if total > max_mib * 2**20:
        print(f"problem: {total / 2**20:.1f} MiB is over the {max_mib} MiB limit", file=sys.stderr)
        return 1
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    q = argparse.ArgumentParser(prog="gpu_wheelhouse")
    q.add_argument("--dir", default=str(ROOT / ".whl"))
    q.add_argument("--deepspeed-pin", default="deepspeed==0.19.8")
    q.add_argument("--max-mib", type=float, default=40)
    q.add_argument("--list", action="store_true", help="print the plan and the commands only")
    a = q.parse_args(argv)
    if a.list:
        plan = wheelhouse_plan((ROOT / "requirements.lock").read_text(), a.deepspeed_pin)
        for cmd in wheelhouse_commands(plan, Path(a.dir)):
            print(" ".join(cmd))
        return 0
    return build_wheelhouse(Path(a.dir), a.deepspeed_pin, a.max_mib)


if __name__ == "__main__":
    sys.exit(main())
