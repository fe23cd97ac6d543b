"""Pacing: stay inside a provider's requests-per-minute and tokens-per-minute limits.

The ``Pacer`` keeps two continuously refilled buckets (requests and tokens). Every request
is budgeted *before* it is sent (its cost is prompt tokens + n x max_tokens, which is what
OpenAI charges against TPM up front), so the run gets close to the limits without a storm
of 429s. The limits are learned from the ``x-ratelimit-*`` headers of the first answer and
the buckets are re-synced to ``x-ratelimit-remaining-*`` on every answer, corrected for the
requests sent since, so another job on the same key, or a server whose window is shorter
than a minute, is picked up at once. A 429 pauses dispatch globally (``retry-after-ms``,
``retry-after``, or "try again in 90ms" from the message) instead of letting every request
hammer on its own.

Edge cases, documented because they decide whether a batch finishes:

- A reset header means "time until the bucket is *full* again", not "time until the next
  request fits". With the refill rate (limit / 60 s) it gives the bucket's real capacity:
  ``remaining + reset x rate``. That is a full minute's worth on OpenAI, one second's worth
  on a server with a short window, and the pacer uses whichever the headers show.
- Durations are Go-style, as OpenAI sends them: ``"12ms"`` is 12 milliseconds, never 12
  minutes; ``"1m30s"``, ``"6m0s"``, ``"0.5s"``, ``"1h2m3.5s"`` all parse exactly.
- Without rate-limit headers (vLLM, Ollama, most gateways) nothing is paced: only the
  concurrency bound and the 429 pause apply.
"""

from __future__ import annotations

import re
from typing import Mapping

__all__ = ["parse_duration", "retry_after_seconds", "Pacer", "Bucket"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_duration_cache: dict[str, float | None] = {}


def parse_duration(text: str | None) -> float | None:
    """Seconds in a Go-style duration (``"12ms"``, ``"1.5s"``, ``"6m0s"``), or None if unreadable.

    A bare number is taken as seconds, as in a ``retry-after`` header.
    """
    if text is None:
        return None
    cached = _duration_cache.get(text)
    if cached is not None or text in _duration_cache:
        return cached
    value = _parse_duration(text.strip())
    if len(_duration_cache) < 4096:  # headers repeat a small set of values; bound the memo
        _duration_cache[text] = value
    return value


def _parse_duration(text: str) -> float | None:
    if not text:
        return None
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total, pos = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


_TRY_AGAIN = re.compile(r"try again in (\d+(?:\.\d+)?(?:ms|s|m))", re.IGNORECASE)


def retry_after_seconds(headers: Mapping[str, str], message: str = "") -> float | None:
    """How long a 429 asks us to wait: ``retry-after-ms``, ``retry-after``, or the message's hint."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        seconds = parse_duration(value)
        if seconds is not None:
            return seconds
    match = _TRY_AGAIN.search(message)
    return parse_duration(match.group(1)) if match else None


class Bucket:
    """A continuously refilled budget: ``capacity`` units, refilled at ``rate`` units per second."""

    __slots__ = ("limit", "capacity", "rate", "level", "stamp")

    def __init__(self, limit: float, now: float, *, capacity: float | None = None, level: float | None = None):
        self.limit = limit  # per minute, as the provider states it
        self.rate = limit / 60.0
        self.capacity = limit if capacity is None else capacity
        self.level = self.capacity if level is None else level
        self.stamp = now

    def refill(self, now: float) -> float:
        """Bring the level up to ``now`` and return it."""
        if now > self.stamp:
            level = self.level + (now - self.stamp) * self.rate
            self.level = level if level < self.capacity else self.capacity
            self.stamp = now
        return self.level

    def wait(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` units are available (0 if they are now)."""
        deficit = cost - self.refill(now)
        return deficit / self.rate if deficit > 0 else 0.0

    def sync(self, limit: float, remaining: float, reset: float | None, spent_since: float, age: float, now: float) -> None:
        """Re-sync to the server's view: its limit, what remained then, and the time until full.

        ``remaining`` was true ``age`` seconds ago; since then the bucket refilled and we spent
        ``spent_since`` on requests the server had not seen yet, so both are carried forward.
        The level is set, not just lowered: our token estimates err high on purpose, and
        taking the server's count back each time keeps that margin from piling up as waste.
        """
        if limit != self.limit:
            self.limit, self.rate = limit, limit / 60.0
        self.capacity = min(limit, remaining + reset * self.rate) if reset is not None else limit
        self.capacity = max(self.capacity, 1.0)
        self.refill(now)
        level = remaining + age * self.rate - spent_since
        self.level = level if level < self.capacity else self.capacity


class Pacer:
    """Decides when the next request may go, from learned or given RPM / TPM limits.

    ``delay(cost)`` says how long to wait, ``take(cost)`` books a request that is being sent,
    ``observe(headers)`` learns from an answer, ``backoff(seconds)`` pauses after a 429.
    All methods take ``now`` from the caller's loop clock, so the pacer is plain arithmetic.
    """

    __slots__ = ("requests", "tokens", "paused_until", "spent_requests", "spent_tokens", "fixed")

    def __init__(self, rpm: float | None = None, tpm: float | None = None, now: float = 0.0):
        self.requests: Bucket | None = Bucket(rpm, now) if rpm else None
        self.tokens: Bucket | None = Bucket(tpm, now) if tpm else None
        self.fixed = bool(rpm or tpm)  # limits given by the user win over headers
        self.paused_until = 0.0
        self.spent_requests = 0.0  # running totals, so an answer can tell what was sent after it
        self.spent_tokens = 0.0

    def delay(self, cost: float, now: float) -> float:
        """Seconds to wait before a request costing ``cost`` tokens may be sent."""
        wait = self.paused_until - now
        if self.requests is not None:
            w = self.requests.wait(1.0, now)
            wait = w if w > wait else wait
        tokens = self.tokens
        if tokens is not None:
            # A request larger than the capacity learned from the headers (a short window, or one
            # near its end) goes when the bucket is full; waiting for more would wait for ever.
            w = tokens.wait(cost if cost < tokens.capacity else tokens.capacity, now)
            wait = w if w > wait else wait
        return wait if wait > 0 else 0.0

    def take(self, cost: float, now: float) -> tuple[float, float, float]:
        """Book a request being sent; returns a mark to hand back to ``observe`` with its answer."""
        if self.requests is not None:
            self.requests.level -= 1.0
        if self.tokens is not None:
            self.tokens.level -= cost
        self.spent_requests += 1.0
        self.spent_tokens += cost
        return (now, self.spent_requests, self.spent_tokens)

    def too_large(self, cost: float) -> bool:
        """True when a request can never fit the token bucket, however long we wait."""
        return self.tokens is not None and cost > self.tokens.limit

    def observe(self, headers: Mapping[str, str], mark: tuple[float, float, float], now: float) -> None:
        """Learn limits and the remaining budget from an answer's ``x-ratelimit-*`` headers."""
        if self.fixed:
            return
        limit_r = headers.get("x-ratelimit-limit-requests")
        limit_t = headers.get("x-ratelimit-limit-tokens")
        if limit_r is None and limit_t is None:
            return
        sent_at, spent_r, spent_t = mark
        age = now - sent_at
        if limit_r is not None:
            self.requests = self._sync(self.requests, limit_r, headers.get("x-ratelimit-remaining-requests"),
                                       headers.get("x-ratelimit-reset-requests"), self.spent_requests - spent_r, age, now)
        if limit_t is not None:
            self.tokens = self._sync(self.tokens, limit_t, headers.get("x-ratelimit-remaining-tokens"),
                                     headers.get("x-ratelimit-reset-tokens"), self.spent_tokens - spent_t, age, now)

    @staticmethod
    def _sync(bucket: Bucket | None, limit_s: str, remaining_s: str | None, reset_s: str | None,
              spent_since: float, age: float, now: float) -> Bucket | None:
        try:
            limit = float(limit_s)
        except ValueError:
            return bucket
        if limit <= 0:
            return bucket
        if bucket is None:
            bucket = Bucket(limit, now)
        if remaining_s is not None:
            try:
                remaining = float(remaining_s)
            except ValueError:
                return bucket
            bucket.sync(limit, remaining, parse_duration(reset_s), spent_since, age, now)
        return bucket

    def backoff(self, seconds: float, now: float) -> None:
        """Pause all dispatch for ``seconds`` (after a 429), never shortening a longer pause."""
        until = now + seconds
        if until > self.paused_until:
            self.paused_until = until

    def limits(self) -> dict[str, float | None]:
        """The limits in force (per minute), for display."""
        return {
            "rpm": self.requests.limit if self.requests else None,
            "tpm": self.tokens.limit if self.tokens else None,
        }
