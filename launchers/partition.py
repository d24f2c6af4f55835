"""What SLURM says about a partition's nodes: GPUs per node and their type, CPUs per node (``sinfo``, then
``scontrol``), for the launcher's resource defaults below the flags and the site file
(:mod:`pipeline.config.site`). The parsers are pure, so their tests need no cluster."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

_GRES_GPU = re.compile(r"(?:^|,)gpu(?::([A-Za-z][\w.-]*))?:(\d+)")


def parse_gres(text: str) -> tuple[int, str | None] | None:
    """GPUs per node (the smallest node) and their type from gres strings, one per line, as ``sinfo -o %G`` or
    ``Gres=`` print them: ``gpu:8``, ``gpu:a100:8(S:0-1)``, ``gpu:v100:4,mps:400``, ``(null)`` (no GPU: 0)."""
    found: list[tuple[int, str | None]] = []
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        hits = [(int(n), t) for t, n in _GRES_GPU.findall(line)]
        if hits:
            found.append((sum(n for n, _ in hits), hits[0][1] or None))
        else:
            found.append((0, None))
    if not found:
        return None
    return min(found, key=lambda x: x[0])


def parse_cpus(text: str) -> int | None:
    """CPUs per node from ``sinfo -o %c`` (``128``, ``64+`` on mixed partitions: the smallest)."""
    values = [int(m.group(1)) for ln in text.splitlines() if (m := re.match(r"\s*(\d+)", ln))]
    return min(values) if values else None


def parse_scontrol_nodes(text: str) -> tuple[tuple[int, str | None] | None, int | None]:
    """``scontrol --oneliner show node ...``: (GPUs per node and type from ``Gres=``, CPUs from ``CPUTot=``),
    the smallest node of the listing."""
    gres = [m.group(1) for m in re.finditer(r"(?:^|\s)Gres=(\S*)", text)]
    cpus = [int(m.group(1)) for m in re.finditer(r"(?:^|\s)CPUTot=(\d+)", text)]
    return (parse_gres("\n".join(gres)) if gres else None), (min(cpus) if cpus else None)


def parse_partition_nodes(text: str) -> str | None:
    """The ``Nodes=`` hostlist of ``scontrol show partition P``."""
    m = re.search(r"(?:^|\s)Nodes=(\S+)", text)
    return m.group(1) if m and m.group(1) != "(null)" else None


def parse_default_partition(text: str) -> str | None:
    """The default partition from ``sinfo -h -o %P`` (marked ``*``)."""
    for line in text.split():
        if line.endswith("*"):
            return line[:-1]
    return None


def _run(cmd: list[str], timeout: float = 15) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


@dataclass
class PartitionInfo:
    """What SLURM says about a partition's nodes (None: not known) and which command said it."""
    partition: str | None = None
    gpus_per_node: int | None = None
    gpu_type: str | None = None
    cpus_per_node: int | None = None
    gpu_source: str = "default"
    cpu_source: str = "default"
    notes: list[str] = field(default_factory=list)


def query_partition(partition: str | None) -> PartitionInfo:
    """GPUs and CPUs per node of ``partition`` (None: SLURM's default partition): sinfo first, then scontrol."""
    info = PartitionInfo(partition)
    if partition is None:
        out = _run(["sinfo", "-h", "-o", "%P"])
        if out is None:
            info.notes.append("sinfo unavailable: no SLURM values")
            return info
        info.partition = partition = parse_default_partition(out)
    sel = ["-p", partition] if partition else []
    gres = _run(["sinfo", *sel, "-h", "-o", "%G"])
    cpus = _run(["sinfo", *sel, "-h", "-o", "%c"])
    if gres is not None and (g := parse_gres(gres)) is not None:
        info.gpus_per_node, info.gpu_type = g
        info.gpu_source = f"sinfo -p {partition} -o %G"
    if cpus is not None and (c := parse_cpus(cpus)) is not None:
        info.cpus_per_node, info.cpu_source = c, f"sinfo -p {partition} -o %c"
    if info.gpus_per_node is None or info.cpus_per_node is None:
        part = _run(["scontrol", "--oneliner", "show", "partition", partition]) if partition else None
        nodes = parse_partition_nodes(part) if part else None
        shown = _run(["scontrol", "--oneliner", "show", "node", nodes]) if nodes else None
        if shown:
            g, c = parse_scontrol_nodes(shown)
            if info.gpus_per_node is None and g is not None:
                info.gpus_per_node, info.gpu_type = g
                info.gpu_source = "scontrol show node (Gres=)"
            if info.cpus_per_node is None and c is not None:
                info.cpus_per_node, info.cpu_source = c, "scontrol show node (CPUTot=)"
    return info
