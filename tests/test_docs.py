"""The documentation is built and checked: the strict mkdocs build (broken internal links, missing pages, stale API
references fail), every benchmark table against its result file, the generated config reference against the schema,
and every shell command the README and docs show: run by a test (DOCUMENTED_COMMANDS) or marked ``# cluster-only``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.tables import BLOCK, check_tables
from pipeline.config.schema import TrainConfig
from pipeline.config.site import SiteConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import gen_config_reference  # noqa: E402 - docs/ is not a package; the path is set up above

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
MKDOCS = str(Path(sys.executable).with_name("mkdocs"))

DATA_PREP_CLI = "tests/test_data_prep_cli.py::test_demo_wds_verify_cli"
# Every command shown in a shell code block of README.md or docs/ (continuations joined, the trailing comment
# dropped, blanks collapsed) that is not marked `# cluster-only` -> the test that runs it (or its entry point on
# test-sized data), or a file that runs it (the CI script).
DOCUMENTED_COMMANDS = {
    "make demo": "tests/test_tracking_store.py::test_demo_logs_and_registers_the_exported_model",
    "make test": ".ci/run",
    "make docs": "tests/test_docs.py::test_mkdocs_build_is_strict_and_complete",
    "make ui": "tests/test_mlflow_ui.py::test_make_ui_prints_the_training_view_and_lists_runs_with_tags_and_dataset",
    "make gpu-check": "tests/test_gpu_check.py::test_make_gpu_check_without_cuda_prints_one_line_and_exits_0",
    "python -m benchmarks.gpu_check --cpu-smoke": "tests/test_gpu_check.py::test_cpu_smoke_rows_end_to_end",
    "python launchers/slurm_submit.py --nodes 4 --model cpvt_b --dry-run":
        "tests/test_launcher_submit.py::test_card_dry_run_nodes_4_model_cpvt_b",
    "python -m pipeline.evaluate runs/demo --resolutions 48 64 96":
        "tests/test_eval_test_res.py::test_training_chooses_on_minival_and_reports_val_there",
    "python -m pipeline.export runs/demo": "tests/test_gpu_check.py::test_cpu_smoke_rows_end_to_end",
    "python -m pipeline.evaluate runs/demo --mode native --max-aspect 2 --resolutions 64 96":
        "tests/test_eval_native.py::test_trainer_evaluator_follows_eval_mode",
    "python -m pipeline.analysis.compare demo --paper --out compare.png":
        "tests/test_analysis_compare.py::test_compare_plots_logged_top1_per_resolution_and_logs_the_figure",
    "python -m pipeline.analysis.resolution --checkpoint runs/demo --data runs/demo/data --resolutions 48 64 96 "
    "--train-res 64 --out res.png":
        "tests/test_analysis_ablations.py::test_row_run_summary_resolution_and_attention_end_to_end",
    "python -m pipeline.analysis.attention_maps --checkpoint runs/demo/export/cpvt_demo.safetensors "
    "--data runs/demo/data --res 64 --out att.png":
        "tests/test_analysis_ablations.py::test_row_run_summary_resolution_and_attention_end_to_end",
    "python -m pipeline.checkpointing verify runs/demo":
        "tests/test_checkpoint_integrity.py::test_complete_records_every_file_with_size_and_sha256",
    "cd runs/demo/checkpoints && python zero_to_fp32.py . out":
        "tests/test_train_elastic.py::test_two_ranks_killed_during_save_resume_on_one_rank",
    "python -m data_prep make_demo_dataset --out data/demo_src": DATA_PREP_CLI,
    "python -m data_prep wds --src data/demo_src --out data/demo": DATA_PREP_CLI,
    "python -m data_prep verify data/demo": DATA_PREP_CLI,
    "python -m benchmarks.run_all --only bench_model": "tests/test_benchmarks_run_all.py::test_run_all_one_benchmark",
    "python -m benchmarks.tables --update docs/benchmarks.md README.md":
        "tests/test_benchmarks_common.py::test_tables_catch_a_stale_table",
}

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELL = ("bash", "sh", "shell", "console", "text")


def shown_commands(text: str) -> list[tuple[str, bool]]:
    """``(command, cluster_only)`` for every command of a page's shell blocks (and ``$ `` lines of text blocks).
    A block whose first line is ``# cluster-only ...`` marks all its commands; a line's own comment marks it."""
    out = []
    for m in FENCE.finditer(text):
        lang, body = m[1], m[2]
        if lang not in SHELL:
            continue
        lines = body.replace("\\\n", " ").splitlines()
        first = next((line.strip() for line in lines if line.strip()), "")
        block_cluster = first.startswith("# cluster-only")
        for line in lines:
            line = line.strip()
            if lang in ("text", "console"):
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            if not line or line.startswith("#"):
                continue
            command, _, comment = line.partition(" #")
            out.append((" ".join(command.split()), block_cluster or "cluster-only" in comment))
    return out


def mkdocs_build(site: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(cwd), NO_MKDOCS_2_WARNING="1")
    return subprocess.run([MKDOCS, "build", "--strict", "--site-dir", str(site)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_mkdocs_build_is_strict_and_complete(tmp_path):
    proc = mkdocs_build(tmp_path / "site")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    site = tmp_path / "site"
    reference = (site / "config" / "index.html").read_text()
    assert "data.canonical_streams" in reference and "run.dist_timeout_s" in reference
    assert "recipe_dirs" in (site / "slurm" / "index.html").read_text()   # the site file's table
    assert 'id="pipeline.train.Trainer"' in (site / "api" / "trainer" / "index.html").read_text()   # mkdocstrings
    for name in ("demo_summary", "slurm_dry_run", "make_ui"):   # the captures the pages include
        assert (ROOT / "docs" / "captures" / f"{name}.txt").is_file()
    assert "== 4/4 summary" in (site / "demo" / "index.html").read_text()
    for table in BLOCK.finditer((ROOT / "docs" / "benchmarks.md").read_text()):   # the tables' links resolve
        assert (site / "benchmarks" / "results" / f"{table['name']}.json").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The same build on a copy of the docs with one link to a page that does not exist."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "docs", copy / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pipeline", "benchmarks"):
        (copy / name).symlink_to(ROOT / name)
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    proc = mkdocs_build(tmp_path / "site", cwd=copy)
    assert proc.returncode != 0 and "no-such-page.md" in proc.stdout + proc.stderr


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_agree_with_their_result_files(page):
    assert check_tables(page) == []


def test_the_readme_and_benchmarks_page_hold_tables():
    for page in (ROOT / "README.md", ROOT / "docs" / "benchmarks.md"):
        assert BLOCK.search(page.read_text()), page


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


@pytest.mark.parametrize("root, cls", [("train", TrainConfig), ("site", SiteConfig)])
def test_config_reference_lists_every_field_with_default_and_meaning(root, cls):
    text = gen_config_reference.markdown(root)
    rows = {r.name: r for _, rs in gen_config_reference.walk(cls) for r in rs}

    def leaves(c, prefix=""):
        for f in dataclasses.fields(c):
            value = gen_config_reference.default_of(f)
            if dataclasses.is_dataclass(value):
                yield from leaves(type(value), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", value

    expected = dict(leaves(cls))
    assert set(rows) == set(expected)
    for name, default in expected.items():
        assert f"| `{name}` |" in text and f"`{gen_config_reference.yaml_value(default)}`" in text, name
    undocumented = sorted(name for name, r in rows.items() if not r.meaning)
    assert not undocumented, f"fields without a comment in the schema: {undocumented}"


def test_config_reference_reads_the_source_comments():
    rows = {r.name: r for _, rs in gen_config_reference.walk(TrainConfig) for r in rs}
    assert rows["run.log_every"].meaning == "optimizer steps between logged training metrics"   # trailing comment
    assert rows["data.global_batch_size"].meaning.startswith("samples per optimizer step over all ranks")   # above
    assert rows["aug.reprob"].group == "on the batch, after normalisation"   # a heading comment


def test_every_documented_command_is_tested_or_cluster_only():
    shown = {}
    for page in PAGES:
        for command, cluster_only in shown_commands(page.read_text()):
            if not cluster_only:
                shown.setdefault(command, page.relative_to(ROOT))
    untested = {c: str(p) for c, p in shown.items() if c not in DOCUMENTED_COMMANDS}
    assert not untested, f"shown, neither run by a test (DOCUMENTED_COMMANDS) nor # cluster-only: {untested}"
    stale = sorted(set(DOCUMENTED_COMMANDS) - set(shown))
    assert not stale, f"DOCUMENTED_COMMANDS entries no page shows: {stale}"
    for command, where in DOCUMENTED_COMMANDS.items():
        path, _, test = where.partition("::")
        source = (ROOT / path).read_text()
        if test:
            assert re.search(rf"^def {test}\(", source, re.M), f"{command}: {where} does not exist"
        else:
            assert command in source, f"{command}: {path} does not run it"


def test_command_extraction():
    page = ("```bash\n# cluster-only: GPUs\ndeepspeed a.py \\\n    --x 1\n```\n\n```bash\nmake demo   # a comment\n"
            "make bench  # cluster-only: long\n```\n\n```text\n$ make ui\noutput # not a command\n```\n")
    assert shown_commands(page) == [("deepspeed a.py --x 1", True), ("make demo", False), ("make bench", True),
                                    ("make ui", False)]
