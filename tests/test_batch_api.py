"""``mode="batch"``: the OpenAI Batch API behind the same call, against the bundled server."""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

import nbparrot
from nbparrot.batch_api import BatchEngine
from nbparrot.pricing import cost_of
from nbparrot.server import expected_tag

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import KernelHarness, wait_until  # noqa: E402

KEY = "sk-batch-test-key-0123456789"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"row {i}" for i in range(n)]}, index=[f"id{i}" for i in range(n)])


def get(server, path: str) -> dict:
    request = urllib.request.Request(server.base_url + path, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10) as response:
        return json.loads(response.read())


def test_batch_mode_answers_every_row_at_half_price(make_server):
    server = make_server(batch_seconds=0.5)
    df = frame(30)
    run = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, mode="batch", poll_interval=0.05)
    result = run.result()
    for i in range(30):
        assert result[f"id{i}"].startswith(f"[{expected_tag(user(f'Say row {i}'))}]")
    p = run.progress
    assert run.cost == pytest.approx(cost_of("gpt-4o-mini", p.prompt_tokens, p.completion_tokens) / 2)
    assert run.estimate.max_cost == pytest.approx(
        cost_of("gpt-4o-mini", run.estimate.prompt_tokens, run.estimate.max_completion_tokens) / 2)
    stats = server.stats()
    assert stats["batches_created"] == 1 and stats["requests"] == 0  # nothing went through the live endpoint
    # the answers are cached like any others: a live rerun sends nothing
    server.reset()
    assert df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY).result().equals(result)
    assert server.stats()["requests"] == 0


def test_failed_lines_become_row_errors(make_server):
    server = make_server(batch_seconds=0.3)
    df = frame(6)
    df.loc["id2", "text"] = "broken <<batch-fail>>"
    run = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, mode="batch", poll_interval=0.05)
    result = run.result()
    assert result.isna().tolist() == [i == 2 for i in range(6)]
    assert list(run.errors.index) == ["id2"] and "500" in run.errors.loc["id2", "error"]


def test_large_jobs_are_split_into_several_files(make_server, monkeypatch):
    server = make_server(batch_seconds=0.3)
    monkeypatch.setattr(BatchEngine, "max_lines", 10)
    run = nbparrot.map([{"t": i} for i in range(25)], "Say {t}", base_url=server.base_url, api_key=KEY,
                       mode="batch", poll_interval=0.05)
    assert all(r["answer"].startswith(f"[{expected_tag(user(f'Say {i}'))}]") for i, r in enumerate(run.result()))
    assert server.stats()["batches_created"] == 3 and len(run.engine.batch_ids) == 3


def test_cancel_cancels_the_remote_batch(make_server):
    server = make_server(batch_seconds=30)

    async def scenario():
        run = nbparrot.map(frame(20), "Say {text}", base_url=server.base_url, api_key=KEY, mode="batch",
                           poll_interval=0.05)
        while not run.engine.batch_ids:
            await asyncio.sleep(0.02)
        run.cancel()
        await asyncio.wait({run._task})
        return run

    run = asyncio.run(scenario())
    assert run.status == "cancelled" and run.progress.cancelled == 20
    remote = get(server, f"/batches/{run.engine.batch_ids[0]}")
    assert remote["status"] in ("cancelling", "cancelled")


def test_batch_mode_refuses_a_max_cost_it_could_pass(make_server):
    server = make_server()
    with pytest.raises(nbparrot.ConfigError, match="cannot be stopped half-way"):
        nbparrot.map([{"t": "x" * 4000}] * 50, "{t}", base_url=server.base_url, api_key=KEY, mode="batch",
                     max_cost=0.0001)
    assert server.stats()["batches_created"] == 0


def test_a_batch_survives_a_kernel_restart(make_server, tmp_path):
    """Re-running the cell after a restart reattaches to the batch instead of submitting (and paying) again."""
    server = make_server(batch_seconds=3)
    cell = ("import nbparrot\n"
            "rows = [{'text': f'row {i}'} for i in range(40)]\n"
            f"run = nbparrot.map(rows, 'Say {{text}}', base_url={server.base_url!r}, api_key={KEY!r}, mode='batch',"
            " poll_interval=0.1)")
    with KernelHarness(cwd=str(tmp_path), env={"NBPARROT_CACHE_DIR": str(tmp_path / "cache")}) as kernel:
        kernel.execute(cell, check=True)
        wait_until(lambda: server.stats()["batches_created"] == 1, timeout=30, message="no batch was created")
        kernel.restart()
        kernel.execute(cell, check=True)
        out = kernel.execute("res = await run\nprint(run.status, sum(r['answer'] is not None for r in res))\n"
                             "print(run.progress.note)", check=True, timeout=60)
    assert out.stdout.splitlines()[0] == "finished 40"
    assert server.stats()["batches_created"] == 1
