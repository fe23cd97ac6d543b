"""Embeddings (``POST /v1/embeddings``): OpenAI's request and answer shapes, deterministic vectors.

Models: a served model whose name contains "embed" is an embedding model; its native dimensions
come from :data:`~.config.EMBEDDING_DIMENSIONS` (``text-embedding-3-small`` 1536,
``text-embedding-3-large`` 3072, ``text-embedding-ada-002`` 1536, ``mock-embed`` 64), else 1536.
A chat model here is a 400 (``param: "model"``); an embedding model on /v1/chat/completions is the
404 OpenAI sends ("This is not a chat model and thus not supported in the v1/chat/completions
endpoint..."); a model not served is the usual 404 ``model_not_found``.

Request: ``input`` a string, a list of strings, a list of token ids, or a list of token-id lists
(at most 2,048 inputs, none empty); ``dimensions`` (1..native; ada-002 refuses it with OpenAI's
400 "This model does not support specifying dimensions."); ``encoding_format`` ``float`` (default)
or ``base64`` (the little-endian float32 bytes). Tokens: a text counts ``ceil(chars / 4)`` (at
least 1, times ``usage_scale``), a token list its length. An input over 8,192 tokens is a 400
(OpenAI's "maximum context length" wording); a request over 300,000 tokens in all is OpenAI's 400
``max_tokens_per_request``. ``usage`` is ``{prompt_tokens, total_tokens}``.

Rate limits, headers, injected faults and latency (``latency_ms`` + jitter) are those of chat: a
request costs one request and its tokens. ``GET /stats`` counts ``embedding_requests`` (every POST),
``embedded_inputs`` (inputs of the requests whose body was valid, before limits and faults, like
chat's ``received``) and ``embedding_tokens`` (of the requests answered).

Vectors (:func:`expected_embedding`): the text is lower-cased and split into words
(``re.findall(r"\\w+")``; a text without one is its own single word; a token list's words are its
ids in decimal). Each word's vector has the native dimensions: the little-endian int16 values of
``shake_256(model + "\\0" + word)``'s first ``2 * dims`` bytes. The text's vector is the sum over its
words (repeats count), cut to ``dimensions`` if given, divided by its Euclidean norm, as float32.
So the cosine similarity of two texts grows with the words they share, and a text's vector is the
same in every request; different models give unrelated vectors.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from .config import (
    EMBEDDING_DIMENSIONS,
    EMBEDDING_MAX_INPUT_TOKENS,
    EMBEDDING_MAX_INPUTS,
    EMBEDDING_MAX_REQUEST_TOKENS,
    FIXED_DIMENSION_MODELS,
)
from .wire import _flush_then_abort, _int_param, _Reject

_WORDS = re.compile(r"\w+")
_INVALID_INPUT = "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."


def is_embedding_model(model: str) -> bool:
    """Whether a model name is an embedding model's (it contains "embed")."""
    return model in EMBEDDING_DIMENSIONS or "embed" in model.lower()


def native_dimensions(model: str) -> int:
    """An embedding model's dimensions without ``dimensions``."""
    return EMBEDDING_DIMENSIONS.get(model, 1536)


@functools.lru_cache(maxsize=4096)
def _word_vector(model: str, word: str, dims: int) -> Any:
    """One word's pseudo-random vector (read-only int16 numpy array)."""
    import numpy as np

    raw = hashlib.shake_256(f"{model}\0{word}".encode("utf-8", "surrogatepass")).digest(2 * dims)
    return np.frombuffer(raw, dtype="<i2")


def _words(item: str | Sequence[int]) -> list[str]:
    """The words of a text, or of a token list (its ids)."""
    if isinstance(item, str):
        return _WORDS.findall(item.lower()) or [item]
    return [str(token) for token in item]


def _vector(item: str | Sequence[int], model: str, dimensions: int | None) -> Any:
    """The float32 unit vector of one input."""
    import numpy as np

    dims = native_dimensions(model)
    total = np.zeros(dims, dtype=np.float64)
    for word in _words(item):
        total += _word_vector(model, word, dims)
    if dimensions is not None:
        total = total[:dimensions]
    norm = float(np.linalg.norm(total))
    if norm:
        total /= norm
    return total.astype(np.float32)


def expected_embedding(text: str | Sequence[int], model: str = "mock-embed",
                       dimensions: int | None = None) -> list[float]:
    """The vector the server returns for ``text`` (a string or a token list) from ``model``."""
    return _vector(text, model, dimensions).tolist()


def _input_tokens(item: str | Sequence[int], scale: float) -> int:
    """Tokens of one input: ceil(chars / 4) of a text (at least 1, scaled), the length of a token list."""
    if isinstance(item, str):
        tokens = max(1, (len(item) + 3) // 4)
        return math.ceil(tokens * scale) if scale != 1.0 else tokens
    return len(item)


def _inputs(value: Any) -> list[str | list[int]]:
    """The inputs of a request's ``input``, or a 400."""
    if isinstance(value, str):
        items: list = [value]
    elif isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            items = value
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            items = [value]
        elif all(isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
                 for v in value):
            items = value
        else:
            raise _Reject(400, _INVALID_INPUT, "invalid_request_error", None)
    else:
        raise _Reject(400, _INVALID_INPUT, "invalid_request_error", None)
    if len(items) > EMBEDDING_MAX_INPUTS or any(not item for item in items):
        raise _Reject(400, _INVALID_INPUT, "invalid_request_error", None)
    if any(isinstance(item, list) and min(item) < 0 for item in items):
        raise _Reject(400, _INVALID_INPUT, "invalid_request_error", None)
    return items


class _EmbeddingJob:
    """A checked embeddings request."""

    __slots__ = ("model", "inputs", "tokens", "dimensions", "base64")

    def __init__(self, model: str, inputs: list, tokens: int, dimensions: int | None, as_base64: bool) -> None:
        """Keep what the answer needs."""
        self.model, self.inputs, self.tokens, self.dimensions, self.base64 = (model, inputs, tokens, dimensions,
                                                                              as_base64)

    def payload(self) -> bytes:
        """The JSON answer: one embedding object per input, in order, and the usage."""
        data = []
        for index, item in enumerate(self.inputs):
            vector = _vector(item, self.model, self.dimensions)
            value: Any = (base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii") if self.base64
                          else vector.tolist())
            data.append({"object": "embedding", "index": index, "embedding": value})
        return json.dumps({"object": "list", "data": data, "model": self.model,
                           "usage": {"prompt_tokens": self.tokens, "total_tokens": self.tokens}}).encode()


class _EmbeddingsEndpoint:
    """POST /v1/embeddings (a mixin of the app)."""

    def parse_embeddings(self, body: Any) -> _EmbeddingJob:
        """Check an embeddings body (raise :class:`_Reject`)."""
        if not isinstance(body, dict):
            raise _Reject(400, "The request body must be a JSON object.", "invalid_request_error", None)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _Reject(400, "you must provide a model parameter", "invalid_request_error", None)
        if model not in self.models:
            raise _Reject(404, f"The model `{model}` does not exist or you do not have access to it.",
                          "invalid_request_error", "model_not_found")
        if not is_embedding_model(model):
            raise _Reject(400, f"The model `{model}` is not an embedding model and does not support the "
                          "v1/embeddings endpoint.", "invalid_request_error", None, "model")
        if "input" not in body:
            raise _Reject(400, "Missing required parameter: 'input'.", "invalid_request_error",
                          "missing_required_parameter", "input")
        inputs = _inputs(body["input"])
        fmt = body.get("encoding_format")
        if fmt not in (None, "float", "base64"):
            raise _Reject(400, f"Invalid value for 'encoding_format': {fmt!r}. Supported values are: 'float' and "
                          "'base64'.", "invalid_request_error", "invalid_value", "encoding_format")
        dimensions = _int_param(body, "dimensions", 1)
        if dimensions is not None:
            if model in FIXED_DIMENSION_MODELS:
                raise _Reject(400, "This model does not support specifying dimensions.", "invalid_request_error",
                              None)
            native = native_dimensions(model)
            if dimensions > native:
                raise _Reject(400, f"Invalid 'dimensions': integer must be between 1 and {native} for {model}, got "
                              f"{dimensions}.", "invalid_request_error", "invalid_value", "dimensions")
        scale = self.config.usage_scale
        counts = [_input_tokens(item, scale) for item in inputs]
        longest = max(counts)
        if longest > EMBEDDING_MAX_INPUT_TOKENS:
            raise _Reject(400, f"This model's maximum context length is {EMBEDDING_MAX_INPUT_TOKENS} tokens, however "
                          f"you requested {longest} tokens ({longest} in your prompt; 0 for the completion). Please "
                          "reduce your prompt; or completion length.", "invalid_request_error", None)
        total = sum(counts)
        if total > EMBEDDING_MAX_REQUEST_TOKENS:
            raise _Reject(400, f"Requested {total} tokens, max {EMBEDDING_MAX_REQUEST_TOKENS} tokens per request",
                          "max_tokens_per_request", "max_tokens_per_request")
        return _EmbeddingJob(model, inputs, total, dimensions, fmt == "base64")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/embeddings: auth, body, limiter, faults, latency, vectors."""
        self.stats.embedding_requests += 1
        return await self.counted(self._embeddings, request)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        """The body of :meth:`embeddings` (in-flight accounting lives in the caller)."""
        started = time.perf_counter()
        now = time.monotonic()
        cfg = self.config
        stats = self.stats
        _, job, refused = await self.accept(request, self.parse_embeddings, started, now)
        if refused is not None:
            return refused
        stats.embedded_inputs += len(job.inputs)

        limit_headers: dict[str, str] = {}
        if self.requests_bucket is not None or self.tokens_bucket is not None:
            refused = self.admit(job.model, job.tokens, now, started, limit_headers)
            if refused is not None:
                return refused
        fault = self.draw_fault()
        if fault is not None and fault != "reset":
            return await self.fault_response(request, fault, job.model, limit_headers, started)

        payload = job.payload()
        if fault == "reset":
            stats.faults["reset"] += 1
        else:
            stats.ok += 1
            stats.embedding_tokens += job.tokens
            self.count(200)
        delay = cfg.latency_ms
        if cfg.jitter_ms:
            delay += self.jitter_rng.uniform(0.0, cfg.jitter_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        headers = {**limit_headers, **self.base_headers(started)}
        if fault == "reset":
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_type = "application/json"
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            await _flush_then_abort(request)
            return resp
        return web.Response(body=payload, headers=headers, content_type="application/json")
