"""Prices per million tokens, so cost is visible before, during and after a run.

Prices come from ``genai-prices`` (Pydantic's price database, shipped inside the package, so
it works offline; its background updater is never started here): looked up once per model
and endpoint, the endpoint telling the provider (api.openai.com, Azure, OpenRouter, Anthropic's
and Google's OpenAI-compatible URLs, ...), else the model's name (a local server serving
"gpt-4o-mini" is priced as OpenAI's). ``set_price`` adds or overrides a model (a fine-tune, a
local model at 0). Tiered prices count at their base tier (long-context surcharges apply only
past ~200k prompt tokens in one request). The Batch API costs half; cached prompt tokens cost
the provider's cached-input price. A model with no price has an *unknown* cost (None), never
zero. ``estimate`` gives a run's cost before any request: expected (answers assumed to use
half of ``max_tokens`` until real ones show their length) and at most (every ``max_tokens``
used, which is also what a budget must assume).
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from typing import Any, NamedTuple

__all__ = ["Price", "PRICES", "BATCH_DISCOUNT", "price_of", "set_price", "cost_of", "Estimate", "estimate",
           "format_usd", "cached_share", "known", "preload"]


class Price(NamedTuple):
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float

    def cost(self, prompt_tokens: float, completion_tokens: float, cached_tokens: float = 0,
             batch: bool = False) -> float:
        """USD for these tokens (``cached_tokens`` are part of ``prompt_tokens``)."""
        usd = ((prompt_tokens - cached_tokens) * self.input + cached_tokens * self.cached_input
               + completion_tokens * self.output) / 1e6
        return usd * BATCH_DISCOUNT if batch else usd


#: Prices set with ``set_price``: they win over the database, for every endpoint.
PRICES: dict[str, Price] = {}
BATCH_DISCOUNT = 0.5
_looked_up: dict[tuple[str, str | None], Price | None] = {}  # (model, base_url) -> the database's price


_loaded = threading.Event()  # the price database is imported (it takes ~0.2-0.8 s of CPU, once per process)
_loader: threading.Thread | None = None


def preload() -> threading.Event:
    """Start loading the price database in a background thread (once); the event is set when it is
    in, so a notebook's ``map()`` returns at once and its planning waits for the prices without
    holding the loop."""
    global _loader
    if _loader is None and not _loaded.is_set():
        _loader = threading.Thread(target=_load, name="nbparrot-prices", daemon=True)
        _loader.start()
    return _loaded


def _load() -> None:
    try:
        from genai_prices.data_snapshot import get_snapshot

        get_snapshot()
    finally:  # a failed import is raised again, and reported, by the lookup that needs it
        _loaded.set()


def known(model: str, base_url: str | None = None) -> bool:
    """Whether ``price_of(model, base_url)`` answers without loading the price database."""
    return model in PRICES or (model, base_url) in _looked_up or _loaded.is_set()


def set_price(model: str, input: float, output: float, cached_input: float | None = None) -> None:
    """Add or override a model's price (USD per 1M tokens), on every endpoint."""
    PRICES[model] = Price(float(input), float(input if cached_input is None else cached_input), float(output))


def price_of(model: str, base_url: str | None = None) -> Price | None:
    """The model's price at the endpoint ``base_url`` (None: by the model's name alone), or None if unknown.

    Looked up in genai-prices once per (model, endpoint) and kept for the process."""
    price = PRICES.get(model)
    if price is not None:
        return price
    key = (model, base_url)
    if key not in _looked_up:
        _looked_up[key] = _lookup(model, base_url)
    return _looked_up[key]


def _lookup(model: str, base_url: str | None) -> Price | None:
    """genai-prices' price of ``model``: at the provider whose API ``base_url`` is, else by the name, else
    at OpenAI (embedding names match no provider by themselves)."""
    preload().wait()
    from genai_prices.data_snapshot import get_snapshot

    snapshot = get_snapshot()
    provider = None
    if base_url:
        try:
            provider = snapshot.find_provider(None, None, base_url)
        except LookupError:
            provider = None  # a local server or a gateway the database does not know: go by the model's name
    try:
        if provider is not None:  # a known provider decides: its own price or none
            _, info = snapshot.find_provider_model(model, provider, None, None)
        else:
            try:
                _, info = snapshot.find_provider_model(model, None, None, None)
            except LookupError:
                _, info = snapshot.find_provider_model(model, None, "openai", None)
    except LookupError:
        return None
    prices = info.get_prices(datetime.now(timezone.utc))
    if getattr(prices, "input_mtok", None) is None:  # priced per image, per second, ...: not by tokens
        return None
    input_price = _base(prices.input_mtok)
    cached = _base(getattr(prices, "cache_read_mtok", None))
    output = _base(getattr(prices, "output_mtok", None))
    return Price(input_price, input_price if cached is None else cached, 0.0 if output is None else output)


def _base(value: Any) -> float | None:
    """A price as a float: a tiered price's base tier."""
    if value is None:
        return None
    return float(getattr(value, "base", value))


def cost_of(model: str, prompt_tokens: float, completion_tokens: float, cached_tokens: float = 0,
            *, batch: bool = False, base_url: str | None = None) -> float | None:
    """USD for these tokens on ``model`` (at ``base_url``'s provider), or None when the price is unknown."""
    price = price_of(model, base_url)
    return None if price is None else price.cost(prompt_tokens, completion_tokens, cached_tokens, batch)


def cached_share(prompt_tokens: int, cached_tokens: int) -> str | None:
    """"prompt 62% cached", or None when no prompt token was cached."""
    if not cached_tokens or not prompt_tokens:
        return None
    return f"prompt {100 * cached_tokens / prompt_tokens:.0f}% cached"


EXPECTED_SHARE = 0.5  # before any answer: assume answers use half of max_tokens


class Estimate(NamedTuple):
    """What a run will send and cost, known before any request: expected and at most."""

    requests: int
    prompt_tokens: int
    max_completion_tokens: int  # n x max_tokens per request, summed
    expected_cost: float | None  # prompts + EXPECTED_SHARE of max_completion_tokens
    max_cost: float | None  # prompts + every max_completion token

    def __str__(self) -> str:
        tokens = f"{self.prompt_tokens:,} prompt + up to {self.max_completion_tokens:,} completion tokens"
        if self.max_cost is None:
            return f"{self.requests:,} requests, {tokens}, cost unknown (no price for this model)"
        return (f"{self.requests:,} requests, {tokens}: ~{format_usd(self.expected_cost)} expected, "
                f"at most {format_usd(self.max_cost)}")


def format_usd(cost: float | None) -> str:
    """Dollars by one rule everywhere: cents from $1 up ($12.35), three significant digits below
    ($0.0123, $0.000456; at most 6 decimals, so ``<$0.000001`` for less), or "cost unknown"."""
    if cost is None:
        return "cost unknown"
    if cost >= 1 or cost == 0:
        return f"${cost:,.2f}"
    if cost < 0.000_000_5:
        return "<$0.000001"
    text = f"{cost:.3g}"
    if "e" in text:  # 3 significant digits below 1e-4 come out in exponent form
        text = f"{float(text):.6f}"
    decimals = text.split(".")[1].rstrip("0") if "." in text else ""
    return f"${float(text):.{max(2, min(6, len(decimals)))}f}"


def estimate(model: str, requests: int, prompt_tokens: int, max_completion_tokens: int, *,
             batch: bool = False, base_url: str | None = None) -> Estimate:
    """Expected and upper-bound cost of a run from its token estimates (at Batch API prices if ``batch``);
    prompts are priced uncached, as nothing says in advance what the provider will have cached."""
    expected_out = int(max_completion_tokens * EXPECTED_SHARE)
    return Estimate(requests, prompt_tokens, max_completion_tokens,
                    cost_of(model, prompt_tokens, expected_out, batch=batch, base_url=base_url),
                    cost_of(model, prompt_tokens, max_completion_tokens, batch=batch, base_url=base_url))
