"""The MLflow UI as a user opens it: ``make ui``'s server over the shared store (two trainings that ran at once
and a demo), the printed training-view URL in headless Chromium: the runs page lists the runs with their tags and
the dataset, and the chart (compare) view draws the top-1 chart of every run. Screenshots are kept as test
artifacts (``<pytest tmp>/ui/*.png``)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers_tracking import runs_of
from tests.helpers_train import job_env, tiny_data, tiny_recipe  # noqa: F401 - session fixtures
from tests.helpers_ui import Browser, UIServer, chromium

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.skipif(chromium() is None, reason="no chromium (make setup-test installs Debian's "
                                 "chromium package when run as root)")]

# the tree nodes of the runs table's column selector (MLflow's design-system tree)
_CHECK_TAGS = """(() => { const t = [...document.querySelectorAll('.du-bois-light-tree-treenode span[title]')]
    .find(e => e.title.startsWith('Tags ('));
  if (!t) return false;
  t.closest('.du-bois-light-tree-treenode').querySelector('.du-bois-light-tree-checkbox').click(); return true; })()"""
_SEARCH_CHARTS = """((q) => { const i = [...document.querySelectorAll('input')]
    .find(e => (e.placeholder || '').startsWith('Search metric charts'));
  if (!i) return false;
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, q);
  i.dispatchEvent(new Event('input', {bubbles: true})); return true; })"""


@pytest.fixture(scope="module")
def ui(shared_store, tmp_path_factory):  # noqa: F811
    server = UIServer(shared_store.uri, job_env())
    browser = Browser(width=2600, height=1100)
    yield server, browser, tmp_path_factory.mktemp("ui")
    browser.close()
    server.close()


def _keep(path):
    """The screenshot is a test artifact; also copied where the project's notes collect them, when present."""
    notes = Path("/work/notes")
    if notes.is_dir():
        shutil.copy(path, notes / path.name)


def _close_assistant(browser):
    browser.eval("[...document.querySelectorAll('button[aria-label=Close]')].forEach(e => e.click())")


def test_make_ui_prints_the_training_view_and_lists_runs_with_tags_and_dataset(ui, shared_store):  # noqa: F811
    server, browser, out = ui
    s = shared_store
    urls = re.findall(r"^  cpvt\s+(\S+)$", server.output(), re.M)
    assert urls and urls[0].startswith(server.base) and urls[0].endswith("/runs?workflowType=machine_learning")
    runs = {name: runs_of(getattr(s, name), s.uri)[0] for name in ("two_node", "single", "demo")}
    dataset = runs["single"].inputs.dataset_inputs[0].dataset
    browser.goto(urls[0])
    names = [r.info.run_name for r in runs.values()]
    browser.wait_for_text([*names, f"{dataset.name} ({dataset.digest})", "Model training"])
    browser.click_text("Columns")
    browser.wait_for(_CHECK_TAGS, what="the column selector's Tags group")
    browser.call("Input.dispatchKeyEvent", type="keyDown", key="Escape", code="Escape", windowsVirtualKeyCode=27)
    _close_assistant(browser)
    browser.wait_for_text(["model", "precision", "zero_stage", "world_size", "git.commit", "cpvt_ti",
                                  "fp32", "train_tiny_recipe", runs["demo"].data.tags["git.commit"]])
    png = browser.screenshot(out / "ui_runs_training_view.png")
    _keep(png)
    assert png.stat().st_size > 20_000


def test_chart_view_draws_the_top1_chart_of_every_run(ui, shared_store):  # noqa: F811
    server, browser, out = ui
    s = shared_store
    exp = runs_of(s.single, s.uri)[0].info.experiment_id
    browser.goto(f"{server.base}/#/experiments/{exp}/runs?workflowType=machine_learning&compareRunsMode=CHART")
    names = [runs_of(getattr(s, n), s.uri)[0].info.run_name for n in ("two_node", "single", "demo")]
    browser.wait_for_text(names)
    browser.wait_for(f"{_SEARCH_CHARTS}('eval/top1')", what="the chart search box")
    _close_assistant(browser)
    legend = [f"{n} (eval/top1)" for n in names]
    browser.wait_for_text(legend)
    browser.wait_for("document.querySelectorAll('.js-plotly-plot').length > 0", what="a plotted chart")
    titles = browser.eval("JSON.stringify([...document.querySelectorAll('[title]')].map(e => e.title))")
    assert any(t.startswith("eval/top1") for t in json.loads(titles)), titles
    png = browser.screenshot(out / "ui_compare_top1.png")
    _keep(png)
    assert png.stat().st_size > 20_000
