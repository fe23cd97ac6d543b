"""A bundled, deterministic, OpenAI-compatible mock server (aiohttp.web).

Users rehearse a run offline with it: rate limits, faults, latency, cost and
structured outputs behave like the real API, but nothing is spent and nothing
leaves the machine (the server only binds to loopback). The demo, the tests
and the benchmarks use it too, so the request handler is kept lean: one
process answers several thousand requests per second.

Answers are deterministic: choice ``i`` of a prompt starts with
``[<tag>#<i>]`` where ``<tag>`` is ``sha1(prompt text)[:12]`` (see
:func:`expected_tag`), so a test can tell exactly which row an answer belongs
to, and ``GET /stats`` says which prompts reached the server and how often.

It also serves OpenAI's Files and Batch APIs (``/v1/files``, ``/v1/batches``) for
chat completions, in memory: a batch goes validating -> in_progress ->
finalizing -> completed within ``batch_seconds`` (default 2 s, instead of up to
24 h), its lines answered by the same code as ``/v1/chat/completions`` (minus
latency, rate limits and random faults), its output lines shuffled.

Run it with ``python -m nbparrot.server --port 8000 --rpm 500 --p500 0.05``
or, from Python, with :class:`ServerProcess` (a subprocess) or :func:`serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import hashlib
import json
import math
import os
import queue
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

__all__ = [
    "ServerConfig",
    "ServerProcess",
    "add_arguments",
    "build_app",
    "config_from_args",
    "config_to_argv",
    "expected_tag",
    "format_duration",
    "main",
    "prompt_tag",
    "prompt_tokens",
    "serve",
]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4.1",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-5",
    "mock",
)
#: Tokens a request without max_tokens is charged per choice by the limiter.
DEFAULT_MAX_TOKENS_CHARGE = 4096
#: Markers in the last user message that change the answer (used by tests).
NOT_JSON_MARKER = "<<not-json>>"  # anywhere in the prompt: never valid JSON (a re-ask fails too)
NOT_JSON_ONCE_MARKER = "<<not-json-once>>"  # in the last user message: one bad answer (a re-ask succeeds)
LIST_JSON_MARKER = "<<list-json>>"
NUMERIC_CODE_MARKER = "<<numeric-code>>"  # in the last user message: a 400 whose error code is a number
BATCH_FAIL_MARKER = "<<batch-fail>>"  # in the last user message of a batch line: that line fails with a 500
NULL_CONTENT_MARKER = "<<null-content>>"  # in the last user message: every choice's content is null
REFUSAL_MARKER = "<<refusal>>"  # in the last user message: content null and a refusal, as OpenAI sends one
HUGE_ANSWER_MARKER = "<<huge-answer>>"  # in the last user message: a valid answer of huge_bytes, with its length
HUGE_JUNK_MARKER = "<<huge-junk>>"  # in the last user message: huge_bytes of non-JSON, chunked, no length
#: The Batch API as OpenAI documents it: one endpoint served here, a 24 h window, limits per input file.
BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_WINDOW_SECONDS = 24 * 3600
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 200 * 1024 * 1024
#: Share of batch_seconds spent validating, and then finalizing (cancelling takes as long); in progress between.
BATCH_PHASE_SHARE = 0.1
FILE_MAX_BYTES = 512 * 1024 * 1024  # one upload
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "user_data")
_BATCH_MAX_ERRORS = 100  # errors.data entries reported for an invalid input file
#: Default lifetime of a server started by ServerProcess (tests never leak one).
SUBPROCESS_MAX_LIFETIME = 3600.0
_LISTENING_RE = re.compile(r"nbparrot server listening on http://(\[[^\]]+\]|[^:/]+):(\d+)/v1")


@dataclass
class ServerConfig:
    """How the mock server behaves: latency, limits, answer sizes, auth and faults."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    latency_ms: float = 0.0  # fixed latency (time to first token)
    jitter_ms: float = 0.0  # plus uniform[0, jitter_ms]
    per_token_ms: float = 0.0  # extra latency per completion token
    rpm: int | None = None  # requests per minute (None = unlimited)
    tpm: int | None = None  # tokens per minute (None = unlimited)
    burst_seconds: float = 60.0  # bucket capacity = limit * burst_seconds / 60
    completion_tokens: int = 16
    completion_tokens_max: int | None = None  # deterministic in [ct, max] from the prompt hash
    api_key: str | None = None  # if set, any other Bearer key gets a 401
    models: tuple[str, ...] = DEFAULT_MODELS  # other models get a 404
    context_window: int = 128_000
    p500: float = 0.0
    p502: float = 0.0
    p503: float = 0.0
    preset: float = 0.0  # 200 + headers + half the body, then a TCP reset
    pstall: float = 0.0  # never answer; reset the connection after stall_seconds
    stall_seconds: float = 30.0
    pquota: float = 0.0  # 429 insufficient_quota
    p429: float = 0.0  # 429 rate_limit_exceeded asking to wait retry_after_429 seconds
    retry_after_429: float = 1.0
    usage: bool = True  # False: answers carry no usage object, as some gateways and local servers
    usage_scale: float = 1.0  # prompt tokens are counted (reported and charged) this many times over
    huge_bytes: int = 64 * 1024 * 1024  # size of the answers asked for by the huge-answer / huge-junk markers
    retry_after: bool = True  # False: 429s carry no retry-after headers
    seed: int = 0  # faults are drawn from random.Random(seed)
    json_schema: bool = True  # False: refuse response_format json_schema with a 400, as older endpoints do
    batch_seconds: float = 2.0  # how long a batch takes from creation to "completed" (OpenAI: up to 24 h)
    max_lifetime: float | None = None  # exit on its own after this many seconds

    def __post_init__(self) -> None:
        """Validate early so a bad flag fails loudly instead of misbehaving later."""
        check_loopback(self.host)
        self.models = tuple(self.models)
        for name in ("p500", "p502", "p503", "preset", "pstall", "pquota", "p429"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if self.burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be positive, got {self.burst_seconds!r}")
        if self.completion_tokens < 1:
            raise ValueError("completion_tokens must be >= 1")
        if self.completion_tokens_max is not None and self.completion_tokens_max < self.completion_tokens:
            raise ValueError("completion_tokens_max must be >= completion_tokens")
        if self.latency_ms < 0 or self.jitter_ms < 0 or self.per_token_ms < 0:
            raise ValueError("latencies must be >= 0")
        if not 0 <= self.batch_seconds < math.inf:
            raise ValueError(f"batch_seconds must be a finite number >= 0, got {self.batch_seconds!r}")


def check_loopback(host: str) -> None:
    """Refuse to bind anywhere but loopback: the mock must never be reachable from outside."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"nbparrot's mock server only binds to loopback ({', '.join(LOOPBACK_HOSTS)}); "
            f"refusing host {host!r}"
        )


# --------------------------------------------------------------------------- prompt helpers


def _content_text(content: Any) -> str:
    """Text of one message content: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _prompt_parts(messages: list[dict]) -> tuple[str, int, str]:
    """Return (prompt text, total content chars, last user message text) in one pass."""
    texts = [_content_text(m.get("content")) for m in messages]
    last_user = ""
    for message, text in zip(reversed(messages), reversed(texts)):
        if message.get("role") == "user":
            last_user = text
            break
    return "\n".join(texts), sum(map(len, texts)), last_user


def _digest(prompt_text: str) -> str:
    """Full sha1 hex digest of the prompt text (its first 12 chars are the tag)."""
    return hashlib.sha1(prompt_text.encode("utf-8", "surrogatepass")).hexdigest()


def prompt_tag(messages: list[dict]) -> str:
    """The tag of a prompt (sha1 prefix, no choice suffix): the key of stats' received/answered."""
    return _digest(_prompt_parts(messages)[0])[:12]


def expected_tag(messages: list[dict], choice: int = 0) -> str:
    """The ``<tag>#<choice>`` the server puts at the start of choice ``choice``'s answer."""
    return f"{prompt_tag(messages)}#{choice}"


def prompt_tokens(messages: list[dict]) -> int:
    """Prompt tokens as the server counts them: ceil(total chars of all contents / 4)."""
    return (_prompt_parts(messages)[1] + 3) // 4


def format_duration(seconds: float) -> str:
    """Format a duration like OpenAI's rate-limit headers (Go style): "12ms", "1.5s", "6m0s"."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    sec = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{sec}s"
    if minutes:
        return f"{minutes}m{sec}s"
    return f"{sec}s"


def _mask_key(key: str) -> str:
    """Mask an API key like OpenAI does, keeping only the first 3 and last 2 characters."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 5) + key[-2:]


_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat duis aute irure dolor in reprehenderit in "
    "voluptate velit esse cillum dolore eu fugiat nulla pariatur excepteur sint occaecat "
    "cupidatat non proident sunt in culpa qui officia deserunt mollit anim id est laborum "
)
_FILLER = _LOREM * 64  # ~25k chars; longer answers repeat it (see _filler)


def _filler(length: int) -> str:
    """Deterministic lorem-ipsum filler of exactly ``length`` characters."""
    if length <= 0:
        return ""
    if length <= len(_FILLER):
        return _FILLER[:length]
    return (_LOREM * (length // len(_LOREM) + 1))[:length]


# --------------------------------------------------------------------------- JSON schema instances


class _SchemaFaker:
    """Builds a deterministic instance of a JSON schema whose strings carry the row's tag."""

    max_depth = 8

    def __init__(self, root: dict, label: str, seed: int) -> None:
        """Remember the root (for $ref), the ``tag#i`` label and a per-choice seed."""
        self.root = root
        self.label = label
        self.seed = seed

    def pick(self, path: str, count: int) -> int:
        """A deterministic index in [0, count) for this choice and schema path."""
        return (self.seed + zlib.crc32(path.encode())) % count

    def resolve(self, ref: str) -> dict:
        """Resolve a local ``#/$defs/Name`` style reference."""
        node: Any = self.root
        if not ref.startswith("#"):
            return {}
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return {}
            node = node[part]
        return node if isinstance(node, dict) else {}

    def make(self, schema: Any, path: str = "$", name: str = "value", depth: int = 0) -> Any:
        """Return a value valid for ``schema`` (the common subset pydantic and users emit)."""
        if not isinstance(schema, dict):
            return f"{self.label} {name}"
        if depth > self.max_depth:
            return None
        if "$ref" in schema:
            return self.make(self.resolve(schema["$ref"]), path, name, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][self.pick(path, len(schema["enum"]))]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
                return self.make((non_null or options)[0], path, name, depth + 1)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged: dict = {}
            for part in schema["allOf"]:
                part = self.resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                if isinstance(part, dict):
                    for k, v in part.items():
                        if isinstance(v, dict) and isinstance(merged.get(k), dict):
                            merged[k] = {**merged[k], **v}
                        elif isinstance(v, list) and isinstance(merged.get(k), list):
                            merged[k] = merged[k] + v
                        else:
                            merged[k] = v
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.make({**merged, **rest}, path, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            kind = kinds[0] if kinds else "null"
        if kind is None:
            if "properties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        if kind == "object":
            props = schema.get("properties") or {}
            return {key: self.make(sub, f"{path}.{key}", key, depth + 1) for key, sub in props.items()}
        if kind == "array":
            return self.make_array(schema, path, name, depth)
        if kind == "string":
            return self.make_string(schema, path, name)
        if kind == "integer":
            return self.make_number(schema, path, integer=True)
        if kind == "number":
            return self.make_number(schema, path, integer=False)
        if kind == "boolean":
            return self.pick(path, 2) == 0
        return None

    def make_array(self, schema: dict, path: str, name: str, depth: int) -> list:
        """Two elements (clamped to minItems/maxItems), honouring prefixItems."""
        count = max(2, int(schema.get("minItems", 0)))
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        if prefix:
            count = len(prefix) if items is False else max(count, len(prefix))
        return [
            self.make(prefix[k] if k < len(prefix) else items, f"{path}[{k}]", f"{name}[{k}]", depth + 1)
            for k in range(count)
        ]

    def make_string(self, schema: dict, path: str, name: str) -> str:
        """A string carrying the tag, or a well-formed value for common formats."""
        fmt = schema.get("format")
        if fmt == "date-time":
            value = "2024-01-01T00:00:00Z"
        elif fmt == "date":
            value = "2024-01-01"
        elif fmt == "time":
            value = "00:00:00"
        elif fmt == "email":
            value = f"{self.label.replace('#', '-')}@example.com"
        elif fmt in ("uri", "url", "uri-reference"):
            value = f"https://example.com/{self.label.replace('#', '-')}"
        elif fmt == "uuid":
            h = hashlib.md5(f"{self.label}{path}".encode()).hexdigest()
            value = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"
        else:
            value = f"{name} {self.label}"
        max_len = schema.get("maxLength")
        if isinstance(max_len, int) and len(value) > max_len:
            value = value[:max_len]
        min_len = schema.get("minLength")
        if isinstance(min_len, int) and len(value) < min_len:
            value += "x" * (min_len - len(value))
        return value

    def make_number(self, schema: dict, path: str, integer: bool) -> int | float:
        """A hash-picked number in [minimum, maximum] (default 0..99)."""
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if "exclusiveMinimum" in schema and "minimum" not in schema:
            low = low + 1 if integer else low + 0.5
        if "exclusiveMaximum" in schema and "maximum" not in schema:
            high = high - 1 if integer else high - 0.5
        low = 0 if low is None else low
        high = low + 99 if high is None else high
        if high < low:
            high = low
        if integer:
            low, high = math.ceil(low), math.floor(high)
            return low + self.pick(path, max(1, high - low + 1))
        span = high - low
        return low + span * self.pick(path, 1000) / 1000 if span else low


# --------------------------------------------------------------------------- rate limiter


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


# --------------------------------------------------------------------------- the app


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
        self.received: dict[str, int] = {}
        self.answered: dict[str, int] = {}
        self.files_uploaded = 0
        self.batches_created = 0
        self.batch_lines = 0  # lines of the batches whose input file was valid
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
            "cpu_seconds": time.process_time(),
            "uptime_seconds": time.time() - self.started,
            "received": dict(self.received),
            "answered": dict(self.answered),
            "files_uploaded": self.files_uploaded,
            "batches_created": self.batches_created,
            "batch_lines": self.batch_lines,
            "huge_bytes_sent": self.huge_bytes_sent,
        }


def _find(store: dict, key: str, message: str, param: str) -> Any:
    """``store[key]``, or a 404 with OpenAI's wording for that kind of object."""
    found = store.get(key)
    if found is None:
        raise _Reject(404, message.format(key), "invalid_request_error", None, param)
    return found


class _Reject(Exception):
    """A ready-made error response raised from request parsing."""

    def __init__(self, status: int, message: str, type_: str, code: str | int | None, param: str | None = None):
        """Keep the pieces of an OpenAI-style error body."""
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        """The JSON error response (not counted in the chat statistics)."""
        return web.json_response(self.body(), status=self.status)


_HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
).encode()

#: (config field, stats name) in the order faults are drawn
_FAULTS = (
    ("p429", "429"), ("pquota", "quota"), ("p500", "500"), ("p502", "502"), ("p503", "503"), ("preset", "reset"), ("pstall", "stall")
)


def _int_param(body: dict, key: str, minimum: int, maximum: int | None = None) -> int | None:
    """Read an optional integer request parameter or raise a 400 like OpenAI's."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Reject(400, f"Invalid type for '{key}': expected an integer, but got {type(value).__name__} instead.",
                      "invalid_request_error", "invalid_type", key)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise _Reject(400, f"Invalid '{key}': integer must be {bound}, got {value}.",
                      "invalid_request_error", "invalid_value", key)
    return value


class _ChatRequest:
    """A checked chat completion request: the prompt, then the options :meth:`_MockServer.parse_options` reads."""

    __slots__ = ("model", "prompt_text", "last_user", "digest", "tag", "ptoks", "n", "max_tokens", "fmt", "schema",
                 "greedy")

    def __init__(self, model: str, prompt_text: str, chars: int, last_user: str) -> None:
        """Derive the tag and prompt tokens from the prompt; options start at their defaults."""
        self.model = model
        self.prompt_text = prompt_text
        self.last_user = last_user
        self.digest = _digest(prompt_text)
        self.tag = self.digest[:12]
        self.ptoks = (chars + 3) // 4
        self.n = 1
        self.max_tokens: int | None = None
        self.fmt = "text"
        self.schema: dict = {}
        self.greedy = False


def _usage(ptoks: int, ctoks: int) -> dict:
    """The ``usage`` object of a chat completion."""
    return {
        "prompt_tokens": ptoks,
        "completion_tokens": ctoks,
        "total_tokens": ptoks + ctoks,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def _completion(completion_id: str, created: int, model: str, contents: list[str | None], finishes: list[str],
                usage: dict | None, refusal: str | None = None) -> dict:
    """A ``chat.completion`` object with one choice per content (no ``usage`` key when it is None)."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": content, "refusal": refusal, "annotations": []},
             "logprobs": None, "finish_reason": finish}
            for i, (content, finish) in enumerate(zip(contents, finishes))
        ],
        **({"usage": usage} if usage is not None else {}),
        "service_tier": "default",
        "system_fingerprint": "fp_nbparrot",
    }


# --------------------------------------------------------------------------- files and batches


@dataclass
class _StoredFile:
    """An uploaded file, or a batch's output or error file, held in memory."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "expires_at": None, "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}


def _batch_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
    """One entry of a failed batch's ``errors.data``."""
    return {"code": code, "message": message, "param": param, "line": line}


def _parse_batch_input(data: bytes) -> tuple[list[tuple[str, dict]], list[dict]]:
    """Check a batch input file: its (custom_id, body) lines, and the errors that fail the batch (if any).

    Like OpenAI, a file that is too large, has too many lines, or has any line that is not a JSON object with a
    unique ``custom_id``, ``"method": "POST"``, ``"url": "/v1/chat/completions"`` and an object ``body``, fails
    the whole batch; a body the chat endpoint refuses only fails its own line, later.
    """
    if len(data) > BATCH_MAX_BYTES:
        return [], [_batch_error("file_too_large", f"The batch input file is {len(data):,} bytes, over the "
                                 f"{BATCH_MAX_BYTES:,}-byte maximum of a batch input file.")]
    raw = data.split(b"\n")
    if not raw[-1].strip():
        raw.pop()  # the newline ending the last line
    if not raw:
        return [], [_batch_error("empty_file", "The batch input file is empty.")]
    if len(raw) > BATCH_MAX_LINES:
        return [], [_batch_error("too_many_tasks", f"The batch input file has {len(raw):,} requests, over the "
                                 f"{BATCH_MAX_LINES:,}-request maximum of a batch.")]
    lines: list[tuple[str, dict]] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for number, text in enumerate(raw, 1):
        if len(errors) >= _BATCH_MAX_ERRORS:
            break
        try:
            item = json.loads(text)
        except ValueError:
            errors.append(_batch_error("invalid_json_line", "This line is not parseable as valid JSON.", number))
            continue
        if not isinstance(item, dict):
            errors.append(_batch_error("invalid_request", "This line is not a JSON object.", number))
            continue
        missing = next((key for key in ("custom_id", "method", "url", "body") if key not in item), None)
        custom_id, body = item.get("custom_id"), item.get("body")
        if missing is not None:
            errors.append(_batch_error("missing_required_parameter", f"Missing required parameter: '{missing}'.",
                                       number, missing))
        elif not isinstance(custom_id, str) or not custom_id:
            errors.append(_batch_error("invalid_value", "Invalid 'custom_id': expected a non-empty string.", number,
                                       "custom_id"))
        elif custom_id in seen:
            errors.append(_batch_error("duplicate_custom_id", "The custom_id for this request is a duplicate of "
                                       "another request. The custom_id parameter must be unique for each individual "
                                       "request in a batch.", number, "custom_id"))
        elif item["method"] != "POST":
            errors.append(_batch_error("invalid_value", "Invalid 'method': only 'POST' is supported.", number,
                                       "method"))
        elif item["url"] != BATCH_ENDPOINT:
            errors.append(_batch_error("url_mismatch", "The URL provided for this request does not match the batch "
                                       "endpoint.", number, "url"))
        elif not isinstance(body, dict):
            errors.append(_batch_error("invalid_value", "Invalid 'body': expected an object.", number, "body"))
        else:
            seen.add(custom_id)
            lines.append((custom_id, body))
    return (lines, []) if not errors else ([], errors)


class _Batch:
    """A batch job. Its status follows from the time since creation: see :meth:`state`."""

    def __init__(self, batch_id: str, input_file: _StoredFile, metadata: dict | None) -> None:
        """Check the input file now (the verdict shows once validation time has passed)."""
        self.id = batch_id
        self.input_file_id = input_file.id
        self.metadata = metadata
        self.lines, self.errors = _parse_batch_input(input_file.data)
        model = self.lines[0][1].get("model") if self.lines else None
        self.model = model if isinstance(model, str) else None
        self.shuffle_seed = hashlib.sha1(input_file.data).hexdigest()  # output order: a function of the input
        self.created = time.time()
        self.started = time.monotonic()
        self.results: list[tuple[bool, dict]] = []  # (succeeded, output line) of the lines done, in input order
        self.completed = 0
        self.failed = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cancel_at: float | None = None  # seconds after creation
        self.cancel_done = 0  # lines done when the cancel came
        self.output_file_id: str | None = None
        self.error_file_id: str | None = None
        self.finished = False  # output files written

    def state(self, elapsed: float, span: float) -> tuple[str, int]:
        """(status, lines done) ``elapsed`` seconds after creation, for batches that take ``span`` seconds."""
        phase = BATCH_PHASE_SHARE * span
        if self.cancel_at is not None:
            return ("cancelling" if elapsed < self.cancel_at + phase else "cancelled"), self.cancel_done
        if elapsed < phase:
            return "validating", 0
        if self.errors:
            return "failed", 0
        total = len(self.lines)
        if elapsed < span - phase:
            return "in_progress", min(total, int(total * (elapsed - phase) / (span - 2 * phase)))
        return ("finalizing" if elapsed < span else "completed"), total

    def obj(self, status: str, elapsed: float, span: float) -> dict:
        """OpenAI's batch object in ``status``, ``elapsed`` seconds after creation."""
        phase = BATCH_PHASE_SHARE * span
        live = elapsed if self.cancel_at is None else min(elapsed, self.cancel_at)  # how far processing got
        valid = not self.errors

        def at(offset: float, reached: bool) -> int | None:
            return int(self.created + offset) if reached else None

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": BATCH_ENDPOINT,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if status == "failed" else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created),
            "in_progress_at": at(phase, valid and live >= phase),
            "expires_at": int(self.created) + BATCH_WINDOW_SECONDS,
            "finalizing_at": at(span - phase, valid and live >= span - phase),
            "completed_at": at(span, status == "completed"),
            "failed_at": at(phase, status == "failed"),
            "expired_at": None,
            "cancelling_at": at(self.cancel_at or 0.0, self.cancel_at is not None),
            "cancelled_at": at((self.cancel_at or 0.0) + phase, status == "cancelled"),
            "request_counts": {"total": len(self.lines) if valid and live >= phase else 0,
                               "completed": self.completed, "failed": self.failed},
            "usage": {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": self.input_tokens + self.output_tokens},
            "metadata": self.metadata,
        }


_Handler = Callable[[Any, web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: _Handler) -> _Handler:
    """Wrap a files or batches handler: Bearer auth first, and a :class:`_Reject` it raises becomes its error."""

    @functools.wraps(handler)
    async def wrapper(self: _MockServer, request: web.Request) -> web.StreamResponse:
        auth_error = self.check_auth(request)
        if auth_error is not None:
            code = "invalid_api_key" if "Incorrect" in auth_error else None
            return _Reject(401, auth_error, "invalid_request_error", code).response()
        try:
            return await handler(self, request)
        except _Reject as rej:
            return rej.response()

    return wrapper


async def _json_object(request: web.Request) -> dict:
    """The request's JSON object body, or a 400."""
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise _Reject(400, "The request body must be a JSON object.", "invalid_request_error", None)
    return body


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    """A multipart field's bytes, or a 400 once they exceed ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(1 << 20):
        size += len(chunk)
        if size > limit:
            raise _Reject(400, f"File is too large: the maximum size of an upload is {limit:,} bytes.",
                          "invalid_request_error", "file_too_large", "file")
        chunks.append(chunk)
    return b"".join(chunks)


def _page(items: list, request: web.Request, default_limit: int, max_limit: int) -> tuple[list, bool]:
    """The ``limit`` items after the one whose id is ``after`` (query parameters), and whether more follow."""
    text = request.query.get("limit")
    limit = default_limit
    if text is not None:
        limit = int(text) if text.isdigit() else 0
        if not 1 <= limit <= max_limit:
            raise _Reject(400, f"Invalid 'limit': integer must be between 1 and {max_limit}, got {text!r}.",
                          "invalid_request_error", "invalid_value", "limit")
    after = request.query.get("after")
    if after:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit], len(items) > limit


def _list_object(data: list[dict], has_more: bool) -> dict:
    """OpenAI's cursor-paginated list object."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def _check_metadata(metadata: Any) -> None:
    """Metadata is null or at most 16 string pairs (keys up to 64 chars, values up to 512), else a 400."""
    if metadata is None:
        return
    if (not isinstance(metadata, dict) or len(metadata) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                       for k, v in metadata.items())):
        raise _Reject(400, "Invalid 'metadata': expected an object of at most 16 string pairs, keys of up to 64 "
                      "characters, values of up to 512.", "invalid_request_error", "invalid_value", "metadata")


class _MockServer:
    """State and handlers of one mock server app."""

    def __init__(self, config: ServerConfig) -> None:
        """Set up buckets, RNGs and counters from the config."""
        self.config = config
        self.models = frozenset(config.models)
        self.stats = _Stats()
        self.rng = random.Random(config.seed)
        self.jitter_rng = random.Random(config.seed + 1)
        self.requests_bucket = _Bucket(config.rpm, config.burst_seconds, floor=1.0) if config.rpm else None
        self.tokens_bucket = _Bucket(config.tpm, config.burst_seconds) if config.tpm else None
        self.fault_bands = []
        edge = 0.0
        for attr, name in _FAULTS:
            p = getattr(config, attr)
            if p > 0:
                edge += p
                self.fault_bands.append((edge, name))
        self.counter = 0
        self.id_prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}"
        self.serial = 0  # of file and batch ids
        self.files: dict[str, _StoredFile] = {}
        self.batches: dict[str, _Batch] = {}

    # ---- helpers

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

    def count(self, status: int) -> None:
        """Count one finished response by status code."""
        key = str(status)
        self.stats.status[key] = self.stats.status.get(key, 0) + 1

    def error(self, status: int, message: str, type_: str, code: str | None, param: str | None,
              headers: dict[str, str]) -> web.Response:
        """An OpenAI-style JSON error response."""
        self.count(status)
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return web.Response(status=status, body=json.dumps(body).encode(), headers=headers,
                            content_type="application/json")

    def base_headers(self, started: float) -> dict[str, str]:
        """x-request-id and openai-processing-ms, present on every chat response."""
        self.counter += 1
        return {
            "x-request-id": f"req_{self.id_prefix}{self.counter:010x}",
            "openai-processing-ms": str(int((time.perf_counter() - started) * 1000)),
            "openai-organization": "org-mock",
        }

    def check_auth(self, request: web.Request) -> str | None:
        """Return an error message if an api_key is configured and the request's key differs."""
        if self.config.api_key is None:
            return None
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with "
                    "blank username) if you're accessing the API from your browser and are prompted for a "
                    "username. You can obtain an API key from https://platform.openai.com/account/api-keys.")
        key = auth[7:].strip()
        if key == self.config.api_key:
            return None
        return (f"Incorrect API key provided: {_mask_key(key)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.")

    # ---- the chat answer, shared by /v1/chat/completions and batch lines

    def parse_prompt(self, body: Any) -> _ChatRequest:
        """Check the body's shape, model and messages (raise :class:`_Reject`); the prompt's tag is known after."""
        if not isinstance(body, dict):
            raise _Reject(400, "The request body must be a JSON object.", "invalid_request_error", None)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _Reject(400, "you must provide a model parameter", "invalid_request_error", None)
        if model not in self.models:
            raise _Reject(404, f"The model `{model}` does not exist or you do not have access to it.",
                          "invalid_request_error", "model_not_found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            if messages is None:
                raise _Reject(400, "Missing required parameter: 'messages'.", "invalid_request_error",
                              "missing_required_parameter", "messages")
            raise _Reject(400, "Invalid 'messages': expected a non-empty array of message objects.",
                          "invalid_request_error", "invalid_value", "messages")
        for k, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise _Reject(400, f"Invalid 'messages[{k}]': expected an object with a 'role'.",
                              "invalid_request_error", "invalid_value", f"messages[{k}]")
        req = _ChatRequest(model, *_prompt_parts(messages))
        if self.config.usage_scale != 1.0:  # an endpoint whose tokenizer counts more than the client's estimate
            req.ptoks = math.ceil(req.ptoks * self.config.usage_scale)
        return req

    def parse_options(self, body: dict, req: _ChatRequest) -> None:
        """Read n, max tokens, response_format and temperature into ``req``; check the context window."""
        cfg = self.config
        req.n = _int_param(body, "n", 1, 128) or 1
        max_tokens = _int_param(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int_param(body, "max_tokens", 1)
        req.max_tokens = max_tokens
        response_format = body.get("response_format")
        if response_format is not None:
            fmt = response_format.get("type") if isinstance(response_format, dict) else None
            if fmt not in ("text", "json_object", "json_schema"):
                raise _Reject(400, "Invalid 'response_format.type': expected one of 'text', 'json_object', "
                              "'json_schema'.", "invalid_request_error", "invalid_value", "response_format.type")
            if fmt == "json_schema" and not cfg.json_schema:
                raise _Reject(400, "response_format of type 'json_schema' is not supported by this server; "
                              "use 'json_object'.", "invalid_request_error", "invalid_value", "response_format")
            if fmt == "json_schema":
                spec = response_format.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise _Reject(400, "Missing required parameter: 'response_format.json_schema.schema'.",
                                  "invalid_request_error", "missing_required_parameter",
                                  "response_format.json_schema")
                req.schema = schema
            req.fmt = fmt
        req.greedy = body.get("temperature") == 0  # at temperature 0 every choice is the same answer, as in practice
        if NUMERIC_CODE_MARKER in req.last_user:  # some gateways and vLLM builds send numeric codes
            raise _Reject(400, "This request was rejected (numeric error code).", "BadRequestError", 400)
        ptoks = req.ptoks
        total = ptoks + (max_tokens or 0)
        if ptoks > cfg.context_window or (max_tokens is not None and total > cfg.context_window):
            if max_tokens is None:
                detail = (f"However, your messages resulted in {ptoks} tokens. "
                          "Please reduce the length of the messages.")
            else:
                detail = (f"However, you requested {total} tokens ({ptoks} in the messages, {max_tokens} in the "
                          "completion). Please reduce the length of the messages or completion.")
            raise _Reject(400, f"This model's maximum context length is {cfg.context_window} tokens. {detail}",
                          "invalid_request_error", "context_length_exceeded", "messages")

    def answer(self, req: _ChatRequest) -> tuple[list[str], list[str], list[int]]:
        """The deterministic (contents, finish reasons, completion tokens) of each of ``req``'s n choices."""
        cfg = self.config
        tag, fmt, schema, last_user, max_tokens = req.tag, req.fmt, req.schema, req.last_user, req.max_tokens
        not_json = NOT_JSON_MARKER in req.prompt_text or NOT_JSON_ONCE_MARKER in last_user
        echo = " ".join(last_user[:96].split())[:48]
        seed = int(req.digest[12:20], 16)
        contents: list[str] = []
        finishes: list[str] = []
        counts: list[int] = []
        ct, ct_max = cfg.completion_tokens, cfg.completion_tokens_max
        for i in range(req.n):
            tokens = ct if ct_max is None else ct + (seed + i * 7919) % (ct_max - ct + 1)
            finish = "stop"
            if max_tokens is not None and tokens > max_tokens:
                tokens, finish = max_tokens, "length"
            label = f"{tag}#{0 if req.greedy else i}"
            if fmt == "text" or not_json:
                prefix = f"[{label}] {echo} "
                content = prefix + _filler(tokens * 4 - len(prefix))
                if finish == "length":
                    content = content[: max(tokens * 4, len(label) + 2)]
                content = content.rstrip()
            else:
                if fmt == "json_schema":
                    content = json.dumps(_SchemaFaker(schema, label, seed + i).make(schema))
                elif LIST_JSON_MARKER in last_user:
                    content = json.dumps({"items": [
                        {"question": f"Question {k + 1} about {echo} [{label}]", "answer": f"Answer {k + 1} [{label}]"}
                        for k in range(3)]})
                else:
                    base = 48 + len(label) + len(echo)
                    content = json.dumps({"tag": label, "echo": echo, "choice": i,
                                          "text": _filler(tokens * 4 - base).rstrip()})
                if finish == "length":
                    content = content[: tokens * 4]  # truncated mid-JSON, like the real API
            contents.append(content)
            finishes.append(finish)
            counts.append(tokens)
        return contents, finishes, counts

    # ---- chat completions

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions: auth, model, body, context, limiter, faults, latency, answer."""
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        if stats.in_flight > stats.peak_in_flight:
            stats.peak_in_flight = stats.in_flight
        try:
            return await self._chat(request)
        finally:
            stats.in_flight -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """The body of :meth:`chat` (in-flight accounting lives in the caller)."""
        started = time.perf_counter()
        now = time.monotonic()
        cfg = self.config
        stats = self.stats

        auth_error = self.check_auth(request)
        if auth_error is not None:
            headers = {**self.limit_headers(now), **self.base_headers(started)}
            code = "invalid_api_key" if "Incorrect" in auth_error else None
            return self.error(401, auth_error, "invalid_request_error", code, None, headers)

        try:
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError):
                raise _Reject(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                              "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                              "but what was sent was not valid JSON.)", "invalid_request_error", None) from None
            req = self.parse_prompt(body)
        except _Reject as rej:
            headers = {**self.limit_headers(now), **self.base_headers(started)}
            return self.error(rej.status, rej.message, rej.type, rej.code, rej.param, headers)

        model, tag, ptoks = req.model, req.tag, req.ptoks
        stats.received[tag] = stats.received.get(tag, 0) + 1

        try:
            self.parse_options(body, req)
        except _Reject as rej:
            headers = {**self.limit_headers(now), **self.base_headers(started)}
            return self.error(rej.status, rej.message, rej.type, rej.code, rej.param, headers)
        n, max_tokens = req.n, req.max_tokens

        # ---- rate limiter: charge up front, or refuse and charge nothing
        limit_headers: dict[str, str] = {}
        rb, tb = self.requests_bucket, self.tokens_bucket
        if rb is not None or tb is not None:
            token_cost = ptoks + n * (max_tokens or DEFAULT_MAX_TOKENS_CHARGE)
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

        # ---- faults, drawn from the seeded RNG
        fault = None
        if self.fault_bands:
            draw = self.rng.random()
            for edge, name in self.fault_bands:
                if draw < edge:
                    fault = name
                    break
        if fault is not None and fault not in ("reset", "stall"):
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
        if fault == "stall":
            stats.faults["stall"] += 1
            await asyncio.sleep(cfg.stall_seconds)
            _abort(request)
            return web.Response(status=504)  # never reaches the client: the connection is gone

        # ---- the answer
        stream = bool(body.get("stream"))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        contents, finishes, counts = self.answer(req)
        ctoks = sum(counts)
        last_user = req.last_user
        refusal = None
        if REFUSAL_MARKER in last_user:
            refusal = "I'm sorry, but I can't help with that."
            contents = [None] * len(contents)
        elif NULL_CONTENT_MARKER in last_user:
            contents = [None] * len(contents)
        elif HUGE_ANSWER_MARKER in last_user:
            contents = [c + " " + _filler(cfg.huge_bytes) for c in contents]

        if fault == "reset":
            stats.faults["reset"] += 1
        else:
            stats.ok += 1
            stats.prompt_tokens += ptoks
            stats.completion_tokens += ctoks
            stats.answered[tag] = stats.answered.get(tag, 0) + 1
            self.count(200)

        delay = cfg.latency_ms
        if cfg.jitter_ms:
            delay += self.jitter_rng.uniform(0.0, cfg.jitter_ms)
        if not stream and cfg.per_token_ms:
            delay += cfg.per_token_ms * max(counts)
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)

        if HUGE_JUNK_MARKER in last_user:
            return await self.junk(request)
        usage = _usage(ptoks, ctoks) if cfg.usage else None
        completion_id = f"chatcmpl-{tag}{self.counter:x}"
        created = int(time.time())
        headers = {**limit_headers, **self.base_headers(started)}
        if stream:
            stats.streams += 1
            return await self.stream(request, headers, completion_id, created, model, contents, finishes, counts,
                                     usage if include_usage else None, include_usage, reset=fault == "reset")
        payload = json.dumps(_completion(completion_id, created, model, contents, finishes, usage, refusal)).encode()
        if fault == "reset":
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_type = "application/json"
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            await _flush_then_abort(request)
            return resp
        return web.Response(body=payload, headers=headers, content_type="application/json")

    async def junk(self, request: web.Request) -> web.StreamResponse:
        """A 200 whose body is ``huge_bytes`` of non-JSON, chunked without a length, written as the client reads."""
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"x" * 65536
        left = self.config.huge_bytes
        try:
            while left > 0:
                piece = chunk[:left]
                await resp.write(piece)  # waits while the client is not reading: a capped client stops it
                self.stats.huge_bytes_sent += len(piece)
                left -= len(piece)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):  # the client went away
            pass
        return resp

    async def stream(self, request: web.Request, headers: dict[str, str], completion_id: str, created: int,
                     model: str, contents: list[str], finishes: list[str], counts: list[int],
                     usage: dict | None, include_usage: bool, reset: bool) -> web.StreamResponse:
        """Send the answer as SSE chat.completion.chunk events, one choice after the other."""
        per_token = self.config.per_token_ms
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "service_tier": "default", "system_fingerprint": "fp_nbparrot"}
        extra = {"usage": None} if include_usage else {}

        def event(choices: list, **more: Any) -> bytes:
            return b"data: " + json.dumps({**head, "choices": choices, **extra, **more}).encode() + b"\n\n"

        # (event bytes, delay in seconds before sending it)
        events: list[tuple[bytes, float]] = []
        for i, content in enumerate(contents):
            events.append((event([{"index": i, "delta": {"role": "assistant", "content": "", "refusal": None},
                                   "logprobs": None, "finish_reason": None}]), 0.0))
            words = content.split(" ")
            gap = per_token * counts[i] / len(words) / 1000.0 if per_token else 0.0
            last = len(words) - 1
            for k, word in enumerate(words):
                piece = word if k == last else word + " "
                events.append((event([{"index": i, "delta": {"content": piece}, "logprobs": None,
                                       "finish_reason": None}]), gap))
            events.append((event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finishes[i]}]), 0.0))
        if usage is not None:
            events.append((event([], usage=usage), 0.0))
        events.append((b"data: [DONE]\n\n", 0.0))

        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)
        if reset:
            await resp.write(b"".join(e for e, _ in events[: len(events) // 2]))
            await _flush_then_abort(request)
            return resp
        if not per_token:
            await resp.write(b"".join(e for e, _ in events))
        else:
            for data, gap in events:
                if gap:
                    await asyncio.sleep(gap)
                await resp.write(data)
        await resp.write_eof()
        return resp

    # ---- files and batches (state in memory; POST /stats/reset keeps it)

    def new_id(self, prefix: str) -> str:
        """A fresh object id: ``prefix`` then hex (this process and start time, then a serial number)."""
        self.serial += 1
        return f"{prefix}{self.id_prefix}{self.serial:06x}"

    def store_file(self, filename: str, purpose: str, data: bytes) -> _StoredFile:
        """Keep a file in memory under a new id."""
        file = _StoredFile(self.new_id("file-"), filename, purpose, data, int(time.time()))
        self.files[file.id] = file
        return file

    def find_file(self, request: web.Request) -> _StoredFile:
        """The file named by the URL, or a 404."""
        return _find(self.files, request.match_info["file_id"], "No such File object: {}", "id")

    def find_batch(self, request: web.Request) -> _Batch:
        """The batch named by the URL, or a 404."""
        return _find(self.batches, request.match_info["batch_id"], "No batch found with id '{}'.", "batch_id")

    def refresh(self, batch: _Batch) -> tuple[str, float]:
        """Bring ``batch`` up to now: answer the lines due, write the output files once it is over."""
        elapsed = time.monotonic() - batch.started
        status, done = batch.state(elapsed, self.config.batch_seconds)
        while len(batch.results) < done:
            self.run_batch_line(batch, len(batch.results))
        if status in ("completed", "cancelled") and not batch.finished:
            batch.finished = True
            rng = random.Random(f"{self.config.seed}:{batch.shuffle_seed}")
            for succeeded, kind in ((True, "output"), (False, "error")):
                lines = [line for ok, line in batch.results if ok is succeeded]
                if not lines:
                    continue
                rng.shuffle(lines)  # OpenAI does not keep the input order either
                data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                file = self.store_file(f"{batch.id}_{kind}.jsonl", "batch_output", data)
                if succeeded:
                    batch.output_file_id = file.id
                else:
                    batch.error_file_id = file.id
        return status, elapsed

    def batch_object(self, batch: _Batch) -> dict:
        """The batch object as of now."""
        status, elapsed = self.refresh(batch)
        return batch.obj(status, elapsed, self.config.batch_seconds)

    def run_batch_line(self, batch: _Batch, index: int) -> None:
        """Answer one batch line like /v1/chat/completions would (no latency, limits or faults) and record it."""
        custom_id, body = batch.lines[index]
        digest = hashlib.sha1(f"{batch.id}:{index}".encode()).hexdigest()
        try:
            req = self.parse_prompt(body)
            self.parse_options(body, req)
        except _Reject as rej:
            status, payload = rej.status, rej.body()
        else:
            if BATCH_FAIL_MARKER in req.last_user:
                status = 500
                payload = _Reject(500, "The server had an error while processing your request. Sorry about that!",
                                  "server_error", None).body()
            else:
                contents, finishes, counts = self.answer(req)
                ctoks = sum(counts)
                status = 200
                payload = _completion(f"chatcmpl-{req.tag}{digest[:8]}", int(time.time()), req.model, contents,
                                      finishes, _usage(req.ptoks, ctoks))
                batch.input_tokens += req.ptoks
                batch.output_tokens += ctoks
        ok = status == 200
        if ok:
            batch.completed += 1
        else:
            batch.failed += 1
        batch.results.append((ok, {
            "id": f"batch_req_{digest[:32]}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{digest[8:40]}", "body": payload},
            "error": None,
        }))

    @_guarded
    async def create_file(self, request: web.Request) -> web.Response:
        """POST /v1/files: a multipart upload with the fields ``file`` and ``purpose``."""
        if request.content_type != "multipart/form-data":
            raise _Reject(400, "Uploads must be multipart/form-data with the fields 'file' and 'purpose'.",
                          "invalid_request_error", None)
        data: bytes | None = None
        filename = purpose = ""
        try:
            async for part in await request.multipart():
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "file":
                    filename = part.filename or "file"
                    data = await _read_part(part, FILE_MAX_BYTES)
                elif part.name == "purpose":
                    purpose = (await _read_part(part, 1024)).decode("utf-8", "replace").strip()
        except ValueError as exc:
            raise _Reject(400, f"Could not parse the multipart body: {exc}", "invalid_request_error", None) from None
        if data is None:
            raise _Reject(400, "Missing required parameter: 'file'.", "invalid_request_error",
                          "missing_required_parameter", "file")
        if not purpose:
            raise _Reject(400, "Missing required parameter: 'purpose'.", "invalid_request_error",
                          "missing_required_parameter", "purpose")
        if purpose not in FILE_PURPOSES:
            raise _Reject(400, f"'{purpose}' is not one of {list(FILE_PURPOSES)} - 'purpose'",
                          "invalid_request_error", "invalid_value", "purpose")
        self.stats.files_uploaded += 1
        return web.json_response(self.store_file(filename, purpose, data).obj())

    @_guarded
    async def list_files(self, request: web.Request) -> web.Response:
        """GET /v1/files: the stored files, newest first (``order=asc`` for oldest), optionally of one purpose."""
        files = list(self.files.values())
        if request.query.get("order", "desc") == "desc":
            files.reverse()
        purpose = request.query.get("purpose")
        if purpose:
            files = [f for f in files if f.purpose == purpose]
        page, has_more = _page(files, request, 10_000, 10_000)
        return web.json_response(_list_object([f.obj() for f in page], has_more))

    @_guarded
    async def get_file(self, request: web.Request) -> web.Response:
        """GET /v1/files/{file_id}: the file object."""
        return web.json_response(self.find_file(request).obj())

    @_guarded
    async def file_content(self, request: web.Request) -> web.Response:
        """GET /v1/files/{file_id}/content: the file's bytes."""
        return web.Response(body=self.find_file(request).data, content_type="application/octet-stream")

    @_guarded
    async def delete_file(self, request: web.Request) -> web.Response:
        """DELETE /v1/files/{file_id}."""
        file = self.find_file(request)
        del self.files[file.id]
        return web.json_response({"id": file.id, "object": "file", "deleted": True})

    @_guarded
    async def create_batch(self, request: web.Request) -> web.Response:
        """POST /v1/batches: a batch of chat completions from an uploaded ``batch`` file."""
        body = await _json_object(request)
        for key in ("input_file_id", "endpoint", "completion_window"):
            if body.get(key) is None:
                raise _Reject(400, f"Missing required parameter: '{key}'.", "invalid_request_error",
                              "missing_required_parameter", key)
        if body["endpoint"] != BATCH_ENDPOINT:
            raise _Reject(400, f"Invalid value: {body['endpoint']!r}. Supported values are: '{BATCH_ENDPOINT}' "
                          "(the only batch endpoint of this mock server).", "invalid_request_error",
                          "invalid_value", "endpoint")
        if body["completion_window"] != "24h":
            raise _Reject(400, f"Invalid value: {body['completion_window']!r}. Supported values are: '24h'.",
                          "invalid_request_error", "invalid_value", "completion_window")
        _check_metadata(body.get("metadata"))
        file_id = body["input_file_id"]
        file = self.files.get(file_id) if isinstance(file_id, str) else None
        if file is None:
            raise _Reject(400, f"Invalid 'input_file_id': no such File object: {file_id!r}.",
                          "invalid_request_error", "invalid_value", "input_file_id")
        if file.purpose != "batch":
            raise _Reject(400, f"Invalid 'input_file_id': {file_id} has purpose {file.purpose!r}, not 'batch'.",
                          "invalid_request_error", "invalid_value", "input_file_id")
        batch = _Batch(self.new_id("batch_"), file, body.get("metadata"))
        self.batches[batch.id] = batch
        self.stats.batches_created += 1
        self.stats.batch_lines += len(batch.lines)
        return web.json_response(self.batch_object(batch))

    @_guarded
    async def list_batches(self, request: web.Request) -> web.Response:
        """GET /v1/batches: the batches, newest first."""
        page, has_more = _page(list(reversed(self.batches.values())), request, 20, 100)
        return web.json_response(_list_object([self.batch_object(b) for b in page], has_more))

    @_guarded
    async def get_batch(self, request: web.Request) -> web.Response:
        """GET /v1/batches/{batch_id}: the batch as of now."""
        return web.json_response(self.batch_object(self.find_batch(request)))

    @_guarded
    async def cancel_batch(self, request: web.Request) -> web.Response:
        """POST /v1/batches/{batch_id}/cancel: stop now; "cancelled" a moment later, with the lines done so far."""
        batch = self.find_batch(request)
        status, elapsed = self.refresh(batch)
        if status in ("validating", "in_progress", "finalizing"):
            batch.cancel_at = elapsed
            batch.cancel_done = len(batch.results)
        elif status != "cancelling":
            raise _Reject(409, f"Cannot cancel a batch with status '{status}'.", "invalid_request_error", None)
        return web.json_response(self.batch_object(batch))

    # ---- other endpoints

    async def list_models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the configured model list."""
        auth_error = self.check_auth(request)
        if auth_error is not None:
            body = {"error": {"message": auth_error, "type": "invalid_request_error", "param": None,
                              "code": "invalid_api_key" if "Incorrect" in auth_error else None}}
            return web.json_response(body, status=401)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "nbparrot"} for m in self.config.models]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, request: web.Request) -> web.Response:
        """GET /stats: counters, per-tag received/answered counts and the config."""
        out = self.stats.as_dict()
        out["config"] = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "api_key"}
        return web.json_response(out)

    async def reset_stats(self, request: web.Request) -> web.Response:
        """POST /stats/reset: zero the counters and refill the rate-limit buckets (files and batches stay)."""
        self.stats = _Stats()
        for bucket in (self.requests_bucket, self.tokens_bucket):
            if bucket is not None:
                bucket.reset()
        return web.json_response({"ok": True})

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: liveness probe."""
        return web.Response(text="ok")


def _abort(request: web.Request) -> None:
    """Reset the client's TCP connection (RST, not a clean close), like a dropped upstream."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


async def _flush_then_abort(request: web.Request) -> None:
    """Let the partial response reach the client, then reset the connection."""
    transport = request.transport
    for _ in range(100):
        if transport is None or transport.is_closing() or not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.005)  # give the client a moment to read what was sent before the RST
    _abort(request)


_STATE_KEY = web.AppKey("nbparrot_mock", _MockServer)


def build_app(config: ServerConfig) -> web.Application:
    """Build the aiohttp application of the mock server (state lives on the app)."""
    check_loopback(config.host)
    server = _MockServer(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_STATE_KEY] = server
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/chat/completions", server.chat)
    app.router.add_get("/v1/models", server.list_models)
    app.router.add_get("/models", server.list_models)
    app.router.add_get("/stats", server.get_stats)
    app.router.add_get("/v1/stats", server.get_stats)
    app.router.add_post("/stats/reset", server.reset_stats)
    app.router.add_post("/v1/stats/reset", server.reset_stats)
    app.router.add_get("/health", server.health)
    for prefix in ("/v1", ""):
        app.router.add_post(prefix + "/files", server.create_file)
        app.router.add_get(prefix + "/files", server.list_files)
        app.router.add_get(prefix + "/files/{file_id}", server.get_file)
        app.router.add_get(prefix + "/files/{file_id}/content", server.file_content)
        app.router.add_delete(prefix + "/files/{file_id}", server.delete_file)
        app.router.add_post(prefix + "/batches", server.create_batch)
        app.router.add_get(prefix + "/batches", server.list_batches)
        app.router.add_get(prefix + "/batches/{batch_id}", server.get_batch)
        app.router.add_post(prefix + "/batches/{batch_id}/cancel", server.cancel_batch)
    return app


async def serve(config: ServerConfig, *, parent_pid: int | None = None) -> None:
    """Serve until cancelled, ``max_lifetime`` elapses or ``parent_pid`` dies; print the URL once bound."""
    check_loopback(config.host)
    host = "127.0.0.1" if config.host == "localhost" else config.host
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, config.port)
        await site.start()
        port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        print(f"nbparrot server listening on http://{shown}:{port}/v1", flush=True)
        done = asyncio.Event()
        watchdog = None
        if parent_pid is not None:
            watchdog = asyncio.ensure_future(_watch_parent(parent_pid, done))
        try:
            await asyncio.wait_for(done.wait(), timeout=config.max_lifetime)
        except asyncio.TimeoutError:
            pass
        finally:
            if watchdog is not None:
                watchdog.cancel()
    finally:
        await runner.cleanup()


async def _watch_parent(parent_pid: int, done: asyncio.Event) -> None:
    """Set ``done`` once the parent process is gone (we got re-parented)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    done.set()


# --------------------------------------------------------------------------- CLI

# (field, type, help); flags are --field-with-dashes
def _bool(text: str) -> bool:
    """A boolean flag value: true/false, yes/no, 1/0."""
    value = text.strip().lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return value in ("true", "yes", "1")


_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("host", str, "loopback address to bind (127.0.0.1, localhost or ::1)"),
    ("port", int, "port (0 = pick a free one)"),
    ("latency_ms", float, "fixed latency / time to first token, ms"),
    ("jitter_ms", float, "extra uniform random latency in [0, jitter], ms"),
    ("per_token_ms", float, "extra latency per completion token, ms"),
    ("rpm", int, "requests per minute limit"),
    ("tpm", int, "tokens per minute limit"),
    ("burst_seconds", float, "bucket capacity in seconds of limit (60 = a full minute)"),
    ("completion_tokens", int, "completion tokens per choice"),
    ("completion_tokens_max", int, "if set, completion tokens vary in [completion-tokens, this]"),
    ("api_key", str, "require this Bearer key (others get 401)"),
    ("models", str, "comma-separated model names served (others get 404)"),
    ("context_window", int, "context window in tokens"),
    ("p500", float, "probability of a 500"),
    ("p502", float, "probability of an HTML 502"),
    ("p503", float, "probability of a 503"),
    ("preset", float, "probability of a connection reset mid-body"),
    ("pstall", float, "probability of a stall (no answer, reset after --stall-seconds)"),
    ("stall_seconds", float, "how long a stalled request hangs"),
    ("pquota", float, "probability of a 429 insufficient_quota"),
    ("p429", float, "probability of a 429 rate_limit_exceeded asking to wait --retry-after-429 seconds"),
    ("retry_after_429", float, "seconds the injected 429s ask to wait"),
    ("usage", _bool, "send a usage object in answers (false: none, as some gateways)"),
    ("usage_scale", float, "count prompt tokens this many times over (an endpoint whose tokenizer counts more)"),
    ("huge_bytes", int, "bytes of the answers the <<huge-answer>> and <<huge-junk>> markers ask for"),
    ("seed", int, "seed of the fault RNG"),
    ("json_schema", _bool, "accept response_format json_schema (false: 400, as older endpoints)"),
    ("batch_seconds", float, "seconds a batch takes from creation to completed (a tenth validating, a tenth finalizing)"),
    ("max_lifetime", float, "exit after this many seconds"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ServerConfig field (dashes for underscores) to ``parser``."""
    defaults = ServerConfig()
    for name, kind, text in _FLAGS:
        default = getattr(defaults, name)
        if name == "models":
            default = ",".join(default)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default,
                            help=f"{text} (default: {default})")
    parser.add_argument("--no-retry-after", dest="retry_after", action="store_false",
                        help="429s carry no retry-after / retry-after-ms headers")


def config_from_args(ns: argparse.Namespace) -> ServerConfig:
    """Build a ServerConfig from parsed flags (raises ValueError on invalid values)."""
    values = {name: getattr(ns, name) for name, _, _ in _FLAGS if hasattr(ns, name)}
    if isinstance(values.get("models"), str):
        values["models"] = tuple(m.strip() for m in values["models"].split(",") if m.strip())
    values["retry_after"] = getattr(ns, "retry_after", True)
    return ServerConfig(**values)


def config_to_argv(config: ServerConfig) -> list[str]:
    """The command-line flags that reproduce ``config`` (only non-default values)."""
    defaults = ServerConfig()
    argv: list[str] = []
    for name, _, _ in _FLAGS:
        value = getattr(config, name)
        if value == getattr(defaults, name) or value is None:
            continue
        text = ",".join(value) if name == "models" else repr(value) if isinstance(value, float) else str(value)
        argv += ["--" + name.replace("_", "-"), text]
    if not config.retry_after:
        argv.append("--no-retry-after")
    return argv


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m nbparrot.server``."""
    parser = argparse.ArgumentParser(prog="python -m nbparrot.server",
                                     description="nbparrot's OpenAI-compatible mock server (loopback only).")
    add_arguments(parser)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--cpu", type=int, default=None, help="pin the server to this CPU")
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    if ns.cpu is not None:
        os.sched_setaffinity(0, {ns.cpu})
    try:
        asyncio.run(serve(config, parent_pid=ns.parent_pid))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"nbparrot server: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


# --------------------------------------------------------------------------- subprocess wrapper


def _terminate(proc: subprocess.Popen) -> None:
    """Terminate a child process, killing it if it does not exit within 5 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerProcess:
    """The mock server in a subprocess: what tests, the demo and benchmarks use."""

    def __init__(self, config: ServerConfig | None = None, *, cpu: int | None = None, **overrides: Any) -> None:
        """Prepare (not start) a server from ``config`` with ``overrides`` of its fields."""
        config = dataclasses.replace(config or ServerConfig(), **overrides)
        if config.max_lifetime is None:
            config = dataclasses.replace(config, max_lifetime=SUBPROCESS_MAX_LIFETIME)
        self.config = config
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.base_url = ""
        self.root_url = ""
        self._stderr: deque[str] = deque(maxlen=200)
        self._finalizer: weakref.finalize | None = None

    def start(self, timeout: float = 15.0) -> ServerProcess:
        """Launch ``python -m nbparrot.server`` (port 0 unless configured) and wait for its "listening" line."""
        if self.proc is not None:
            return self
        cmd = [sys.executable, "-m", "nbparrot.server", *config_to_argv(dataclasses.replace(self.config, port=0)),
               "--port", str(self.config.port), "--parent-pid", str(os.getpid())]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=env, text=True, encoding="utf-8",
                                            errors="replace")
        self._finalizer = weakref.finalize(self, _terminate, proc)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True).start()
        threading.Thread(target=_pump, args=(proc.stderr, self._stderr.append), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                if proc.poll() is not None:
                    time.sleep(0.1)  # let the stderr pump catch the traceback
                    self.stop()
                    raise RuntimeError(f"mock server exited with {proc.returncode}: {self.stderr_tail()}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mock server did not start within {timeout:.0f}s: {self.stderr_tail()}")
                continue
            match = _LISTENING_RE.search(line)
            if match:
                host, self.port = match.group(1), int(match.group(2))
                self.root_url = f"http://{host}:{self.port}"
                self.base_url = self.root_url + "/v1"
                return self

    def stderr_tail(self) -> str:
        """The last lines the server wrote to stderr (for error messages)."""
        return "".join(self._stderr).strip()[-4000:]

    def _request(self, method: str, path: str) -> Any:
        """One JSON request to the server's control endpoints (no proxies: loopback only)."""
        if not self.root_url:
            raise RuntimeError("server not started")
        req = urllib.request.Request(self.root_url + path, method=method, data=b"" if method == "POST" else None)
        with _NO_PROXY_OPENER.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        """GET /stats."""
        return self._request("GET", "/stats")

    def reset(self) -> None:
        """POST /stats/reset: zero the counters and refill the limiter buckets."""
        self._request("POST", "/stats/reset")

    def stop(self) -> None:
        """Terminate the server (kill after 5 s); safe to call twice."""
        if self.proc is not None:
            _terminate(self.proc)
        if self._finalizer is not None:
            self._finalizer.detach()

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> ServerProcess:
        """Start on entering a with-block."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop on leaving a with-block."""
        self.stop()

    def __repr__(self) -> str:
        """Show where it listens."""
        return f"ServerProcess({self.base_url or 'not started'})"


def _pump(stream: Any, sink: Any) -> None:
    """Copy lines from a child pipe into ``sink`` until EOF (keeps the child from blocking)."""
    try:
        for line in stream:
            sink(line)
    except (OSError, ValueError):
        pass
    finally:
        stream.close()


if __name__ == "__main__":
    main()
