"""PEG ablations (the paper's CPVT-Ti comparisons): one training command per row, one summary table from MLflow.

Rows live in ``pipeline/recipes/ablations/<row>.yaml`` (each inherits the CPVT-Ti training recipe through
``_base_``). Every run logs to the project's MLflow store (``pipeline.tracking.default_uri``) under
experiment ``cpvt-ablations`` with run name ``ablation-<row>``, so ``summarise`` can put all rows in one table
beside the paper's numbers.

    python -m pipeline.analysis.ablations list
    python -m pipeline.analysis.ablations run --row peg_pos_3 --data runs/demo/data [run.epochs=30 ...]
    deepspeed --num_gpus 8 -m pipeline.analysis.ablations run --row kernel_5 --data /data/imagenet
    python -m pipeline.analysis.ablations summarise [--tracking-uri URI]

A row trained with ``eval.mode=native`` logs native-aspect accuracies under the same ``eval/top1_<r>px`` keys;
to compare a PEG row with ``learned_pe`` in both modes on the same weights (the learned table resampled to each
bucket's token grid), run ``python -m pipeline.analysis.resolution --checkpoint runs/ablations/peg_pos_0
runs/ablations/learned_pe --modes center_crop native --data DATA``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.config import ConfigError
from pipeline.config import load_train_config
from pipeline.tracking import default_uri
from pipeline.train import main as train_main

RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "ablations"
EXPERIMENT = "cpvt-ablations"
DEFAULT_ROOT = "runs/ablations"
RUN_NAME_PREFIX = "ablation-"


@dataclass(frozen=True)
class Row:
    name: str
    group: str
    change: str
    paper_top1: float | None  # ImageNet top-1 of CPVT-Ti from the paper / its public references, when stated
    paper_note: str = ""
    recipe: str | None = None  # default: <name>.yaml; rows sharing a run point at the same recipe

    @property
    def recipe_path(self) -> Path:
        return RECIPE_DIR / (self.recipe or f"{self.name}.yaml")

    @property
    def run_row(self) -> str:
        """The row whose run provides this row's numbers (kernel_3 is the same model as peg_pos_0)."""
        return Path(self.recipe).stem if self.recipe else self.name


ROWS: tuple[Row, ...] = (
    Row("peg_pos_m1", "PEG position", "1 PEG before block 0 (on patch embeddings)", 70.6,
        "72.5 with a 27x27 kernel"),
    Row("peg_pos_0", "PEG position", "1 PEG after block 0 (CPVT-Ti)", 72.4),
    Row("peg_pos_3", "PEG position", "1 PEG after block 3", None),
    Row("peg_pos_6", "PEG position", "1 PEG after block 6", None),
    Row("peg_pos_10", "PEG position", "1 PEG after block 10", None),
    Row("pegs_0_4", "PEG count", "5 PEGs after blocks 0-4", 73.4, "more PEGs saturate"),
    Row("kernel_1", "PEG kernel", "1 PEG after block 0, 1x1 kernel", None, "drops sharply (no spatial context)"),
    Row("kernel_3", "PEG kernel", "1 PEG after block 0, 3x3 kernel (= peg_pos_0)", 72.4, recipe="peg_pos_0.yaml"),
    Row("kernel_5", "PEG kernel", "1 PEG after block 0, 5x5 kernel", None, "no real gain over 3x3"),
    Row("kernel_7", "PEG kernel", "1 PEG after block 0, 7x7 kernel", None, "no real gain over 3x3"),
    Row("no_peg", "baseline", "no position encoding at all", 68.2),
    Row("learned_pe", "baseline", "DeiT-style learned absolute PE (interpolated at other sizes), no PEG", 72.2,
        "DeiT-tiny"),
)
ROW_NAMES = [r.name for r in ROWS]


def get_row(name: str) -> Row:
    for r in ROWS:
        if r.name == name:
            return r
    raise ConfigError(f"row: {name!r} is not one of {ROW_NAMES}")


def default_tracking_uri(root: str | Path = DEFAULT_ROOT) -> str:
    """The project store (``pipeline.tracking.default_uri``): ablation rows sit next to every other run."""
    return default_uri()


def train_argv(row: Row, *, data: str | None, root: str | Path, tracking_uri: str | None,
               overrides: Sequence[str] = ()) -> list[str]:
    """The ``pipeline.train.main`` argv of one row (recipe + run dir + shared MLflow store + run name)."""
    argv = ["--recipe", str(row.recipe_path), "--run-dir", str(Path(root) / row.run_row)]
    if data:
        argv += ["--data", str(data)]
    argv += [f"tracking.uri={tracking_uri or default_tracking_uri(root)}", f"tracking.experiment={EXPERIMENT}",
             f"tracking.run_name={RUN_NAME_PREFIX}{row.run_row}"]
    return argv + list(overrides)


def validate_recipes(world_size: int = 1) -> dict[str, Any]:
    """Load + validate every row's recipe with the trainer's own config loader; returns {row: TrainConfig}."""
    return {r.name: load_train_config(str(r.recipe_path), [], world_size)[0] for r in ROWS}


# ----------------------------------------------------------------------------------------- summary
def collect(tracking_uri: str, experiment: str = EXPERIMENT) -> list[dict[str, Any]]:
    """One dict per table row: paper numbers + the newest finished MLflow run of that row (if any)."""
    import mlflow  # local: mlflow (~1 s) only for `summarise`; `list` and `--help` stay fast

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5000) if exp else []
    newest: dict[str, Any] = {}
    for run in runs:
        name = run.info.run_name or ""
        if name.startswith(RUN_NAME_PREFIX):
            newest.setdefault(name[len(RUN_NAME_PREFIX):], run)
    table = []
    for r in ROWS:
        run = newest.get(r.run_row)
        m = run.data.metrics if run else {}
        res_top1 = {int(k[len("eval/top1_"):-2]): v for k, v in m.items()
                    if k.startswith("eval/top1_") and k.endswith("px")}
        table.append({"row": r.name, "group": r.group, "change": r.change,
                      "top1": m.get("eval/top1"), "top1_by_res": dict(sorted(res_top1.items())),
                      "paper_top1": r.paper_top1, "paper_note": r.paper_note,
                      "run_id": run.info.run_id if run else None,
                      "epochs": (run.data.params.get("run.epochs") if run else None)})
    return table


def format_summary(table: Sequence[dict[str, Any]]) -> str:
    res = sorted({r for row in table for r in row["top1_by_res"]})

    def f(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"

    head = ["row", "group", "change", "top1", *[f"@{r}" for r in res], "paper", "paper note", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [row["row"], row["group"], row["change"], f(row["top1"]),
                 *[f(row["top1_by_res"].get(r)) for r in res], f(row["paper_top1"]), row["paper_note"],
                 (row["run_id"] or "not run")[:8]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> Any:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    p_list = sub.add_parser("list", help="rows, their recipes and the command that trains each")
    p_run = sub.add_parser("run", help="train one row (pipeline.train.main; works under deepspeed/torchrun/srun)")
    p_run.add_argument("--row", required=True, choices=ROW_NAMES)
    p_run.add_argument("--data", default=None, help="data_prep output root (data.root)")
    p_run.add_argument("overrides", nargs="*", help="extra section.field=value overrides (e.g. run.epochs=30)")
    p_sum = sub.add_parser("summarise", aliases=["summarize"], help="one table of all rows from MLflow")
    p_sum.add_argument("--json", default=None, help="also write the table here")
    for sp in (p_list, p_run, p_sum):
        sp.add_argument("--root", default=DEFAULT_ROOT, help="run dirs go to <root>/<row>")
        sp.add_argument("--tracking-uri", default=None, help="shared MLflow store (default: $MLFLOW_TRACKING_URI "
                        "or the project store)")
    args = p.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(args.root)
    if args.cmd == "list":
        for r in ROWS:
            cmd = "same run as " + r.run_row if r.run_row != r.name else \
                f"python -m pipeline.analysis.ablations run --row {r.name} --data DATA"
            print(f"{r.name:11s} {r.group:13s} {r.change:62s} paper={r.paper_top1}  $ {cmd}")
        return ROWS
    if args.cmd == "run":
        row = get_row(args.row)
        return train_main(train_argv(row, data=args.data, root=args.root, tracking_uri=uri, overrides=args.overrides))
    table = collect(uri)
    print(format_summary(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
    sys.exit(0)
