"""Markdown tables generated from the result files, so that a table in the docs can never disagree with its file.

A table sits in a markdown page between two HTML comments naming its result file (``benchmarks/results/<name>.json``)::

    <!-- table: bench_trainer -->
    ...generated...
    <!-- /table -->

    python -m benchmarks.tables                      # print the table of every result file
    python -m benchmarks.tables --update README.md   # regenerate the tables a page holds, in place
    python -m benchmarks.tables --check README.md    # exit 1 naming every table that differs from its file

Each table lists the result's summary (or, without one, its ratios: :func:`benchmarks.run_all.summarize_result`)
under a line saying where the numbers come from: file, commit, CPU (and GPU), date.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

from benchmarks.common import RESULTS_DIR, ROOT
from benchmarks.run_all import summarize_result

BLOCK = re.compile(r"<!-- table: (?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render(name: str, results_dir: str | Path = RESULTS_DIR) -> str:
    """The markdown table of ``<results_dir>/<name>.json`` (provenance line, then quantity | value rows)."""
    path = Path(results_dir) / f"{name}.json"
    doc = json.loads(path.read_text())
    machine = doc.get("machine") or {}
    hardware = f"{machine.get('cpu_model', '?')} ({machine.get('cpu_count', '?')} cores)"
    if machine.get("cuda"):
        hardware += f", {machine['cuda']}"
    commit = (doc.get("commit") or "unknown")[:12]
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        shown = path.name
    lines = [f"From [`{path.name}`]({shown}): commit `{commit}`, {hardware}, {doc.get('timestamp', '?')[:10]}.", "",
             f"| {name} | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in summarize_result(path)]
    return "\n".join(lines) + "\n"


def result_names(results_dir: str | Path = RESULTS_DIR) -> list[str]:
    """Every committed result (smoke runs' ``*_quick`` files left out)."""
    return sorted(p.stem for p in Path(results_dir).glob("*.json") if not p.stem.endswith("_quick"))


def block(name: str, results_dir: str | Path = RESULTS_DIR) -> str:
    return f"<!-- table: {name} -->\n{render(name, results_dir)}<!-- /table -->"


def check_tables(markdown_path: str | Path, results_dir: str | Path = RESULTS_DIR) -> list[str]:
    """The tables of a markdown page that differ from their result file (or whose file is missing), as one line
    each; empty when every table is current."""
    problems = []
    for m in BLOCK.finditer(Path(markdown_path).read_text()):
        name = m["name"]
        if not (Path(results_dir) / f"{name}.json").is_file():
            problems.append(f"{markdown_path}: table {name}: no result file {name}.json")
        elif m["body"] != render(name, results_dir):
            problems.append(f"{markdown_path}: table {name} differs from {name}.json "
                            f"(python -m benchmarks.tables --update {markdown_path})")
    return problems


def update_tables(markdown_path: str | Path, results_dir: str | Path = RESULTS_DIR) -> int:
    """Regenerate every table block of a page in place; returns how many it holds."""
    path = Path(markdown_path)
    text, n = BLOCK.subn(lambda m: block(m["name"], results_dir), path.read_text())
    path.write_text(text)
    return n


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", nargs="+", default=[], metavar="MD", help="pages whose tables must match their files")
    p.add_argument("--update", nargs="+", default=[], metavar="MD", help="pages whose tables to regenerate")
    p.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    for page in args.update:
        print(f"{page}: {update_tables(page, args.results_dir)} table(s) regenerated")
    problems = [line for page in args.check for line in check_tables(page, args.results_dir)]
    for line in problems:
        print(line, file=sys.stderr)
    if not args.check and not args.update:
        print("\n\n".join(block(name, args.results_dir) for name in result_names(args.results_dir)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
