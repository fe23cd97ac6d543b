"""One chat completion, streamed: the text arrives as it is generated (for ``%%llm``).

Server-sent events (``stream=true`` with ``stream_options.include_usage``) are read line by
line; every content delta is handed to ``on_text`` with the text so far. Transient failures
before the first delta (connection errors, 429, 5xx) are retried a few times, honouring
``retry-after``; fatal ones raise the same errors as a batch does.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, Callable

import aiohttp

from .config import Endpoint
from .errors import FatalError, NbparrotError, describe_error, error_fields, fatal_error
from .ratelimit import retry_after_seconds
from .transport import TRANSIENT_ERRORS

__all__ = ["StreamResult", "stream_chat"]

class StreamResult:
    """The streamed answer: texts per choice, finish reasons and usage (``usage_sent`` False when
    the endpoint sent none: the token counts are then 0, for the caller to estimate)."""

    __slots__ = ("texts", "finish_reasons", "prompt_tokens", "completion_tokens", "cached_tokens", "usage_sent")

    def __init__(self, n: int):
        self.texts = [""] * n
        self.finish_reasons: list[Any] = [None] * n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens served from the provider's prompt cache (cheaper)
        self.usage_sent = False


async def stream_chat(endpoint: Endpoint, body: dict, on_text: Callable[[list[str]], None], *,
                      timeout: float = 120.0, attempts: int = 4) -> StreamResult:
    """Send ``body`` with streaming on; ``on_text(texts)`` is called as deltas arrive."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    data = json.dumps(body).encode()
    n = int(body.get("n") or 1)
    client_timeout = aiohttp.ClientTimeout(total=timeout, connect=min(10.0, timeout))
    async with aiohttp.ClientSession(headers=endpoint.headers(), timeout=client_timeout) as session:
        for attempt in range(1, attempts + 1):
            result = StreamResult(n)
            wait = None
            try:
                async with session.post(endpoint.chat_url, data=data, allow_redirects=False) as response:
                    if response.status != 200:
                        raw = await response.read()
                        wait = _check(response.status, response.headers, raw, endpoint)
                    else:
                        await _read_events(response, result, on_text)
                        return result
            except TRANSIENT_ERRORS as exc:
                if any(result.texts):  # part of the answer was shown: do not silently start over
                    raise NbparrotError(f"the stream broke off: {type(exc).__name__}: {exc}") from None
                wait = None
                last = exc
            else:
                last = None
            if attempt == attempts:
                break
            await asyncio.sleep(wait if wait is not None else random.uniform(0, 2 ** attempt * 0.5))
        raise NbparrotError(f"no answer from {endpoint.display_url} after {attempts} attempts"
                            + (f" ({type(last).__name__}: {last})" if last else ""))


def _check(status: int, headers: Any, raw: bytes, endpoint: Endpoint) -> float | None:
    """Raise for answers that cannot be retried; return how long to wait before the next try."""
    message, code, kind = error_fields(raw, endpoint.api_key)
    where = f"{status} from {endpoint.display_url}"
    fatal = fatal_error(status, message, code, kind, where)
    if fatal is not None:
        raise fatal
    if status == 429 or status in (408, 409) or status >= 500:
        return retry_after_seconds(headers, message)
    raise FatalError(f"{endpoint.display_url}: {describe_error(status, message, code)}", status=status,
                     code=code if isinstance(code, str) else None)


async def _read_events(response: aiohttp.ClientResponse, result: StreamResult,
                       on_text: Callable[[list[str]], None]) -> None:
    async for line in response.content:
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            break
        try:
            event = json.loads(payload)
        except ValueError:
            raise NbparrotError(f"the endpoint sent a malformed stream event: {payload[:80]!r}") from None
        if not isinstance(event, dict):
            raise NbparrotError(f"the endpoint sent a stream event that is not an object: {payload[:80]!r}")
        usage = event.get("usage")
        if isinstance(usage, dict):
            result.usage_sent = True
            result.prompt_tokens = usage.get("prompt_tokens") or 0
            result.completion_tokens = usage.get("completion_tokens") or 0
            details = usage.get("prompt_tokens_details")
            result.cached_tokens = (details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        changed = False
        for choice in event.get("choices") or ():
            index = choice.get("index", 0)
            if index >= len(result.texts):
                continue
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                result.texts[index] += delta
                changed = True
            if choice.get("finish_reason"):
                result.finish_reasons[index] = choice["finish_reason"]
        if changed:
            on_text(result.texts)
