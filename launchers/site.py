"""Site defaults: what does not change between runs on one cluster, in one small YAML file.

The file is ``$CPVT_SITE`` (``CPVT_SITE=`` empty: no site file) or else ``~/.config/cpvt/site.yaml`` when it
exists::

    data_root: /datasets/imagenet_prep      # --data
    partition: gpu                          # --partition (and the partition asked for its GPUs)
    account: my-lab
    qos: normal
    gpus_per_node: 8                        # else SLURM: sinfo -p <partition> -o %G, then scontrol's Gres=gpu:N
    gpu_type: A100                          # throughput-table row for the time-limit estimate (else gres type)
    cpus_per_task: 12                       # else the node's CPUs / tasks per node
    mem_gb: 480
    time: "24:00:00"
    runs_root: /scratch/me/cpvt-runs        # run dirs are <runs_root>/<model>-<time> (train.py: <runs_root>/default)
    mlflow_uri: http://mlflow.internal:5000 # tracking.uri unless set on the command line or MLFLOW_TRACKING_URI
    recipe_dirs: [/shared/cpvt-recipes]     # searched before pipeline/recipes for --model / --recipe names

Relative paths are relative to the site file. Command-line flags override every value; ``slurm_submit.py
--dry-run`` prints where each value came from (:class:`Setting`: flag, the site file, sinfo, scontrol, default).

The SLURM queries are plain text parsers (:func:`parse_gres`, :func:`parse_scontrol_nodes`, ...) over the
commands' output, so their parsing is tested on captured real output without a GPU cluster.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from pipeline.config import ConfigError, check_positive, from_dict

DEFAULT_SITE = Path("~/.config/cpvt/site.yaml")
ENV_VAR = "CPVT_SITE"


@dataclass
class SiteConfig:
    data_root: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: Optional[int] = None
    gpu_type: Optional[str] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[float] = None
    time: Optional[str] = None
    runs_root: Optional[str] = None
    mlflow_uri: Optional[str] = None
    recipe_dirs: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.gpus_per_node is not None:
            check_positive("gpus_per_node", self.gpus_per_node, allow_zero=True)
        for name in ("cpus_per_task", "mem_gb"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))


@dataclass(frozen=True)
class Setting:
    """One resolved value and where it came from (printed by ``--dry-run``)."""
    value: Any
    source: str

    def __str__(self) -> str:
        return f"{self.value if self.value is not None else '(not set)'}  [{self.source}]"


def site_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The site file in effect: ``$CPVT_SITE`` (must exist; empty: none), else the default file if it exists."""
    env = os.environ if environ is None else environ
    if ENV_VAR in env:
        if not env[ENV_VAR]:
            return None
        path = Path(env[ENV_VAR]).expanduser()
        if not path.is_file():
            raise ConfigError(f"{ENV_VAR}: site file {path} does not exist (unset {ENV_VAR}= to use none)")
        return path
    path = DEFAULT_SITE.expanduser()
    return path if path.is_file() else None


def load_site(environ: Mapping[str, str] | None = None) -> tuple[SiteConfig, Path | None]:
    """(site defaults, their file or None); a bad file is one ConfigError naming the file and the field."""
    path = site_path(environ)
    if path is None:
        return SiteConfig(), None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"site file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"site file {path}: must hold a mapping of {[f.name for f in fields(SiteConfig)]}")
    if isinstance(data.get("time"), int) and re.search(r"^\s*time:\s*\d+:", path.read_text(), re.M):
        raise ConfigError(f"site file {path}: time: quote it (time: \"24:00:00\"); YAML reads 24:00:00 as a number")
    try:
        site = from_dict(SiteConfig, data)
    except ConfigError as e:
        raise ConfigError(f"site file {path}: {e}") from None
    base = path.parent

    def local(p: str | None) -> str | None:
        return None if p is None else str((base / Path(p).expanduser()).resolve())

    site.data_root, site.runs_root = local(site.data_root), local(site.runs_root)
    site.recipe_dirs = [str(local(d)) for d in site.recipe_dirs]
    return site, path


def pick(name: str, flag: Any, site: SiteConfig, site_file: Path | None, default: Any = None,
         default_source: str = "default") -> Setting:
    """flag > site file > default, with the source."""
    if flag is not None:
        return Setting(flag, "flag")
    value = getattr(site, name)
    if value is not None:
        return Setting(value, f"site file {site_file}")
    return Setting(default, default_source)


def train_defaults(site: SiteConfig, site_file: Path | None, environ: Mapping[str, str] | None = None,
                   run_dir: bool = True) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """Training-config defaults from the site file (below the recipe and the command line) and, per value,
    ``(dotted field, value, note)``: data.root, tracking.uri (``mlflow_uri``, else the SQLite store under
    ``runs_root``; only without MLFLOW_TRACKING_URI, which is more specific), and the run dir
    ``<runs_root>/default`` (``run_dir=False``: the launcher names run dirs itself)."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    notes: list[tuple[str, str, str]] = []
    if site.data_root:
        out["data"] = {"root": site.data_root}
        notes.append(("data.root", site.data_root, f"data.root={site.data_root} (site file {site_file})"))
    if not env.get("MLFLOW_TRACKING_URI") and (site.mlflow_uri or site.runs_root):
        # the project's one store: the site's server, else the SQLite store under the site's runs root
        uri = site.mlflow_uri or f"sqlite:///{(Path(site.runs_root) / 'mlflow.db').resolve()}"
        out["tracking"] = {"uri": uri}
        what = "" if site.mlflow_uri else " runs_root"
        notes.append(("tracking.uri", uri, f"tracking.uri={uri} (site file {site_file}{what})"))
    if run_dir and site.runs_root:
        value = str(Path(site.runs_root) / "default")
        out["run"] = {"run_dir": value}
        notes.append(("run.run_dir", value, f"run.run_dir={value} (site file {site_file} runs_root)"))
    return out, notes


# ----------------------------------------------------------------------------------------------- SLURM
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
