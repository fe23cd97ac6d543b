"""Notebooks that last: executed headlessly (nbconvert, papermill) a notebook saves the final
state of every run, ``%%llm`` stream and comparison, with no widget view a new kernel could not
render; the example notebooks are committed with those outputs, and re-executing them (with
scripts/execute_notebooks.py, nbconvert's executor) gives the same answers and counts.

The checks read the saved files only: answers, counts and tables, never timings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import KernelHarness, kernel_python, kernel_version_params  # noqa: E402

from nbparrot.server import expected_tag  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NAMES = ["quickstart", "extraction", "prompt_iteration", "operators"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
KEY = "sk-headless-test-key-0123456789"


# ---- reading a saved notebook -----------------------------------------------------------------

def code_cell(nb, needle: str):
    """The one code cell whose source contains ``needle``."""
    cells = [c for c in nb.cells if c.cell_type == "code" and needle in c.source]
    assert len(cells) == 1, f"{len(cells)} cells contain {needle!r}"
    return cells[0]


def html(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.outputs)


def text(cell) -> str:
    """Stream text, markdown and plain text of a cell's outputs."""
    parts = []
    for o in cell.outputs:
        if o.output_type == "stream":
            parts.append(o.text)
        else:
            data = o.get("data", {})
            parts.append(data.get("text/markdown", "") + data.get("text/plain", ""))
    return "\n".join(parts)


def panel(cell) -> str:
    """The final static HTML of the one run a cell started."""
    finals = [o["data"]["text/html"] for o in cell.outputs
              if "nbparrot-final" in o.get("data", {}).get("text/html", "")]
    assert len(finals) == 1, f"{len(finals)} final panels in:\n{cell.source}"
    return finals[0]


def summary(cell) -> str:
    match = re.search(r"<span class='nbparrot-summary'[^>]*>(.*?)</span>", panel(cell))
    assert match, panel(cell)
    return match.group(1)


def preview_rows(cell) -> int:
    match = re.search(r"<table class='nbparrot-preview'.*?</table>", panel(cell), re.S)
    assert match, panel(cell)
    return len(re.findall(r"<tr[ >]", match.group(0))) - 1  # the header row


def check_lasting(nb) -> None:
    """Every output readable without a kernel: no widget view, a text/plain beside every rich
    output, no run left showing anything but its final state, no error."""
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        for o in cell.outputs:
            assert o.output_type != "error", (cell.source, o.get("ename"), o.get("evalue"))
            if o.output_type in ("display_data", "execute_result"):
                assert WIDGET_VIEW not in o.data, cell.source
                assert "text/plain" in o.data, cell.source
                shown = o.data.get("text/html", "")
                assert "nbparrot-panel" not in shown or "nbparrot-final" in shown, cell.source
                assert "comparing variants" not in shown and "waiting for the answer" not in text(cell), cell.source
    assert "widgets" not in nb.metadata, "no widget state is needed (nor saved) for a finished run"


def check_quickstart(nb) -> None:
    start = code_cell(nb, "run = nbparrot.map(df")
    assert summary(start).startswith("run 1 finished: 200/200 answered") and preview_rows(start) == 5
    counts = text(code_cell(nb, "run.counts()"))
    assert "'done': 200" in counts and "'queued': 0" in counts
    head = code_cell(nb, 'df["sentiment"] = await run')
    assert "sentiment" in html(head) and html(head).count("<tr>") == 6  # the header and df.head()'s 5 rows


def check_prompt_iteration(nb) -> None:
    stream = text(code_cell(nb, "%%llm -o tagline"))
    tag = expected_tag([{"role": "user", "content": "Write a one-line tagline for a kettle."}])
    assert stream.startswith(f"[{tag}] Write a one-line tagline for a kettle.") and "tokens" in stream
    trial = code_cell(nb, "-o trial")
    assert summary(trial).startswith("run 1 finished: 5/5 answered") and preview_rows(trial) == 5
    compared = code_cell(nb, "-o compared")
    assert summary(compared).startswith("run 2 finished: 10/10 answered")
    table = re.search(r"<table class='nbparrot-compare'[^>]*>.*?</table>", html(compared), re.S)
    assert table, html(compared)
    table = table.group(0)
    assert "variant 1" in table and "variant 2" in table and "mean latency" in table
    assert len(re.findall(r"<tr[ >]", table)) == 3 + 5  # header, prompts, usage, and the 5 sampled rows
    assert table.count("#0] Classify the sentiment") == 5 and table.count("#0] Answer with one word") == 5
    full = code_cell(nb, "-o full")
    assert summary(full).startswith("run 3 finished: 300/300 answered") and preview_rows(full) == 5
    head = code_cell(nb, 'reviews["sentiment"] = await full')
    assert "sentiment" in html(head) and html(head).count("#0] Answer with one word") == 5
    # requests: the stream's 1, the trial's 5, the comparison's 5 new ones (its first variant is the
    # trial's, cached), the full run's 295 new ones (5 were the comparison's second variant)
    assert "<td>306</td>" in html(code_cell(nb, "%llm cost"))


def check_extraction(nb) -> None:
    assert summary(code_cell(nb, "class Contact")).startswith("run 1 finished: 3/3 answered")
    contacts = html(code_cell(nb, "contacts = await run"))
    assert all(name in contacts for name in ("m-101", "m-102", "m-103", "seniority"))
    qa = code_cell(nb, "class QA")
    assert summary(qa).startswith("run 2 finished: 2/2 answered")
    assert "Owls" in html(qa) and "Bees" in html(qa) and "question" in html(qa)
    both = code_cell(nb, "Explain to a child")
    assert summary(both).startswith("run 3 finished: 4/4 answered") and "template" in html(both)


def check_operators(nb) -> None:
    refunds = code_cell(nb, "refund_run = tickets.llm.filter")
    assert summary(refunds).startswith("run 1 finished: 14/16 answered, 1 failed, 1 skipped")
    assert all(f">{t}<" in html(refunds) for t in (101, 103, 106, 109, 112, 116))
    assert "'requests': 3" in text(code_cell(nb, "mask=True"))
    assert "[billing, bug]" in text(code_cell(nb, "multi=True"))
    assert "'requests': 0" in text(code_cell(nb, "sim_join"))
    budget = code_cell(nb, "max_cost=0.01")
    assert " stopped: " in summary(budget) and "stopped at the budget" in text(budget)
    rerun = code_cell(nb, "max_cost=0.05")
    assert summary(rerun).startswith("run 11 finished: 15/16 answered") and "priority" in html(rerun)


CHECKS = {"quickstart": check_quickstart, "extraction": check_extraction,
          "prompt_iteration": check_prompt_iteration, "operators": check_operators}


# ---- the tests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_hold_their_final_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    check_lasting(notebook)
    CHECKS[name](notebook)


@pytest.mark.timeout(600)
def test_the_script_re_executes_every_example_notebook_with_lasting_outputs(tmp_path):
    """nbconvert's executor (nbclient), as scripts/execute_notebooks.py runs it for the commit."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "execute_notebooks.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=540, env=_env())
    assert result.returncode == 0, result.stderr[-3000:]
    for name in NAMES:
        notebook = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
        check_lasting(notebook)
        CHECKS[name](notebook)
        assert not any("execution" in c.metadata for c in notebook.cells), "no timing metadata is recorded"


def test_papermill_saves_the_final_stream_runs_and_comparison(tmp_path):
    """papermill: the stream, a run nobody awaits, the comparison and the awaited run, all final."""
    out = tmp_path / "out.ipynb"
    result = subprocess.run([sys.executable, "-m", "papermill", "--cwd", str(NOTEBOOKS),
                             str(NOTEBOOKS / "prompt_iteration.ipynb"), str(out)],
                            capture_output=True, text=True, timeout=300, env=_env(cache=tmp_path / "cache"))
    assert result.returncode == 0, result.stderr[-3000:]
    notebook = nbformat.read(out, as_version=4)
    check_lasting(notebook)
    check_prompt_iteration(notebook)


@pytest.mark.parametrize("version", kernel_version_params())
def test_the_client_decides_where_a_run_goes_and_configure_overrides_it(make_server, tmp_path, version):
    """A client that cannot answer input() (allow_stdin false: nbclient) gets the run finished in
    its cell, shown as static HTML under that cell (ipykernel 7 and 6 give output from other
    threads different parents); ``configure(background=...)`` overrides either way."""
    server = make_server()
    start = (f"run = nbparrot.map([{{'t': 'a'}}, {{'t': 'b'}}], 'Say {{t}}', base_url={server.base_url!r}, "
             f"api_key={KEY!r})\nprint(run.done())")
    with KernelHarness(kernel_python(version), cwd=str(tmp_path), env={"NBPARROT_CACHE_DIR": str(tmp_path / "cache")},
                       allow_stdin=False) as kernel:
        kernel.execute("import nbparrot", check=True)
        cell = kernel.execute(start, check=True)
        assert cell.stdout == "True\n" and not cell.widget_views and not kernel.find_widgets()
        finals = [d["text/html"] for d in cell.displays + cell.display_updates
                  if "nbparrot-final" in d.get("text/html", "")]
        assert finals and "2/2 answered" in finals[-1]
        kernel.execute("nbparrot.configure(background=True)", check=True)
        assert kernel.execute(start, check=True).stdout == "False\n"
        kernel.execute("nbparrot.configure(background=False)\nawait run", check=True)
        assert kernel.wait(kernel.execute_nowait(start, allow_stdin=True)).stdout == "True\n"
        kernel.execute("nbparrot.configure(background='auto')", check=True)
        assert kernel.wait(kernel.execute_nowait(start, allow_stdin=True)).stdout == "False\n"
        wrong = kernel.execute("nbparrot.configure(background='sometimes')\n" + start)
        assert wrong.error is not None and wrong.error.ename == "ConfigError" and "background" in wrong.error.evalue


def test_a_cell_ending_in_its_run_saves_it_once_and_a_hidden_preview_stays_hidden(make_server, tmp_path, monkeypatch):
    """nbclient runs a cell that starts a run and names it last (``run``, ``df.llm.map(...)``): the
    saved cell holds one final panel, not two; a comparison's run shown again keeps to its summary."""
    from nbclient import NotebookClient

    server = make_server()
    monkeypatch.setenv("NBPARROT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    options = f"base_url={server.base_url!r}"
    sources = ["import nbparrot, pandas as pd\ndf = pd.DataFrame({'t': ['a', 'b', 'c']})",
               f"run = nbparrot.map(df, 'Say {{t}}', {options})\nrun",
               f"df.llm.map('Shout {{t}}', {options})",
               "run",
               f"nbparrot.configure({options})",
               "%%llm --over df -o cmp\nSay {t}\n---\nWhisper {t}",
               "cmp"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources])
    NotebookClient(nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    check_lasting(nb)
    for k in (1, 2, 3):  # panel() asserts there is exactly one final panel in the cell
        assert summary(nb.cells[k]).startswith(f"run {1 if k != 2 else 2} finished: 3/3 answered"), k
    assert preview_rows(nb.cells[3]) == 3
    assert "nbparrot-compare" in html(nb.cells[5]) and "nbparrot-preview" not in panel(nb.cells[5])
    assert summary(nb.cells[6]).startswith("run 3 finished: 6/6 answered")
    assert "nbparrot-preview" not in panel(nb.cells[6]), "the comparison's run shown again brings its preview back"


def _env(cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    if cache is not None:
        env["NBPARROT_CACHE_DIR"] = str(cache)
    return env


@pytest.mark.parametrize("awaiting", [False, True], ids=["plain-cell", "cell-with-await"])
@pytest.mark.parametrize("version", kernel_version_params())
def test_interrupting_a_run_that_finishes_in_its_cell_cancels_it_and_keeps_finished_rows(make_server, tmp_path,
                                                                                          version, awaiting):
    """nbclient's timeout interrupts the kernel, as the stop button does: the run stops, keeps the
    rows answered, and the cell still saves its final state; also in a cell with a top-level
    await, where ipykernel 7's own handler would only cancel the cell's task."""
    server = make_server(latency_ms=100)
    start = (("import asyncio\nawait asyncio.sleep(0)\n" if awaiting else "") +
             f"import nbparrot\nrun = nbparrot.map([{{'t': str(i)}} for i in range(400)], 'Say {{t}}', "
             f"base_url={server.base_url!r}, api_key={KEY!r}, concurrency=4)")
    with KernelHarness(kernel_python(version), cwd=str(tmp_path), env={"NBPARROT_CACHE_DIR": str(tmp_path / "cache")},
                       allow_stdin=False) as kernel:
        msg_id = kernel.execute_nowait(start)
        kernel.wait_for(lambda: sum(server.stats()["answered"].values()) >= 10, timeout=30, message="no answers")
        kernel.interrupt()
        cell = kernel.wait(msg_id, timeout=30)
        assert cell.status == "ok", cell.error and cell.error.text
        status, done, cancelled = kernel.eval("[run.status, run.progress.done, run.progress.cancelled]")
        assert status == "cancelled" and 1 <= done < 400 and done + cancelled == 400
        final = [d["text/html"] for d in cell.display_updates if "nbparrot-final" in d.get("text/html", "")]
        assert final and f"{done}/400 answered" in final[-1] and "cancelled" in final[-1]
