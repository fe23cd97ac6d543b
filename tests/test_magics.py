"""``%%llm`` / ``%llm`` in a real kernel: streaming after the cell returned, -o, --over, compare, status."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import KernelHarness, kernel_python, kernel_version_params, wait_until  # noqa: E402

from nbparrot.server import expected_tag  # noqa: E402

KEY = "sk-magic-test-key-0123456789"


@pytest.fixture(params=kernel_version_params())
def kernel(request, tmp_path, make_server):
    server = make_server(latency_ms=30, per_token_ms=15, completion_tokens=40)
    python = kernel_python(request.param)
    env = {"NBPARROT_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": KEY}
    with KernelHarness(python=python, cwd=str(tmp_path), env=env) as k:
        k.execute(f"%load_ext nbparrot\n%config NbparrotMagics.base_url = {server.base_url!r}", check=True)
        k.server = server
        yield k


def display_updates(kernel: KernelHarness, cell) -> list[tuple[float, dict]]:
    """Updates of the displays a cell created, matched by display_id (``KernelHarness.display_updates``)."""
    return kernel.display_updates(cell)


def comparison_table(kernel: KernelHarness, cell) -> str:
    """The comparison table a ``---`` cell shows once its run ends (waited for, bounded)."""
    def table():
        for _, content in display_updates(kernel, cell):
            html = content["data"].get("text/html", "")
            if "nbparrot-compare" in html:
                return html
        return None

    return wait_until(table, timeout=30, message="no comparison table")


def cost_row(kernel: KernelHarness, model: str = "gpt-4o-mini") -> tuple[int, int, int, str]:
    """``%llm cost``'s row for ``model``: requests, prompt tokens, completion tokens, cost."""
    table = kernel.execute("%llm cost", check=True).execute_result["text/html"]
    found = re.search(rf"<tr><td>{re.escape(model)}</td><td>([\d,]+)</td><td>([\d,]+)</td><td>([\d,]+)</td>"
                      r"<td>[\d,]+</td><td>([^<]*)</td>", table)
    assert found, table
    return (*(int(found.group(k).replace(",", "")) for k in (1, 2, 3)), found.group(4))


def final_markdown(kernel: KernelHarness, cell, needle: str) -> str:
    """The last Markdown a stream cell shows once it holds ``needle`` (waited for, bounded)."""
    def shown():
        texts = [c["data"].get("text/markdown", "") for _, c in display_updates(kernel, cell)]
        return next((t for t in reversed(texts) if needle in t), None)

    return kernel.wait_for(shown, timeout=30, message=f"no output with {needle!r}")


def test_one_prompt_streams_into_the_output_after_the_cell_returned(kernel):
    cell = kernel.execute("topic = 'owls'\n", check=True)
    cell = kernel.execute("%%llm -o answer\nTell me about {topic}.", check=True)
    wait_until(lambda: kernel.eval("'answer' in globals()"), timeout=30, message="-o was never bound")
    answer = kernel.eval("answer")
    assert answer.startswith(f"[{expected_tag([{'role': 'user', 'content': 'Tell me about owls.'}])}]")
    updates = display_updates(kernel, cell)
    assert len([t for t, _ in updates if t > cell.reply_time]) >= 2, "the answer should arrive in pieces, after the reply"
    final = updates[-1][1]["data"]["text/markdown"]
    assert final.startswith(answer) and "tokens" in final


def test_a_stream_shows_it_is_going_and_stop_keeps_what_arrived(kernel, make_server):
    slow = make_server(latency_ms=20, per_token_ms=10, completion_tokens=3000)  # ~30 s unless stopped
    cell = kernel.execute(f"%%llm --base-url {slow.base_url} --max-tokens 3000 -o story\nTell me a long story.",
                          check=True)

    def cue():
        values = [w.get("value", "") for w in kernel.find_widgets("HTML").values()]
        return next((v for v in values if "nbparrot-cue" in v and "streaming…" in v and "~0 tokens" not in v), None)

    assert "tokens" in kernel.wait_for(cue, timeout=30, message="no 'streaming…' cue")
    kernel.click(kernel.wait_for_widget("Button", description="Stop"))
    kernel.wait_for(lambda: kernel.eval("'story' in globals()"), timeout=30, message="Stop did not end the stream")
    story = kernel.eval("story")
    final = [c["data"] for _, c in display_updates(kernel, cell)]
    answer = next(d["text/markdown"] for d in reversed(final) if "text/markdown" in d)
    assert "stopped after" in answer and answer.startswith(story) and 0 < len(story) < 3000 * 3
    assert final[-1].get("text/html") == "" or any(d.get("text/html") == "" for d in final), "the controls stay"
    assert slow.stats()["streams"] == 1
    requests, prompt, completion, _ = cost_row(kernel)  # the stopped answer was paid for as far as it came
    assert requests == 1 and prompt > 0 and 0 < completion < 3000
    kernel.wait_for(lambda: not kernel.find_widgets("Button", description="Stop"), timeout=10,
                    message="the stopped stream's Stop button is left open")
    kernel.execute(f"%%llm --base-url {slow.base_url} --max-tokens 3000 -o again\nTell me a long story.", check=True)
    kernel.wait_for(lambda: slow.stats()["streams"] == 2, timeout=30,  # a stopped answer is not cached
                    message="the same prompt was answered without a request")
    kernel.click(kernel.wait_for_widget("Button", description="Stop"))


def test_a_malformed_stream_says_so_and_takes_its_controls_away(kernel):
    """A ``data:`` line that is not JSON mid-answer (``<<bad-sse>>``): the text that came stays with
    the error under it, Stop and the still-going cue go, and the tokens that came are counted."""
    cell = kernel.execute("%%llm -o broken\nTell me a story <<bad-sse>>", check=True)
    shown = final_markdown(kernel, cell, "nbparrot error")
    assert "malformed stream event" in shown and shown.startswith("[")  # the answer so far, then the error
    kernel.wait_for(lambda: not kernel.widgets(), timeout=10,
                    message=lambda: f"the broken stream left widgets open: {kernel._widget_summary()}")
    assert kernel.eval("'broken' in globals()") is False
    requests, prompt, completion, _ = cost_row(kernel)
    assert requests == 1 and prompt > 0 and completion > 0


def test_cached_prompt_tokens_are_priced_as_such(kernel):
    """The server's prompt cache answers a repeated 1,024+ token prompt: the stream's usage says so
    (``prompt_tokens_details.cached_tokens``) and the second answer costs less."""
    kernel.execute("long = ' '.join(f'word{i}' for i in range(1200))", check=True)
    notes = []
    for name in ("first", "second"):
        cell = kernel.execute(f"%%llm --no-cache -o {name}\nSummarize: {{long}}", check=True)
        notes.append(re.search(r"tokens · \$([\d.]+)", final_markdown(kernel, cell, "tokens · $")).group(1))
    assert kernel.server.stats()["cached_tokens"] > 0
    assert float(notes[1]) < float(notes[0]), notes


def test_the_ipython_terminal_prints_the_answer_once(make_server, tmp_path):
    """No kernel, no display to redraw: the terminal would print the whole answer again on every
    update, so it gets the final text only."""
    import os
    import subprocess

    server = make_server(per_token_ms=15, completion_tokens=60)  # ~1 s of streaming: several updates
    code = ("get_ipython().run_line_magic('load_ext', 'nbparrot')\n"
            f"get_ipython().run_cell_magic('llm', '--base-url {server.base_url} -o answer', 'Tell me about owls.')\n"
            "print('bound:', answer[:20])")
    env = {**os.environ, "OPENAI_API_KEY": KEY, "NBPARROT_CACHE_DIR": str(tmp_path / "cache"),
           "IPYTHONDIR": str(tmp_path / "ipython")}
    out = subprocess.run([sys.executable, "-m", "IPython", "--no-banner", "--colors=NoColor", "-c", code],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    tag = expected_tag([{"role": "user", "content": "Tell me about owls."}])
    assert out.stdout.count(f"[{tag}]") == 2, out.stdout  # the answer once, and the bound variable's print
    assert "tokens" in out.stdout


def test_a_stream_without_usage_counts_its_estimate(kernel, make_server):
    """An endpoint that sends no usage in its stream: the tokens are our estimate, said so, never zero."""
    bare = make_server(usage=False)
    cell = kernel.execute(f"%%llm --base-url {bare.base_url}\nHello there.", check=True)
    assert "(estimated: the endpoint sent no usage)" in final_markdown(kernel, cell, "tokens")
    requests, prompt, completion, _ = cost_row(kernel)
    assert requests == 1 and prompt > 0 and completion > 0


def test_json_output_and_the_cache(kernel):
    kernel.execute("thing = 'a kettle'", check=True)
    kernel.execute("%%llm --json -o data\nDescribe {thing} as JSON.", check=True)
    wait_until(lambda: kernel.eval("'data' in globals()"), timeout=30, message="-o was never bound")
    assert sorted(kernel.eval("data")) == ["choice", "echo", "tag", "text"]
    requests = kernel.server.stats()["requests"]
    kernel.execute("%%llm --json -o again\nDescribe {thing} as JSON.", check=True)
    assert kernel.eval("again == data") and kernel.server.stats()["requests"] == requests  # answered from the cache


def test_mistakes_give_a_short_message_and_send_nothing(kernel):
    cases = {
        "%%llm\nHello {nobody_defined_this}": "nobody_defined_this",
        "%%llm --temperature hot\nHi": "temperature",
        "%%llm --over no_such_df -o r\nSay {text}": "no_such_df",
        "x = 3\n": None,
        "%%llm --over x -o r\nSay {text}": "not a DataFrame",
        "%%llm\n\n": "the cell is empty",
        "%llm frobnicate": "unknown command",
        "%llm cancel 999": "no running run 999",
    }
    for code, needle in cases.items():
        result = kernel.execute(code)
        if needle is None:
            continue
        assert result.error is not None and result.error.ename == "UsageError", (code, result.error)
        assert needle in result.error.evalue and "Traceback" not in result.error.text, code
    assert kernel.server.stats()["requests"] == 0


def test_over_a_dataframe_binds_a_run_at_once(kernel):
    kernel.execute("import pandas as pd\ndf = pd.DataFrame({'text': [f'row {i}' for i in range(40)]})", check=True)
    result = kernel.execute("%%llm --over df --sample 5 -o run\nSay {text}", check=True)
    assert kernel.eval("type(run).__name__") == "Run"
    assert kernel.find_widgets("FloatProgress")
    out = kernel.execute("res = await run\nprint(len(res), res.notna().sum(), list(res.index) == sorted(res.index))",
                         check=True, timeout=60)
    assert out.stdout == "5 5 True\n" and result.status == "ok"


def test_compare_variants_side_by_side(kernel):
    kernel.execute("import pandas as pd\ndf = pd.DataFrame({'text': ['a', 'b', 'c', 'd']})", check=True)
    cell = kernel.execute("%%llm --over df --sample 3 -o cmp\nSay {text}\n---\nShout {text}!", check=True)
    html = comparison_table(kernel, cell)
    assert "variant 1" in html and "variant 2" in html and "mean latency" in html and "tokens" in html
    assert html.count("<tr") == 3 + 3  # header, prompts, usage, and one row per sampled row
    assert html.count("#0] Say ") == 3 and html.count("#0] Shout ") == 3  # one answer per row and variant


def test_filter_and_classify_variants_side_by_side(kernel):
    kernel.execute("import pandas as pd\ndf = pd.DataFrame({'text': ['a <<yes>>', 'b <<no>>', 'c <<yes>>']})",
                   check=True)
    cell = kernel.execute("%%llm --over df --filter -o kept\n{text}\n---\nIs this true? {text}", check=True)
    html = comparison_table(kernel, cell)
    assert html.count(">true</td>") == 4 and html.count(">false</td>") == 2  # the decisions, not JSON
    frame = kernel.execute("res = await kept\nprint(res.shape, res.dtypes.unique().tolist())", check=True, timeout=30)
    assert frame.stdout == "(3, 2) [BooleanDtype]\n"
    kernel.execute("%%llm --over df --classify yes,no -o labels\n{text}", check=True)
    labels = kernel.execute("res = await labels\nprint(res.tolist(), list(res.cat.categories))", check=True, timeout=30)
    assert labels.stdout == "['yes', 'no', 'yes'] ['yes', 'no']\n"


def test_status_cancel_cost_models_and_cache(kernel):
    kernel.server  # noqa: B018 - the fixture's server answers these
    kernel.execute("import pandas as pd\nbig = pd.DataFrame({'text': [f'row {i}' for i in range(2000)]})\n"
                   "%config NbparrotMagics.concurrency = 2", check=True)
    kernel.execute("%%llm --over big -o slow\nSay {text}", check=True)
    status = kernel.execute("%llm status", check=True).execute_result["text/html"]
    assert "nbparrot-status" in status and ("<td>running</td>" in status or "<td>preparing</td>" in status)
    assert kernel.execute("%llm cancel all", check=True).text == "'cancelled 1 run(s)'"
    kernel.execute("import asyncio\nawait asyncio.wait({slow._task})", check=True)
    assert kernel.eval("slow.status") == "cancelled"
    cost = kernel.execute("%llm cost", check=True).execute_result["text/html"]
    assert "gpt-4o-mini" in cost and "$" in cost
    assert "gpt-4o-mini" in kernel.execute("%llm models", check=True).text
    info = kernel.execute("%llm cache info", check=True).text
    assert "entries" in info and KEY not in info
    assert "removed" in kernel.execute("%llm cache clear", check=True).text
    kernel.execute("%config NbparrotMagics.model = 'gpt-4.1-mini'", check=True)
    assert kernel.eval("__import__('nbparrot').defaults.model") == "gpt-4.1-mini"


def test_import_registers_the_magics_in_a_kernel(tmp_path):
    with KernelHarness(cwd=str(tmp_path), env={"NBPARROT_CACHE_DIR": str(tmp_path)}) as k:
        assert k.execute("%llm status").error is not None  # not loaded yet
        k.execute("import nbparrot", check=True)
        assert "no runs" in k.execute("%llm status", check=True).execute_result["text/html"]
        assert "Cell form" in k.execute("%llm?").text or k.execute("print(nbparrot.magics.NbparrotMagics.llm.__doc__)").stdout


def test_batch_flag_sends_through_the_batch_api(kernel):
    kernel.execute("import pandas as pd\ndf = pd.DataFrame({'text': [f'row {i}' for i in range(12)]})", check=True)
    assert kernel.execute("%%llm --batch\nSay hi").error.ename == "UsageError"
    kernel.execute("%%llm --over df --batch -o b\nSay {text}", check=True)
    out = kernel.execute("res = await b\nprint(b.engine.batch, int(res.notna().sum()))", check=True, timeout=60)
    assert out.stdout == "True 12\n" and kernel.server.stats()["batches_created"] == 1
