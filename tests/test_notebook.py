"""Runs on a real kernel's own loop (ipykernel 7.x and 6.29.5), driven over the Jupyter protocol.

The kernel talks to the bundled server started by the test; the harness plays the frontend
(it mirrors widget state and clicks buttons with the same comm messages JupyterLab sends).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import KernelHarness, kernel_python, kernel_version_params, wait_until  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEY = "sk-kernel-test-key-0123456789"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(params=kernel_version_params())
def kernel(request, tmp_path):
    python = kernel_python(request.param)
    with KernelHarness(python=python, cwd=str(tmp_path), env={"NBPARROT_CACHE_DIR": str(tmp_path / "cache")}) as k:
        yield k


def start_run(kernel: KernelHarness, server, rows: int, name: str = "run", concurrency: int = 4, key: str = KEY):
    code = (
        "import nbparrot\n"
        f"rows_{name} = [{{'text': f'row {{i}}'}} for i in range({rows})]\n"
        f"{name} = nbparrot.map(rows_{name}, 'Say: {{text}}', base_url={server.base_url!r}, api_key={key!r}, "
        f"concurrency={concurrency}, backoff=0.05)\n"
        f"print({name}.done())"
    )
    result = kernel.execute(code, check=True)
    return result


def test_cell_returns_at_once_and_the_panel_moves_while_no_cell_runs(kernel, make_server):
    server = make_server(latency_ms=60)
    started = start_run(kernel, server, rows=120)
    assert started.stdout == "False\n", "the cell should return while the run goes on"
    bar = kernel.wait_for_widget("FloatProgress")
    # updates keep arriving after the cell's reply, while no cell is executing
    wait_until(lambda: any(u.while_idle and u.state.get("value", 0) > 0 for u in kernel.updates(bar)), timeout=30,
               message="no progress update arrived while the kernel was idle")
    result = kernel.execute("res = await run\nprint(len(res), sum(r['answer'].startswith('[') for r in res), run.status)",
                            check=True, timeout=60)
    assert result.stdout == "120 120 finished\n"
    assert kernel.widget(bar)["value"] == 1.0
    # the output: the widget view with a static fallback, replaced once the run ended by static HTML
    # alone (a saved notebook reopened under a new kernel has no widget model to show)
    shown = [d for d in started.displays if WIDGET_VIEW in d]
    assert len(shown) == 1 and "nbparrot-panel" in shown[0]["text/html"] and shown[0]["text/plain"].startswith("nbparrot run")
    final = wait_until(lambda: [c["data"] for _, c in kernel.display_updates(started)
                                if "nbparrot-final" in c["data"].get("text/html", "")], timeout=10,
                       message="the panel was not replaced by its final HTML")
    assert len(final) == 1 and WIDGET_VIEW not in final[0] and "120/120 answered" in final[0]["text/html"]
    assert "nbparrot-preview" in final[0]["text/html"] and "120/120 answered" in final[0]["text/plain"]
    # nobody sees the widgets any more: every one of them closed (the harness mirrors open comms)
    wait_until(lambda: not kernel.widgets(), timeout=10,
               message=lambda: f"the finished panel's widgets stay open: {kernel._widget_summary()}")
    again = kernel.execute("run", check=True)  # shown again once finished: static only
    assert again.displays and all(WIDGET_VIEW not in d and "nbparrot-final" in d["text/html"] for d in again.displays)


def test_cancel_click_stops_the_run_and_keeps_finished_rows(kernel, make_server):
    server = make_server(latency_ms=100)
    start_run(kernel, server, rows=400)
    bar = kernel.wait_for_widget("FloatProgress")
    wait_until(lambda: kernel.widget(bar).get("value", 0) > 0.02, timeout=30, message="the run made no progress")
    kernel.click(kernel.wait_for_widget("Button", description="Cancel"))
    check = (
        "import asyncio, json\n"
        "await asyncio.wait({run._task})\n"
        "pending = [t for t in asyncio.all_tasks() if 'nbparrot' in repr(t.get_coro())]\n"
        "statuses = [o.status for o in run.outcomes]\n"
        "print(json.dumps({'status': run.status, 'done': run.progress.done, 'ok': statuses.count('ok'),"
        " 'cancelled': statuses.count('cancelled'), 'pending': len(pending), 'inner': len(run.engine._tasks),"
        " 'requests': run.progress.requests, 'answered': sum(v is not None for v in (r['answer'] for r in run.partial()))}))"
    )
    report = json.loads(kernel.execute(check, check=True, timeout=30).stdout)
    assert report["status"] == "cancelled"
    assert report["pending"] == 0 and report["inner"] == 0
    assert 0 < report["done"] < 400 and report["ok"] == report["done"] == report["answered"]
    assert report["ok"] + report["cancelled"] == 400
    # every request the server saw was sent, and accounted for, by this run
    assert server.stats()["requests"] == report["requests"]


def test_interrupt_during_await_cancels_and_keeps_finished_rows(kernel, make_server):
    server = make_server(latency_ms=100)
    start_run(kernel, server, rows=400)
    msg_id = kernel.execute_nowait("result = await run")
    wait_until(lambda: sum(server.stats()["answered"].values()) >= 10, timeout=30, message="no answers arrived")
    kernel.interrupt()
    cell = kernel.wait(msg_id, timeout=30)
    assert cell.error is not None and cell.error.ename == "RunCancelledError", cell.error
    assert "rows answered" in cell.error.evalue and "run.partial()" in cell.error.evalue
    state = json.loads(kernel.execute(
        "import json; print(json.dumps([run.status, run.progress.done, run.progress.cancelled,"
        " sum(r['answer'] is not None for r in run.partial())]))", check=True).stdout)
    status, done, cancelled, answered = state
    assert status == "cancelled" and done >= 1 and done + cancelled == 400 and answered == done


def test_two_runs_at_once_cancel_one_and_the_other_finishes(kernel, make_server):
    server = make_server(latency_ms=50)
    start_run(kernel, server, rows=300, name="slow")
    start_run(kernel, server, rows=40, name="quick")
    slow_button = kernel.eval("slow.view.cancel_button.model_id")
    kernel.click(slow_button)
    report = kernel.execute(
        "quick_res = await quick\nimport asyncio\nawait asyncio.wait({slow._task})\n"
        "print(slow.status, quick.status, sum(r['answer'] is not None for r in quick_res))",
        check=True, timeout=60)
    assert report.stdout == "cancelled finished 40\n"


def test_a_failing_run_shows_its_error_in_the_panel_and_on_await(kernel, make_server):
    server = make_server(api_key="sk-the-right-one-000000")
    started = start_run(kernel, server, rows=50)
    result = kernel.execute("await run", timeout=30)
    assert result.error is not None and result.error.ename == "AuthenticationError"
    assert KEY not in result.error.text
    shown = wait_until(lambda: [c["data"]["text/html"] for _, c in kernel.display_updates(started)
                                if "nbparrot-final" in c["data"].get("text/html", "")], timeout=10,
                       message="the panel was not replaced by its final HTML")
    assert "stopped:" in shown[-1] and "401" in shown[-1], "the panel does not show the error"
    assert all(KEY not in json.dumps(s) for s in kernel.widgets().values()) and KEY not in json.dumps(shown)
    assert server.stats()["requests"] == 1


def test_a_finished_panel_lets_go_of_its_widgets_and_its_run(kernel, make_server):
    """Once the static HTML replaced it, the panel closes every widget (comms, ipywidgets' registry,
    the Cancel handler holding the run): nothing keeps the finished run and its outcomes alive."""
    server = make_server()
    start_run(kernel, server, rows=20)
    kernel.wait_for_widget("Button", description="Cancel")
    report = kernel.execute(
        "import asyncio, gc, weakref\nfrom ipywidgets.widgets.widget import _instances\n"
        "await asyncio.wait({run._task})\ngone = weakref.ref(run)\ndel run\ngc.collect()\n"
        "print(len(_instances), gone() is None)", check=True, timeout=60)
    assert report.stdout == "0 True\n"
    wait_until(lambda: not kernel.widgets(), timeout=10,
               message=lambda: f"widgets left open: {kernel._widget_summary()}")


def test_result_before_the_end_says_to_await_and_column_assignment_is_refused(kernel, make_server):
    server = make_server(latency_ms=100)
    start_run(kernel, server, rows=200)
    result = kernel.execute("run.result()")
    assert result.error.ename == "RunNotFinishedError" and "await" in result.error.evalue
    result = kernel.execute("import pandas as pd\ndf = pd.DataFrame(rows_run)\ndf['answer'] = run")
    assert result.error.ename == "RunNotFinishedError"
    kernel.execute("run.cancel()", check=True)


@pytest.mark.parametrize("name", ["quickstart", "extraction", "prompt_iteration", "operators"])
def test_example_notebooks_pass_run_all(kernel, name):
    """Every cell queued at once, as Run All does: cells after the background run and the await all answer."""
    import nbformat

    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    cells = [c.source for c in notebook.cells if c.cell_type == "code"]
    ids = [kernel.execute_nowait(source) for source in cells]
    deadline = time.monotonic() + 120
    for source, msg_id in zip(cells, ids):
        result = kernel.wait(msg_id, timeout=max(1.0, deadline - time.monotonic()))
        assert result.status == "ok", (source, result.error and result.error.text)
    if name == "quickstart":
        assert kernel.eval("int(df['sentiment'].notna().sum())") == 200
    elif name == "prompt_iteration":
        assert kernel.eval("[int(reviews['sentiment'].notna().sum()), trial.status, compared.status]") == \
            [300, "finished", "finished"]
    elif name == "extraction":
        assert kernel.eval("[int(contacts['seniority'].notna().sum()), len(qa) > 4, sorted(set(qa['title']))]") == \
            [3, True, ["Bees", "Owls"]]
    else:
        assert kernel.eval("[list(refunds.index), str(tickets.loc[111, 'topic']), list(hits['title'])[0], "
                           "len(suggested) > 0, budget_run.status, int(tickets['priority'].notna().sum())]") == \
            [[101, 103, 106, 109, 112, 116], "account", "Refunds", True, "stopped", 15]


def test_confirm_over_asks_in_the_panel_before_any_request(kernel, make_server):
    server = make_server()
    code = (
        "import nbparrot\n"
        "rows = [{'text': 'x' * 2000} for _ in range(100)]\n"
        f"costly = nbparrot.map(rows, 'Say {{text}}', base_url={server.base_url!r}, api_key={KEY!r}, confirm_over=0.001)\n"
        f"dropped = nbparrot.map(rows[:10], 'Drop {{text}}', base_url={server.base_url!r}, api_key={KEY!r}, confirm_over=0.0001)\n"
        "print(costly.status, dropped.status)"
    )
    # map() returns before planning: the question comes once the estimate is known, before any request
    assert kernel.execute(code, check=True).stdout in ("preparing preparing\n", "waiting preparing\n",
                                                       "waiting waiting\n")
    wait_until(lambda: kernel.eval("[costly.status, dropped.status]") == ["waiting", "waiting"], timeout=30,
               message="the runs never asked")
    assert server.stats()["requests"] == 0
    go = kernel.eval("costly.view.question.children[1].model_id")
    no = kernel.eval("dropped.view.question.children[2].model_id")
    kernel.click(no)
    kernel.click(go)
    report = kernel.execute("await costly\nimport asyncio\nawait asyncio.wait({dropped._task})\n"
                            "print(costly.status, costly.progress.done, dropped.status, dropped.progress.cancelled)",
                            check=True, timeout=60)
    assert report.stdout == "finished 100 cancelled 10\n"
    assert server.stats()["requests"] == 100
    # cancelled while the question is still up: every row says so, none is left pending
    kernel.execute(f"asked = nbparrot.map(rows[:7], 'Ask {{text}}', base_url={server.base_url!r}, api_key={KEY!r}, "
                   "confirm_over=0.0001)\nasked.cancel()", check=True)
    out = kernel.execute("await asyncio.wait({asked._task})\n"
                         "print(asked.status, [o.status for o in asked.outcomes].count('cancelled'))", check=True)
    assert out.stdout == "cancelled 7\n" and server.stats()["requests"] == 100
