"""Outside a running loop (a script) ``map`` runs to completion; Ctrl-C cancels and keeps rows."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

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
