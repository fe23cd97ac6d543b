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

__all__ = ["Transport", "TRANSIENT_ERRORS"]

# Errors after which the same request may simply be tried again.
TRANSIENT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError)


class Transport:
    """Posts chat-completion bodies to one endpoint with a per-attempt timeout."""

    def __init__(self, endpoint: Endpoint, *, concurrency: int, timeout: float, connect_timeout: float = 10.0):
        self.endpoint = endpoint
        self._url = endpoint.chat_url
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
        """Send one request; returns status, headers (case-insensitive mapping) and body bytes."""
        # No redirects: a key in a custom header (Azure's api-key) would follow one to another host.
        async with self._session.post(self._url, data=body, allow_redirects=False) as response:  # type: ignore[union-attr]
            data = await response.read()
            return response.status, response.headers, data
