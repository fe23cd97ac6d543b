"""How the engine puts waits and transport errors into words for row errors and the panel."""

from __future__ import annotations

import asyncio


def _duration(seconds: float) -> str:
    """``90 s``, ``25 min``, ``24 h``: a wait in the unit a person reads it in."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h".replace(".0 h", " h")


def _describe(exc: BaseException) -> str:
    """A transport error in words; a connection that could not be made says why (refused, no such name)."""
    cannot = _cannot_connect(exc)
    if cannot is not None:
        return cannot[1]
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out waiting for the answer"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _cannot_connect(exc: BaseException) -> tuple[int, str] | None:
    """For an error before any byte was sent: (retries worth trying before anything has answered, the
    reason in words); None for other errors. A host name that does not exist will not exist a second
    later (no retry); a refused or timed-out connection gets two quick ones (a server just starting)."""
    import socket

    import aiohttp

    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return 2, f"timed out connecting ({exc})"
    if not isinstance(exc, aiohttp.ClientConnectorError):
        return None
    where, cause = f"{exc.host}:{exc.port}", exc.os_error
    if isinstance(exc, aiohttp.ClientConnectorDNSError) or isinstance(cause, socket.gaierror):
        if getattr(cause, "errno", None) == socket.EAI_AGAIN:
            return 2, f"DNS lookup of {exc.host} failed for now ({cause.strerror or cause})"
        return 0, f"DNS name not found: {exc.host} ({getattr(cause, 'strerror', None) or cause})"
    if isinstance(cause, ConnectionRefusedError):
        return 2, f"connection refused by {where} (nothing is listening there)"
    return 2, f"cannot connect to {where} ({getattr(cause, 'strerror', None) or cause})"
