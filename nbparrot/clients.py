"""``client=``: an openai client object as the source of the endpoint, key and headers of a run.

Users often have an ``openai.OpenAI`` / ``AsyncOpenAI`` / ``AzureOpenAI`` / ``AsyncAzureOpenAI``
configured already (base URL, key, organization, project, default headers, Azure's api-version
and deployment). ``endpoint_of`` reads those from it once, when the run starts; the requests
themselves still go through nbparrot's aiohttp transport (the SDK spends 1.3-3.2 ms of CPU per
request against aiohttp's ~0.2 ms, see bench/README.md). The client is recognised by its class's
module, so nothing here imports openai: a user who passes no client never loads it.
"""

from __future__ import annotations

import inspect
from typing import Any
from urllib.parse import quote, urlsplit

from .config import AZURE_HOSTS, Endpoint
from .errors import ConfigError, redact_url

__all__ = ["is_openai_client", "endpoint_of"]

_CLIENTS = ("OpenAI", "AsyncOpenAI", "AzureOpenAI", "AsyncAzureOpenAI")
_AZURE = ("AzureOpenAI", "AsyncAzureOpenAI")
_SDK_HEADERS = frozenset({"accept", "content-type", "user-agent"})  # the SDK's own; nbparrot sends its own
_NO_KEY = ("", "<missing API key>")  # what the SDK holds when the key comes from elsewhere (a callable, Azure AD)


def _kinds(client: Any) -> set[str]:
    """The openai client classes ``client`` is an instance of (subclasses included), by name and module."""
    return {c.__name__ for c in type(client).__mro__
            if c.__name__ in _CLIENTS and (c.__module__ or "").split(".")[0] == "openai"}


def is_openai_client(client: Any) -> bool:
    """Whether ``client`` is one of the openai SDK's clients (without importing openai)."""
    return bool(_kinds(client))


def endpoint_of(client: Any, base_url: str | None, api_key: str | None, model: str | None) -> Endpoint:
    """The endpoint ``client`` is configured for; ``base_url`` / ``api_key`` given too must agree with it.

    ``model`` is the Azure deployment when an Azure client was made without ``azure_deployment``
    (the SDK then puts the model in the path, and so does this). No message shows a key."""
    kinds = _kinds(client)
    if not kinds:
        raise ConfigError(f"client must be an openai.OpenAI, AsyncOpenAI, AzureOpenAI or AsyncAzureOpenAI "
                          f"object, not {type(client).__module__}.{type(client).__name__}")
    azure = bool(kinds & set(_AZURE))
    url = str(client.base_url).rstrip("/")
    if base_url is not None and base_url.strip().rstrip("/") != url:
        raise ConfigError(f"base_url={redact_url(base_url)!r} and client= (base URL {redact_url(url)!r}) disagree; "
                          "give the endpoint once: client= alone, or base_url= and api_key= without it")
    key = _key(client)
    if api_key is not None and api_key != key:
        raise ConfigError("api_key= and the key of client= differ (neither is shown); give the key once: "
                          "client= alone, or base_url= and api_key= without it")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"the client's base URL {redact_url(url)!r} is not an http(s) URL")
    if azure and "/deployments/" not in url + "/" and model:
        url += "/deployments/" + quote(model, safe="")
    headers = {name: value for name, value in client.default_headers.items()
               if isinstance(value, str) and name.lower() not in _SDK_HEADERS
               and not name.lower().startswith("x-stainless")}  # organization, project, the user's default_headers
    if azure and key is None and not any(name.lower() in ("authorization", "api-key") for name in headers):
        token = _azure_ad_token(client)
        if token:
            headers["Authorization"] = f"Bearer {token}"
    query = tuple((name, str(value)) for name, value in client.default_query.items() if value is not None)
    version = dict(query).get("api-version")
    return Endpoint(url, key, azure or parts.hostname.endswith(AZURE_HOSTS), version, extra_headers=tuple(headers.items()),
                    query=query)


def _key(client: Any) -> str | None:
    """The client's API key; a key provider (a callable) is called once, now."""
    key = getattr(client, "api_key", None)
    if isinstance(key, str) and key not in _NO_KEY:
        return key
    provider = getattr(client, "_api_key_provider", None)
    return _called(provider, "api_key") if provider is not None else None


def _azure_ad_token(client: Any) -> str | None:
    """An Azure AD token: the client's own, or its token provider's (called once per run)."""
    token = getattr(client, "_azure_ad_token", None)
    if token:
        return token
    provider = getattr(client, "_azure_ad_token_provider", None)
    return _called(provider, "azure_ad_token_provider") if provider is not None else None


def _called(provider: Any, name: str) -> str | None:
    value = provider()
    if inspect.isawaitable(value):
        if hasattr(value, "close"):
            value.close()  # a coroutine never awaited: closed, so it does not warn
        raise ConfigError(f"the client's {name} is async; nbparrot reads it once when a run starts and cannot await "
                          "it there: give the client a plain (sync) callable or a key")
    return value or None

