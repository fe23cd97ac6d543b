"""``Progress``: a run's live counters, which the panel and the progress line read."""

from __future__ import annotations

from typing import Callable


class Progress:
    """Live counters of a run, updated in place by the engine (cheap to read at 10 Hz).

    Listeners registered with ``subscribe`` get ``(event, row)`` calls for "sent", "retry",
    "done", "failed", "rate_limited" and "finished"; with no listener nothing is called.
    """

    __slots__ = ("total", "queued", "in_flight", "retrying", "done", "failed", "cancelled", "skipped",
                 "cached", "requests", "rate_limited", "prompt_tokens", "completion_tokens", "cached_prompt_tokens",
                 "usage_estimated", "started", "finished", "last_error", "retried", "last_retry", "note", "pause",
                 "sent_at", "limits", "_listeners")

    def __init__(self, total: int = 0):
        self.total = total
        self.queued = total
        self.in_flight = self.retrying = self.done = self.failed = self.cancelled = self.skipped = 0
        self.cached = self.requests = self.rate_limited = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.cached_prompt_tokens = 0  # of prompt_tokens, those the provider served from its prompt cache
        self.usage_estimated = 0  # answers that came without usage: their tokens are our estimate
        self.started: float | None = None
        self.finished: float | None = None
        self.last_error: str | None = None  # why the last row failed, or why the run stopped
        self.retried: dict[str, int] = {}  # retries by cause in plain words ("500 server error": 2)
        self.last_retry: str | None = None  # the last retried fault in full (redacted)
        self.note: str | None = None  # a status line of the run's own (e.g. a Batch API job's state)
        self.pause: tuple[float, str] | None = None  # (loop time it ends, why): dispatch is held back
        self.sent_at: dict[int, float] = {}  # row -> loop time of its in-flight attempt
        self.limits: Callable[[], dict] | None = None
        self._listeners: list[Callable[[str, int], None]] = []

    def count_retry(self, cause: str, reason: str) -> None:
        """A request is sent again after ``cause``: counted, not an error unless the row fails in the end."""
        self.retried[cause] = self.retried.get(cause, 0) + 1
        self.last_retry = reason

    def subscribe(self, listener: Callable[[str, int], None]) -> None:
        self._listeners.append(listener)

    def emit(self, event: str, row: int) -> None:
        for listener in self._listeners:
            listener(event, row)

    @property
    def settled(self) -> int:
        return self.done + self.failed + self.cancelled + self.skipped
