"""Prices for every provider (genai-prices, offline) and prompt caching in the cost, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest

import nbparrot
from nbparrot.panel_html import stats_html
from nbparrot.panel_state import snapshot
from nbparrot.pricing import Price, cost_of, price_of, set_price
from nbparrot.server.promptcache import PromptCache

KEY = "sk-prices-test-0123456789"


@pytest.mark.parametrize("base_url, model, price", [
    ("https://api.openai.com/v1", "gpt-4o-mini", Price(0.15, 0.075, 0.60)),
    ("http://127.0.0.1:8000/v1", "gpt-4.1", Price(2.00, 0.50, 8.00)),  # a local server: by the model's name
    ("http://127.0.0.1:8000/v1", "text-embedding-3-small", Price(0.02, 0.02, 0.0)),
    ("https://res.openai.azure.com/openai/deployments/gpt-4o-mini", "gpt-4o-mini", Price(0.15, 0.075, 0.60)),
    ("https://openrouter.ai/api/v1", "anthropic/claude-sonnet-4.5", Price(3.0, 0.3, 15.0)),
    ("https://api.anthropic.com/v1", "claude-sonnet-4-5", Price(3.0, 0.3, 15.0)),
    ("https://generativelanguage.googleapis.com/v1beta/openai", "gemini-2.5-flash", Price(0.30, 0.03, 2.50)),
    ("https://api.mistral.ai/v1", "mistral-small-latest", Price(0.15, 0.015, 0.60)),
])
def test_prices_come_from_the_provider_the_endpoint_is(base_url, model, price):
    assert price_of(model, base_url) == pytest.approx(price)


def test_unknown_models_stay_unknown_and_set_price_wins_everywhere():
    assert price_of("local-llama", "http://127.0.0.1:8000/v1") is None
    assert price_of("gpt-4o-mini", "https://api.anthropic.com/v1") is None  # a known provider decides alone
    set_price("llama3.1:8b", input=0.0, output=0.0)
    assert cost_of("llama3.1:8b", 10_000, 10_000, base_url="http://127.0.0.1:11434/v1") == 0.0
    set_price("claude-sonnet-4-5", input=1.0, output=2.0, cached_input=0.1)
    try:
        assert price_of("claude-sonnet-4-5", "https://api.anthropic.com/v1") == Price(1.0, 0.1, 2.0)
    finally:
        nbparrot.pricing.PRICES.pop("claude-sonnet-4-5")
        nbparrot.pricing.PRICES.pop("llama3.1:8b")


def test_price_lookups_open_no_connection_and_start_no_thread():
    """genai-prices can update itself over HTTP in a background thread; nbparrot never starts that (its own
    thread only imports the bundled database)."""
    script = textwrap.dedent("""
        import json, sys, threading
        events = []
        sys.addaudithook(lambda event, args: events.append(event) if event.startswith("socket.") else None)
        from nbparrot.pricing import price_of
        prices = [price_of(m, u) for m, u in [("gpt-4o-mini", "https://api.openai.com/v1"),
                                              ("anthropic/claude-sonnet-4.5", "https://openrouter.ai/api/v1"),
                                              ("gemini-2.5-flash", None)]]
        others = [t.name for t in threading.enumerate() if t.name not in ("MainThread", "nbparrot-prices")]
        print(json.dumps({"events": events, "threads": others, "known": all(prices)}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report == {"events": [], "threads": [], "known": True}


def test_the_servers_prompt_cache_follows_openais_rule():
    cache, text = PromptCache(), "x" * 6000  # 1,500 tokens at 4 characters each
    assert cache.cached_tokens("gpt-4o-mini", text, 1500) == 0  # first time: nothing cached
    assert cache.cached_tokens("gpt-4o-mini", text, 1500) == 1024 + 3 * 128  # 128-token steps, not past the prompt
    assert cache.cached_tokens("gpt-4o", text, 1500) == 0  # per model
    assert cache.cached_tokens("gpt-4o-mini", text[:4400] + "y" * 1600, 1500) == 1024  # 1,100 tokens shared
    short = "z" * 4000  # 1,000 tokens: never cached
    cache.cached_tokens("gpt-4o-mini", short, 1000)
    assert cache.cached_tokens("gpt-4o-mini", short, 1000) == 0


def test_cached_prompt_tokens_are_priced_at_the_cached_rate_end_to_end(make_server):
    server = make_server(api_key=KEY, completion_tokens=10)
    fixed = "You label support tickets. Rules: " + "be brief and exact. " * 260  # ~5,200 characters first
    df = pd.DataFrame({"ticket": [f"ticket {i}: my parcel number {i} is late" for i in range(12)]})
    run = df.llm.map("{ticket}", system=fixed, base_url=server.base_url, api_key=KEY, meta=True, cache="off",
                     concurrency=4, progress=False)
    result = run.result()
    p, stats = run.progress, server.stats()
    assert p.done == 12 and p.prompt_tokens == stats["prompt_tokens"]
    assert p.cached_prompt_tokens == stats["cached_tokens"] > 0
    assert run.usage["gpt-4o-mini"]["cached_prompt_tokens"] == p.cached_prompt_tokens
    assert (result["cached"] == False).all()  # noqa: E712 - answers, not rows from nbparrot's own cache
    # gpt-4o-mini: $0.15 per 1M prompt tokens, $0.075 cached, $0.60 completion
    expected = ((p.prompt_tokens - p.cached_prompt_tokens) * 0.15 + p.cached_prompt_tokens * 0.075
                + p.completion_tokens * 0.60) / 1e6
    assert run.cost == pytest.approx(expected) and run.cost < cost_of("gpt-4o-mini", p.prompt_tokens, p.completion_tokens)
    assert result["cost"].sum() == pytest.approx(run.cost)
    share = f"prompt {100 * p.cached_prompt_tokens / p.prompt_tokens:.0f}% cached"
    assert share in run.summary()
    shown = snapshot(run)
    assert shown["cached_share"] == share and share in stats_html(shown)


def test_a_claude_model_through_a_gateway_has_a_price_so_max_cost_can_hold():
    """Before, every non-OpenAI model was "cost unknown" and max_cost refused it."""
    est = nbparrot.pricing.estimate("anthropic/claude-sonnet-4.5", 100, 50_000, 25_600,
                                    base_url="https://openrouter.ai/api/v1")
    assert est.max_cost == pytest.approx((50_000 * 3.0 + 25_600 * 15.0) / 1e6)
    assert "cost unknown" not in str(est)
