"""How the engine puts waits and transport errors into words for row errors and the panel.

A fault has two forms: a *cause*, a few plain words to count retries by ("connection reset",
"500 server error"), and a *description* for a row that failed in the end: the cause as a
sentence a user reads without knowing the HTTP library (no exception class names).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Mapping

import aiohttp

#: Plain words for the HTTP statuses a request is retried after.
STATUS_WORDS = {408: "request timeout", 409: "conflict", 429: "rate limited", 500: "server error",
                502: "bad gateway", 503: "unavailable", 504: "gateway timeout"}

# (exception class, cause, sentence), most specific first.
_FAULTS: tuple[tuple[type[BaseException], str, str], ...] = (
    (asyncio.TimeoutError, "timeout", "timed out waiting for the answer"),
    (aiohttp.ClientPayloadError, "answer cut off", "the connection broke off before the answer was complete"),
    (aiohttp.ServerDisconnectedError, "disconnected", "the server closed the connection without answering"),
    (ConnectionRefusedError, "connection refused", "the connection was refused (nothing listens at that address)"),
    (ConnectionResetError, "connection reset", "the connection was reset before the answer came"),
    (aiohttp.ClientSSLError, "TLS error", "the secure (TLS) connection failed"),
    (aiohttp.ClientConnectorError, "cannot connect", "could not connect to the endpoint"),
    (aiohttp.ClientOSError, "network error", "a network error interrupted the request"),
    (ConnectionError, "network error", "a network error interrupted the request"),
)


def _duration(seconds: float) -> str:
    """``90 s``, ``25 min``, ``24 h``: a wait in the unit a person reads it in."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h".replace(".0 h", " h")


def _fault(exc: BaseException) -> tuple[str, str] | None:
    """(cause, sentence) for a transport error, looking through aiohttp's wrapper to the OS error."""
    os_error = getattr(exc, "os_error", None)
    if isinstance(os_error, socket.gaierror) or isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "host not found", "the endpoint's host name was not found (DNS)"
    code = getattr(os_error if os_error is not None else exc, "errno", None)
    if code == errno.ECONNREFUSED:
        return "connection refused", "the connection was refused (nothing listens at that address)"
    if code in (errno.ECONNRESET, errno.EPIPE):
        return "connection reset", "the connection was reset before the answer came"
    for kind, cause, sentence in _FAULTS:
        if isinstance(exc, kind):
            return cause, sentence
    return None


def cause(exc: BaseException) -> str:
    """A transport error in a few plain words, to count retries by: ``connection reset``."""
    fault = _fault(exc)
    return fault[0] if fault is not None else type(exc).__name__


def status_cause(status: int) -> str:
    """An HTTP status in a few plain words: ``500 server error``."""
    word = STATUS_WORDS.get(status) or ("server error" if status >= 500 else "")
    return f"{status} {word}".strip()


def _describe(exc: BaseException) -> str:
    """A transport error in words; a connection that could not be made says why (refused, no such name)."""
    cannot = _cannot_connect(exc)
    if cannot is not None:
        return cannot[1]
    fault = _fault(exc)
    if fault is not None:
        return fault[1]
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _cannot_connect(exc: BaseException) -> tuple[int, str] | None:
    """For an error before any byte was sent: (retries worth trying before anything has answered, the
    reason in words); None for other errors. A host name that does not exist will not exist a second
    later (no retry); a refused or timed-out connection gets two quick ones (a server just starting)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return 2, f"timed out connecting ({exc})"
    if not isinstance(exc, aiohttp.ClientConnectorError):
        return None
    where, os_error = f"{exc.host}:{exc.port}", exc.os_error
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(os_error, socket.gaierror):
        if getattr(os_error, "errno", None) == socket.EAI_AGAIN:
            return 2, f"DNS lookup of {exc.host} failed for now ({os_error.strerror or os_error})"
        return 0, f"DNS name not found: {exc.host} ({getattr(os_error, 'strerror', None) or os_error})"
    if isinstance(os_error, ConnectionRefusedError):
        return 2, f"connection refused by {where} (nothing is listening there)"
    return 2, f"cannot connect to {where} ({getattr(os_error, 'strerror', None) or os_error})"


def retries_text(causes: Mapping[str, int]) -> str:
    """``3 retried: 2× 500 server error, 1× connection reset`` (most frequent first), or ``""``."""
    total = sum(causes.values())
    if not total:
        return ""
    ranked = sorted(causes.items(), key=lambda item: (-item[1], item[0]))
    return f"{total} retried: " + ", ".join(f"{count}× {name}" for name, count in ranked)
