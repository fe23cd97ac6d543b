"""The panel in a real JupyterLab in headless Chromium: progress moves, Cancel stops the run.

Screenshots land in build/artifacts/ (kept by CI as artifacts).
"""

from __future__ import annotations

import re
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


# ---- the panel's words and look, in light and dark ------------------------------------------------

KEY = "sk-browser-panel-test-0123456789"

_COLOR_OF_VAR = """(name) => {
    const probe = document.createElement('span');
    probe.style.color = `var(${name})`;
    document.body.appendChild(probe);
    const color = getComputedStyle(probe).color;
    probe.remove();
    return color;
}"""


def _color(locator) -> str:
    return locator.evaluate("el => getComputedStyle(el).color")


def _shot_path(br, name: str) -> Path:
    br.artifacts_dir.mkdir(parents=True, exist_ok=True)
    path = br.artifacts_dir / f"{br.prefix}{name}.png"
    br.screenshots.append(path)
    return path


def _shot(br, name: str, locator=None) -> Path:
    """A screenshot of the page, or of one element (scrolled into view), into build/artifacts/."""
    path = _shot_path(br, name)
    (locator or br.page).screenshot(path=str(path))
    return path


def _shots(br, theme: str) -> None:
    """The finished panel, the failing run, the cached comparison and the stopped stream."""
    for k, name in ((1, "finished"), (2, "failed"), (3, "compare"), (4, "compare_cached"), (5, "stream_stopped")):
        _shot(br, f"1{k}_{name}_{theme}", br.cell(k))


def _set_theme(br, theme: str) -> None:
    br.page.evaluate("(theme) => window.jupyterapp.commands.execute('apputils:change-theme', {theme})", theme)
    wait_until(lambda: br.page.evaluate("() => document.body.dataset.jpThemeName") == theme, timeout=30,
               message=f"the theme never became {theme}")


def test_panel_words_rates_comparison_and_stream_in_light_and_dark(tmp_path, make_server):
    """Retries read as retries and failures in the theme's error colour, the rate is a count over
    the run's first seconds (never a burst stretched to a minute), no early ETA, a one-line title,
    a comparison without the panel's preview and with cached answers marked, a stream with a
    still-going cue and a Stop button; screenshots in the light and the dark theme."""
    from harness.lab import Browser, JupyterLab, require_browser, write_notebook

    require_browser()
    flaky = make_server(latency_ms=150, jitter_ms=150, rpm=600, burst_seconds=2, p500=0.06, p503=0.03, seed=7,
                        api_key=KEY)
    slow = make_server(latency_ms=100, per_token_ms=15, completion_tokens=3000, api_key=KEY)
    cells = [
        "import nbparrot, pandas as pd\n%load_ext nbparrot\n"
        f"nbparrot.configure(base_url={flaky.base_url!r})\n"
        "df = pd.DataFrame({'text': [f'review {i}: the kettle was fine' for i in range(150)]})\n"
        "bad = pd.DataFrame({'text': ['fine', '<<numeric-code>> broken', 'fine too', '<<numeric-code>> again']})\n"
        "drinks = pd.DataFrame({'text': ['tea', 'coffee', 'cocoa', 'water']})",
        "run = nbparrot.map(df, 'Classify the sentiment of this review: {text}', concurrency=16, max_tokens=24)",
        "res = await run\nfailing = nbparrot.map(bad, 'Repeat {text}')\nawait failing",
        "%%llm --over drinks --sample 3 -o cmp\nSay {text}\n---\nShout {text}!",
        "%%llm --over drinks --sample 3 -o cmp2\nSay {text}\n---\nShout {text}!",
        f"%%llm --base-url {slow.base_url} --max-tokens 3000 -o story\nTell me a long story.",
    ]
    write_notebook(tmp_path / "panel.ipynb", cells)
    with JupyterLab(tmp_path, env={"OPENAI_API_KEY": KEY}) as lab, \
            Browser(lab, prefix="panel_", viewport=(1300, 1400)) as br:
        page = br.page
        br.open_notebook("panel.ipynb")
        br.run_cell(0, timeout=90)
        assert "Error" not in br.cell_output_text(0), br.cell_output_text(0)
        br.run_cell(1)
        panel = br.cell(1).locator(".nbparrot-panel")
        rates = panel.locator(".nbparrot-rates")
        rates.wait_for(timeout=30_000)
        first = wait_until(lambda: "limit 600/min" in rates.inner_text() and rates.inner_text(), timeout=30,
                           message=lambda: f"the limit learned from the endpoint is not shown: {rates.inner_text()}")
        # the first seconds: a count of what went out, against the per-minute limit, not extrapolated
        match = re.search(r"requests ([\d.]+k?) in the first (\d+) s \(limit 600/min\)", first)
        assert match, first
        shown = float(match.group(1).rstrip("k")) * (1000 if match.group(1).endswith("k") else 1)
        assert shown <= 150 * 3, first  # at most every row and its retries: never a 1.5k extrapolation
        stats = panel.locator(".nbparrot-stats").inner_text()
        elapsed = re.search(r"elapsed ([\d.]+)s", stats)
        if elapsed and float(elapsed.group(1)) < 10:
            assert "ETA" not in stats, stats  # no ETA from the first seconds
        title = panel.locator(".nbparrot-title")
        assert "/v1" not in title.inner_text() and flaky.base_url in (title.get_attribute("title") or "")
        line = title.evaluate("el => parseFloat(getComputedStyle(el).lineHeight) || 20")
        assert title.bounding_box()["height"] < 1.6 * line, "the title wraps"
        _shot(br, "01_running_light", br.cell(1))

        summary = panel.locator(".nbparrot-summary")
        seen = []  # (elapsed, ETA shown) while the run goes: an ETA only after its first 10 s
        while not summary.count() and len(seen) < 600:
            text = panel.locator(".nbparrot-stats").inner_text() if panel.locator(".nbparrot-stats").count() else ""
            found = re.search(r"elapsed ([\d.]+)s", text)
            if found:
                seen.append((float(found.group(1)), "ETA ~" in text))
                if seen[-1][1] and not any(eta for _, eta in seen[:-1]):
                    _shot(br, "01_running_eta_light", br.cell(1))
            page.wait_for_timeout(100)
        assert seen and all(elapsed >= 10 for elapsed, eta in seen if eta), seen
        br.run_cell(2, timeout=120)  # awaits the run, then a run with failing rows
        summary.wait_for(timeout=60_000)
        assert "150/150 answered" in summary.inner_text()
        retries = panel.locator(".nbparrot-retries")
        assert re.match(r"\d+ retried: \d+× ", retries.inner_text()), retries.inner_text()
        assert panel.locator(".nbparrot-failed").count() == 0, "a run where every row was answered shows no error"
        assert panel.locator(".nbparrot-preview").count() == 1
        failing = br.cell(2).locator(".nbparrot-panel")
        failing.locator(".nbparrot-summary").wait_for(timeout=60_000)
        failed = failing.locator(".nbparrot-failed")
        assert "2 failed" in failed.inner_text()

        compare = [br.cell(k).locator("table.nbparrot-compare") for k in (3, 4)]
        for k, table in zip((3, 4), compare):  # one after the other: the second is answered from the cache
            br.run_cell(k, timeout=60)
            table.wait_for(timeout=60_000)
        assert "cached" not in compare[0].inner_text()
        assert compare[1].inner_text().count("· cached") == 6 and "no cost" in compare[1].inner_text()
        for k in (3, 4):
            cell = br.cell(k)
            cell.locator(".nbparrot-panel .nbparrot-summary").wait_for(timeout=30_000)
            assert cell.locator(".nbparrot-preview").count() == 0, "the comparison repeats the panel's preview"
            assert cell.locator(".nbparrot-estimate").count() == 0, "a stray estimate line stays"

        br.run_cell(5)
        cue = br.cell(5).locator(".nbparrot-stream .nbparrot-cue")
        wait_until(lambda: "streaming…" in cue.inner_text() or None, timeout=30, message="no streaming cue")
        wait_until(lambda: re.search(r"~([1-9]\d{2,}|[5-9]\d) tokens", cue.inner_text()), timeout=60,
                   message=lambda: f"the cue never counted 50 tokens: {cue.inner_text()!r}")
        box = br.cell(5).bounding_box()  # the output grows while it streams: the shot takes room below it
        page.screenshot(path=str(_shot_path(br, "02_streaming_light")),
                        clip={**box, "height": box["height"] + 120})
        br.cell(5).locator(".nbparrot-stream button", has_text="Stop").click()
        output = br.cell(5).locator(".jp-OutputArea")
        wait_until(lambda: "stopped after" in output.inner_text() or None, timeout=30, message="Stop did nothing")
        assert br.cell(5).locator(".nbparrot-stream").count() == 0
        kept = output.inner_text().split("stopped after")[0].strip()
        assert len(kept) > 20, "the text that arrived was not kept"

        error_light, muted_light = page.evaluate(_COLOR_OF_VAR, "--jp-error-color1"), page.evaluate(
            _COLOR_OF_VAR, "--jp-ui-font-color2")
        assert _color(failed) == error_light and _color(retries) == muted_light
        _shots(br, "light")

        _set_theme(br, "JupyterLab Dark")
        error_dark = page.evaluate(_COLOR_OF_VAR, "--jp-error-color1")
        assert error_dark != error_light and _color(failed) == error_dark  # follows the theme, not #b00
        assert _color(retries) == page.evaluate(_COLOR_OF_VAR, "--jp-ui-font-color2") != muted_light
        _shots(br, "dark")
        assert br.console_errors == []
