"""The panel in a real JupyterLab in headless Chromium: progress moves, Cancel stops the run.

Screenshots land in build/artifacts/ (kept by CI as artifacts).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import wait_until  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


def _bar_width(page) -> float:
    style = page.locator(".nbparrot-panel .widget-hprogress .progress-bar").first.get_attribute("style") or ""
    for part in style.split(";"):
        if part.strip().startswith("width"):
            return float(part.split(":")[1].strip().rstrip("%") or 0)
    return 0.0


def test_quickstart_panel_progress_and_cancel_in_jupyterlab(tmp_path):
    from harness.lab import Browser, JupyterLab, require_browser

    require_browser()
    _copy_without_outputs(REPO / "notebooks" / "quickstart.ipynb", tmp_path / "quickstart.ipynb")
    code = [k for k, cell in enumerate(__import__("nbformat").read(tmp_path / "quickstart.ipynb", 4).cells)
            if cell.cell_type == "code"]
    setup, start, counts, stop = code[0], code[1], code[2], code[-1]
    with JupyterLab(tmp_path) as lab, Browser(lab, prefix="quickstart_") as br:
        br.open_notebook("quickstart.ipynb")
        br.screenshot("00_opened")
        br.run_cell(setup, timeout=90)
        br.run_cell(start)  # returns at once: the run goes on in the background
        page = br.page
        page.locator(".nbparrot-panel button.widget-button", has_text="Cancel").wait_for(timeout=30_000)
        first = wait_until(lambda: _bar_width(page) or None, timeout=30, message="the progress bar never moved")
        wait_until(lambda: _bar_width(page) > first, timeout=30, message="the progress bar stopped moving")
        assert _bar_width(page) < 100, "the run finished before Cancel could be tested"
        br.screenshot("01_running")

        page.locator(".nbparrot-panel button.widget-button", has_text="Cancel").click()
        # the stopped run's panel is replaced by static HTML (summary and preview): no widget view left
        summary = page.locator(".nbparrot-final .nbparrot-summary")
        summary.wait_for(timeout=30_000)
        assert "cancelled" in summary.inner_text()
        assert page.locator(".nbparrot-panel .widget-hprogress").count() == 0
        br.screenshot("02_cancelled")

        br.run_cell(counts)  # a later cell sees the stopped run
        output = br.cell_output_text(counts)
        assert "'cancelled'" in output and "'in_flight': 0" in output and "'queued': 0" in output
        br.run_cell(stop)
        br.screenshot("03_end")
        assert br.console_errors == []
        # saved, the run's output is the static HTML JupyterLab holds: readable without a kernel
        page.keyboard.press("Control+s")
        notebook = tmp_path / "quickstart.ipynb"
        saved = wait_until(lambda: _outputs(notebook, start), timeout=30, message="the notebook was not saved")
        assert all(WIDGET_VIEW not in o.get("data", {}) for o in saved)
        assert any("nbparrot-final" in o.get("data", {}).get("text/html", "") for o in saved)


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def _copy_without_outputs(source: Path, target: Path) -> None:
    """The committed notebook (saved with its outputs) as a user starts it: no outputs yet."""
    import nbformat

    notebook = nbformat.read(source, 4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(notebook, target)


def _outputs(path: Path, index: int) -> list:
    """The saved outputs of cell ``index`` (empty until JupyterLab has saved them)."""
    import nbformat

    try:
        return list(nbformat.read(path, 4).cells[index].get("outputs", []))
    except (OSError, ValueError):  # mid-write
        return []
