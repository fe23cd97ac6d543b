"""Rate limits, injected faults and counters.

Rate limits are continuously refilled token buckets (one for requests, one for tokens) sized like a
provider's window: capacity ``limit * burst_seconds / 60``. A request is charged up front (its
prompt tokens plus ``max_tokens`` per choice, :data:`DEFAULT_MAX_TOKENS_CHARGE` without one) or
refused with a 429 and charged nothing. Faults are then drawn from ``random.Random(seed)`` in the
order of :data:`_FAULTS`, each with its configured probability.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

from aiohttp import web

from .prompts import format_duration
from .wire import _HTML_502, _abort

if TYPE_CHECKING:
    from .config import ServerConfig


class _Bucket:
    """A continuously refilled token bucket (requests or tokens) sized like a provider window."""

    __slots__ = ("limit", "capacity", "rate", "level", "stamp")

    def __init__(self, limit: int, burst_seconds: float, floor: float = 0.0) -> None:
        """Start full; ``floor`` keeps the request bucket able to hold at least one request."""
        self.limit = limit
        self.capacity = max(limit * burst_seconds / 60.0, floor)
        self.rate = limit / 60.0
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        """Add what flowed in since the last look, up to capacity."""
        level = self.level + (now - self.stamp) * self.rate
        self.level = level if level < self.capacity else self.capacity
        self.stamp = now

    def wait_for(self, cost: float) -> float:
        """Seconds until ``cost`` fits (0 if it fits now)."""
        missing = cost - self.level
        return missing / self.rate if missing > 0 else 0.0

    def headers(self, kind: str, out: dict[str, str]) -> None:
        """Add OpenAI's x-ratelimit-*-<kind> headers describing this bucket."""
        out[f"x-ratelimit-limit-{kind}"] = str(self.limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(self.level)))
        out[f"x-ratelimit-reset-{kind}"] = format_duration((self.capacity - self.level) / self.rate)

    def reset(self) -> None:
        """Refill to capacity."""
        self.level = self.capacity
        self.stamp = time.monotonic()


class _Stats:
    """Counters served by GET /stats; cheap attribute increments on the hot path."""

    def __init__(self) -> None:
        """Start from zero."""
        self.requests = 0
        self.ok = 0
        self.status: dict[str, int] = {}
        self.rate_limited = 0
        self.too_large = 0
        self.faults = {"500": 0, "502": 0, "503": 0, "reset": 0, "stall": 0, "quota": 0, "429": 0}
        self.huge_bytes_sent = 0  # bytes of huge answers written to clients (a capped client stops early)
        self.streams = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens answered as served from the prompt cache
        self.last_request: dict = {}  # the last model request's auth scheme, query and other headers (no secrets)
        self.received: dict[str, int] = {}
        self.answered: dict[str, int] = {}
        self.models: dict[str, int] = {}  # chat answers per model (a cascade's requests per model)
        self.files_uploaded = 0
        self.batches_created = 0
        self.batch_lines = 0  # lines of the batches whose input file was valid
        self.embedding_requests = 0  # POST /v1/embeddings, valid or not
        self.embedded_inputs = 0  # inputs of the embedding requests whose body was valid (before limits and faults)
        self.embedding_tokens = 0  # tokens of the embedding requests answered
        self.rows_seen: list[list[str]] = []  # per answered request holding <<row:ID>> markers, its IDs (.table)
        self.started = time.time()

    def as_dict(self) -> dict:
        """The JSON document of GET /stats."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "status": dict(self.status),
            "rate_limited": self.rate_limited,
            "too_large": self.too_large,
            "faults": dict(self.faults),
            "streams": self.streams,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "last_request": self.last_request,
            "cpu_seconds": time.process_time(),
            "uptime_seconds": time.time() - self.started,
            "received": dict(self.received),
            "answered": dict(self.answered),
            "models": dict(self.models),
            "files_uploaded": self.files_uploaded,
            "batches_created": self.batches_created,
            "batch_lines": self.batch_lines,
            "embedding_requests": self.embedding_requests,
            "embedded_inputs": self.embedded_inputs,
            "embedding_tokens": self.embedding_tokens,
            "huge_bytes_sent": self.huge_bytes_sent,
            "rows_seen": [list(ids) for ids in self.rows_seen],
        }


#: (config field, stats name) in the order faults are drawn
_FAULTS = (
    ("p429", "429"), ("pquota", "quota"), ("p500", "500"), ("p502", "502"), ("p503", "503"), ("p_reset", "reset"), ("pstall", "stall")
)


def _fault_bands(config: ServerConfig) -> list[tuple[float, str]]:
    """(cumulative probability, fault name) for each configured fault, in drawing order."""
    bands = []
    edge = 0.0
    for attr, name in _FAULTS:
        p = getattr(config, attr)
        if p > 0:
            edge += p
            bands.append((edge, name))
    return bands


class _Gate:
    """The rate limiter and fault injection in front of the endpoints (a mixin of the app)."""

    def limit_headers(self, now: float) -> dict[str, str]:
        """Current x-ratelimit-* headers (empty when no limit is configured)."""
        out: dict[str, str] = {}
        if self.requests_bucket is not None:
            self.requests_bucket.refill(now)
            self.requests_bucket.headers("requests", out)
        if self.tokens_bucket is not None:
            self.tokens_bucket.refill(now)
            self.tokens_bucket.headers("tokens", out)
        return out

    def admit(self, model: str, token_cost: int, now: float, started: float,
              limit_headers: dict[str, str]) -> web.Response | None:
        """Charge one request and ``token_cost`` tokens (filling ``limit_headers``), or the 429 refusing it."""
        cfg = self.config
        stats = self.stats
        rb, tb = self.requests_bucket, self.tokens_bucket
        if rb is not None:
            rb.refill(now)
        if tb is not None:
            tb.refill(now)
            if token_cost > tb.capacity:
                stats.rate_limited += 1
                stats.too_large += 1
                headers = {**self.limit_headers(now), **self.base_headers(started)}
                message = (f"Request too large for {model} in organization org-mock on tokens per min (TPM): "
                           f"Limit {tb.limit}, Requested {token_cost}. The input or output tokens must be "
                           "reduced in order to run successfully. Visit https://platform.openai.com/account/"
                           "rate-limits to learn more.")
                return self.error(429, message, "tokens", "rate_limit_exceeded", None, headers)
        wait_r = rb.wait_for(1) if rb is not None else 0.0
        wait_t = tb.wait_for(token_cost) if tb is not None else 0.0
        if wait_r > 0 or wait_t > 0:
            stats.rate_limited += 1
            wait = max(wait_r, wait_t)
            if wait_r >= wait_t:
                bucket, what, unit, requested = rb, "requests per min (RPM)", "requests", 1
            else:
                bucket, what, unit, requested = tb, "tokens per min (TPM)", "tokens", token_cost
            assert bucket is not None
            used = max(0, round(bucket.capacity - bucket.level))
            message = (f"Rate limit reached for {model} in organization org-mock on {what}: Limit {bucket.limit}, "
                       f"Used {used}, Requested {requested}. Please try again in {format_duration(wait)}. "
                       "Visit https://platform.openai.com/account/rate-limits to learn more.")
            headers = {**self.limit_headers(now), **self.base_headers(started)}
            if cfg.retry_after:
                wait_ms = max(1, math.ceil(wait * 1000))
                headers["retry-after"] = str(max(1, math.ceil(wait_ms / 1000)))
                headers["retry-after-ms"] = str(wait_ms)
            return self.error(429, message, unit, "rate_limit_exceeded", None, headers)
        if rb is not None:
            rb.level -= 1
            rb.headers("requests", limit_headers)
        if tb is not None:
            tb.level -= token_cost
            tb.headers("tokens", limit_headers)
        return None

    def draw_fault(self) -> str | None:
        """The fault this request gets (a name of :data:`_FAULTS`), or None."""
        if self.fault_bands:
            draw = self.rng.random()
            for edge, name in self.fault_bands:
                if draw < edge:
                    return name
        return None

    async def fault_response(self, request: web.Request, fault: str, model: str, limit_headers: dict[str, str],
                             started: float) -> web.StreamResponse:
        """The response of an error fault (all but "reset", which the endpoint applies to its answer)."""
        cfg = self.config
        stats = self.stats
        if fault == "stall":
            stats.faults["stall"] += 1
            await asyncio.sleep(cfg.stall_seconds)
            _abort(request)
            return web.Response(status=504)  # never reaches the client: the connection is gone
        stats.faults[fault] += 1
        headers = {**limit_headers, **self.base_headers(started)}
        if fault == "429":
            wait = cfg.retry_after_429
            headers["retry-after"] = str(max(0, math.ceil(wait)))
            headers["retry-after-ms"] = str(max(0, math.ceil(wait * 1000)))
            return self.error(429, f"Rate limit reached for {model} in organization org-mock on requests per min "
                              f"(RPM). Please try again in {format_duration(wait)}.", "requests",
                              "rate_limit_exceeded", None, headers)
        if fault == "quota":
            return self.error(429, "You exceeded your current quota, please check your plan and billing "
                              "details. For more information on this error, read the docs: "
                              "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                              "insufficient_quota", "insufficient_quota", None, headers)
        if fault == "500":
            return self.error(500, "The server had an error while processing your request. Sorry about that!",
                              "server_error", None, None, headers)
        if fault == "503":
            return self.error(503, "The engine is currently overloaded, please try again later.",
                              "server_error", None, None, headers)
        self.count(502)
        return web.Response(status=502, body=_HTML_502, headers=headers, content_type="text/html")
