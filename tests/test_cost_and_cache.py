"""Cost you can see and cap, and a cache that makes reruns free and crashes harmless."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import nbparrot
from nbparrot.pricing import Estimate, cost_of, estimate, price_of, set_price
from nbparrot.server import prompt_tag

KEY = "sk-very-secret-key-for-cache-tests-1234567890"


def tags(texts: list[str], template: str = "Say {text}") -> set[str]:
    return {prompt_tag([{"role": "user", "content": template.format(text=t)}]) for t in texts}


def test_price_arithmetic():
    assert cost_of("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    assert cost_of("gpt-4o-mini", 1_000_000, 0, cached_tokens=400_000) == pytest.approx(0.6 * 0.15 + 0.4 * 0.075)
    assert cost_of("gpt-4.1", 2_000, 500, batch=True) == pytest.approx((2_000 * 2.0 + 500 * 8.0) / 1e6 / 2)
    assert price_of("gpt-4o-mini-2024-07-18") == price_of("gpt-4o-mini")
    assert price_of("nobody-knows-this-model") is None and cost_of("my-finetune", 10, 10) is None
    set_price("my-finetune", input=1.0, output=2.0)
    assert cost_of("my-finetune", 1_000_000, 1_000_000) == pytest.approx(3.0)
    e = estimate("gpt-4o-mini", 10, 1_000_000, 2_000_000)
    assert e == Estimate(10, 1_000_000, 2_000_000, pytest.approx(0.15 + 0.60), pytest.approx(0.15 + 1.20))
    assert "at most $1.35" in str(e)
    assert "cost unknown" in str(estimate("nobody-knows", 1, 10, 10))


def test_estimate_before_the_run_and_cost_after(make_server):
    server = make_server(completion_tokens=20)
    df = pd.DataFrame({"text": [f"row {i}" for i in range(50)]})
    run = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, max_tokens=40)
    est = run.estimate
    assert est.requests == 50 and est.max_completion_tokens == 50 * 40
    run.result()
    p = run.progress
    assert p.completion_tokens == 50 * 20 and run.cost == pytest.approx(cost_of("gpt-4o-mini", p.prompt_tokens, 1000))
    assert est.prompt_tokens >= p.prompt_tokens  # the offline estimate errs high, never low
    assert run.usage["gpt-4o-mini"]["rows_answered"] == 50


def test_rerun_sends_nothing_and_costs_nothing(make_server):
    server = make_server()
    df = pd.DataFrame({"text": [f"row {i}" for i in range(40)]})
    first = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY).result()
    server.reset()
    run = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, meta=True)
    again = run.result()
    assert server.stats()["requests"] == 0
    assert again["answer"].tolist() == first.tolist() and again["cached"].all() and (again["cost"] == 0).all()
    assert run.cost == 0 and run.progress.cached == 40 and run.estimate.requests == 0


def test_editing_the_template_for_some_rows_resends_only_those(make_server):
    server = make_server()
    df = pd.DataFrame({"text": [f"row {i}" for i in range(30)]})
    df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY).result()
    server.reset()
    df.loc[[3, 7, 11], "text"] = ["changed 3", "changed 7", "changed 11"]
    run = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY)
    run.result()
    assert set(server.stats()["received"]) == tags(["changed 3", "changed 7", "changed 11"])
    assert run.progress.cached == 27


def test_cache_modes_refresh_and_off(make_server):
    server = make_server()
    rows = [{"text": "a"}, {"text": "b"}]
    nbparrot.map(rows, "Say {text}", base_url=server.base_url, api_key=KEY).result()
    nbparrot.map(rows, "Say {text}", base_url=server.base_url, api_key=KEY, cache="refresh").result()
    nbparrot.map(rows, "Say {text}", base_url=server.base_url, api_key=KEY, cache="off").result()
    assert server.stats()["requests"] == 6
    with pytest.raises(nbparrot.ConfigError, match="cache must be one of"):
        nbparrot.map(rows, "Say {text}", base_url=server.base_url, cache="sometimes")


SCRIPT = textwrap.dedent("""
    import json, sys
    import nbparrot
    rows = [{"text": f"row {i}"} for i in range(300)]
    run = nbparrot.map(rows, "Say {text}", base_url=sys.argv[1], api_key=sys.argv[2], concurrency=4)
    run.result()
    print(json.dumps({"cached": [i for i, o in enumerate(run.outcomes) if o.cached], "done": run.progress.done}))
""")


def test_sigkill_mid_run_then_rerun_sends_exactly_the_unanswered_rows(make_server, tmp_path, interrupt_after_answers):
    server = make_server(latency_ms=40)
    script = tmp_path / "batch.py"
    script.write_text(SCRIPT)
    argv = [sys.executable, str(script), server.base_url, KEY]
    interrupt_after_answers(argv, server, 60, signal.SIGKILL)
    server.reset()
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    report = json.loads(rerun.stdout.strip().splitlines()[-1])
    cached = set(report["cached"])
    assert report["done"] == 300 and len(cached) >= 50  # all but the last moments before the kill were kept
    received = server.stats()["received"]
    assert all(count == 1 for count in received.values())
    assert set(received) == tags([f"row {i}" for i in range(300) if i not in cached])


def test_max_cost_stops_before_the_budget_is_passed(make_server):
    server = make_server(latency_ms=5, completion_tokens=30)
    df = pd.DataFrame({"text": [f"row {i} " + "x" * 400 for i in range(400)]})
    budget = 0.004
    with pytest.raises(nbparrot.BudgetExceededError, match="max_cost") as info:  # in a script, map raises it
        df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, max_tokens=50, max_cost=budget,
                   concurrency=16)
    run = info.value.run
    assert run.estimate.max_cost > budget
    assert run.status == "stopped"
    with pytest.raises(nbparrot.BudgetExceededError, match="max_cost"):
        run.result()
    p = run.progress
    assert 0 < p.done < 400 and run.cost <= budget
    assert p.done + p.cancelled == 400 and server.stats()["answered"] and sum(server.stats()["answered"].values()) == p.done
    assert run.partial().notna().sum() == p.done
    assert "max_cost" in run.errors["error"].iloc[-1]


def test_max_cost_needs_a_known_price(make_server):
    server = make_server(models=("local-llama",))
    with pytest.raises(nbparrot.ConfigError, match="price of 'local-llama' is unknown"):
        nbparrot.map([{"t": 1}], "{t}", model="local-llama", base_url=server.base_url, max_cost=1.0)
    assert server.stats()["requests"] == 0


def test_confirm_over_in_a_script_needs_confirm(make_server):
    server = make_server()
    rows = [{"text": "x" * 2000} for _ in range(100)]
    with pytest.raises(nbparrot.ConfigError, match="confirm=True"):
        nbparrot.map(rows, "Say {text}", base_url=server.base_url, api_key=KEY, confirm_over=0.001)
    assert server.stats()["requests"] == 0
    run = nbparrot.map(rows, "Say {text}", base_url=server.base_url, api_key=KEY, confirm_over=0.001, confirm=True)
    assert run.status == "finished"


def test_the_api_key_appears_in_no_file_under_the_cache_dir(make_server, tmp_path):
    server = make_server(api_key=KEY)
    cache_dir = tmp_path / "cache"
    df = pd.DataFrame({"text": [f"row {i}" for i in range(50)]})
    df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, cache_dir=cache_dir).result()
    nbparrot.api.open_cache(cache_dir).flush()
    files = [f for f in Path(cache_dir).rglob("*") if f.is_file()]
    assert files and sum(f.stat().st_size for f in files) > 0
    for f in files:
        data = f.read_bytes()
        assert KEY.encode() not in data and KEY[:20].encode() not in data, f
