"""A bundled, deterministic, OpenAI-compatible mock server (aiohttp.web).

Users rehearse a run offline with it: rate limits, faults, latency, cost and
structured outputs behave like the real API, but nothing is spent and nothing
leaves the machine (the server only binds to loopback). The demo, the tests
and the benchmarks use it too, so the request handler is kept lean: one
process answers several thousand requests per second.

Answers are deterministic: choice ``i`` of a prompt starts with
``[<tag>#<i>]`` where ``<tag>`` is ``sha1(prompt text)[:12]`` (see
:func:`expected_tag`), so a test can tell exactly which row an answer belongs
to (an image or PDF in the prompt adds ``[image:<image_tag(bytes)>]`` after it, see
:mod:`.media`), and ``GET /stats`` says which prompts reached the server and how often.

It also serves OpenAI's Files and Batch APIs (``/v1/files``, ``/v1/batches``) for
chat completions, in memory: a batch goes validating -> in_progress ->
finalizing -> completed within ``batch_seconds`` (default 2 s, instead of up to
24 h), its lines answered by the same code as ``/v1/chat/completions`` (minus
latency, rate limits and random faults), its output lines shuffled.

Structured answers decide their boolean and enum fields by documented rules
(:mod:`.decisions`: :func:`expected_decision`, :func:`expected_label`,
:func:`expected_labels`, :func:`expected_confidence`), with logprobs on request
(:mod:`.logprobs`); ``mock-weak`` (:data:`WEAK_MODEL`) errs on rows marked ``<<hard>>``
(:data:`HARD_MARKER`) with low confidence, ``mock-strong`` (:data:`STRONG_MODEL`) never: the pair
cascades are tested and benchmarked on, the truth being ``expected_decision(text, STRONG_MODEL)``.
``GET /stats`` counts answers per model under ``models``.
The table operators' markers (:mod:`.table`: ``<<row:ID>>``, ``<<score:N>>``, ``<<key:K>>``) give
``agg``, ``topk`` and ``join`` a truth to check (:func:`expected_seen`, :func:`expected_score`,
:func:`expected_choice`, :func:`expected_match`; ``GET /stats`` logs ``rows_seen``).
``/v1/embeddings`` returns hashed bag-of-words vectors (:mod:`.embeddings`,
:func:`expected_embedding`).

Run it with ``python -m nbparrot.server --port 8000 --rpm 500 --p500 0.05``
or, from Python, with :class:`ServerProcess` (a subprocess) or :func:`serve`.

Modules, one per area: :mod:`.config` (ServerConfig, loopback check, markers,
constants), :mod:`.prompts` (tags, digests, token counts, filler), :mod:`.table` (table operators' markers),
:mod:`.schema_faker` (JSON-schema instances), :mod:`.decisions` (booleans,
labels, confidence), :mod:`.logprobs`, :mod:`.limits` (rate-limit buckets,
faults, stats), :mod:`.wire` (errors and HTTP helpers), :mod:`.chat` (chat
completions and streaming), :mod:`.embeddings`, :mod:`.files` and :mod:`.batches`,
:mod:`.app` (the app, build_app, serve), :mod:`.cli` (flags, main) and
:mod:`.process` (ServerProcess).
"""

from __future__ import annotations

from .app import build_app, serve
from .batches import _Batch, _StoredFile
from .cli import add_arguments, config_from_args, config_to_argv, main
from .config import (
    BAD_SSE_MARKER,
    BATCH_ENDPOINT,
    BATCH_FAIL_MARKER,
    BATCH_MAX_BYTES,
    BATCH_MAX_LINES,
    BATCH_PHASE_SHARE,
    BATCH_WINDOW_SECONDS,
    DEFAULT_MAX_TOKENS_CHARGE,
    DEFAULT_MODELS,
    EMBEDDING_DIMENSIONS,
    EMBEDDING_MAX_INPUT_TOKENS,
    EMBEDDING_MAX_INPUTS,
    EMBEDDING_MAX_REQUEST_TOKENS,
    FILE_MAX_BYTES,
    FILE_PURPOSES,
    FIXED_DIMENSION_MODELS,
    HARD_MARKER,
    HUGE_ANSWER_MARKER,
    HUGE_JUNK_MARKER,
    LIST_JSON_MARKER,
    LOOPBACK_HOSTS,
    NO_MARKER,
    NOT_JSON_MARKER,
    NOT_JSON_ONCE_MARKER,
    NULL_CONTENT_MARKER,
    NUMERIC_CODE_MARKER,
    REFUSAL_MARKER,
    STRONG_MODEL,
    SUBPROCESS_MAX_LIFETIME,
    WEAK_MODEL,
    YES_MARKER,
    ServerConfig,
    check_loopback,
)
from .decisions import (
    CONFIDENCE_RANGE,
    WEAK_EASY_RANGE,
    WEAK_HARD_RANGE,
    decision_text,
    expected_confidence,
    expected_decision,
    expected_label,
    expected_labels,
)
from .embeddings import expected_embedding
from .process import ServerProcess
from .media import image_tag
from .table import expected_choice, expected_match, expected_score, expected_seen
from .prompts import expected_tag, format_duration, prompt_tag, prompt_tokens

__all__ = [
    "HARD_MARKER",
    "STRONG_MODEL",
    "WEAK_MODEL",
    "ServerConfig",
    "ServerProcess",
    "add_arguments",
    "build_app",
    "config_from_args",
    "config_to_argv",
    "decision_text",
    "expected_confidence",
    "expected_decision",
    "expected_embedding",
    "expected_choice",
    "expected_match",
    "expected_score",
    "expected_seen",
    "expected_label",
    "expected_labels",
    "expected_tag",
    "image_tag",
    "format_duration",
    "main",
    "prompt_tag",
    "prompt_tokens",
    "serve",
]
