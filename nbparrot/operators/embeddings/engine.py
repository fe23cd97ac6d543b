"""``EmbedEngine``: an ``Engine`` whose unit on the wire is a pack of rows (``POST /v1/embeddings``)."""

from __future__ import annotations

import asyncio
import binascii
import json
import math
import time
from collections import deque
from hashlib import sha256
from json.encoder import encode_basestring as _encode_text  # what the canonical key JSON does to a str
from typing import Any, Callable

import numpy as np

from ...cache import CachedAnswer, request_key
from ...engine import PLAN_SLICE, Engine
from ...engine.columns import _Keys, _Queue
from ...engine.words import _cannot_connect, _describe, cause, status_cause
from ...errors import BudgetExceededError, FatalError, error_fields, fatal_error
from ...errors import describe_error, redact_url
from ...outcomes import CHUNK, FAILED, MASK, OK, PENDING, SHIFT, Outcomes
from ...prepare import RenderError
from ...pricing import estimate
from ...ratelimit import retry_after_seconds
from ...tokens import estimate_text_tokens
from ...transport import TRANSIENT_ERRORS, ResponseTooLargeError, Transport


DEFAULT_MODEL = "text-embedding-3-small"
MAX_INPUTS = 2048  # inputs per request (OpenAI)
MAX_REQUEST_TOKENS = 300_000  # tokens summed over one request's inputs (OpenAI)
MAX_INPUT_TOKENS = 8192  # tokens of one input (OpenAI's embedding models)
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # 2,048 base64 vectors of 3,072 dims are ~34 MB
MEMO_ENTRIES = 4  # frames whose unit vectors search keeps in memory
MEMO_BYTES = 2 * 1024 ** 3  # ... and at most this many bytes of them (the newest is always kept)
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_SIZE_WORDS = ("token", "context length", "too long", "too large", "too many", "maximum", "max_tokens_per_request")
_OK, _PENDING, _FAILED = Outcomes.code(OK), Outcomes.code(PENDING), Outcomes.code(FAILED)
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # as cache.request_key


# ---- the texts of a run ------------------------------------------------------------------


class _Pack:
    """Rows sent in one request."""

    __slots__ = ("rows", "tokens", "sent", "attempts")

    def __init__(self, rows: list[int], tokens: int, sent: bool = False, attempts: int = 0):
        self.rows, self.tokens, self.sent, self.attempts = rows, tokens, sent, attempts


class _Transport(Transport):
    """The engine's transport, posting to the embeddings URL."""

    def __init__(self, url: str, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._url = url


class EmbedEngine(Engine):
    """Sends a run's texts to ``/v1/embeddings`` in packs; one outcome per row (see the module docstring).

    ``params`` is the request's shared part: ``{"model": ..., "dimensions": ...?}``. The vectors
    land in ``vectors`` (rows x dims float32, allocated once the dimensions are known); a row has
    one when its status is OK."""

    max_inputs = MAX_INPUTS
    max_request_tokens = MAX_REQUEST_TOKENS
    max_input_tokens = MAX_INPUT_TOKENS
    _base64 = True

    def __init__(self, endpoint: Any, params: Any, prompts: Any, settings: Any = None, *,
                 per_request: int | None = None, **kwargs: Any):
        super().__init__(endpoint, params, prompts, settings, **kwargs)
        if per_request is not None:
            self.max_inputs = per_request
        self._key_params = {k: self.params[k] for k in ("model", "dimensions") if k in self.params}
        self._ready: deque[_Pack] = deque()  # packs to send as they are (retries, halves), before new ones
        self._packs: dict[int, _Pack] = {}  # first row -> its pack, while in flight or waiting to retry
        self._twins: dict[int, list[int]] = {}  # row sent -> later rows with the same text
        self.dims: int | None = None
        self.vectors: np.ndarray | None = None

    @property
    def url(self) -> str:
        return self.endpoint.url("/embeddings")

    def vector(self, row: int) -> np.ndarray | None:
        """Row ``row``'s vector (a view), or None."""
        if self.outcomes.status[row] != _OK or self.vectors is None:
            return None
        return self.vectors[row]

    def _encode_prefix(self) -> bytes:
        body = dict(self.params)
        if self._base64:
            body["encoding_format"] = "base64"
        return json.dumps(body)[:-1].encode() + b', "input": '

    # ---- planning -----------------------------------------------------------------------

    def _plan_steps(self) -> Any:
        source, progress, costs = self.source, self.progress, self._costs
        render, clock, n = source.render, time.perf_counter, len(self.outcomes)
        lookup = self.cache is not None and not self._refresh
        keys = self._keys = _Keys(n)  # always: they also find the rows that hold the same text
        key_of, chunks, limit = text_key(self.endpoint.base_url, self._key_params), keys._chunks, self.max_input_tokens
        opened = self.cache is None
        row = tokens_left = 0
        while row < n:
            progress.note = f"preparing: {row:,} of {n:,} rows"
            end = clock() + PLAN_SLICE
            rows, hexes = [], []
            while row < n and (row & 63 or clock() < end):
                k, row = row, row + 1
                try:
                    text = render(k)
                except RenderError as exc:
                    self._settle_unsendable(k, str(exc))
                    continue
                if text is None:
                    self._settle_skipped(k)
                    continue
                if not text:
                    self._settle_unsendable(k, "empty text: there is nothing to embed (the endpoint refuses empty inputs)")
                    continue
                tokens = estimate_text_tokens(text)
                if tokens > limit:
                    self._settle_unsendable(k, f"text too long to embed: about {tokens:,} tokens, over the "
                                               f"{limit:,}-token limit of one input; shorten or split it")
                    continue
                costs[k] = tokens
                digest = key_of(text)
                chunk = chunks[k >> SHIFT]
                if chunk is None:
                    chunk = chunks[k >> SHIFT] = bytearray(32 * CHUNK)
                at = 32 * (k & MASK)
                chunk[at:at + 32] = digest  # what _Keys[k] = digest.hex() stores, without the round trip
                rows.append(k)
                hexes.append(digest)
            if rows and not opened and not lookup:
                opened = True
                yield []  # refresh: an empty lookup checks that the cache opens
            if rows and lookup:
                hexes = [digest.hex() for digest in hexes]
                found = yield hexes
                if found:
                    get, settle = found.get, self._settle_cached
                    rows = [k for k, key in zip(rows, hexes) if not settle(k, get(key))]
            else:
                yield None
            self._pending.extend(rows)
            self._unsettled += len(rows)
            tokens_left += sum(map(costs._tokens.__getitem__, rows))
        progress.note = None
        tokens = self._fold_twins(tokens_left)
        sending = len(self._pending)
        requests = max(math.ceil(sending / self.max_inputs), math.ceil(tokens / self.max_request_tokens))
        self.estimate = estimate(self.model, requests, tokens, 0, batch=self.batch, base_url=self.endpoint.base_url)
        self._planned = True

    def _fold_twins(self, tokens: int) -> int:
        """Send each distinct text once: rows whose key an earlier queued row has wait for that row's
        vector (``_twins``). Returns ``tokens`` (of the queued rows) less the twins'."""
        pending = self._pending
        rows = np.array(pending._rows[pending._head:], dtype=np.int64)
        costs = self._costs._tokens
        if len(rows) < 2 or self._keys._other:
            return tokens
        digests = np.empty((len(rows), 16), dtype=np.uint8)
        chunk_of = rows >> SHIFT
        for number in np.unique(chunk_of):
            chosen = chunk_of == number
            packed = np.frombuffer(self._keys._chunks[number], dtype=np.uint8).reshape(-1, 32)
            digests[chosen] = packed[rows[chosen] & MASK, :16]
        _, first, inverse = np.unique(digests.view("V16").ravel(), return_index=True, return_inverse=True)
        if len(first) < len(rows):
            leader = first[inverse.ravel()]
            twin = leader != np.arange(len(rows))
            for position in np.flatnonzero(twin).tolist():
                row = int(rows[position])
                self._twins.setdefault(int(rows[leader[position]]), []).append(row)
                tokens -= costs[row]
            queue = self._pending = _Queue()
            queue.extend(rows[~twin].tolist())
            folded = int(twin.sum())
            self._unsettled -= folded
            self.progress.queued -= folded  # they go with their twin's request
        return tokens

    def _settle_cached(self, row: int, answer: CachedAnswer | None) -> bool:
        if answer is None or not isinstance(answer.content, str):
            return False
        try:
            vector = np.frombuffer(binascii.a2b_base64(answer.content), dtype="<f4")
        except (binascii.Error, ValueError):
            return False
        if not self._store(row, vector):
            return False
        outcomes = self.outcomes
        outcomes.status[row] = _OK
        outcomes.cached[row] = 1
        outcomes.prompt_tokens[row] = answer.prompt_tokens or 0
        progress = self.progress
        progress.done += 1
        progress.cached += 1
        progress.queued -= 1
        if progress._listeners:
            progress.emit("done", row)
        return True

    def _store(self, row: int, vector: np.ndarray) -> bool:
        """Put a vector in the matrix (allocated at the first one); False if its length is not the run's."""
        if self.vectors is None:
            if not len(vector):
                return False
            self.dims = len(vector)
            self.vectors = np.empty((len(self.outcomes), self.dims), dtype=np.float32)
        elif len(vector) != self.dims:
            return False
        self.vectors[row] = vector
        return True

    # ---- sending ------------------------------------------------------------------------

    async def run(self) -> Any:
        loop = self._loop = asyncio.get_running_loop()
        progress = self.progress
        if progress.started is None:
            progress.started = loop.time()
        await self.prepare()
        s = self.settings
        async with _Transport(self.url, self.endpoint, concurrency=s.concurrency, timeout=s.timeout,
                              max_bytes=max(s.max_response_bytes, MAX_ANSWER_BYTES)) as transport:
            self._transport = transport
            watchdog = loop.call_later(s.first_byte_timeout, self._check_alive)
            try:
                await self._dispatch()
            finally:
                watchdog.cancel()
                try:
                    await self._stop()
                finally:
                    self._finish_twins()
                    progress.finished = loop.time()
                    progress.emit("finished", -1)
        return self.outcomes

    def _next_pack(self) -> _Pack:
        """Rows from the head of the queue, up to the input count and the token caps."""
        pending, costs = self._pending, self._costs._tokens
        cap = self.max_request_tokens
        bucket = self.pacer.tokens
        if bucket is not None and bucket.limit < cap:
            cap = bucket.limit
        rows: list[int] = []
        total, most = 0, self.max_inputs
        while pending and len(rows) < most:
            row = pending[0]
            tokens = costs[row]
            if rows and total + tokens > cap:
                break
            pending.popleft()
            rows.append(row)
            total += tokens
        return _Pack(rows, total)

    async def _dispatch(self) -> None:
        loop, pacer, ready = self._loop, self.pacer, self._ready
        budget = self.settings.max_cost
        while self._unsettled and self.fatal is None:
            if self.budget_stop is not None:
                if not self._in_flight:
                    return
                await self._wait()
                continue
            if (not ready and not self._pending) or \
                    self._in_flight + (0 if self._opened else self.progress.retrying) >= self._limit:
                await self._wait()
                continue
            if not ready:
                ready.append(self._next_pack())
            pack = ready[0]
            if pacer.too_large(pack.tokens):
                ready.popleft()
                if len(pack.rows) > 1:
                    ready.extendleft(reversed(self._halves(pack)))
                else:
                    self._fail_pack(pack, f"text needs about {pack.tokens} tokens, more than the whole "
                                          f"tokens-per-minute limit ({pacer.tokens.limit:.0f})")
                continue
            if budget is not None and not self._affordable_pack(pack, budget):
                continue
            now = loop.time()
            delay = pacer.delay(pack.tokens, now)
            if delay > 0:
                if delay >= 2.0:
                    self.progress.pause = (now + delay, self._why_paused(now))
                await self._wait(delay)
                continue
            if self.progress.pause is not None:
                self.progress.pause = None
            ready.popleft()
            first = pack.rows[0]
            self._packs[first] = pack
            mark = pacer.take(pack.tokens, loop.time())
            self._in_flight += 1
            task = loop.create_task(self._attempt(first, mark))
            self._tasks[task] = first
            task.add_done_callback(self._task_done)

    def _halves(self, pack: _Pack) -> list[_Pack]:
        costs = self._costs._tokens
        middle = len(pack.rows) // 2
        parts = [pack.rows[:middle], pack.rows[middle:]]
        return [_Pack(rows, sum(costs[r] for r in rows), pack.sent, pack.attempts) for rows in parts]

    def _affordable_pack(self, pack: _Pack, budget: float) -> bool:
        """Book the most ``pack`` can cost (its estimate times the largest counted / estimated ratio
        seen); a pack that does not fit is cut to the rows that do, and with none the run stops."""
        first = pack.rows[0]
        held, _ = self._committed.pop(first, (0, 0))
        self._committed_prompt -= held
        per_token = self.price.cost(1_000_000, 0, 0, self.batch) / 1e6 * self._ratio
        left = budget - self._spent - self._committed_prompt * per_token
        if pack.tokens * per_token > left:
            costs, fits, total = self._costs._tokens, 0, 0
            for row in pack.rows:
                if (total + costs[row]) * per_token > left:
                    break
                total += costs[row]
                fits += 1
            if not fits:
                most = pack.tokens * per_token
                self.budget_stop = BudgetExceededError(
                    f"stopped at the budget: ${self._spent:,.6f} spent of max_cost=${budget:,.6f}, and the next "
                    f"request could cost up to ${most:,.6f}; {self.progress.done} of {self.progress.total} rows "
                    "embedded (run.partial() has them; a rerun with a higher max_cost sends only the rest)")
                self.progress.last_error = str(self.budget_stop)
                return False
            rest = _Pack(pack.rows[fits:], pack.tokens - total, pack.sent, pack.attempts)
            pack.rows, pack.tokens = pack.rows[:fits], total
            self._ready.insert(1, rest)
        self._committed[first] = (pack.tokens, 0)
        self._committed_prompt += pack.tokens
        return True

    async def _attempt(self, first: int, mark: tuple[float, float, float]) -> None:
        loop, progress = self._loop, self.progress
        pack = self._packs[first]
        rows = pack.rows
        if not pack.sent:
            pack.sent = True
            progress.queued -= len(rows)
        pack.attempts += 1
        progress.requests += 1
        progress.in_flight += len(rows)
        sent = progress.sent_at[first] = loop.time()
        if progress._listeners:
            progress.emit("sent", first)
        version = self._version
        render = self.source.render
        body = b"".join((self._prefix, json.dumps([render(r) for r in rows]).encode(), b"}"))
        try:
            status, headers, raw = await self._transport.post(body)
        except TRANSIENT_ERRORS as exc:
            self._retry(first, _describe(exc), cause(exc), None if self._heard else _cannot_connect(exc))
            return
        except ResponseTooLargeError as exc:
            self._heard = True
            self._too_large(first, f"{exc}; not read")
            return
        finally:
            progress.in_flight -= len(rows)
            progress.sent_at.pop(first, None)
            if self._committed:
                held, _ = self._committed.pop(first, (0, 0))
                self._committed_prompt -= held
        now = loop.time()
        self._heard = True
        self.pacer.observe(headers, mark, now)
        if status == 200:
            try:
                self._answer(first, json.loads(raw), now - sent)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, binascii.Error):
                self._retry(first, f"unreadable answer from the endpoint: {self.endpoint.redact(repr(raw[:200]))}",
                            "unreadable answer")
            return
        self._error(first, status, headers, raw, version)

    def _answer(self, first: int, data: dict, latency: float | None) -> None:
        pack = self._packs[first]
        rows = pack.rows
        # Read everything first: an unreadable answer is retried whole, with nothing settled.
        vectors: list[Any] = [None] * len(rows)
        for item in data["data"]:
            embedding = item["embedding"]
            if isinstance(embedding, str):
                vectors[item["index"]] = (np.frombuffer(binascii.a2b_base64(embedding), dtype="<f4"), embedding)
            else:
                vectors[item["index"]] = (np.asarray(embedding, dtype=np.float32), None)
        usage = data.get("usage")
        tokens = (usage.get("prompt_tokens") or usage.get("total_tokens")) if isinstance(usage, dict) else None
        progress, outcomes = self.progress, self.outcomes
        if tokens is None:
            tokens = pack.tokens
            progress.usage_estimated += len(rows)
        progress.prompt_tokens += tokens
        if self.settings.max_cost is not None:
            self._spent += self.price.cost(tokens, 0, 0, self.batch)
            ratio = tokens / max(1, pack.tokens)
            if ratio > self._ratio:
                self._ratio = ratio
        del self._packs[first]
        self._open()
        self._streak = 0
        self._answered, self._failing = True, 0
        costs, keys, cache, model = self._costs._tokens, self._keys, self.cache, self.model
        status, attempts, prompt_tokens, latencies = (outcomes.status, outcomes.attempts, outcomes.prompt_tokens,
                                                      outcomes.latency)
        estimated, share = max(1, pack.tokens), 0
        latency = float("nan") if latency is None else latency
        twins, listeners = self._twins, progress._listeners
        done = 0
        for j, row in enumerate(rows):
            if status[row] != _PENDING:
                continue
            got = vectors[j]
            if got is None or not self._store(row, got[0]):
                problem = "no embedding for this input in the answer" if got is None else \
                    f"the endpoint returned {len(got[0])} dimensions where earlier rows had {self.dims}"
                self._fail_rows([row], problem, pack.attempts)
                continue
            row_tokens = costs[row] * tokens // estimated if j < len(rows) - 1 else tokens - share
            share += row_tokens
            status[row] = _OK
            attempts[row] = pack.attempts
            prompt_tokens[row] = row_tokens
            latencies[row] = latency
            done += 1
            if cache is not None:
                text = got[1]
                if text is None:
                    text = binascii.b2a_base64(got[0].astype("<f4").tobytes(), newline=False).decode("ascii")
                cache.put(keys[row], CachedAnswer(text, None, row_tokens, 0, model))
            if twins and row in twins:
                done += self._copy_to_twins(row, latency)
            if listeners:
                progress.emit("done", row)
        progress.done += done
        self._settle_many(len(rows))

    def _copy_to_twins(self, row: int, latency: float) -> int:
        outcomes, vectors = self.outcomes, self.vectors
        twins = self._twins.pop(row)
        for twin in twins:
            if outcomes.status[twin] == _PENDING:
                vectors[twin] = vectors[row]
                outcomes.status[twin] = _OK
                outcomes.latency[twin] = latency
        return len(twins)

    def _finish_twins(self) -> None:
        """Rows waiting for a twin that never got a vector share its fate (cancelled rows are already)."""
        for row, twins in list(self._twins.items()):
            outcome = self.outcomes[row]
            if outcome.status == FAILED:
                self._fail_rows(twins, outcome.error or "failed", 0, twins=False)
        self._twins.clear()

    def _error(self, first: int, status: int, headers: Any, raw: bytes, version: int) -> None:
        message, code, kind = error_fields(raw, self.endpoint.api_key)
        message = self.endpoint.redact(message)
        where = f"{status} from {redact_url(self.url)}"
        param = _param(raw)
        fatal = fatal_error(status, message, code, kind, where)
        if fatal is not None:
            return self._stop_run(fatal, first)
        lower = message.lower()
        if status == 429:
            if "too large" in lower:
                return self._too_large(first, f"429 request too large: {message}")
            self._open()
            return self._rate_limited(first, retry_after_seconds(headers, message))
        if 300 <= status < 400:
            location = self.endpoint.redact(headers.get("location", "?"))
            return self._stop_run(FatalError(
                f"{where}: the endpoint redirects (to {location}); set base_url to the final address", status=status), first)
        if status in (400, 413, 422):
            if version != self._version:
                return self._requeue(first)
            if self._base64 and ("encoding_format" in lower or "base64" in lower):
                self._base64 = False  # an endpoint without base64: ask for JSON floats from now on
                self._version += 1
                self._prefix = self._encode_prefix()
                return self._requeue(first)
            sized = status == 413 or any(word in lower for word in _SIZE_WORDS)
            if param in ("model", "dimensions", "encoding_format") or (
                    not self._answered and not sized and "model" in lower):
                hint = (f" (embed needs an embedding model, e.g. model={DEFAULT_MODEL!r})"
                        if param == "model" or "model" in lower else "")
                return self._stop_run(FatalError(f"{where}: {message}{hint}", status=status, code=code), first)
            # Anything else is taken to be about some input of the pack: halves, down to the row at
            # fault. Before any answer, three single rows refused in a row stop the run instead.
            pack = self._packs.get(first)
            if pack is not None and len(pack.rows) > 1:
                return self._too_large(first, describe_error(status, message, code))
            self._fail(first, describe_error(status, message, code))
            if not self._answered:
                self._failing += 1
                if self._failing >= 3:
                    self._stop_run(FatalError(f"{where}: {message} (every request so far was refused)",
                                              status=status, code=code))
            return None
        if status in _RETRY_STATUS or status >= 500:
            return self._retry(first, f"{status} {message or 'server error'}".strip(), status_cause(status))
        self._open()
        return self._fail(first, describe_error(status, message, code))

    def _too_large(self, first: int, reason: str) -> None:
        """A pack refused for its size: send it as two halves; one row alone fails with ``reason``."""
        pack = self._packs.get(first)
        if pack is None or len(pack.rows) < 2:
            return self._fail(first, reason)
        del self._packs[first]
        self._ready.extendleft(reversed(self._halves(pack)))
        self._notify()
        return None

    # ---- bookkeeping by pack --------------------------------------------------------------

    def _requeue(self, unit: int) -> None:
        pack = self._packs.pop(unit, None)
        if pack is not None:
            self._ready.appendleft(pack)
        else:
            self._pending.appendleft(unit)
        self._notify()

    def _rows(self, unit: int) -> list[int]:
        pack = self._packs.get(unit)
        return pack.rows if pack is not None else [unit]

    def _fail(self, unit: int, reason: str) -> None:
        pack = self._packs.pop(unit, None)
        self._fail_pack(pack if pack is not None else _Pack([unit], 0, True, self.outcomes[unit].attempts), reason)

    def _fail_pack(self, pack: _Pack, reason: str) -> None:
        if not pack.sent:
            self.progress.queued -= len(pack.rows)
        failed = self._fail_rows(pack.rows, reason, pack.attempts)
        self._settle_many(failed)

    def _fail_rows(self, rows: list[int], reason: str, attempts: int, twins: bool = True) -> int:
        """Fail those of ``rows`` still pending (and their twins); returns how many of ``rows`` it failed."""
        outcomes, progress = self.outcomes, self.progress
        failed = 0
        for row in rows:
            if outcomes.status[row] != _PENDING:
                continue
            outcomes.status[row] = _FAILED
            outcomes.error.set(row, reason)
            outcomes.attempts[row] = attempts
            failed += 1
            if progress._listeners:
                progress.emit("failed", row)
            if twins and row in self._twins:  # they are not counted as unsettled: not in the return value
                self._fail_rows(self._twins.pop(row), reason, 0, twins=False)
        progress.failed += failed
        progress.last_error = reason
        return failed

    def _settle_many(self, count: int) -> None:
        self._unsettled -= count
        if self._unsettled <= 0:
            self._notify()


def text_key(base_url: str, params: dict) -> Callable[[str], bytes]:
    """The cache key of one text's embedding, as raw sha256 bytes: the same as
    ``request_key(base_url, {**params, "input": text})`` (whose hex it is), built from the canonical
    JSON's fixed head and tail around the text instead of encoding the whole body each time."""
    marker = "\x00nbparrot-input\x00"
    canonical = _CANONICAL.encode({"base_url": base_url.rstrip("/"), "body": {**params, "input": marker}})
    head, tail = canonical.split(_encode_text(marker))
    head_bytes, tail_bytes = head.encode(), tail.encode()

    def key(text: str) -> bytes:
        try:
            data = head_bytes + _encode_text(text).encode() + tail_bytes
        except UnicodeEncodeError:
            return bytes.fromhex(request_key(base_url, {**params, "input": text}))
        return sha256(data).digest()

    return key


def _param(raw: bytes) -> str | None:
    try:
        error = json.loads(raw).get("error")
        return error.get("param") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None


# ---- the run -----------------------------------------------------------------------------


