"""Chat completions: request checks, the deterministic answer (shared with batch lines), streaming.

Choice ``i`` of a text answer is ``[<tag>#<i>] <first 48 chars of the last user message> `` (with
images or PDFs in the prompt, their marks ``[image:<image_tag>]`` come first, see :mod:`.media`) then
lorem-ipsum filler up to the choice's completion tokens (4 characters a token); at temperature 0
every choice is choice 0's answer. ``json_schema`` answers are instances of the schema
(:mod:`.schema_faker`, written as UTF-8 JSON), and so are ``json_object`` answers to a prompt that
gives the schema in words (the first JSON object after the words "JSON schema", as nbparrot's
fallback instruction does, see :func:`.decisions.schema_in_words`); other ``json_object`` answers
are ``{"tag", "echo", "choice", "text"}`` objects. In those instances booleans and enums follow the
decision rules of :mod:`.decisions` (same for every choice). ``logprobs: true`` adds token logprobs
(:mod:`.logprobs`), per token in streams too. Markers in the last user message (see :mod:`.config`)
ask for broken, empty, refused or huge answers; the table operators' markers (:mod:`.table`) give
plain-text answers in words (the rows an ``agg`` request covered, logged in ``GET /stats``'s
``rows_seen``; the better of two scored items; whether two keys match). An embedding model here is OpenAI's 404 "This is not
a chat model...".
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

from aiohttp import web

from .config import (
    BAD_SSE_MARKER,
    DEFAULT_MAX_TOKENS_CHARGE,
    HUGE_ANSWER_MARKER,
    HUGE_JUNK_MARKER,
    LIST_JSON_MARKER,
    NOT_JSON_MARKER,
    NOT_JSON_ONCE_MARKER,
    NULL_CONTENT_MARKER,
    NUMERIC_CODE_MARKER,
    REFUSAL_MARKER,
)
from .decisions import _Decider, schema_in_words
from .embeddings import is_embedding_model
from .logprobs import Piece, answer_pieces, logprobs_object
from .prompts import _digest, _filler, _prompt_media
from .schema_faker import _SchemaFaker
from .table import ROW_MARKER, rows_in, text_answer
from .wire import _Reject, _flush_then_abort, _int_param


class _ChatRequest:
    """A checked chat completion request: the prompt, then the options :meth:`_ChatEndpoint.parse_options` reads."""

    __slots__ = ("model", "prompt_text", "last_user", "digest", "tag", "ptoks", "n", "max_tokens", "fmt", "schema",
                 "greedy", "logprobs", "top_logprobs", "marks")

    def __init__(self, model: str, prompt_text: str, chars: int, last_user: str) -> None:
        """Derive the tag and prompt tokens from the prompt; options start at their defaults."""
        self.model = model
        self.prompt_text = prompt_text
        self.last_user = last_user
        self.digest = _digest(prompt_text)
        self.tag = self.digest[:12]
        self.ptoks = (chars + 3) // 4
        self.n = 1
        self.max_tokens: int | None = None
        self.fmt = "text"
        self.schema: dict = {}
        self.greedy = False
        self.logprobs = False  # logprobs asked for, and served
        self.top_logprobs = 0
        self.marks = ""  # "[image:<tag>] ..." of the prompt's images and files, put before the echo


def _usage(ptoks: int, ctoks: int, cached: int = 0) -> dict:
    """The ``usage`` object of a chat completion (``cached``: prompt tokens from the prompt cache)."""
    return {
        "prompt_tokens": ptoks,
        "completion_tokens": ctoks,
        "total_tokens": ptoks + ctoks,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def _completion(completion_id: str, created: int, model: str, contents: list[str | None], finishes: list[str],
                usage: dict | None, refusal: str | None = None, logprobs: list[dict | None] | None = None) -> dict:
    """A ``chat.completion`` object with one choice per content (no ``usage`` key when it is None)."""
    if logprobs is None:
        logprobs = [None] * len(contents)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": content, "refusal": refusal, "annotations": []},
             "logprobs": lp, "finish_reason": finish}
            for i, (content, finish, lp) in enumerate(zip(contents, finishes, logprobs))
        ],
        **({"usage": usage} if usage is not None else {}),
        "service_tier": "default",
        "system_fingerprint": "fp_nbparrot",
    }


class _ChatEndpoint:
    """POST /v1/chat/completions and the answer it shares with batch lines (a mixin of the app)."""

    # ---- the chat answer, shared by /v1/chat/completions and batch lines

    def parse_prompt(self, body: Any) -> _ChatRequest:
        """Check the body's shape, model and messages (raise :class:`_Reject`); the prompt's tag is known after."""
        if not isinstance(body, dict):
            raise _Reject(400, "The request body must be a JSON object.", "invalid_request_error", None)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _Reject(400, "you must provide a model parameter", "invalid_request_error", None)
        if model not in self.models:
            raise _Reject(404, f"The model `{model}` does not exist or you do not have access to it.",
                          "invalid_request_error", "model_not_found")
        if is_embedding_model(model):  # OpenAI's words for a model of another kind
            raise _Reject(404, "This is not a chat model and thus not supported in the v1/chat/completions endpoint. "
                          "Did you mean to use v1/completions?", "invalid_request_error", None, "model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            if messages is None:
                raise _Reject(400, "Missing required parameter: 'messages'.", "invalid_request_error",
                              "missing_required_parameter", "messages")
            raise _Reject(400, "Invalid 'messages': expected a non-empty array of message objects.",
                          "invalid_request_error", "invalid_value", "messages")
        for k, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise _Reject(400, f"Invalid 'messages[{k}]': expected an object with a 'role'.",
                              "invalid_request_error", "invalid_value", f"messages[{k}]")
        text, chars, last_user, media = _prompt_media(messages, model)
        req = _ChatRequest(model, text, chars, last_user)
        if media:  # each answer starts with the marks of the prompt's images and files
            req.marks = " ".join(found.mark for found in media) + " "
            req.ptoks += sum(found.tokens for found in media)
        if self.config.usage_scale != 1.0:  # an endpoint whose tokenizer counts more than the client's estimate
            req.ptoks = math.ceil(req.ptoks * self.config.usage_scale)
        return req

    def parse_options(self, body: dict, req: _ChatRequest) -> None:
        """Read n, max tokens, response_format and temperature into ``req``; check the context window."""
        cfg = self.config
        req.n = _int_param(body, "n", 1, 128) or 1
        max_tokens = _int_param(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int_param(body, "max_tokens", 1)
        req.max_tokens = max_tokens
        response_format = body.get("response_format")
        if response_format is not None:
            fmt = response_format.get("type") if isinstance(response_format, dict) else None
            if fmt not in ("text", "json_object", "json_schema"):
                raise _Reject(400, "Invalid 'response_format.type': expected one of 'text', 'json_object', "
                              "'json_schema'.", "invalid_request_error", "invalid_value", "response_format.type")
            if fmt == "json_schema" and not cfg.json_schema:
                raise _Reject(400, "response_format of type 'json_schema' is not supported by this server; "
                              "use 'json_object'.", "invalid_request_error", "invalid_value", "response_format")
            if fmt == "json_schema":
                spec = response_format.get("json_schema")
                schema = spec.get("schema") if isinstance(spec, dict) else None
                if not isinstance(schema, dict):
                    raise _Reject(400, "Missing required parameter: 'response_format.json_schema.schema'.",
                                  "invalid_request_error", "missing_required_parameter",
                                  "response_format.json_schema")
                req.schema = schema
            req.fmt = fmt
        logprobs = body.get("logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise _Reject(400, f"Invalid type for 'logprobs': expected a boolean, but got {type(logprobs).__name__} "
                          "instead.", "invalid_request_error", "invalid_type", "logprobs")
        top_logprobs = _int_param(body, "top_logprobs", 0, 20)
        if top_logprobs is not None and not logprobs:
            raise _Reject(400, "The 'top_logprobs' parameter is only allowed when 'logprobs' is enabled.",
                          "invalid_request_error", None, "top_logprobs")
        req.logprobs = bool(logprobs) and cfg.logprobs  # a server without logprobs answers "logprobs": null
        req.top_logprobs = top_logprobs or 0
        req.greedy = body.get("temperature") == 0  # at temperature 0 every choice is the same answer, as in practice
        if NUMERIC_CODE_MARKER in req.last_user:  # some gateways and vLLM builds send numeric codes
            raise _Reject(400, "This request was rejected (numeric error code).", "BadRequestError", 400)
        ptoks = req.ptoks
        total = ptoks + (max_tokens or 0)
        if ptoks > cfg.context_window or (max_tokens is not None and total > cfg.context_window):
            if max_tokens is None:
                detail = (f"However, your messages resulted in {ptoks} tokens. "
                          "Please reduce the length of the messages.")
            else:
                detail = (f"However, you requested {total} tokens ({ptoks} in the messages, {max_tokens} in the "
                          "completion). Please reduce the length of the messages or completion.")
            raise _Reject(400, f"This model's maximum context length is {cfg.context_window} tokens. {detail}",
                          "invalid_request_error", "context_length_exceeded", "messages")

    def answer(self, req: _ChatRequest) -> tuple[list[str], list[str], list[int], list[list[Piece]] | None]:
        """The deterministic (contents, finish reasons, completion tokens, logprob tokens) of ``req``'s n choices.

        The logprob tokens are None unless the request asked for logprobs (and the server serves them).
        """
        cfg = self.config
        tag, fmt, schema, last_user, max_tokens = req.tag, req.fmt, req.schema, req.last_user, req.max_tokens
        not_json = NOT_JSON_MARKER in req.prompt_text or NOT_JSON_ONCE_MARKER in last_user
        echo = " ".join(last_user[:96].split())[:48]
        seed = int(req.digest[12:20], 16)
        contents: list[str] = []
        finishes: list[str] = []
        counts: list[int] = []
        pieces: list[list[Piece]] | None = [] if req.logprobs else None
        faking = fmt == "json_schema"
        if fmt == "json_object" and not not_json and LIST_JSON_MARKER not in last_user:
            in_words = schema_in_words(req.prompt_text)  # the json_object fallback: the schema in an instruction
            if in_words is not None:
                schema, faking = in_words, True
        decider = _Decider(last_user, req.model) if faking and not not_json else None
        ct, ct_max = cfg.completion_tokens, cfg.completion_tokens_max
        for i in range(req.n):
            tokens = ct if ct_max is None else ct + (seed + i * 7919) % (ct_max - ct + 1)
            finish = "stop"
            if max_tokens is not None and tokens > max_tokens:
                tokens, finish = max_tokens, "length"
            label = f"{tag}#{0 if req.greedy else i}"
            value: Any = None
            faker = None
            marked = text_answer(last_user) if fmt == "text" and not not_json else None
            if marked is not None:  # the table operators' markers (see .table): rows seen, a choice, a match
                tokens, finish = (len(marked) + 3) // 4, "stop"
                if max_tokens is not None and tokens > max_tokens:
                    tokens, finish, marked = max_tokens, "length", marked[: max_tokens * 4]
                content = marked
            elif fmt == "text" or not_json:
                prefix = f"[{label}] {req.marks}{echo} "
                content = prefix + _filler(tokens * 4 - len(prefix))
                if finish == "length":
                    content = content[: max(tokens * 4, len(label) + 2)]
                content = content.rstrip()
            else:
                if faking:
                    faker = _SchemaFaker(schema, label, seed + i, decider)
                    value = faker.make(schema)
                    content = json.dumps(value, ensure_ascii=False)
                elif LIST_JSON_MARKER in last_user:
                    content = json.dumps({"items": [
                        {"question": f"Question {k + 1} about {echo} [{label}]", "answer": f"Answer {k + 1} [{label}]"}
                        for k in range(3)]})
                else:
                    base = 48 + len(label) + len(echo)
                    content = json.dumps({"tag": label, "echo": echo, "choice": i,
                                          "text": _filler(tokens * 4 - base).rstrip()})
                if finish == "length":
                    content = content[: tokens * 4]  # truncated mid-JSON, like the real API
            contents.append(content)
            finishes.append(finish)
            counts.append(tokens)
            if pieces is not None:
                pieces.append(answer_pieces(content, value, faker.decisions if faker is not None else None))
        return contents, finishes, counts, pieces

    # ---- chat completions

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions: auth, model, body, context, limiter, faults, latency, answer."""
        return await self.counted(self._chat, request)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        """The body of :meth:`chat` (in-flight accounting lives in the caller)."""
        started = time.perf_counter()
        now = time.monotonic()
        cfg = self.config
        stats = self.stats

        body, req, refused = await self.accept(request, self.parse_prompt, started, now)
        if refused is not None:
            return refused

        model, tag, ptoks = req.model, req.tag, req.ptoks
        stats.received[tag] = stats.received.get(tag, 0) + 1

        try:
            self.parse_options(body, req)
        except _Reject as rej:
            headers = {**self.limit_headers(now), **self.base_headers(started)}
            return self.error(rej.status, rej.message, rej.type, rej.code, rej.param, headers)
        n, max_tokens = req.n, req.max_tokens

        # ---- rate limiter: charge up front, or refuse and charge nothing
        limit_headers: dict[str, str] = {}
        if self.requests_bucket is not None or self.tokens_bucket is not None:
            refused = self.admit(model, ptoks + n * (max_tokens or DEFAULT_MAX_TOKENS_CHARGE), now, started,
                                 limit_headers)
            if refused is not None:
                return refused

        # ---- faults, drawn from the seeded RNG
        fault = self.draw_fault()
        if fault is not None and fault != "reset":
            return await self.fault_response(request, fault, model, limit_headers, started)

        # ---- the answer
        stream = bool(body.get("stream"))
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        contents, finishes, counts, pieces = self.answer(req)
        ctoks = sum(counts)
        last_user = req.last_user
        refusal = None
        if REFUSAL_MARKER in last_user:
            refusal = "I'm sorry, but I can't help with that."
            contents = [None] * len(contents)
            pieces = None
        elif NULL_CONTENT_MARKER in last_user:
            contents = [None] * len(contents)
            pieces = None
        elif HUGE_ANSWER_MARKER in last_user:
            contents = [c + " " + _filler(cfg.huge_bytes) for c in contents]
            pieces = None
        logprobs = None
        if req.logprobs:
            logprobs = [None] * len(contents) if pieces is None else [logprobs_object(p, req.top_logprobs)
                                                                      for p in pieces]

        if fault == "reset":
            stats.faults["reset"] += 1
        else:
            stats.ok += 1
            stats.prompt_tokens += ptoks
            stats.completion_tokens += ctoks
            stats.answered[tag] = stats.answered.get(tag, 0) + 1
            if ROW_MARKER in last_user:
                stats.rows_seen.append(rows_in(last_user))
            stats.models[model] = stats.models.get(model, 0) + 1
            self.count(200)

        delay = cfg.latency_ms
        if cfg.jitter_ms:
            delay += self.jitter_rng.uniform(0.0, cfg.jitter_ms)
        if not stream and cfg.per_token_ms:
            delay += cfg.per_token_ms * max(counts)
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)

        if HUGE_JUNK_MARKER in last_user:
            return await self.junk(request)
        cached = self.prompt_cache.cached_tokens(model, req.prompt_text, ptoks) if cfg.prompt_cache else 0
        if cached and fault != "reset":
            stats.cached_tokens += cached
        usage = _usage(ptoks, ctoks, cached) if cfg.usage else None
        completion_id = f"chatcmpl-{tag}{self.counter:x}"
        created = int(time.time())
        headers = {**limit_headers, **self.base_headers(started)}
        if stream:
            stats.streams += 1
            return await self.stream(request, headers, completion_id, created, model, contents, finishes, counts,
                                     usage if include_usage else None, include_usage, reset=fault == "reset",
                                     logprobs=logprobs, bad_event=BAD_SSE_MARKER in last_user)
        payload = json.dumps(_completion(completion_id, created, model, contents, finishes, usage, refusal,
                                         logprobs)).encode()
        if fault == "reset":
            resp = web.StreamResponse(status=200, headers=headers)
            resp.content_type = "application/json"
            resp.content_length = len(payload)
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            await _flush_then_abort(request)
            return resp
        return web.Response(body=payload, headers=headers, content_type="application/json")

    async def junk(self, request: web.Request) -> web.StreamResponse:
        """A 200 whose body is ``huge_bytes`` of non-JSON, chunked without a length, written as the client reads."""
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"x" * 65536
        left = self.config.huge_bytes
        try:
            while left > 0:
                piece = chunk[:left]
                await resp.write(piece)  # waits while the client is not reading: a capped client stops it
                self.stats.huge_bytes_sent += len(piece)
                left -= len(piece)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):  # the client went away
            pass
        return resp

    async def stream(self, request: web.Request, headers: dict[str, str], completion_id: str, created: int,
                     model: str, contents: list[str], finishes: list[str], counts: list[int],
                     usage: dict | None, include_usage: bool, reset: bool,
                     logprobs: list[dict | None] | None = None, bad_event: bool = False) -> web.StreamResponse:
        """Send the answer as SSE chat.completion.chunk events, one choice after the other.

        A chunk carries a word and the spaces after it; with logprobs, one logprob token and its entry.
        ``bad_event``: a ``data:`` line that is not JSON in the middle (a broken gateway, for tests).
        """
        per_token = self.config.per_token_ms
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "service_tier": "default", "system_fingerprint": "fp_nbparrot"}
        extra = {"usage": None} if include_usage else {}

        def event(choices: list, **more: Any) -> bytes:
            return b"data: " + json.dumps({**head, "choices": choices, **extra, **more}).encode() + b"\n\n"

        # (event bytes, delay in seconds before sending it)
        events: list[tuple[bytes, float]] = []
        for i, content in enumerate(contents):
            events.append((event([{"index": i, "delta": {"role": "assistant", "content": "", "refusal": None},
                                   "logprobs": None, "finish_reason": None}]), 0.0))
            entries = logprobs[i]["content"] if logprobs is not None and logprobs[i] is not None else None
            if entries is not None:
                gap = per_token * counts[i] / max(1, len(entries)) / 1000.0 if per_token else 0.0
                for entry in entries:
                    events.append((event([{"index": i, "delta": {"content": entry["token"]},
                                           "logprobs": {"content": [entry], "refusal": None},
                                           "finish_reason": None}]), gap))
            else:
                words = content.split(" ")
                gap = per_token * counts[i] / len(words) / 1000.0 if per_token else 0.0
                last = len(words) - 1
                for k, word in enumerate(words):
                    piece = word if k == last else word + " "
                    events.append((event([{"index": i, "delta": {"content": piece}, "logprobs": None,
                                           "finish_reason": None}]), gap))
            events.append((event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finishes[i]}]), 0.0))
        if usage is not None:
            events.append((event([], usage=usage), 0.0))
        if bad_event:
            events.insert(len(events) // 2, (b"data: {\"choices\": [\n\n", 0.0))
        events.append((b"data: [DONE]\n\n", 0.0))

        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)
        if reset:
            await resp.write(b"".join(e for e, _ in events[: len(events) // 2]))
            await _flush_then_abort(request)
            return resp
        if not per_token:
            await resp.write(b"".join(e for e, _ in events))
        else:
            for data, gap in events:
                if gap:
                    await asyncio.sleep(gap)
                await resp.write(data)
        await resp.write_eof()
        return resp
