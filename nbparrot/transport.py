"""HTTP transport: one aiohttp session, pre-encoded bodies, raw answers.

The openai SDK spends 1.3-3.2 ms of CPU per request against aiohttp's ~0.2 ms (see
``bench/README.md``); in a notebook that CPU is taken from the user's kernel, so the hot
path talks to the endpoint directly and leaves parsing to the engine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from .config import Endpoint

__all__ = ["Transport", "TRANSIENT_ERRORS", "ResponseTooLargeError"]

# Errors after which the same request may simply be tried again.
TRANSIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError)


class ResponseTooLargeError(Exception):
    """An answer bigger than the transport's ``max_bytes``: refused as soon as that is known, never buffered whole."""


class Transport:
    """Posts chat-completion bodies to one endpoint with a per-attempt timeout and a cap on answer size."""

    def __init__(self, endpoint: Endpoint, *, concurrency: int, timeout: float, connect_timeout: float = 10.0,
                 max_bytes: int = 10 * 1024 * 1024):
        self.endpoint = endpoint
        self._url = endpoint.chat_url
        self._max_bytes = max_bytes
        self._headers = endpoint.headers()
        self._limit = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(connect_timeout, timeout))
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Transport":
        connector = aiohttp.TCPConnector(limit=self._limit, limit_per_host=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers, skip_auto_headers=("Accept-Encoding",)
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, body: bytes) -> tuple[int, Any, bytes]:
        """Send one request; returns status, headers (case-insensitive mapping) and body bytes.

        Raises ``ResponseTooLargeError`` for an answer over ``max_bytes``: at once when its
        Content-Length says so, else as soon as that many bytes have arrived (the connection is
        then dropped, so the rest is never read)."""
        # No redirects: a key in a custom header (Azure's api-key) would follow one to another host.
        async with self._session.post(self._url, data=body, allow_redirects=False) as response:  # type: ignore[union-attr]
            length, cap = response.content_length, self._max_bytes
            if length is not None and length <= cap:
                return response.status, response.headers, await response.read()
            if length is not None:
                raise ResponseTooLargeError(f"the answer is {length:,} bytes, over max_response_bytes={cap:,}")
            chunks, size = [], 0
            async for chunk in response.content.iter_any():
                size += len(chunk)
                if size > cap:
                    raise ResponseTooLargeError(f"the answer passed max_response_bytes={cap:,} bytes")
                chunks.append(chunk)
            return response.status, response.headers, b"".join(chunks)

    async def alive(self, timeout: float) -> int:
        """The HTTP status of ``GET {base_url}/models``: any answer shows the endpoint is there."""
        async with self._session.get(self.endpoint.base_url + "/models", allow_redirects=False,  # type: ignore[union-attr]
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            return response.status
