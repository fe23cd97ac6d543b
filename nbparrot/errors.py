"""One exception hierarchy for everything nbparrot raises.

Row-level failures are never raised: they are recorded on the row (see ``results``).
What is raised is either a mistake we can name before any paid call (``ConfigError``,
``TemplateError``), or a fatal answer from the endpoint that makes every further request
pointless (``FatalError`` and its subclasses), or a question about an unfinished run.
"""

from __future__ import annotations

import json
import re

__all__ = [
    "NbparrotError",
    "ConfigError",
    "TemplateError",
    "FatalError",
    "AuthenticationError",
    "PermissionDeniedError",
    "ModelNotFoundError",
    "QuotaExceededError",
    "EndpointUnreachableError",
    "EndpointFailingError",
    "RateLimitWaitError",
    "LogprobsUnavailableError",
    "BudgetExceededError",
    "RunNotFinishedError",
    "RunCancelledError",
    "redact",
    "redact_url",
    "secret_header",
    "SHOWN_QUERY",
    "error_fields",
    "fatal_error",
    "describe_error",
]


class NbparrotError(Exception):
    """Base class of every error nbparrot raises.

    An error that stopped a run carries it as ``run`` (``err.run.partial()``, ``err.run.errors``)."""

    run = None  # the Run this error stopped, when it stopped one

    def __reduce__(self):  # pickled (e.g. from a dask worker) without its run, which holds a loop and a session
        state = {k: v for k, v in self.__dict__.items() if k != "run"}
        return self.__class__, self.args, state or None


class ConfigError(NbparrotError, ValueError):
    """A bad argument or setting, found before any request was sent."""


class TemplateError(NbparrotError, ValueError):
    """A template that cannot be rendered against the data (found before any request)."""


class RenderError(ValueError):
    """A row whose values cannot be rendered (text, or an image or file); the message names the column."""


class FatalError(NbparrotError):
    """The endpoint gave an answer that stops the whole run (bad key, unknown model, no quota).

    ``status`` is the HTTP status, ``code`` the provider's error code when it gave one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(redact(message))  # it names the URL, shown in panels, row errors and logs
        self.status = status
        self.code = code


class AuthenticationError(FatalError):
    """401: the API key was refused."""


class PermissionDeniedError(FatalError):
    """403: the key may not use this endpoint or model."""


class ModelNotFoundError(FatalError):
    """404: the endpoint does not know the model (or the URL is wrong)."""


class QuotaExceededError(FatalError):
    """429 ``insufficient_quota``: the account has no credit left; retrying cannot help."""


class EndpointUnreachableError(FatalError):
    """Nothing answered at all: the server is down or ``base_url`` is wrong."""


class EndpointFailingError(FatalError):
    """The endpoint answers, but row after row fails through all its retries (e.g. a 502 every time)."""


class RateLimitWaitError(FatalError):
    """A 429 asked to wait longer than ``max_wait`` (say a daily limit): stopping beats a silent day-long pause."""


class LogprobsUnavailableError(FatalError):
    """The endpoint answered without the logprobs a cascade reads its confidence from."""


class BudgetExceededError(NbparrotError):
    """The run stopped because the next requests would have passed ``max_cost``."""


class RunNotFinishedError(NbparrotError):
    """``result()`` was asked of a run that is still going: ``await`` it instead."""


class RunCancelledError(NbparrotError):
    """Raised by ``await run`` when the awaiting cell is interrupted (the run is cancelled too)."""


_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{4})[A-Za-z0-9_\-]{8,}")
_URL_PATTERN = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]*[^\s'\"<>`.,;:)\]]")
_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/]*)")


def _looks_like_key(segment: str) -> bool:
    """A path segment that reads as a token: a long run of letters mixed with digits (hex keys,
    base64ish tokens), not a word, a version, a date or a deployment name like gpt-4o-2024-08-06."""
    return len(segment) >= 16 and any(
        len(chunk) >= 16 and not chunk.isalpha() and not chunk.isdigit()
        for chunk in re.split(r"[-_.~%]", segment))


_SECRET_WORDS = ("key", "token", "auth", "secret", "password", "cookie")


def secret_header(name: str) -> bool:
    """Whether a header carries a credential (its name holds key, token, auth, secret, password or cookie:
    Authorization, api-key, x-goog-api-key, Ocp-Apim-Subscription-Key, X-Portkey-Api-Key, Cookie, ...).
    The one rule for what is never shown, here and in the bundled server's /stats."""
    name = name.lower()
    return any(word in name for word in _SECRET_WORDS)


SHOWN_QUERY = frozenset({"api-version"})  # the query parameters whose values are shown; any other may be a key


def _redact_query(query: str) -> str:
    """A query string (without its ``?``) with every value masked but those of ``SHOWN_QUERY``."""
    pairs = []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        pairs.append(pair if not value or name.lower() in SHOWN_QUERY else f"{name}=***")
    return "&".join(pairs)


def redact_url(url: str) -> str:
    """``url`` fit to show: ``user:password@`` becomes ``***@``, key-looking path segments
    keep only their first 4 characters (``/v1/sk-abc123.../`` shows as ``/v1/sk-a***/``), and
    query values become ``***`` (``?key=...`` is how some gateways take the key), api-version's excepted.

    The one way every message, panel and repr should print an endpoint's URL."""
    match = _AUTHORITY.match(url)
    if match is None:
        return _KEY_PATTERN.sub(r"\1***", url)
    scheme, authority = match.groups()
    if "@" in authority:  # the last "@" ends the userinfo, as urlsplit reads it
        authority = "***@" + authority.rpartition("@")[2]
    rest = url[match.end():]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    path = "/".join(s[:4] + "***" if _looks_like_key(s) else s for s in rest[:cut].split("/"))
    tail = rest[cut:]
    if tail.startswith("?"):
        query, hash_, fragment = tail[1:].partition("#")
        tail = "?" + _redact_query(query) + hash_ + fragment
    return _KEY_PATTERN.sub(r"\1***", scheme + authority + path + tail)


def redact(text: str, secret: str | None = None) -> str:
    """Remove an API key (the given one, and anything shaped like ``sk-...``) from ``text``, and
    credentials and key-looking path segments from any URL in it (see ``redact_url``)."""
    if secret and len(secret) >= 4 and secret in text:
        text = text.replace(secret, "***")
    if "://" in text:
        text = _URL_PATTERN.sub(lambda m: redact_url(m.group(0)), text)
    return _KEY_PATTERN.sub(r"\1***", text)


def error_fields(raw: bytes, secret: str | None) -> tuple[str, str | None, str | None]:
    """Message, code and type of an OpenAI-style error body (or its text), with keys redacted."""
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict):
            return redact(str(error.get("message") or ""), secret), error.get("code"), error.get("type")
        if isinstance(error, str):
            return redact(error, secret), None, None
    except (ValueError, AttributeError):
        pass
    text = raw[:300].decode("utf-8", "replace").strip()
    if text.lstrip().startswith("<"):  # an HTML error page from a proxy
        text = "non-JSON error page"
    return redact(text, secret), None, None


def fatal_error(status: int, message: str, code: str | None, kind: str | None, where: str) -> FatalError | None:
    """The run-stopping error for an HTTP answer (bad key, no permission, unknown model, no quota), if it is one."""
    if status == 429 and "insufficient_quota" in (code, kind):
        return QuotaExceededError(f"{where}: no quota left ({message})", status=status, code=code)
    if status == 401:
        return AuthenticationError(f"{where}: the API key was refused ({message})", status=status, code=code)
    if status == 403:
        return PermissionDeniedError(f"{where}: permission denied ({message})", status=status, code=code)
    if status == 404:
        return ModelNotFoundError(f"{where}: {message or 'not found (is base_url right?)'}", status=status, code=code)
    return None


def describe_error(status: int | None, message: str, code: object = None) -> str:
    """One line for a row's error: status, the provider's code (any type) and message."""
    code = f"{code}:" if code and str(code) != str(status) else ""  # some servers repeat the status as the code
    return " ".join(part for part in (str(status) if status else "", code, message) if part)
