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
--dry-run`` prints where each value came from (:class:`Setting`: flag, the site file, sinfo, scontrol, default);
what SLURM itself says about a partition is asked by ``launchers/partition.py``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from pipeline.config.errors import ConfigError, check_positive
from pipeline.config.sections import from_dict

DEFAULT_SITE = Path("~/.config/cpvt/site.yaml")
ENV_VAR = "CPVT_SITE"


@dataclass
class SiteConfig:
    """The site file's fields (the module docstring shows each with an example); None: not set there."""
    data_root: Optional[str] = None       # data.root (--data)
    partition: Optional[str] = None       # SLURM --partition
    account: Optional[str] = None         # SLURM --account
    qos: Optional[str] = None             # SLURM --qos
    constraint: Optional[str] = None      # SLURM --constraint
    gpus_per_node: Optional[int] = None   # else what SLURM says about the partition
    gpu_type: Optional[str] = None        # the throughput-table row for the time-limit estimate
    cpus_per_task: Optional[int] = None   # else the node's CPUs / tasks per node
    mem_gb: Optional[float] = None        # SLURM --mem
    time: Optional[str] = None            # SLURM --time ("24:00:00", quoted)
    runs_root: Optional[str] = None       # run dirs go under it; its mlflow.db is the default store
    mlflow_uri: Optional[str] = None      # tracking.uri unless the command line or MLFLOW_TRACKING_URI sets one
    recipe_dirs: list[str] = field(default_factory=list)   # searched before pipeline/recipes for recipe names

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
