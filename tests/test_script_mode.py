"""Outside a running loop (a script) ``map`` runs to completion; Ctrl-C cancels and keeps rows."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

import nbparrot

SCRIPT = textwrap.dedent("""
    import json, sys
    import nbparrot
    rows = [{"text": f"row {i}"} for i in range(300)]
    run = nbparrot.map(rows, "Say: {text}", base_url=sys.argv[1], api_key="sk-script", concurrency=4)
    out = run.partial()
    print(json.dumps({"status": run.status, "done": run.progress.done, "cancelled": run.progress.cancelled,
                      "answered": sum(r["answer"] is not None for r in out), "pending": [o.status for o in run.outcomes].count("pending")}))
""")


def test_script_runs_to_completion(make_server, tmp_path):
    server = make_server(latency_ms=1)
    script = tmp_path / "batch.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), server.base_url], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report == {"status": "finished", "done": 300, "cancelled": 0, "answered": 300, "pending": 0}
    assert "run 1 finished: 300/300 answered" in proc.stderr


def test_ctrl_c_cancels_and_keeps_finished_rows(make_server, tmp_path, interrupt_after_answers):
    server = make_server(latency_ms=100)
    script = tmp_path / "batch.py"
    script.write_text(SCRIPT)
    proc, out, err = interrupt_after_answers([sys.executable, str(script), server.base_url], server, 12,
                                             signal.SIGINT, text=True)
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "cancelled" and report["pending"] == 0
    # the server had sent 12 answers; at most 4 (the concurrency) can still have been on the wire
    assert 8 <= report["done"] < 300 and report["answered"] == report["done"]
    assert report["done"] + report["cancelled"] == 300
    assert "cancelled" in err


FAILING = textwrap.dedent("""
    import json, sys
    import nbparrot
    rows = [{"text": f"row {i}"} for i in range(50)]
    try:
        nbparrot.map(rows, "Say: {text}", base_url=sys.argv[1], api_key=sys.argv[2])
    except nbparrot.AuthenticationError as err:  # the run is attached: its rows stay reachable
        run = err.run
        print(json.dumps({"status": run.status, "statuses": run.errors["status"].tolist()[:3],
                          "attempts": run.errors["attempts"].tolist()[:3], "answered": sum(r["answer"] is not None for r in run.partial())}))
    nbparrot.map(rows, "Say: {text}", base_url=sys.argv[1], api_key=sys.argv[2])  # uncaught: the script ends with it
""")


def test_a_script_whose_run_fails_raises_the_error_with_the_run_attached(make_server, tmp_path):
    server = make_server(latency_ms=1, api_key="sk-the-right-key-0000")
    wrong = "sk-wrong-key-abcdefghijklmnop"
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    proc = subprocess.run([sys.executable, str(script), server.base_url, wrong], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1  # not a silent success with every row NA
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # the one row sent failed with the 401 (one attempt); the others were never sent
    assert report == {"status": "failed", "statuses": ["failed", "cancelled", "cancelled"],
                      "attempts": [1, 0, 0], "answered": 0}
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("nbparrot.errors.AuthenticationError: 401") and wrong not in proc.stderr


def test_a_finished_run_is_indexed_like_its_result(make_server):
    server = make_server(latency_ms=1)
    opts = {"base_url": server.base_url, "api_key": "sk-script", "progress": False}
    run = nbparrot.map(pd.DataFrame({"text": ["a", "b"]}), "Say: {text}", **opts)
    assert run[1] == run.result()[1] and run[1].startswith("[")
    records = nbparrot.map([{"text": "a"}], "Say: {text}", **opts)
    assert records[0]["answer"] == records.result()[0]["answer"]

    async def unfinished() -> None:
        run = nbparrot.map(pd.DataFrame({"text": ["a"]}), "Say: {text}", **opts)
        with pytest.raises(nbparrot.RunNotFinishedError, match="await"):
            run[0]
        await run

    asyncio.run(unfinished())


def test_a_row_waiting_to_retry_when_the_run_stops_is_failed_and_the_line_says_why(make_server):
    """The progress line names what is being retried, fits 80 columns; a row tried and failed is ``failed``."""
    server = make_server(latency_ms=1)
    rows = [{"text": "fine"}, {"text": "empty <<null-content>> " + "long " * 20}]

    async def main() -> tuple[nbparrot.Run, str]:
        run = nbparrot.map(rows, "Say: {text}", base_url=server.base_url, api_key="sk-script", backoff=60.0,
                           max_retries=5, cache="off")
        for _ in range(500):  # until the empty answer has come and the row waits for its retry (60 s backoff)
            if run.progress.retrying and run.progress.done:
                break
            await asyncio.sleep(0.01)
        line = run.view.line()
        run.cancel()
        await asyncio.wait({run._task})
        return run, line

    run, line = asyncio.run(main())
    assert "1 retrying: empty answer" in line and len(line) <= 80
    errors = run.errors
    assert errors["status"].tolist() == ["failed"] and errors["attempts"].tolist() == [1]
    assert "empty answer" in errors["error"].iloc[0] and "not retried: the run was cancelled" in errors["error"].iloc[0]
