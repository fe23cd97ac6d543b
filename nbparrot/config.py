"""Where a run sends its requests and with which defaults.

Configuration follows the openai SDK's conventions (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``OPENAI_API_VERSION`` for Azure); session-wide defaults (model, endpoint, concurrency, ...)
live in ``nbparrot.defaults`` and can be set with ``nbparrot.configure(...)`` or ``%config``.
The API key is held by ``Endpoint`` and shown nowhere: its repr masks it.

Credentials in ``base_url`` (``https://user:password@host/v1``) are taken out of the URL and sent
as HTTP Basic auth, as curl, requests and browsers do (OpenAI itself accepts the key as the
password of a blank user). The URL the run keeps, and every message shows, has none of them.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

from .errors import ConfigError, redact, redact_url, secret_header

__all__ = ["Defaults", "defaults", "configure", "Endpoint", "resolve_endpoint", "OPENAI_URL"]

OPENAI_URL = "https://api.openai.com/v1"
AZURE_HOSTS = (".openai.azure.com", ".cognitiveservices.azure.com")


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
    background: bool | str = "auto"  # in a kernel: runs go on after their cell (True), finish in it (False),
    # or "auto": in the background unless the notebook is executed headlessly (nbconvert, papermill)
    client: Any = None  # an openai client object: endpoint, key and headers of every run (see nbparrot.clients)


defaults = Defaults()


def configure(**settings: object) -> Defaults:
    """Change session defaults, e.g. ``nbparrot.configure(model="gpt-4.1-mini")``."""
    known = {f.name for f in fields(Defaults)}
    for name, value in settings.items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}; known settings: {', '.join(sorted(known))}")
        setattr(defaults, name, value)
    return defaults


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its ``user:password@`` part, and that (user, password), unquoted; or None."""
    scheme, sep, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    if not sep or "@" not in authority:
        return url, None
    userinfo, _, host = authority.rpartition("@")
    user, _, password = userinfo.partition(":")
    return f"{scheme}://{host}{rest[len(authority):]}", (unquote(user), unquote(password))


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint: the chat URL and the headers that authenticate to it.

    ``basic_auth`` is a (user, password) pair sent as HTTP Basic auth. A ``base_url`` given with
    ``user:password@`` is split here, so ``base_url`` never holds credentials; with Basic auth there
    is no room for a Bearer ``api_key`` too (both are the Authorization header), except on Azure,
    whose key goes in its own ``api-key`` header. Show the URL as ``display_url``: it also masks a
    key-looking path segment (``/v1/sk-...``), which the requests themselves need.
    """

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    azure: bool = False
    api_version: str | None = None
    basic_auth: tuple[str, str] | None = field(default=None, repr=False)
    extra_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # an openai client's own headers
    query: tuple[tuple[str, str], ...] = ()  # sent with every request (an openai client's default_query)

    def __post_init__(self) -> None:
        shown = redact_url(self.base_url)  # with ***@ where the credentials were
        url, credentials = split_credentials(self.base_url)
        if credentials is not None:
            if self.basic_auth is not None:
                raise ConfigError(f"base_url {shown!r} carries user:password and "
                                  "basic_auth= is given too; give the credentials once")
            object.__setattr__(self, "base_url", url)
            object.__setattr__(self, "basic_auth", credentials)
        if self.basic_auth is not None and self.api_key and not self.azure:
            raise ConfigError(f"base_url {shown!r} has HTTP Basic credentials (user:password@) and an "
                              "api_key is given too: both would go in the Authorization header. Give one: "
                              "api_key= with a base_url without user:password@, or the URL's credentials alone")

    def url(self, path: str) -> str:
        """The URL of ``path`` (e.g. "/embeddings") under ``base_url``, with the query every request carries."""
        query = list(self.query)
        if (self.azure and self.api_version and "/deployments/" in self.base_url
                and not any(name == "api-version" for name, _ in query)):
            query.insert(0, ("api-version", self.api_version))
        return self.base_url + path + ("?" + urlencode(query) if query else "")

    @property
    def chat_url(self) -> str:
        return self.url("/chat/completions")

    @property
    def display_url(self) -> str:
        """``base_url`` fit for messages and panels (key-looking path segments masked)."""
        return redact_url(self.base_url)

    @property
    def display_chat_url(self) -> str:
        """``chat_url`` fit for messages and panels."""
        return redact_url(self.chat_url)

    def redact(self, text: str) -> str:
        """``text`` without this endpoint's key, password, key-like headers and query values, or any URL's
        credentials, key-looking path and query values (see ``redact_url``)."""
        if self.basic_auth is not None:
            text = redact(text, self.basic_auth[1])
        for name, value in (*self.extra_headers, *self.query):  # a token in a client's default headers or query
            if secret_header(name):
                text = redact(text, value.split(" ", 1)[-1])
        return redact(text, self.api_key)

    def headers(self) -> dict[str, str]:
        """Request headers, including the key (never log or display these)."""
        headers = {"Content-Type": "application/json", "User-Agent": "nbparrot"}
        if self.basic_auth is not None:
            token = base64.b64encode(":".join(self.basic_auth).encode()).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        if self.api_key:
            if self.azure:
                headers["api-key"] = self.api_key
            else:
                headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self.extra_headers)
        return headers

    @property
    def is_openai(self) -> bool:
        return urlsplit(self.base_url).hostname == "api.openai.com"

    def __repr__(self) -> str:
        key = "set" if self.api_key else "none"
        basic = ", basic_auth=set" if self.basic_auth is not None else ""
        return f"Endpoint({self.display_url!r}, api_key={key}{basic})"


def resolve_endpoint(base_url: str | None = None, api_key: str | None = None, api_version: str | None = None, *,
                     client: Any = None, model: str | None = None) -> Endpoint:
    """The endpoint from arguments, then defaults, then the environment; checked before any request.

    An openai ``client`` (else ``defaults.client`` when neither ``base_url`` nor ``api_key`` is given)
    supplies all of it instead (see ``nbparrot.clients``; ``model`` names an Azure deployment there).

    ``user:password@`` in the URL becomes HTTP Basic auth (see ``Endpoint``) and then
    ``OPENAI_API_KEY`` is not sent (the URL's credentials are meant for this endpoint); an
    explicit ``api_key=`` together with them is a ``ConfigError`` (Azure excepted). No message
    here repeats the password or a key-looking path segment.
    """
    if client is None and base_url is None and api_key is None:
        client = defaults.client
    if client is not None:
        from .clients import endpoint_of

        return endpoint_of(client, base_url, api_key, model)
    url = base_url or defaults.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
    url = url.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    shown = redact_url(url).split("?")[0].split("#")[0]
    bare, credentials = split_credentials(url)  # Endpoint moves the credentials into basic_auth
    parts = urlsplit(bare)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"base_url {shown!r} is not an http(s) URL, e.g. 'http://127.0.0.1:8000/v1'")
    if parts.query or parts.fragment:  # it would be shown in panels and errors, and break the path
        raise ConfigError("base_url must not carry a query string; pass the key as api_key= "
                          f"(base_url given: {shown!r}?...)")
    host = parts.hostname or ""
    azure = host.endswith(AZURE_HOSTS)
    if credentials is not None and not azure:
        key = api_key  # the environment's key is not for this endpoint; an explicit one conflicts (Endpoint says so)
    else:
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    if azure:
        key = key if api_key is not None else (os.environ.get("AZURE_OPENAI_API_KEY") or key)
    if not key and credentials is None and (host == "api.openai.com" or azure):
        variable = "AZURE_OPENAI_API_KEY (or OPENAI_API_KEY)" if azure else "OPENAI_API_KEY"
        raise ConfigError(f"no API key: set the {variable} environment variable or pass api_key=")
    version = api_version or os.environ.get("OPENAI_API_VERSION") or ("2024-10-21" if azure else None)
    return Endpoint(url, key or None, azure, version)
