"""A run's live counters as one dict every view reads (``snapshot``), and the short number, time
and text formats the text line and the HTML share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .pace import Pace
from .pricing import cached_share

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

__all__ = ["snapshot"]


def _fmt_int(n: float) -> str:
    n = float(n)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_secs(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def _retried(p: Any) -> dict[str, int]:
    """Retries by cause, 429 waits among them: requests sent again, not errors."""
    causes = dict(p.retried)
    if p.rate_limited:
        causes["429 rate limited"] = causes.get("429 rate limited", 0) + p.rate_limited
    return causes


def snapshot(run: "Run", pace: Pace | None = None) -> dict[str, Any]:
    """Everything a view shows, computed from the run's live counters."""
    p = run.progress
    loop = run._loop
    now = loop.time() if loop is not None and not loop.is_closed() else None
    started = p.started
    end = p.finished if p.finished is not None else now
    elapsed = (end - started) if (started is not None and end is not None) else 0.0
    settled = p.settled
    oldest = None
    if p.sent_at and now is not None:
        oldest = now - min(p.sent_at.values())
    tokens = p.prompt_tokens + p.completion_tokens
    reading = None
    if pace is not None and now is not None and started is not None and p.finished is None:
        reading = pace.update(now, started, p.requests, tokens, p.done + p.failed - p.cached, p.total - settled)
    limits = p.limits() if p.limits else {}
    return {
        "total": p.total, "settled": settled, "queued": p.queued, "in_flight": p.in_flight,
        "retrying": p.retrying, "done": p.done, "failed": p.failed, "cancelled": p.cancelled,
        "skipped": p.skipped, "rate_limited": p.rate_limited, "tokens": tokens, "cost": run.cost,
        "projected": run.projected_cost, "cached": p.cached,
        "cached_share": cached_share(p.prompt_tokens, p.cached_prompt_tokens),
        "elapsed": elapsed, "eta": reading.eta if reading is not None else None, "oldest": oldest, "pace": reading,
        "rpm_limit": limits.get("rpm"), "tpm_limit": limits.get("tpm"), "last_error": p.last_error,
        "retried": _retried(p), "last_retry": p.last_retry,
        "note": " · ".join(_notes(p, now)) or None,
        "status": run.status,
    }


def _notes(p: Any, now: float | None) -> list[str]:
    """The run's own note, a pause with its reason and countdown, and tokens that are estimates."""
    notes = [p.note] if p.note else []
    if p.pause is not None and now is not None and p.finished is None and p.pause[0] > now:
        notes.append(f"paused {_fmt_secs(p.pause[0] - now)}: {p.pause[1]}")
    if p.usage_estimated:
        notes.append(f"tokens of {p.usage_estimated:,} answer(s) estimated: the endpoint sent no usage")
    return notes


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in an ellipsis when cut (counts come first, notes last)."""
    return text if len(text) <= width else text[: width - 1] + "…"
