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
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out waiting for the answer"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
