"""How hard a run pushes (``EngineSettings``) and the engine's fixed numbers."""

from __future__ import annotations

from dataclasses import dataclass


_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
PAUSE_SHOWN = 2.0  # seconds: a dispatch pause at least this long is shown, with its reason, in the views
PLAN_SLICE = 0.008  # seconds of planning between two yields to the loop
LOOKUP_KEYS = 400  # keys per Cache.get_many call while planning
FAN_OUT = 32  # requests the dispatcher starts before it lets the loop run them (the fan-out after the probe)


@dataclass
class EngineSettings:
    """How hard to push: concurrency, retries, timeouts and optional fixed limits."""

    concurrency: int = 128
    max_retries: int = 5  # retries after a retryable error (429 waits are counted apart)
    timeout: float = 120.0  # seconds per attempt
    backoff_base: float = 1.0  # full-jitter backoff: uniform(0, min(cap, base * 2**k))
    backoff_cap: float = 30.0
    rpm: float | None = None  # fixed limits; None = learn them from the headers
    tpm: float | None = None
    max_rate_limit_waits: int = 50  # 429s one row may wait through before it is failed
    max_reasks: int = 2  # re-asks after an answer that does not match the schema
    max_cost: float | None = None  # USD: never dispatch what could take spend past this
    max_wait: float = 60.0  # seconds: a 429 asking to wait longer stops the run with an error naming the wait
    max_response_bytes: int = 10 * 1024 * 1024  # a larger answer fails its row, read no further
    first_byte_timeout: float = 10.0  # no byte of the first answer by then: ask the endpoint if it is alive
    max_failing_rows: int = 10  # rows failed in a row after all their retries, none answered between: stop
