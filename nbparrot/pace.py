"""How fast a run goes, in figures a user can hold against the limits: counts over the last
minute (never a start burst stretched to a minute) and an ETA only once it means something.

``Pace.update`` is fed the loop time and the run's counters at each refresh; it keeps about
one sample a second for the last minute, so it costs nothing per request.
"""

from __future__ import annotations

import math
from collections import deque
from typing import NamedTuple

__all__ = ["Pace", "Reading", "format_eta", "WINDOW", "ETA_MIN_SECONDS", "ETA_MIN_ROWS"]

WINDOW = 60.0  # seconds: rate limits are per minute, so the rate is what went out in the last minute
SAMPLE_EVERY = 1.0  # seconds between kept samples (the newest counters are always used as they are)
ETA_MIN_SECONDS = 10.0  # no ETA before the run has sent for this long...
ETA_MIN_ROWS = 10  # ...and settled this many rows by sending them
ETA_SMOOTHING = 15.0  # seconds: time constant of the ETA's pull towards the measured pace


class Reading(NamedTuple):
    """What went out over ``window`` seconds (the run's age, until it is a full minute old)."""

    window: float
    requests: int
    tokens: int
    rows: int
    eta: float | None  # seconds left, or None while it would mean nothing

    @property
    def full(self) -> bool:
        """True once the window is a whole minute: the counts are then per minute."""
        return self.window >= WINDOW

    def per_minute(self, count: int) -> float:
        """A count over the window as a rate per minute (only meaningful once ``full``)."""
        return count * 60.0 / self.window if self.window > 0 else 0.0


class Pace:
    """Sliding-minute counts of requests, tokens and rows, and a smoothed ETA."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int, int]] = deque()
        self._eta: float | None = None
        self._eta_at = 0.0

    def update(self, now: float, started: float, requests: int, tokens: int, rows: int,
               remaining: int) -> Reading:
        """``rows``: rows settled by sending (not from the cache); ``remaining``: rows not settled yet."""
        samples = self._samples
        if not samples:
            samples.append((started, 0, 0, 0))  # the run began with nothing sent
        if now - samples[-1][0] >= SAMPLE_EVERY:
            samples.append((now, requests, tokens, rows))
        while len(samples) > 1 and samples[1][0] <= now - WINDOW:
            samples.popleft()  # keep one sample at or before the window's start as the baseline
        t0, r0, k0, n0 = samples[0]
        window = now - t0
        reading = Reading(window, requests - r0, tokens - k0, rows - n0, None)
        return reading._replace(eta=self._smoothed_eta(now, reading, remaining))

    def _smoothed_eta(self, now: float, reading: Reading, remaining: int) -> float | None:
        """remaining / pace, counted down between refreshes and pulled towards the measure gently."""
        if remaining <= 0 or reading.window < ETA_MIN_SECONDS or reading.rows < ETA_MIN_ROWS:
            self._eta = None
            return None
        measured = remaining * reading.window / reading.rows
        if self._eta is None:
            self._eta = measured
        else:
            dt = max(0.0, now - self._eta_at)
            counted_down = max(0.0, self._eta - dt)
            pull = 1.0 - math.exp(-dt / ETA_SMOOTHING)
            self._eta = counted_down + pull * (measured - counted_down)
        self._eta_at = now
        return self._eta


def format_eta(seconds: float) -> str:
    """``~45s``, ``~4m``, ``~1h05m``: as precise as an estimate deserves, in the panel's time style."""
    if seconds <= 55:
        return f"~{max(5, math.ceil(seconds / 5) * 5)}s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"~{minutes}m"
    return f"~{minutes // 60}h{minutes % 60:02d}m"
