"""Self-tests of tests/harness: real kernels, real JupyterLab, real Chromium.

They do not use nbparrot.  Kernel tests run on the current ipykernel (7.x)
and on ipykernel 6.29.5 (a cached venv under build/kernels, built on first
use).  Browser tests are marked ``browser``; they skip with a reason when
chromium/jupyterlab/playwright are missing, except under CI=true, where they
fail instead.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (  # noqa: E402
    KernelHarness,
    kernel_python,
    kernel_version_id,
    kernel_version_params,
)


@pytest.fixture
def kernel():
    with KernelHarness() as k:
        yield k


def test_execute_returns_stdout_result_and_error(kernel):
    r = kernel.execute("print('hello'); 6 * 7", check=True)
    assert r.stdout == "hello\n"
    assert r.text == "42"
    assert r.execution_count == 1
    assert r.reply_time is not None and r.idle_time is not None

    r = kernel.execute("raise ValueError('boom')")
    assert r.status == "error"
    assert (r.error.ename, r.error.evalue) == ("ValueError", "boom")
    assert "raise ValueError" in r.error.text
    assert "\x1b[" not in r.error.text  # ANSI colours stripped

    assert kernel.eval("{'a': [1, 2]}") == {"a": [1, 2]}
    assert kernel.ipykernel_version == importlib.metadata.version("ipykernel")


def test_kernel_env_and_restart(tmp_path):
    with KernelHarness(env={"NBPARROT_CACHE_DIR": str(tmp_path)}) as k:
        assert k.eval("__import__('os').environ['NBPARROT_CACHE_DIR']") == str(tmp_path)
        k.execute("x = 1; import ipywidgets; w = ipywidgets.IntSlider()", check=True)
        assert k.find_widgets("IntSlider")
        k.restart()
        assert k.widgets() == {}
        r = k.execute("x")
        assert r.error is not None and r.error.ename == "NameError"


def test_click_sets_flag_seen_by_later_cell(kernel):
    kernel.execute(
        "import ipywidgets as w\n"
        "b = w.Button(description='flag me')\n"
        "flag = {'clicked': 0}\n"
        "b.on_click(lambda _: flag.update(clicked=flag['clicked'] + 1))\n"
        "display(b)",
        check=True,
    )
    bid = kernel.wait_for_widget("Button", description="flag me")
    kernel.click(bid)
    # Same shell channel, no subshell: the click is handled before the next cell.
    assert kernel.execute("print(flag['clicked'])", check=True).stdout == "1\n"


def test_set_state_reaches_kernel_and_is_echoed(kernel):
    kernel.execute(
        "import ipywidgets as w\n"
        "t = w.Text(value='', description='txt')\n"
        "seen = []\n"
        "t.observe(lambda ch: seen.append(ch['new']), names='value')\n"
        "display(t)",
        check=True,
    )
    tid = kernel.wait_for_widget("Text", description="txt")
    kernel.set_state(tid, value="hello")
    assert kernel.execute("print(t.value, seen)", check=True).stdout == "hello ['hello']\n"
    # ipywidgets 8 confirms frontend-side changes with an echo_update.
    echoes = kernel.updates(tid, methods=("echo_update",))
    assert echoes and echoes[-1].state == {"value": "hello"}


BACKGROUND_CELL = """
import asyncio, threading
import ipywidgets as w

loop = asyncio.get_running_loop()
bar = w.IntProgress(min=0, max=1_000_000, description="bg")
stop = w.Button(description="stop")
stop_requested = asyncio.Event()
click_threads = []

def on_stop(_):
    # on JupyterLab + ipykernel 7.0-7.3 this runs on a subshell thread
    click_threads.append(threading.current_thread().name)
    loop.call_soon_threadsafe(stop_requested.set)

stop.on_click(on_stop)

async def tick():
    while not stop_requested.is_set():
        bar.value += 1
        try:
            await asyncio.wait_for(stop_requested.wait(), 0.02)
        except asyncio.TimeoutError:
            pass
    stop.description = "stopped"
    return bar.value

task = loop.create_task(tick())
display(bar, stop)
print("started")
"""


@pytest.mark.parametrize("comm_subshell", [False, True], ids=["shell", "subshell"])
@pytest.mark.parametrize("version", kernel_version_params())
def test_background_task_updates_while_idle_and_click_stops_it(version, comm_subshell):
    with KernelHarness(kernel_python(version), comm_subshell=comm_subshell) as k:
        if version is not None:
            assert k.ipykernel_version == version
        # JupyterLab >= 4.4 uses a subshell only if the kernel has them (ipykernel >= 7).
        assert (k.subshell_id is not None) == (comm_subshell and k.supports_subshells)

        mid = k.execute_nowait(BACKGROUND_CELL)
        r = k.wait(mid, timeout=30).raise_for_error()
        assert r.stdout == "started\n"
        bar = k.wait_for_widget("IntProgress", description="bg")
        assert bar in r.widget_views

        # The cell has returned (reply + idle) but the task keeps updating the bar.
        def idle_updates():
            return [u for u in k.updates_since(r.idle_time, bar) if u.while_idle]

        k.wait_for(lambda: len(idle_updates()) >= 3, timeout=20,
                   message=lambda: f"updates after idle: {len(idle_updates())}")
        # Background output keeps the parent header of the cell that started it.
        assert {u.parent_msg_id for u in idle_updates()} == {mid}
        assert k.executing == ()

        stop = k.wait_for_widget("Button", description="stop")
        k.click(stop)
        k.wait_for(lambda: k.widget(stop)["description"] == "stopped", timeout=20)
        r2 = k.execute("print(task.done(), task.result() == bar.value, click_threads)", check=True)
        assert r2.stdout.startswith("True True [")
        print(f"{kernel_version_id(version)} ({k.ipykernel_version}) comm_subshell={comm_subshell}: "
              f"on_click ran on {r2.stdout.split(' ', 2)[2].strip()}")
        # The mirror agrees with the kernel (IOPub is ordered: all updates came before idle).
        assert k.widget(bar)["value"] == k.eval("bar.value")


@pytest.mark.parametrize("version", kernel_version_params())
def test_interrupt_during_top_level_await(version):
    with KernelHarness(kernel_python(version)) as k:
        mid = k.execute_nowait(
            "import asyncio\nprint('sleeping', flush=True)\nawait asyncio.sleep(30)\nprint('woke')"
        )
        k.wait_for(lambda: "sleeping" in k.result(mid).stdout, timeout=20)
        # The SIGINT handler only schedules the cancellation; wake=True sends a
        # shell message so the kernel loop wakes before the 30 s sleep ends.
        k.interrupt(wake=True)
        r = k.wait(mid, timeout=20)
        assert r.status == "error"
        assert r.error.ename in ("CancelledError", "KeyboardInterrupt")
        assert "woke" not in r.stdout
        assert k.execute("print('still alive')", check=True).stdout == "still alive\n"


# ---------------------------------------------------------------- browser

WIDGET_CELL = """import ipywidgets as w
bar = w.IntProgress(value=3, max=10, description="progress")
button = w.Button(description="click me")
clicks = []

def on_click(b):
    clicks.append(1)
    b.description = "clicked"
    bar.value = 7

button.on_click(on_click)
display(bar, button)"""


@pytest.mark.browser
def test_browser_renders_widgets_and_click_reaches_kernel(tmp_path):
    from harness.lab import SEL_BUTTON, SEL_PROGRESS_BAR, Browser, JupyterLab, require_browser, write_notebook

    require_browser()

    write_notebook(tmp_path / "widgets.ipynb", [WIDGET_CELL, "print('clicks:', len(clicks))"])
    with JupyterLab(tmp_path) as lab, Browser(lab, prefix="harness_browser_") as br:
        server_pid = lab.proc.pid
        br.open_notebook("widgets.ipynb")
        br.screenshot("00_opened")
        br.run_cell(0)
        page = br.page
        page.locator(SEL_BUTTON, has_text="click me").wait_for()
        bar = page.locator(SEL_PROGRESS_BAR)
        assert "width: 30%" in bar.get_attribute("style")
        br.screenshot("01_widgets")

        page.locator(SEL_BUTTON).click()
        # The kernel ran on_click and pushed new state back to the page.
        page.locator(SEL_BUTTON, has_text="clicked").wait_for(timeout=20_000)
        page.wait_for_function(
            "sel => document.querySelector(sel).style.width === '70%'",
            arg=SEL_PROGRESS_BAR, timeout=20_000,
        )
        br.screenshot("02_after_click")

        br.run_cell(1)
        assert br.cell_output_text(1).strip() == "clicks: 1"
        br.screenshot("03_end")
        assert br.console_errors == []
        for shot in br.screenshots:
            assert shot.stat().st_size > 0
    assert not Path(f"/proc/{server_pid}").exists()
