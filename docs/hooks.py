"""mkdocs hooks of the documentation site: the generated config reference and the benchmark result files.

* ``<!-- config-reference: train -->`` / ``<!-- config-reference: site -->`` in a page become the tables of
  :mod:`docs.gen_config_reference` (every field of the schema, its default and its comment), at build time;
* every ``benchmarks/results/<name>.json`` is published at the same path of the site, so the links of the tables
  that ``python -m benchmarks.tables --update`` writes into a page resolve there as they do on GitHub.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the checkout's pipeline package and docs/ scripts, whatever the working folder
sys.path.insert(0, str(ROOT / "docs"))
import gen_config_reference  # noqa: E402 - after the path set-up above

MARKER = re.compile(r"<!-- config-reference: (\w+) -->")


def on_files(files, config):
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        uri = f"benchmarks/results/{path.name}"
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: gen_config_reference.markdown(m[1]), markdown)
