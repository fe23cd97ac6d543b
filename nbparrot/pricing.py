"""Prices per million tokens, so cost is visible before, during and after a run.

The table holds OpenAI's list prices (USD per 1M tokens: input, cached input, output) as
published when this version was made; ``set_price`` adds or overrides a model (a gateway's
or a fine-tune's). The Batch API costs half. A model missing from the table has an
*unknown* cost (None), never zero. ``estimate`` gives a run's cost before any request:
expected (answers assumed to use half of ``max_tokens`` until real ones show their length)
and at most (every ``max_tokens`` used, which is also what a budget must assume).
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["Price", "PRICES", "BATCH_DISCOUNT", "price_of", "set_price", "cost_of", "Estimate", "estimate", "format_usd"]


class Price(NamedTuple):
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float


PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 0.125, 10.00),
    "gpt-5-mini": Price(0.25, 0.025, 2.00),
    "gpt-5-nano": Price(0.05, 0.005, 0.40),
    "gpt-4.1": Price(2.00, 0.50, 8.00),
    "gpt-4.1-mini": Price(0.40, 0.10, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.025, 0.40),
    "gpt-4o": Price(2.50, 1.25, 10.00),
    "gpt-4o-mini": Price(0.15, 0.075, 0.60),
    "o3": Price(2.00, 0.50, 8.00),
    "o4-mini": Price(1.10, 0.275, 4.40),
    "o3-mini": Price(1.10, 0.55, 4.40),
    "gpt-3.5-turbo": Price(0.50, 0.50, 1.50),
    # embeddings: input tokens only
    "text-embedding-3-small": Price(0.02, 0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.10, 0.0),
}

BATCH_DISCOUNT = 0.5
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")


def set_price(model: str, input: float, output: float, cached_input: float | None = None) -> None:
    """Add or override a model's price (USD per 1M tokens)."""
    PRICES[model] = Price(float(input), float(input if cached_input is None else cached_input), float(output))


def price_of(model: str) -> Price | None:
    """The model's price; a dated snapshot ("gpt-4o-mini-2024-07-18") falls back to its family."""
    price = PRICES.get(model)
    if price is None:
        price = PRICES.get(_SNAPSHOT.sub("", model))
    return price


def cost_of(model: str, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
            *, batch: bool = False) -> float | None:
    """USD for these tokens on ``model``, or None when the price is unknown."""
    price = price_of(model)
    if price is None:
        return None
    usd = ((prompt_tokens - cached_tokens) * price.input + cached_tokens * price.cached_input
           + completion_tokens * price.output) / 1e6
    return usd * BATCH_DISCOUNT if batch else usd


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
             batch: bool = False) -> Estimate:
    """Expected and upper-bound cost of a run from its token estimates (at Batch API prices if ``batch``)."""
    expected_out = int(max_completion_tokens * EXPECTED_SHARE)
    return Estimate(requests, prompt_tokens, max_completion_tokens,
                    cost_of(model, prompt_tokens, expected_out, batch=batch),
                    cost_of(model, prompt_tokens, max_completion_tokens, batch=batch))
