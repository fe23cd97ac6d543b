"""Embeddings over a DataFrame's rows: ``embed``, ``search`` and ``sim_join`` (``POST /v1/embeddings``).

``embed(df, "text")`` (a column, its text as is) or ``embed(df, "{title}: {body}")`` (a template)
returns a ``Run`` like ``map`` does: at once in a notebook (live panel, Cancel, ``await run``), to
completion in a script. Its result is a Series of float32 numpy vectors on the frame's index (None
where a row has none); ``run.matrix()`` gives them as one (rows x dims) float32 array, NaN rows
where there is no vector, and ``nbparrot.operators.similarity.as_matrix(series.dropna())`` makes one
from any such Series.

How a run goes (``EmbedEngine``, an ``Engine`` whose unit on the wire is a *pack* of rows):

- **Planning**, before any request, in slices as for ``map``: each row's text is rendered once,
  its tokens estimated (``ceil(utf-8 bytes / 4)``), and its cache key made from the base URL, the
  model, ``dimensions`` and the text alone, so a frame's vectors are found again by any later call
  (``embed``, ``search``, ``sim_join``, another frame holding the same texts). A missing value is
  skipped (``on_missing``), an empty text or one over the 8,192-token input limit fails its row
  there, with nothing sent. Then rows with the same text are folded together: each distinct text
  is sent once and its vector given to every row that has it.
- **Packing** happens as requests are dispatched: rows are taken from the head of the queue into a
  pack of at most ``per_request`` inputs (2,048, OpenAI's limit) and 300,000 estimated tokens (and
  never more than the tokens-per-minute limit, once one is known). A request's pacing cost is the
  sum of its inputs' estimated tokens. The first pack goes alone, as ``map``'s first row does:
  a chat model, a bad key or an unknown model costs one request and stops the run with the
  endpoint's error in one line.
- **Answers** come base64-encoded (``encoding_format="base64"``, float32 little-endian: a quarter
  of the JSON floats' decoding work), are written into one preallocated float32 matrix and put in
  the cache as the base64 text. ``usage.prompt_tokens`` is shared out over the pack's rows in
  proportion to their estimates (``meta=True`` shows it per row). A pack refused for its size
  (tokens, or an answer over the size cap) is split in two and both halves sent, down to the one
  row at fault, which fails alone; 429s, 5xx and network errors retry the pack with backoff.
- **Budget**: ``max_cost`` books each pack's most-possible cost before it goes; a pack that does
  not fit is cut to the rows that do, then the run stops.
- Cancel keeps every vector that landed (and the cache has them): a rerun sends only the rest.

``search`` and ``sim_join`` embed through the same run (one panel: the frame's rows plus the
query, or both sides of the join), then rank by cosine similarity with
``nbparrot.operators.similarity.nearest`` (chunked: the full similarity matrix is never built).
``search`` also keeps the last few frames' unit vectors in memory (``MEMO_ENTRIES``, ``MEMO_BYTES``),
checked against the frame's columns on each call (pandas' copy-on-write makes that a cheap
comparison), so a second query on an unchanged frame costs one embedding and one matrix product.

The Batch API (``mode="batch"``) is not offered for embeddings yet: a ``ConfigError`` says so.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import math
import time
import warnings
from collections import OrderedDict, deque
from hashlib import sha256
from json.encoder import encode_basestring as _encode_text  # what the canonical key JSON does to a str
from typing import Any, Callable, Sequence

import numpy as np

from ..api import launch, resolve
from ..cache import CachedAnswer, request_key
from ..engine import PLAN_SLICE, Engine
from ..engine.columns import _Keys, _Queue
from ..engine.words import _describe
from ..errors import BudgetExceededError, ConfigError, FatalError, NbparrotError, TemplateError, error_fields, fatal_error
from ..errors import describe_error, redact_url
from ..options import RUN, check_options, takes_options
from ..outcomes import CHUNK, FAILED, MASK, OK, PENDING, SHIFT, SKIPPED, Outcomes
from ..prepare import Prepared, RenderError, prepare
from ..pricing import cost_of, estimate
from ..ratelimit import retry_after_seconds
from ..results import _meta_columns
from ..run import Run
from ..templates import Template
from ..tokens import estimate_text_tokens
from ..transport import TRANSIENT_ERRORS, ResponseTooLargeError, Transport
from .similarity import nearest, normalize

__all__ = ["embed", "search", "sim_join", "EmbedEngine", "EmbedRun", "Inputs", "DEFAULT_MODEL", "clear_memo"]

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


class Inputs:
    """The texts of one embedding run, from one or more parts: a frame's rows (a ``Prepared``) or a
    few plain texts (a query). Stands where a ``Prepared`` does for ``Run``, the panel and the
    engine: ``len``, ``render(k)`` (the text, None for a skipped row, ``RenderError``), ``skip_reason``,
    ``user_text``, ``index`` / ``request_index`` and ``frame`` / ``records`` of the first part."""

    variants = 1

    def __init__(self, parts: Sequence[tuple[str, Prepared | list[str]]]):
        self.parts = list(parts)
        self.starts = [0]
        for _, part in self.parts:
            self.starts.append(self.starts[-1] + (part.rows if isinstance(part, Prepared) else len(part)))
        first = self.parts[0][1]
        self.frame = first.frame if isinstance(first, Prepared) else None
        self.records = first.records if isinstance(first, Prepared) else None
        self.rows = self.starts[-1]
        self.templates = [_label(part) for _, part in self.parts]
        if len(self.parts) == 1 and isinstance(first, Prepared):
            render = first.render  # the hot path: one frame, no part lookup

            def render_one(k: int) -> str | None:
                messages = render(k)
                return None if messages is None else messages[0]["content"]

            self.render = render_one  # type: ignore[method-assign]

    def __len__(self) -> int:
        return self.rows

    def _part(self, k: int) -> tuple[int, Any]:
        starts = self.starts
        for p in range(len(self.parts)):
            if k < starts[p + 1]:
                return k - starts[p], self.parts[p][1]
        raise IndexError(k)

    def render(self, k: int) -> str | None:
        local, part = self._part(k)
        if isinstance(part, Prepared):
            messages = part.render(local)
            return None if messages is None else messages[0]["content"]
        return part[local]

    def skip_reason(self, k: int) -> str:
        local, part = self._part(k)
        return part.skip_reason(local) if isinstance(part, Prepared) else "skipped"

    def user_text(self, k: int) -> str | None:
        try:
            return self.render(k)
        except (RenderError, TemplateError, ConfigError):
            return None

    def row_of(self, k: int) -> int:
        return k

    def template_of(self, k: int) -> str:
        for p in range(len(self.parts)):
            if k < self.starts[p + 1]:
                return self.templates[p]
        return ""

    def span(self, name: str) -> range:
        """The requests of the part called ``name``."""
        for p, (part_name, _) in enumerate(self.parts):
            if part_name == name:
                return range(self.starts[p], self.starts[p + 1])
        raise KeyError(name)

    @property
    def index(self) -> Any:
        first = self.parts[0][1]
        if isinstance(first, Prepared):
            return first.index
        import pandas as pd

        return pd.RangeIndex(len(first))

    @property
    def request_index(self) -> Any:
        import pandas as pd

        if len(self.parts) == 1:
            return self.index
        names, labels = [], []
        for name, part in self.parts:
            index = part.index if isinstance(part, Prepared) else pd.RangeIndex(len(part))
            names += [name] * len(index)
            labels += list(index)
        return pd.MultiIndex.from_arrays([names, labels], names=["part", "row"])


def _label(part: Any) -> str:
    return part.templates[0] if isinstance(part, Prepared) else "(query)"


def texts_of(data: Any, on: Any, *, on_missing: str = "skip", what: str = "on") -> Prepared:
    """A ``Prepared`` rendering ``on`` for each row of ``data``: a column's (or a dict key's) text as
    is, or a ``{field}`` template. ``TemplateError`` for an unknown column or field, before anything."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        try:
            is_column = on in data.columns
        except TypeError:  # unhashable
            is_column = False
        if is_column:
            if isinstance(on, str) and on.isidentifier():
                return prepare(data, "{" + on + "}", system=None, on_missing=on_missing)
            if not data.columns.is_unique:
                prepare(data, "", system=None)  # the duplicate-names ConfigError
            view = data[[on]].set_axis(["text"], axis=1)  # no copy under copy-on-write
            prepared = prepare(view, "{text}", system=None, on_missing=on_missing)
            prepared.frame = data
            prepared.templates = [str(on)]
            return prepared
        names = [str(c) for c in data.columns]
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        first = data[0] if len(data) and isinstance(data[0], dict) else {}
        if isinstance(on, str) and on in first:
            if on.isidentifier():
                return prepare(data, "{" + on + "}", system=None, on_missing=on_missing)
            rows = [{"text": r[on]} if isinstance(r, dict) and on in r else r for r in data]
            prepared = prepare(rows, "{text}", system=None, on_missing=on_missing)
            prepared.records = data
            return prepared
        names = sorted({str(key) for r in data[:1000] if isinstance(r, dict) for key in r})
    else:
        raise ConfigError(f"data must be a pandas DataFrame or a list of dicts, not {type(data).__name__}")
    if not isinstance(on, str):
        raise TemplateError(f"{what}={on!r} is not a column; columns: {', '.join(names[:40]) or '(none)'}")
    if not Template(on).fields:  # a plain word that is no column: a typo, not a constant text to embed
        raise TemplateError(f"{what}={on!r} is neither a column nor a template with {{fields}}; "
                            f"columns: {', '.join(names[:40]) or '(none)'}")
    return prepare(data, on, system=None, on_missing=on_missing)


# ---- the engine --------------------------------------------------------------------------


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
        endpoint = self.endpoint
        url = endpoint.base_url + "/embeddings"
        if endpoint.azure and endpoint.api_version and "/deployments/" in endpoint.base_url:
            url += f"?api-version={endpoint.api_version}"
        return url

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
        self.estimate = estimate(self.model, requests, tokens, 0, batch=self.batch)
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
        model, ratio = self.model, self._ratio
        per_token = (cost_of(model, 1_000_000, 0, batch=self.batch) or 0.0) / 1e6 * ratio
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
            self._retry(first, _describe(exc))
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
                self._retry(first, f"unreadable answer from the endpoint: {self.endpoint.redact(repr(raw[:200]))}")
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
            self._spent += cost_of(self.model, tokens, 0, batch=self.batch) or 0.0
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
            return self._stop_run(fatal)
        lower = message.lower()
        if status == 429:
            if "too large" in lower:
                return self._too_large(first, f"429 request too large: {message}")
            self._open()
            return self._rate_limited(first, retry_after_seconds(headers, message))
        if 300 <= status < 400:
            return self._stop_run(FatalError(
                f"{where}: the endpoint redirects (to {headers.get('location', '?')}); set base_url to the final "
                "address", status=status))
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
                return self._stop_run(FatalError(f"{where}: {message}{hint}", status=status, code=code))
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
            return self._retry(first, f"{status} {message or 'server error'}".strip())
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


class EmbedRun(Run):
    """A ``Run`` of embeddings: ``matrix()`` gives the vectors as one array."""

    def matrix(self) -> np.ndarray:
        """The vectors as one float32 array of (rows x dims), in row order; rows without a vector
        (skipped, failed, cancelled) are NaN. The run's own array: it is not copied."""
        if not self.done():
            self.result()  # raises RunNotFinishedError with the usual advice
        engine: EmbedEngine = self.engine
        if engine.vectors is None:
            return np.zeros((len(engine.outcomes), 0), dtype=np.float32)
        missing = np.frombuffer(engine.outcomes.status, dtype=np.uint8) != _OK
        if missing.any():
            engine.vectors[missing] = np.nan
        return engine.vectors

    def describe_answer(self, row: int) -> str:
        """A short text for a row's vector in the panel's preview."""
        vector = self.engine.vector(row)
        if vector is None:
            return ""
        head = ", ".join(f"{v:.3f}" for v in vector[:3])
        return f"[{head}, …] ({len(vector)} dims)"


def _vector_series(run: EmbedRun, rows: range, index: Any, name: str) -> Any:
    import pandas as pd

    engine: EmbedEngine = run.engine
    values = np.empty(len(rows), dtype=object)
    if engine.vectors is not None:
        status = np.frombuffer(engine.outcomes.status, dtype=np.uint8)[rows.start:rows.stop]
        have = np.flatnonzero(status == _OK)
        block = engine.vectors[rows.start:rows.stop]
        for k in have.tolist():  # one view per row (a list assigned at once would be broadcast as 2-D)
            values[k] = block[k]
    return pd.Series(values, index=index, name=name, dtype=object)


class _EmbedShape:
    """``embed``'s result: a Series of vectors (or, for a list of dicts, the dicts with the vector)."""

    def __init__(self, name: str, meta: bool):
        self.name, self.meta = name, meta

    def __call__(self, run: EmbedRun) -> Any:
        prepared: Inputs = run.prepared
        rows = range(len(prepared))
        series = _vector_series(run, rows, prepared.index, self.name)
        if prepared.records is not None:
            columns = {self.name: series.tolist()}
            if self.meta:
                columns.update(_meta_columns(run, list(rows)))
            return [{**record, **{c: values[k] for c, values in columns.items()}}
                    for k, record in enumerate(prepared.records)]
        if not self.meta:
            return series
        import pandas as pd

        return pd.DataFrame({self.name: series, **_meta_columns(run, list(rows))}, index=prepared.index)


# ---- shared checks -----------------------------------------------------------------------


def _check_common(options: dict, model: Any, dimensions: Any, per_request: Any) -> dict:
    mode = options.pop("mode", "live")
    options.pop("poll_interval", None)
    if mode == "batch":
        raise ConfigError("embeddings do not run through the Batch API (mode='batch') in this version: use the "
                          "default live mode (embeddings cost $0.02-0.13 per million tokens, and the run packs "
                          "2,048 texts per request)")
    if mode != "live":
        raise ConfigError(f"mode must be 'live' or 'batch', not {mode!r}")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model must be an embedding model's name, not {model!r}")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise ConfigError(f"dimensions must be a positive integer, not {dimensions!r}")
    if isinstance(per_request, bool) or not isinstance(per_request, int) or not 1 <= per_request <= MAX_INPUTS:
        raise ConfigError(f"per_request must be an integer from 1 to {MAX_INPUTS:,}, not {per_request!r}")
    return options


def _no_meta(options: dict, what: str) -> None:
    if options.get("meta"):
        raise ConfigError(f"meta=True gives provenance per embedded row, which {what} does not return; use "
                          "embed(..., meta=True), or run.errors and run.usage of this run")


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, not {k!r}")
    return int(k)


def _check_threshold(threshold: Any) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or \
            not -1.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be a cosine similarity between -1 and 1, not {threshold!r}")
    return float(threshold)


def _params(model: str, dimensions: int | None) -> dict:
    return {"model": model, **({"dimensions": dimensions} if dimensions is not None else {})}


def _start(setup: Any, inputs: Inputs, params: dict, shape: Any, label: str, per_request: int) -> EmbedRun:
    return launch(setup, inputs, params, shape, engine=EmbedEngine, label=label, run_class=EmbedRun,
                  per_request=per_request)


# ---- embed -------------------------------------------------------------------------------


@takes_options(RUN)
def embed(
    data: Any,
    template_or_column: Any,
    *,
    model: str = DEFAULT_MODEL,
    dimensions: int | None = None,
    per_request: int = MAX_INPUTS,
    name: str = "embedding",
    **options: Any,
) -> EmbedRun:
    """Embed each row's text with ``/v1/embeddings``; a Series of float32 vectors on the frame's index.

    ``template_or_column`` is a column name (its text as is) or a ``{field}`` template. Returns a
    ``Run`` (``await`` it in a notebook; in a script it has finished): ``run.result()`` is the Series
    (None where a row has no vector: skipped for a missing value, failed, cancelled; see
    ``run.errors``), ``run.matrix()`` one (rows x dims) float32 array with NaN rows there. Vectors are
    cached per text (base URL, model, dimensions), so a rerun, or ``search`` / ``sim_join`` over the
    same texts, sends only what is not cached; identical texts are sent once.

    model: an embedding model (text-embedding-3-small, -3-large, ada-002, ...).
    dimensions: shorter vectors from the text-embedding-3 models (e.g. 256).
    per_request: texts per request, at most 2,048 (a gateway may allow fewer).
    name: the Series' name (the key added to each dict for a list of dicts).
    """
    options = check_options(embed, _check_common(dict(options), model, dimensions, per_request))
    options["model"] = model
    setup = resolve(options)
    prepared = texts_of(data, template_or_column, on_missing=options["on_missing"], what="template_or_column")
    inputs = Inputs([("data", prepared)])
    return _start(setup, inputs, _params(model, dimensions), _EmbedShape(name, bool(options["meta"])),
                  f"embed {prepared.templates[0]}", per_request)


# ---- search ------------------------------------------------------------------------------

_memo: OrderedDict[tuple, "_Corpus"] = OrderedDict()


class _Corpus:
    """A frame's unit vectors, as ``search`` keeps them: valid while the columns it read are unchanged."""

    __slots__ = ("columns", "positions", "matrix")

    def __init__(self, columns: dict, positions: np.ndarray, matrix: np.ndarray):
        self.columns, self.positions, self.matrix = columns, positions, matrix

    def matches(self, columns: dict) -> bool:
        held = self.columns
        return held.keys() == columns.keys() and all(
            held[name] is columns[name] or held[name].equals(columns[name]) for name in held)


def clear_memo() -> None:
    """Forget the vectors ``search`` keeps in memory (the cache on disk keeps them)."""
    _memo.clear()


def _memo_key(setup: Any, prepared: Prepared, params: dict) -> tuple:
    return (setup.endpoint.base_url, json.dumps(params, sort_keys=True), prepared.templates[0],
            prepared.on_missing, tuple(prepared._columns))


def _remember(key: tuple, corpus: _Corpus) -> None:
    _memo[key] = corpus
    _memo.move_to_end(key)
    while len(_memo) > 1 and (len(_memo) > MEMO_ENTRIES or
                              sum(c.matrix.nbytes for c in _memo.values()) > MEMO_BYTES):
        _memo.popitem(last=False)


def _ranked(data: Any, positions: np.ndarray, corpus: np.ndarray, query: np.ndarray, k: int,
            threshold: float | None) -> Any:
    """The rows of ``data`` nearest to ``query``, best first, with their ``similarity``."""
    import pandas as pd

    if len(positions) and len(query) != corpus.shape[1]:
        raise ConfigError(f"the query has {len(query)} dimensions and the rows {corpus.shape[1]}")
    found, scores = nearest(normalize(query[None, :]), corpus, k, threshold=threshold, normalized=True)
    keep = found[0] >= 0
    rows, similarity = positions[found[0][keep]], scores[0][keep].astype(np.float64)
    if isinstance(data, pd.DataFrame):
        out = data.take(rows)
        out["similarity"] = similarity
        return out
    return [{**data[r], "similarity": float(s)} for r, s in zip(rows.tolist(), similarity.tolist())]


def _frame_corpus(run: EmbedRun, span: range) -> tuple[np.ndarray, np.ndarray, int]:
    """The unit vectors of the rows of ``span`` that have one, their positions, and how many rows lack one
    for a reason other than a missing value."""
    engine: EmbedEngine = run.engine
    status = np.frombuffer(engine.outcomes.status, dtype=np.uint8)[span.start:span.stop]
    positions = np.flatnonzero(status == _OK)
    lacking = int(np.count_nonzero((status != _OK) & (status != Outcomes.code(SKIPPED))))
    if engine.vectors is None or not len(positions):
        return positions, np.zeros((0, engine.dims or 0), dtype=np.float32), lacking
    return positions, _unit_rows(engine.vectors[span.start:span.stop][positions]), lacking


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` (a fresh array) with its rows scaled to unit length, in place."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return matrix


class _SearchShape:
    def __init__(self, data: Any, k: int, threshold: float | None, memo: tuple | None, corpus: _Corpus | None,
                 columns: dict):
        self.data, self.k, self.threshold, self.memo, self.corpus, self.columns = data, k, threshold, memo, corpus, columns

    def __call__(self, run: EmbedRun) -> Any:
        engine: EmbedEngine = run.engine
        inputs: Inputs = run.prepared
        query_row = inputs.span("query").start
        query = engine.vector(query_row)
        if query is None:
            why = engine.outcomes[query_row].error or engine.outcomes[query_row].status
            if run.done():
                raise NbparrotError(f"the query could not be embedded: {why}")
            return self._empty()
        corpus = self.corpus
        if corpus is None:
            positions, matrix, lacking = _frame_corpus(run, inputs.span("data"))
            if lacking:
                warnings.warn(f"{lacking} row(s) have no embedding (see run.errors) and are left out of the "
                              "search", stacklevel=3)
            corpus = _Corpus(self.columns, positions, matrix)
            if run.done() and not lacking and self.memo is not None:
                _remember(self.memo, corpus)
        return _ranked(self.data, corpus.positions, corpus.matrix, query, self.k, self.threshold)

    def _empty(self) -> Any:
        import pandas as pd

        if isinstance(self.data, pd.DataFrame):
            return self.data.iloc[:0].assign(similarity=np.zeros(0))
        return []


@takes_options(RUN)
def search(
    data: Any,
    query: str,
    *,
    on: Any,
    k: int = 10,
    threshold: float | None = None,
    model: str = DEFAULT_MODEL,
    dimensions: int | None = None,
    per_request: int = MAX_INPUTS,
    **options: Any,
) -> EmbedRun:
    """The ``k`` rows most similar (cosine) to the text ``query``, best first, with a ``similarity`` column.

    ``on`` is a column (its text as is) or a ``{field}`` template, as ``embed`` takes. The rows'
    vectors come from the cache (``embed`` over the same texts fills it; a frame never embedded is
    embedded here, with the panel); the last frames searched also stay in memory while their
    columns are unchanged, so a second query costs one embedding and a matrix product. Returns a
    ``Run`` whose result is a DataFrame: the input's columns and index plus ``similarity`` (a list
    of dicts for a list of dicts). Rows without a vector are left out, with a warning if they failed.

    k: how many rows (fewer if the frame has fewer).
    threshold: leave out rows less similar than this (cosine, -1..1).
    model, dimensions, per_request: as for ``embed``; the query is embedded with the same model.
    """
    k, threshold = _check_k(k), _check_threshold(threshold)
    if not isinstance(query, str) or not query:
        raise ConfigError(f"query must be a non-empty string, not {query!r}")
    if estimate_text_tokens(query) > MAX_INPUT_TOKENS:
        raise ConfigError(f"the query is about {estimate_text_tokens(query):,} tokens, over the "
                          f"{MAX_INPUT_TOKENS:,}-token limit of one embedding input")
    options = check_options(search, _check_common(dict(options), model, dimensions, per_request))
    _no_meta(options, "search")
    options["model"] = model
    setup = resolve(options)
    prepared = texts_of(data, on, on_missing=options["on_missing"])
    params = _params(model, dimensions)
    import pandas as pd

    memo, corpus, columns = None, None, {}
    if isinstance(data, pd.DataFrame) and setup.cache is not None and not setup.refresh:
        columns = dict(prepared._columns)
        memo = _memo_key(setup, prepared, params)
        corpus = _memo.get(memo)
        if corpus is not None and not corpus.matches(columns):
            corpus = None
            del _memo[memo]
    parts: list = [("query", [query])] if corpus is not None else [("data", prepared), ("query", [query])]
    shape = _SearchShape(data, k, threshold, memo, corpus, columns)
    return _start(setup, Inputs(parts), params, shape, f"search {prepared.templates[0]}: {query[:40]!r}",
                  per_request)


# ---- sim_join ----------------------------------------------------------------------------


class _JoinShape:
    def __init__(self, left: Any, right: Any, k: int, threshold: float | None, suffixes: tuple[str, str]):
        self.left, self.right, self.k, self.threshold, self.suffixes = left, right, k, threshold, suffixes

    def __call__(self, run: EmbedRun) -> Any:
        inputs: Inputs = run.prepared
        left_rows, left, left_lacking = _frame_corpus(run, inputs.span("left"))
        right_rows, right, right_lacking = _frame_corpus(run, inputs.span("right"))
        if left_lacking or right_lacking:
            warnings.warn(f"{left_lacking} left and {right_lacking} right row(s) have no embedding (see "
                          "run.errors) and are left out of the join", stacklevel=3)
        if len(left_rows) and len(right_rows):
            found, scores = nearest(left, right, self.k, threshold=self.threshold, normalized=True)
        else:
            found = np.zeros((len(left_rows), 0), dtype=np.int64)
            scores = np.zeros((len(left_rows), 0), dtype=np.float32)
        keep = found >= 0  # best first within each left row; left rows stay in input order
        pairs_left = np.repeat(left_rows, keep.sum(axis=1))
        pairs_right = right_rows[found[keep]]
        return _joined(self.left, self.right, pairs_left, pairs_right, scores[keep].astype(np.float64),
                       self.suffixes)


def _joined(left: Any, right: Any, lpos: np.ndarray, rpos: np.ndarray, similarity: np.ndarray,
            suffixes: tuple[str, str]) -> Any:
    """Left columns + right columns (clashing names suffixed, as pandas' merge does) + similarity."""
    import pandas as pd

    lf = left.take(lpos).reset_index(drop=True)
    rf = right.take(rpos).reset_index(drop=True)
    clash = (set(lf.columns) & set(rf.columns)) | ({"similarity"} & (set(lf.columns) | set(rf.columns)))
    lf = lf.rename(columns={c: f"{c}{suffixes[0]}" for c in lf.columns if c in clash})
    rf = rf.rename(columns={c: f"{c}{suffixes[1]}" for c in rf.columns if c in clash})
    out = pd.concat([lf, rf], axis=1)
    out["similarity"] = similarity
    return out


def _as_frame(data: Any, side: str) -> Any:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return pd.DataFrame(list(data))
    raise ConfigError(f"{side} must be a pandas DataFrame or a list of dicts, not {type(data).__name__}")


@takes_options(RUN)
def sim_join(
    left: Any,
    right: Any,
    *,
    left_on: Any = None,
    right_on: Any = None,
    on: Any = None,
    k: int = 1,
    threshold: float | None = None,
    suffixes: tuple[str, str] = ("_left", "_right"),
    model: str = DEFAULT_MODEL,
    dimensions: int | None = None,
    per_request: int = MAX_INPUTS,
    **options: Any,
) -> EmbedRun:
    """For each row of ``left``, its ``k`` most similar rows of ``right`` (cosine), with the similarity.

    ``left_on`` / ``right_on`` (or ``on`` for both) are columns (their text as is) or ``{field}``
    templates. Both sides are embedded in one run (one panel; texts found in the cache, or on both
    sides, are sent once). The result is a DataFrame of the left columns, the right columns (names
    on both sides get ``suffixes``, as in pandas' merge; so does a column named ``similarity``) and
    ``similarity``: left rows in input order, each one's matches best first, a fresh RangeIndex.
    Rows without a vector take no part, with a warning if they failed. The similarities are computed
    a block of left rows at a time: the full left x right matrix is never built.

    k: matches per left row (fewer if ``right`` has fewer rows).
    threshold: drop pairs less similar than this (cosine, -1..1); a left row may then have none.
    suffixes: added to column names found on both sides.
    """
    k, threshold = _check_k(k), _check_threshold(threshold)
    left_on = on if left_on is None else left_on
    right_on = left_on if right_on is None else right_on
    if left_on is None:
        raise ConfigError("sim_join needs left_on= and right_on= (or on= for both): the columns or templates to compare")
    if not (isinstance(suffixes, (tuple, list)) and len(suffixes) == 2 and all(isinstance(s, str) for s in suffixes)
            and suffixes[0] != suffixes[1]):
        raise ConfigError(f"suffixes must be two different strings, not {suffixes!r}")
    options = check_options(sim_join, _check_common(dict(options), model, dimensions, per_request))
    _no_meta(options, "sim_join")
    options["model"] = model
    setup = resolve(options)
    left_frame, right_frame = _as_frame(left, "left"), _as_frame(right, "right")
    left_texts = texts_of(left_frame, left_on, on_missing=options["on_missing"], what="left_on")
    right_texts = texts_of(right_frame, right_on, on_missing=options["on_missing"], what="right_on")
    inputs = Inputs([("left", left_texts), ("right", right_texts)])
    shape = _JoinShape(left_frame, right_frame, k, threshold, tuple(suffixes))
    label = f"sim_join {left_texts.templates[0]} ~ {right_texts.templates[0]}"
    return _start(setup, inputs, _params(model, dimensions), shape, label, per_request)
