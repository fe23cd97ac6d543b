"""Where a run sends its requests and with which defaults.

Configuration follows the openai SDK's conventions (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``OPENAI_API_VERSION`` for Azure); session-wide defaults (model, endpoint, concurrency, ...)
live in ``nbparrot.defaults`` and can be set with ``nbparrot.configure(...)`` or ``%config``.
The API key is held by ``Endpoint`` and shown nowhere: its repr masks it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from urllib.parse import urlsplit

from .errors import ConfigError

__all__ = ["Defaults", "defaults", "configure", "Endpoint", "resolve_endpoint", "OPENAI_URL"]

OPENAI_URL = "https://api.openai.com/v1"


@dataclass
class Defaults:
    """Session-wide defaults for every run; an argument to ``map`` always wins."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None  # None: OPENAI_BASE_URL, else OpenAI's
    concurrency: int = 128  # requests in flight at once
    max_retries: int = 5  # retries per row for 408/409/5xx/connection errors/timeouts
    timeout: float = 120.0  # seconds per attempt; a stalled answer never hangs a run
    max_tokens: int = 256  # always sent: the provider charges it up front, so budgets need it
    system: str | None = None  # default system prompt
    cache: str = "use"  # "use", "refresh" or "off" (see nbparrot.cache)
    max_wait: float = 60.0  # seconds: a 429 asking to wait longer stops the run with an error naming the wait
    max_response_bytes: int = 10 * 1024 * 1024  # a larger answer fails its row and is not read further
    first_byte_timeout: float = 10.0  # no answer yet by then: a status check finds out if the endpoint is there


defaults = Defaults()


def configure(**settings: object) -> Defaults:
    """Change session defaults, e.g. ``nbparrot.configure(model="gpt-4.1-mini")``."""
    known = {f.name for f in fields(Defaults)}
    for name, value in settings.items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}; known settings: {', '.join(sorted(known))}")
        setattr(defaults, name, value)
    return defaults


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint: the chat URL and the headers that authenticate to it."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    azure: bool = False
    api_version: str | None = None

    @property
    def chat_url(self) -> str:
        url = self.base_url + "/chat/completions"
        if self.azure and self.api_version and "/deployments/" in self.base_url:
            url += f"?api-version={self.api_version}"
        return url

    def headers(self) -> dict[str, str]:
        """Request headers, including the key (never log or display these)."""
        headers = {"Content-Type": "application/json", "User-Agent": "nbparrot"}
        if self.api_key:
            if self.azure:
                headers["api-key"] = self.api_key
            else:
                headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    @property
    def is_openai(self) -> bool:
        return urlsplit(self.base_url).hostname == "api.openai.com"

    def __repr__(self) -> str:
        key = "set" if self.api_key else "none"
        return f"Endpoint({self.base_url!r}, api_key={key})"


def resolve_endpoint(base_url: str | None = None, api_key: str | None = None, api_version: str | None = None) -> Endpoint:
    """The endpoint from arguments, then defaults, then the environment; checked before any request."""
    url = base_url or defaults.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base_url {url.split('?')[0]!r} is not an http(s) URL, e.g. 'http://127.0.0.1:8000/v1'")
    if parts.query or parts.fragment:  # it would be shown in panels and errors, and break the path
        raise ConfigError("base_url must not carry a query string; pass the key as api_key= "
                          f"(base_url given: {url.split('?')[0]!r}?...)")
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    host = parts.hostname or ""
    azure = host.endswith(".openai.azure.com") or host.endswith(".cognitiveservices.azure.com")
    if azure:
        key = key if api_key is not None else (os.environ.get("AZURE_OPENAI_API_KEY") or key)
    if not key and (host == "api.openai.com" or azure):
        raise ConfigError("no API key: set the OPENAI_API_KEY environment variable or pass api_key=")
    version = api_version or os.environ.get("OPENAI_API_VERSION") or ("2024-10-21" if azure else None)
    return Endpoint(url, key or None, azure, version)
