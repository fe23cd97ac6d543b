"""The mock server's settings: :class:`ServerConfig`, the loopback check, markers and constants.

Markers are strings a prompt can carry to ask for a particular behaviour (tests use them); the
constants are the limits OpenAI documents for the Files, Batch and Embeddings APIs.

Models: every chat model follows the decision rules of :mod:`.decisions`; ``mock-weak`` errs on
rows marked ``<<hard>>`` (a cheap model for cascades), ``mock-strong`` never does. A served model
whose name contains "embed" is an embedding model (:mod:`.embeddings`): ``/v1/embeddings`` only,
with the dimensions of :data:`EMBEDDING_DIMENSIONS` (1536 for names not listed there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4.1",
    "gpt-5-mini",
    "gpt-5-nano",
    "gpt-5",
    "mock",
    "mock-weak",
    "mock-strong",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
    "mock-embed",
)
#: Chat models of the cascade: the weak one errs on <<hard>> rows (see decisions.py), the strong one never.
WEAK_MODEL = "mock-weak"
STRONG_MODEL = "mock-strong"
#: Native dimensions of the embedding models (other served names containing "embed" have 1536).
EMBEDDING_DIMENSIONS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
    "mock-embed": 64,
}
#: Embedding models that refuse ``dimensions`` with a 400, as OpenAI's ada-002 does.
FIXED_DIMENSION_MODELS = ("text-embedding-ada-002",)
#: OpenAI's embeddings limits: inputs per request, tokens per input, tokens summed over a request.
EMBEDDING_MAX_INPUTS = 2048
EMBEDDING_MAX_INPUT_TOKENS = 8192
EMBEDDING_MAX_REQUEST_TOKENS = 300_000
#: Tokens a request without max_tokens is charged per choice by the limiter.
DEFAULT_MAX_TOKENS_CHARGE = 4096
#: Markers in the last user message that change the answer (used by tests).
NOT_JSON_MARKER = "<<not-json>>"  # anywhere in the prompt: never valid JSON (a re-ask fails too)
NOT_JSON_ONCE_MARKER = "<<not-json-once>>"  # in the last user message: one bad answer (a re-ask succeeds)
LIST_JSON_MARKER = "<<list-json>>"
NUMERIC_CODE_MARKER = "<<numeric-code>>"  # in the last user message: a 400 whose error code is a number
BATCH_FAIL_MARKER = "<<batch-fail>>"  # in the last user message of a batch line: that line fails with a 500
NULL_CONTENT_MARKER = "<<null-content>>"  # in the last user message: every choice's content is null
REFUSAL_MARKER = "<<refusal>>"  # in the last user message: content null and a refusal, as OpenAI sends one
HUGE_ANSWER_MARKER = "<<huge-answer>>"  # in the last user message: a valid answer of huge_bytes, with its length
HUGE_JUNK_MARKER = "<<huge-junk>>"  # in the last user message: huge_bytes of non-JSON, chunked, no length
BAD_SSE_MARKER = "<<bad-sse>>"  # in the last user message of a stream: a malformed data: line mid-answer
YES_MARKER = "<<yes>>"  # in the last user message: boolean fields of a structured answer are true
NO_MARKER = "<<no>>"  # in the last user message: boolean fields are false (<<yes>> wins if both)
HARD_MARKER = "<<hard>>"  # in the last user message: mock-weak gets the decision wrong, with low confidence
#: The Batch API as OpenAI documents it: one endpoint served here, a 24 h window, limits per input file.
BATCH_ENDPOINT = "/v1/chat/completions"
BATCH_WINDOW_SECONDS = 24 * 3600
BATCH_MAX_LINES = 50_000
BATCH_MAX_BYTES = 200 * 1024 * 1024
#: Share of batch_seconds spent validating, and then finalizing (cancelling takes as long); in progress between.
BATCH_PHASE_SHARE = 0.1
FILE_MAX_BYTES = 512 * 1024 * 1024  # one upload
FILE_PURPOSES = ("assistants", "batch", "fine-tune", "user_data")
_BATCH_MAX_ERRORS = 100  # errors.data entries reported for an invalid input file
#: Default lifetime of a server started by ServerProcess (tests never leak one).
SUBPROCESS_MAX_LIFETIME = 3600.0


@dataclass
class ServerConfig:
    """How the mock server behaves: latency, limits, answer sizes, auth and faults."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    latency_ms: float = 0.0  # fixed latency (time to first token)
    jitter_ms: float = 0.0  # plus uniform[0, jitter_ms]
    per_token_ms: float = 0.0  # extra latency per completion token
    rpm: int | None = None  # requests per minute (None = unlimited)
    tpm: int | None = None  # tokens per minute (None = unlimited)
    burst_seconds: float = 60.0  # bucket capacity = limit * burst_seconds / 60
    completion_tokens: int = 16
    completion_tokens_max: int | None = None  # deterministic in [ct, max] from the prompt hash
    api_key: str | None = None  # if set, any other Bearer key gets a 401
    models: tuple[str, ...] = DEFAULT_MODELS  # other models get a 404
    context_window: int = 128_000
    p500: float = 0.0
    p502: float = 0.0
    p503: float = 0.0
    p_reset: float = 0.0  # 200 + headers + half the body, then a TCP reset
    pstall: float = 0.0  # never answer; reset the connection after stall_seconds
    stall_seconds: float = 30.0
    pquota: float = 0.0  # 429 insufficient_quota
    p429: float = 0.0  # 429 rate_limit_exceeded asking to wait retry_after_429 seconds
    retry_after_429: float = 1.0
    usage: bool = True  # False: answers carry no usage object, as some gateways and local servers
    usage_scale: float = 1.0  # prompt tokens are counted (reported and charged) this many times over
    prompt_cache: bool = True  # report cached_tokens for repeated prompt prefixes of 1,024+ tokens (promptcache.py)
    huge_bytes: int = 64 * 1024 * 1024  # size of the answers asked for by the huge-answer / huge-junk markers
    retry_after: bool = True  # False: 429s carry no retry-after headers
    seed: int = 0  # faults are drawn from random.Random(seed)
    json_schema: bool = True  # False: refuse response_format json_schema with a 400, as older endpoints do
    logprobs: bool = True  # False: ignore logprobs/top_logprobs and answer "logprobs": null, as some gateways
    batch_seconds: float = 2.0  # how long a batch takes from creation to "completed" (OpenAI: up to 24 h)
    max_lifetime: float | None = None  # exit on its own after this many seconds

    def __post_init__(self) -> None:
        """Validate early so a bad flag fails loudly instead of misbehaving later."""
        check_loopback(self.host)
        self.models = tuple(self.models)
        for name in ("p500", "p502", "p503", "p_reset", "pstall", "pquota", "p429"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if self.burst_seconds <= 0:
            raise ValueError(f"burst_seconds must be positive, got {self.burst_seconds!r}")
        if self.completion_tokens < 1:
            raise ValueError("completion_tokens must be >= 1")
        if self.completion_tokens_max is not None and self.completion_tokens_max < self.completion_tokens:
            raise ValueError("completion_tokens_max must be >= completion_tokens")
        if self.latency_ms < 0 or self.jitter_ms < 0 or self.per_token_ms < 0:
            raise ValueError("latencies must be >= 0")
        if not 0 <= self.batch_seconds < math.inf:
            raise ValueError(f"batch_seconds must be a finite number >= 0, got {self.batch_seconds!r}")


def check_loopback(host: str) -> None:
    """Refuse to bind anywhere but loopback: the mock must never be reachable from outside."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(
            f"nbparrot's mock server only binds to loopback ({', '.join(LOOPBACK_HOSTS)}); "
            f"refusing host {host!r}"
        )
