"""The Batch API (``/v1/batches``) for chat completions, in memory and on a short clock.

A batch goes validating -> in_progress -> finalizing -> completed within ``batch_seconds``
(default 2 s, instead of up to 24 h): a tenth validating, a tenth finalizing, its lines answered in
between by the same code as ``/v1/chat/completions`` (minus latency, rate limits and random faults);
output lines are shuffled. The status is a function of the time since creation (:meth:`_Batch.state`),
so nothing runs in the background: lines are answered when someone looks.

The limits are read from the package (``nbparrot.server.BATCH_MAX_BYTES`` ...) when a file is
checked, so a test can lower them there.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from typing import Any

from aiohttp import web

from .config import BATCH_ENDPOINT, BATCH_FAIL_MARKER, BATCH_PHASE_SHARE, BATCH_WINDOW_SECONDS, _BATCH_MAX_ERRORS
from .chat import _completion, _usage
from .files import _StoredFile
from .logprobs import logprobs_object
from .wire import _find, _guarded, _json_object, _list_object, _page, _Reject


def _batch_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
    """One entry of a failed batch's ``errors.data``."""
    return {"code": code, "message": message, "param": param, "line": line}


def _parse_batch_input(data: bytes) -> tuple[list[tuple[str, dict]], list[dict]]:
    """Check a batch input file: its (custom_id, body) lines, and the errors that fail the batch (if any).

    Like OpenAI, a file that is too large, has too many lines, or has any line that is not a JSON object with a
    unique ``custom_id``, ``"method": "POST"``, ``"url": "/v1/chat/completions"`` and an object ``body``, fails
    the whole batch; a body the chat endpoint refuses only fails its own line, later.
    """
    from . import BATCH_MAX_BYTES, BATCH_MAX_LINES  # read now: a test may lower them on the package

    if len(data) > BATCH_MAX_BYTES:
        return [], [_batch_error("file_too_large", f"The batch input file is {len(data):,} bytes, over the "
                                 f"{BATCH_MAX_BYTES:,}-byte maximum of a batch input file.")]
    raw = data.split(b"\n")
    if not raw[-1].strip():
        raw.pop()  # the newline ending the last line
    if not raw:
        return [], [_batch_error("empty_file", "The batch input file is empty.")]
    if len(raw) > BATCH_MAX_LINES:
        return [], [_batch_error("too_many_tasks", f"The batch input file has {len(raw):,} requests, over the "
                                 f"{BATCH_MAX_LINES:,}-request maximum of a batch.")]
    lines: list[tuple[str, dict]] = []
    errors: list[dict] = []
    seen: set[str] = set()
    for number, text in enumerate(raw, 1):
        if len(errors) >= _BATCH_MAX_ERRORS:
            break
        try:
            item = json.loads(text)
        except ValueError:
            errors.append(_batch_error("invalid_json_line", "This line is not parseable as valid JSON.", number))
            continue
        if not isinstance(item, dict):
            errors.append(_batch_error("invalid_request", "This line is not a JSON object.", number))
            continue
        missing = next((key for key in ("custom_id", "method", "url", "body") if key not in item), None)
        custom_id, body = item.get("custom_id"), item.get("body")
        if missing is not None:
            errors.append(_batch_error("missing_required_parameter", f"Missing required parameter: '{missing}'.",
                                       number, missing))
        elif not isinstance(custom_id, str) or not custom_id:
            errors.append(_batch_error("invalid_value", "Invalid 'custom_id': expected a non-empty string.", number,
                                       "custom_id"))
        elif custom_id in seen:
            errors.append(_batch_error("duplicate_custom_id", "The custom_id for this request is a duplicate of "
                                       "another request. The custom_id parameter must be unique for each individual "
                                       "request in a batch.", number, "custom_id"))
        elif item["method"] != "POST":
            errors.append(_batch_error("invalid_value", "Invalid 'method': only 'POST' is supported.", number,
                                       "method"))
        elif item["url"] != BATCH_ENDPOINT:
            errors.append(_batch_error("url_mismatch", "The URL provided for this request does not match the batch "
                                       "endpoint.", number, "url"))
        elif not isinstance(body, dict):
            errors.append(_batch_error("invalid_value", "Invalid 'body': expected an object.", number, "body"))
        else:
            seen.add(custom_id)
            lines.append((custom_id, body))
    return (lines, []) if not errors else ([], errors)


class _Batch:
    """A batch job. Its status follows from the time since creation: see :meth:`state`."""

    def __init__(self, batch_id: str, input_file: _StoredFile, metadata: dict | None) -> None:
        """Check the input file now (the verdict shows once validation time has passed)."""
        self.id = batch_id
        self.input_file_id = input_file.id
        self.metadata = metadata
        self.lines, self.errors = _parse_batch_input(input_file.data)
        model = self.lines[0][1].get("model") if self.lines else None
        self.model = model if isinstance(model, str) else None
        self.shuffle_seed = hashlib.sha1(input_file.data).hexdigest()  # output order: a function of the input
        self.created = time.time()
        self.started = time.monotonic()
        self.results: list[tuple[bool, dict]] = []  # (succeeded, output line) of the lines done, in input order
        self.completed = 0
        self.failed = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cancel_at: float | None = None  # seconds after creation
        self.cancel_done = 0  # lines done when the cancel came
        self.output_file_id: str | None = None
        self.error_file_id: str | None = None
        self.finished = False  # output files written

    def state(self, elapsed: float, span: float) -> tuple[str, int]:
        """(status, lines done) ``elapsed`` seconds after creation, for batches that take ``span`` seconds."""
        phase = BATCH_PHASE_SHARE * span
        if self.cancel_at is not None:
            return ("cancelling" if elapsed < self.cancel_at + phase else "cancelled"), self.cancel_done
        if elapsed < phase:
            return "validating", 0
        if self.errors:
            return "failed", 0
        total = len(self.lines)
        if elapsed < span - phase:
            return "in_progress", min(total, int(total * (elapsed - phase) / (span - 2 * phase)))
        return ("finalizing" if elapsed < span else "completed"), total

    def obj(self, status: str, elapsed: float, span: float) -> dict:
        """OpenAI's batch object in ``status``, ``elapsed`` seconds after creation."""
        phase = BATCH_PHASE_SHARE * span
        live = elapsed if self.cancel_at is None else min(elapsed, self.cancel_at)  # how far processing got
        valid = not self.errors

        def at(offset: float, reached: bool) -> int | None:
            return int(self.created + offset) if reached else None

        return {
            "id": self.id,
            "object": "batch",
            "endpoint": BATCH_ENDPOINT,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if status == "failed" else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": int(self.created),
            "in_progress_at": at(phase, valid and live >= phase),
            "expires_at": int(self.created) + BATCH_WINDOW_SECONDS,
            "finalizing_at": at(span - phase, valid and live >= span - phase),
            "completed_at": at(span, status == "completed"),
            "failed_at": at(phase, status == "failed"),
            "expired_at": None,
            "cancelling_at": at(self.cancel_at or 0.0, self.cancel_at is not None),
            "cancelled_at": at((self.cancel_at or 0.0) + phase, status == "cancelled"),
            "request_counts": {"total": len(self.lines) if valid and live >= phase else 0,
                               "completed": self.completed, "failed": self.failed},
            "usage": {"input_tokens": self.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": self.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": self.input_tokens + self.output_tokens},
            "metadata": self.metadata,
        }


def _check_metadata(metadata: Any) -> None:
    """Metadata is null or at most 16 string pairs (keys up to 64 chars, values up to 512), else a 400."""
    if metadata is None:
        return
    if (not isinstance(metadata, dict) or len(metadata) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                       for k, v in metadata.items())):
        raise _Reject(400, "Invalid 'metadata': expected an object of at most 16 string pairs, keys of up to 64 "
                      "characters, values of up to 512.", "invalid_request_error", "invalid_value", "metadata")


class _BatchEndpoints:
    """/v1/batches (a mixin of the app; state in memory, POST /stats/reset keeps it)."""

    def find_batch(self, request: web.Request) -> _Batch:
        """The batch named by the URL, or a 404."""
        return _find(self.batches, request.match_info["batch_id"], "No batch found with id '{}'.", "batch_id")

    def refresh(self, batch: _Batch) -> tuple[str, float]:
        """Bring ``batch`` up to now: answer the lines due, write the output files once it is over."""
        elapsed = time.monotonic() - batch.started
        status, done = batch.state(elapsed, self.config.batch_seconds)
        while len(batch.results) < done:
            self.run_batch_line(batch, len(batch.results))
        if status in ("completed", "cancelled") and not batch.finished:
            batch.finished = True
            rng = random.Random(f"{self.config.seed}:{batch.shuffle_seed}")
            for succeeded, kind in ((True, "output"), (False, "error")):
                lines = [line for ok, line in batch.results if ok is succeeded]
                if not lines:
                    continue
                rng.shuffle(lines)  # OpenAI does not keep the input order either
                data = "".join(json.dumps(line) + "\n" for line in lines).encode()
                file = self.store_file(f"{batch.id}_{kind}.jsonl", "batch_output", data)
                if succeeded:
                    batch.output_file_id = file.id
                else:
                    batch.error_file_id = file.id
        return status, elapsed

    def batch_object(self, batch: _Batch) -> dict:
        """The batch object as of now."""
        status, elapsed = self.refresh(batch)
        return batch.obj(status, elapsed, self.config.batch_seconds)

    def run_batch_line(self, batch: _Batch, index: int) -> None:
        """Answer one batch line like /v1/chat/completions would (no latency, limits or faults) and record it."""
        custom_id, body = batch.lines[index]
        digest = hashlib.sha1(f"{batch.id}:{index}".encode()).hexdigest()
        try:
            req = self.parse_prompt(body)
            self.parse_options(body, req)
        except _Reject as rej:
            status, payload = rej.status, rej.body()
        else:
            if BATCH_FAIL_MARKER in req.last_user:
                status = 500
                payload = _Reject(500, "The server had an error while processing your request. Sorry about that!",
                                  "server_error", None).body()
            else:
                contents, finishes, counts, pieces = self.answer(req)
                ctoks = sum(counts)
                status = 200
                logprobs = None if pieces is None else [logprobs_object(p, req.top_logprobs) for p in pieces]
                payload = _completion(f"chatcmpl-{req.tag}{digest[:8]}", int(time.time()), req.model, contents,
                                      finishes, _usage(req.ptoks, ctoks), logprobs=logprobs)
                batch.input_tokens += req.ptoks
                batch.output_tokens += ctoks
        ok = status == 200
        if ok:
            batch.completed += 1
        else:
            batch.failed += 1
        batch.results.append((ok, {
            "id": f"batch_req_{digest[:32]}",
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"req_{digest[8:40]}", "body": payload},
            "error": None,
        }))


    @_guarded
    async def create_batch(self, request: web.Request) -> web.Response:
        """POST /v1/batches: a batch of chat completions from an uploaded ``batch`` file."""
        body = await _json_object(request)
        for key in ("input_file_id", "endpoint", "completion_window"):
            if body.get(key) is None:
                raise _Reject(400, f"Missing required parameter: '{key}'.", "invalid_request_error",
                              "missing_required_parameter", key)
        if body["endpoint"] != BATCH_ENDPOINT:
            raise _Reject(400, f"Invalid value: {body['endpoint']!r}. Supported values are: '{BATCH_ENDPOINT}' "
                          "(the only batch endpoint of this mock server).", "invalid_request_error",
                          "invalid_value", "endpoint")
        if body["completion_window"] != "24h":
            raise _Reject(400, f"Invalid value: {body['completion_window']!r}. Supported values are: '24h'.",
                          "invalid_request_error", "invalid_value", "completion_window")
        _check_metadata(body.get("metadata"))
        file_id = body["input_file_id"]
        file = self.files.get(file_id) if isinstance(file_id, str) else None
        if file is None:
            raise _Reject(400, f"Invalid 'input_file_id': no such File object: {file_id!r}.",
                          "invalid_request_error", "invalid_value", "input_file_id")
        if file.purpose != "batch":
            raise _Reject(400, f"Invalid 'input_file_id': {file_id} has purpose {file.purpose!r}, not 'batch'.",
                          "invalid_request_error", "invalid_value", "input_file_id")
        batch = _Batch(self.new_id("batch_"), file, body.get("metadata"))
        self.batches[batch.id] = batch
        self.stats.batches_created += 1
        self.stats.batch_lines += len(batch.lines)
        return web.json_response(self.batch_object(batch))

    @_guarded
    async def list_batches(self, request: web.Request) -> web.Response:
        """GET /v1/batches: the batches, newest first."""
        page, has_more = _page(list(reversed(self.batches.values())), request, 20, 100)
        return web.json_response(_list_object([self.batch_object(b) for b in page], has_more))

    @_guarded
    async def get_batch(self, request: web.Request) -> web.Response:
        """GET /v1/batches/{batch_id}: the batch as of now."""
        return web.json_response(self.batch_object(self.find_batch(request)))

    @_guarded
    async def cancel_batch(self, request: web.Request) -> web.Response:
        """POST /v1/batches/{batch_id}/cancel: stop now; "cancelled" a moment later, with the lines done so far."""
        batch = self.find_batch(request)
        status, elapsed = self.refresh(batch)
        if status in ("validating", "in_progress", "finalizing"):
            batch.cancel_at = elapsed
            batch.cancel_done = len(batch.results)
        elif status != "cancelling":
            raise _Reject(409, f"Cannot cancel a batch with status '{status}'.", "invalid_request_error", None)
        return web.json_response(self.batch_object(batch))

