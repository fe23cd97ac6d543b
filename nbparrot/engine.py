"""The batch engine: send every row's request once, paced, retried, and accounted for.

In: the shared request parameters and the rows' requests: a ``Prepared`` that renders request
``k``'s messages on demand (or a plain list of message lists, ``None`` for a skipped row). Out:
exactly one outcome per row, in input order — answered, failed (with the reason and the number
of attempts), skipped or cancelled — in ``Outcomes`` (column-wise, see ``nbparrot.outcomes``),
and live counters in ``Progress`` that a panel or progress line reads.

Planning comes first (``plan`` synchronously, or ``prepare`` on the loop in slices of a few
milliseconds while the panel says "preparing"): each row is rendered once to settle it as
skipped, failed (a value that cannot be rendered) or cached, and to key and cost it; the
rendered messages are then dropped. Per row the engine keeps only compact columns: the packed
cache key, the token budget, the outcome. A row is rendered again when it is sent.

How it schedules: a single dispatcher coroutine takes rows from the head of a queue, asks
the ``Pacer`` how long the next one must wait for the RPM/TPM budget, and starts one task
per attempt while fewer than ``concurrency`` are in flight. A slow request never holds back
the others (no chunked ``gather``), a row waiting for a retry does not hold a slot, and a
429 pauses the dispatcher, not each request on its own. The first row goes alone: the
fan-out starts only once the endpoint has accepted the key and the model, so a bad key or a
misspelt model costs one request, not thousands.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from array import array
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from .cache import Cache, CachedAnswer, request_key
from .config import Endpoint
from .errors import (
    BudgetExceededError,
    ConfigError,
    EndpointFailingError,
    EndpointUnreachableError,
    FatalError,
    RateLimitWaitError,
    describe_error,
    error_fields,
    fatal_error,
)
from .outcomes import CANCELLED, CHUNK, FAILED, MASK, OK, PENDING, SHIFT, SKIPPED, Chunked, Outcome, Outcomes
from .prepare import RenderError
from .pricing import Estimate, cost_of, estimate, price_of
from .ratelimit import Pacer, retry_after_seconds
from .structured import Schema
from .tokens import estimate_prompt_tokens, estimate_text_tokens
from .transport import TRANSIENT_ERRORS, ResponseTooLargeError, Transport

__all__ = ["Engine", "EngineSettings", "Outcome", "Progress", "PENDING", "OK", "FAILED", "CANCELLED", "SKIPPED"]

_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
PAUSE_SHOWN = 2.0  # seconds: a dispatch pause at least this long is shown, with its reason, in the views
PLAN_SLICE = 0.008  # seconds of planning between two yields to the loop
LOOKUP_KEYS = 400  # keys per Cache.get_many call while planning
FAN_OUT = 32  # requests the dispatcher starts before it lets the loop run them (the fan-out after the probe)


class Progress:
    """Live counters of a run, updated in place by the engine (cheap to read at 10 Hz).

    Listeners registered with ``subscribe`` get ``(event, row)`` calls for "sent", "retry",
    "done", "failed", "rate_limited" and "finished"; with no listener nothing is called.
    """

    __slots__ = ("total", "queued", "in_flight", "retrying", "done", "failed", "cancelled", "skipped",
                 "cached", "requests", "rate_limited", "prompt_tokens", "completion_tokens", "usage_estimated",
                 "started", "finished", "last_error", "note", "pause", "sent_at", "limits", "_listeners")

    def __init__(self, total: int = 0):
        self.total = total
        self.queued = total
        self.in_flight = self.retrying = self.done = self.failed = self.cancelled = self.skipped = 0
        self.cached = self.requests = self.rate_limited = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.usage_estimated = 0  # answers that came without usage: their tokens are our estimate
        self.started: float | None = None
        self.finished: float | None = None
        self.last_error: str | None = None
        self.note: str | None = None  # a status line of the run's own (e.g. a Batch API job's state)
        self.pause: tuple[float, str] | None = None  # (loop time it ends, why): dispatch is held back
        self.sent_at: dict[int, float] = {}  # row -> loop time of its in-flight attempt
        self.limits: Callable[[], dict] | None = None
        self._listeners: list[Callable[[str, int], None]] = []

    def subscribe(self, listener: Callable[[str, int], None]) -> None:
        self._listeners.append(listener)

    def emit(self, event: str, row: int) -> None:
        for listener in self._listeners:
            listener(event, row)

    @property
    def settled(self) -> int:
        return self.done + self.failed + self.cancelled + self.skipped


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


class Engine:
    """Runs one batch of chat-completion requests; see the module docstring for the design."""

    batch = False  # priced at Batch API rates (see nbparrot.batch_api)

    def __init__(
        self,
        endpoint: Endpoint,
        params: Mapping[str, Any],
        prompts: Any,
        settings: EngineSettings | None = None,
        *,
        progress: Progress | None = None,
        skip_reasons: Mapping[int, str] | None = None,
        schema: Schema | None = None,
        cache: Cache | None = None,
        refresh: bool = False,
        extract: Callable[[dict, "Progress"], Any] | None = None,
    ):
        self.endpoint = endpoint
        self.extract = extract  # reads something besides the text from an answer's choice (kept in outcome.extra)
        self.settings = settings or EngineSettings()
        self.params = dict(params)
        # what renders request k: a Prepared, or a plain list of message lists (None = skipped)
        self.source = prompts if hasattr(prompts, "render") else _Listed(prompts, skip_reasons or {})
        n = len(self.source)
        self.outcomes = Outcomes(n)
        self.progress = progress or Progress(n)
        self.pacer = Pacer(self.settings.rpm, self.settings.tpm)
        self.progress.limits = self.pacer.limits
        self.fatal: FatalError | None = None
        self.budget_stop: BudgetExceededError | None = None
        self.cache, self._refresh = cache, refresh
        self.estimate: Estimate | None = None
        self.model = str(self.params.get("model", ""))
        if self.settings.max_cost is not None and price_of(self.model) is None:
            raise ConfigError(f"max_cost cannot be kept: the price of {self.model!r} is unknown; "
                              "set it with nbparrot.set_price(model, input=..., output=...)")
        self._keys = _Keys(0)  # row -> its cache key (filled while planning, when there is a cache or a batch)
        self._planned = False
        self._planner: Any = None  # the planning generator, while planning goes on (see _plan_steps)
        self._spent = 0.0  # USD of answered requests, kept only under a budget
        self._committed: dict[int, tuple[int, int]] = {}  # row -> (prompt, reply) tokens booked for it in flight
        self._committed_prompt = self._committed_reply = 0  # their totals
        self._ratio = 1.0  # the most the endpoint has counted per estimated prompt token (budgets reserve with it)
        self.schema = schema
        if schema is not None:
            self.params["response_format"] = schema.response_format()
        self._preamble: list[dict] = []  # messages put before every row's (the json_object fallback)
        self._extra: dict[int, list[dict]] = {}  # row -> messages after its own (a re-ask)
        self._costs = _Costs(n)  # row -> its budgeted tokens, until its messages change
        self._reasks: dict[int, int] = {}
        self._n = int(self.params.get("n") or 1)
        self._reply_tokens = self._n * int(self.params.get("max_tokens") or self.params.get("max_completion_tokens") or 0)
        self._prefix = self._encode_prefix()
        self._version = 0  # bumped when the shared parameters change mid-run (see _switch_and_resend)
        self._pending = _Queue()
        self._tasks: dict[asyncio.Task, int] = {}  # attempt in flight -> its row
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._failures: dict[int, int] = {}  # row -> retryable errors so far
        self._waits: dict[int, int] = {}  # row -> 429 waits so far
        self._limit = 1  # concurrency in force: 1 until the endpoint has accepted us
        self._opened = False  # the endpoint has answered something other than a fatal or 5xx error
        self._heard = False  # any HTTP answer at all
        self._in_flight = 0
        self._unsettled = 0
        self._streak = 0  # consecutive 429s without retry-after
        self._answered = False  # any 200 at all
        self._failing = 0  # rows failed after all their retries since the last answer
        self._pause_reason = ""  # why the pacer's pause was set (a 429's wait)
        self._ping_task: asyncio.Task | None = None
        self._waiter: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: Transport | None = None

    # ---- public -------------------------------------------------------------------------

    @property
    def planned(self) -> bool:
        """True once every row is settled or queued and the estimate is known."""
        return self._planned

    def plan(self) -> Estimate:
        """Before any request: settle skipped, unrenderable and cached rows, and estimate what is left
        to send. Here, synchronously, to the end: for a script, a batch, dask's empty partition."""
        if self._planned:
            return self.estimate
        planner = self._planner = self._planner or self._plan_steps()
        reply = None
        try:
            while True:
                keys = planner.send(reply)
                reply = None if keys is None else self._lookup(keys)
        except StopIteration:
            return self.estimate

    async def prepare(self) -> Estimate:
        """``plan`` on the running loop, a few milliseconds at a time (the rows' statuses and the
        progress note move as it goes); the cache lookups run in a thread."""
        loop = self._loop = asyncio.get_running_loop()
        if self.progress.started is None:
            self.progress.started = loop.time()
        if self._planned:
            return self.estimate
        planner = self._planner = self._planner or self._plan_steps()
        reply = None
        try:
            while True:
                keys = planner.send(reply)
                if keys is None:
                    reply = None
                    await asyncio.sleep(0)
                else:
                    reply = await loop.run_in_executor(None, self._lookup, keys)
        except StopIteration:
            return self.estimate

    def _lookup(self, keys: list[str]) -> dict:
        """The cached answers of ``keys``, asked LOOKUP_KEYS at a time: below the size at which the
        cache counts its entries to choose a whole-file pass (~40 ms on a million entries, per call)."""
        if not keys:
            return self.cache.get_many([])  # checks that the cache opens
        found: dict = {}
        for start in range(0, len(keys), LOOKUP_KEYS):
            found.update(self.cache.get_many(keys[start:start + LOOKUP_KEYS]))
        return found

    def _plan_steps(self) -> Any:
        """The planning, as a generator: it yields after each slice of rows None, or the cache
        keys to look up (and is sent what was found), so ``plan`` and ``prepare`` can drive it."""
        source, progress, costs, reply_tokens = self.source, self.progress, self._costs, self._reply_tokens
        render, clock, n = source.render, time.perf_counter, len(self.outcomes)
        keyed = self.cache is not None or self.batch  # a batch names its lines by these keys too
        lookup = self.cache is not None and not self._refresh
        keys = self._keys = _Keys(n if keyed else 0)
        base, params = self.endpoint.base_url, self.params
        opened = self.cache is None
        sending = prompt_tokens = 0
        row = 0
        while row < n:
            progress.note = f"preparing: {row:,} of {n:,} rows"
            end = clock() + PLAN_SLICE
            rows = []
            while row < n and (row & 63 or clock() < end):
                k, row = row, row + 1
                try:
                    messages = render(k)
                except RenderError as exc:
                    self._settle_unsendable(k, str(exc))
                    continue
                if messages is None:
                    self._settle_skipped(k)
                    continue
                costs[k] = estimate_prompt_tokens(messages) + reply_tokens
                if keyed:
                    keys[k] = request_key(base, {**params, "messages": messages})
                rows.append(k)
            if rows and not opened and not lookup:
                opened = True
                yield []  # refresh: an empty lookup checks that the cache opens
            if rows and lookup:
                found = yield [keys[k] for k in rows]
                if found:
                    rows = [k for k in rows if not self._settle_cached(k, found.get(keys[k]))]
            else:
                yield None
            self._pending.extend(rows)
            self._unsettled += len(rows)
            sending += len(rows)
            prompt_tokens += sum(costs.get(k) for k in rows) - reply_tokens * len(rows)
        progress.note = None
        self.estimate = estimate(self.model, sending, prompt_tokens, reply_tokens * sending, batch=self.batch)
        self._planned = True

    def _settle_cached(self, row: int, answer: CachedAnswer | None) -> bool:
        """Settle a row from the cache; False if there is no usable cached answer."""
        if answer is None:
            return False
        outcome = self.outcomes[row]
        if self.schema is not None:
            try:
                parse = self.schema.parse
                outcome.parsed = [parse(c) for c in answer.content] if self._n > 1 else parse(answer.content)
            except (ValueError, TypeError):
                return False
        outcome.content, outcome.finish_reason = answer.content, answer.finish_reason
        outcome.prompt_tokens, outcome.completion_tokens = answer.prompt_tokens, answer.completion_tokens
        if answer.extra is not None:
            outcome.extra = answer.extra
        outcome.status, outcome.cached = OK, True
        progress = self.progress
        progress.done += 1
        progress.cached += 1
        progress.queued -= 1
        if progress._listeners:
            progress.emit("done", row)
        return True

    async def run(self) -> list[Outcome]:
        """Plan what is not planned yet (``prepare``), then send every row; returns the outcomes
        (also on cancel, where unfinished rows say so)."""
        loop = self._loop = asyncio.get_running_loop()
        progress = self.progress
        if progress.started is None:
            progress.started = loop.time()
        await self.prepare()  # the rest of the planning, if map() did not finish it
        settings = self.settings
        async with Transport(self.endpoint, concurrency=settings.concurrency, timeout=settings.timeout,
                             max_bytes=settings.max_response_bytes) as transport:
            self._transport = transport
            watchdog = loop.call_later(settings.first_byte_timeout, self._check_alive)
            try:
                await self._dispatch()
            finally:  # before the session closes, or in-flight requests would fail as disconnects
                watchdog.cancel()
                try:
                    await self._stop()
                finally:
                    progress.finished = loop.time()
                    progress.emit("finished", -1)
        return self.outcomes

    def cost(self, row: int) -> int:
        """Tokens a row's request is budgeted at: prompt estimate + n x max_tokens (memoised per row)."""
        tokens = self._costs.get(row)
        if tokens is None:
            tokens = self._costs[row] = estimate_prompt_tokens(self._messages(row)) + self._reply_tokens
        return tokens

    # ---- dispatch -----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        loop, pacer, pending = self._loop, self.pacer, self._pending
        budget = self.settings.max_cost
        started = 0
        while self._unsettled and self.fatal is None:
            if self.budget_stop is not None:
                if not self._in_flight:
                    return
                await self._wait()
                continue
            # Until the endpoint has answered, a row waiting to retry still counts: one row at a time.
            if not pending or self._in_flight + (0 if self._opened else self.progress.retrying) >= self._limit:
                await self._wait()
                continue
            row = pending[0]
            cost = self.cost(row)
            if pacer.too_large(cost):
                pending.popleft()
                self._fail(row, f"request needs about {cost} tokens, more than the whole "
                                f"tokens-per-minute limit ({pacer.tokens.limit:.0f}); shorten the prompt or max_tokens")
                continue
            if budget is not None and not self._affordable(row, cost, budget):
                continue
            now = loop.time()
            delay = pacer.delay(cost, now)
            if delay > 0:
                if delay >= PAUSE_SHOWN:
                    self.progress.pause = (now + delay, self._why_paused(now))
                await self._wait(delay)
                continue
            if self.progress.pause is not None:
                self.progress.pause = None
            pending.popleft()
            mark = pacer.take(cost, loop.time())
            self._in_flight += 1
            task = loop.create_task(self._attempt(row, mark))
            self._tasks[task] = row
            task.add_done_callback(self._task_done)
            started += 1
            if started % FAN_OUT == 0:  # let these begin before starting more: no 256-request burst in one loop pass
                await asyncio.sleep(0)

    def _affordable(self, row: int, tokens: int, budget: float) -> bool:
        """Book the most this request can cost, unless spend plus what is in flight would pass the budget.

        Prompt tokens are reserved at our estimate times the largest ratio of counted to estimated
        tokens seen in answers so far (the first request goes alone, so it is known before the
        fan-out); reply tokens at n x max_tokens, which the endpoint never exceeds.
        """
        prompt, reply = tokens - self._reply_tokens, self._reply_tokens
        held_prompt, held_reply = self._committed.pop(row, (0, 0))  # a row waiting for its turn was booked already
        self._committed_prompt -= held_prompt
        self._committed_reply -= held_reply
        ratio, model, batch = self._ratio, self.model, self.batch
        in_flight = cost_of(model, self._committed_prompt * ratio, self._committed_reply, batch=batch) or 0.0
        most = cost_of(model, prompt * ratio, reply, batch=batch) or 0.0
        if self._spent + in_flight + most > budget:
            self.budget_stop = BudgetExceededError(
                f"stopped at the budget: ${self._spent:,.4f} spent of max_cost=${budget:,.4f}, and the next request "
                f"could cost up to ${most:,.4f} with ${in_flight:,.4f} still in flight; "
                f"{self.progress.done} of {self.progress.total} rows answered (run.partial() has them; "
                "a rerun with a higher max_cost sends only the rest)")
            self.progress.last_error = str(self.budget_stop)
            return False
        self._committed[row] = (prompt, reply)
        self._committed_prompt += prompt
        self._committed_reply += reply
        return True

    def _why_paused(self, now: float) -> str:
        """The reason behind a dispatch pause, in words (for the panel and the text line)."""
        pacer = self.pacer
        if pacer.paused_until > now and self._pause_reason:
            return self._pause_reason
        if self.budget_stop is None and pacer.tokens is not None and pacer.tokens.level < 0.5 * pacer.tokens.capacity:
            return f"waiting for the tokens-per-minute limit ({pacer.tokens.limit:,.0f})"
        if pacer.requests is not None:
            return f"waiting for the requests-per-minute limit ({pacer.requests.limit:,.0f})"
        return "waiting for the rate limits"

    def _task_done(self, task: asyncio.Task) -> None:
        row = self._tasks.pop(task)
        self._in_flight -= 1
        if not task.cancelled() and task.exception() is not None and self.outcomes[row].status == PENDING:
            # A bug must cost one row, never hang the run waiting for it.
            self._fail(row, f"internal error: {type(task.exception()).__name__}: {task.exception()}")
        self._notify()

    async def _wait(self, delay: float | None = None) -> None:
        """Sleep until something changes (a slot frees, a row is requeued) or ``delay`` passes."""
        loop = self._loop
        fut = self._waiter = loop.create_future()
        timer = loop.call_later(delay, self._notify) if delay is not None else None
        try:
            await fut
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _notify(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _check_alive(self) -> None:
        """The first answer is slow: find out, with a status check, whether the endpoint is there at all."""
        if not self._heard and self.fatal is None:
            self._ping_task = self._loop.create_task(self._ping())

    async def _ping(self) -> None:
        limit = self.settings.first_byte_timeout
        try:
            await self._transport.alive(limit)  # any HTTP answer at all will do
        except asyncio.TimeoutError:
            if not self._heard:
                self._stop_run(EndpointUnreachableError(
                    f"{self.endpoint.base_url} accepted the connection but has sent nothing for {2 * limit:.0f} s, "
                    "not even to a status check (GET /models); is base_url the right address, and is the server up?"))
        except TRANSIENT_ERRORS:  # refused or reset: the request's own retries report that
            pass

    async def _stop(self) -> None:
        """Cancel what is in flight or waiting; mark every unfinished row (nothing left pending)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._ping_task is not None:
            self._ping_task.cancel()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # a second cancel while gathering must not leave rows pending
            self._mark_unsent()

    def _mark_unsent(self) -> None:
        if self.fatal:
            reason = f"not sent: the run stopped ({self.fatal})"
        elif self.budget_stop:
            reason = f"not sent: max_cost=${self.settings.max_cost:,.4f} reached"
        else:
            reason = "cancelled before an answer arrived"
        self.abandon(reason)

    def abandon(self, reason: str) -> None:
        """Mark every row without an outcome as cancelled, with ``reason`` (nothing is left pending)."""
        progress = self.progress
        progress.retrying = 0
        progress.cancelled += self.outcomes.settle_pending(CANCELLED, reason)
        progress.queued = 0
        progress.in_flight = 0
        progress.sent_at.clear()

    # ---- one attempt --------------------------------------------------------------------

    async def _attempt(self, row: int, mark: tuple[float, float, float]) -> None:
        loop, progress = self._loop, self.progress
        outcome = self.outcomes[row]
        if outcome.attempts == 0:
            progress.queued -= 1
        outcome.attempts += 1
        progress.requests += 1
        progress.in_flight += 1
        sent = progress.sent_at[row] = loop.time()
        if progress._listeners:
            progress.emit("sent", row)
        version = self._version
        body = b"".join((self._prefix, json.dumps(self._messages(row)).encode(), b"}"))
        try:
            status, headers, raw = await self._transport.post(body)
        except TRANSIENT_ERRORS as exc:
            self._retry(row, _describe(exc))
            return
        except ResponseTooLargeError as exc:
            self._heard = True
            self._fail(row, f"{exc}; not read (raise it with nbparrot.configure(max_response_bytes=...))")
            return
        finally:
            progress.in_flight -= 1
            progress.sent_at.pop(row, None)
            if self._committed:
                held_prompt, held_reply = self._committed.pop(row, (0, 0))
                self._committed_prompt -= held_prompt
                self._committed_reply -= held_reply
        now = loop.time()
        self._heard = True
        self.pacer.observe(headers, mark, now)
        if status == 200:
            try:
                self._answer(row, json.loads(raw), now - sent)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                self._retry(row, f"unreadable answer from the endpoint: {self.endpoint.redact(repr(raw[:200]))}")
            return
        self._error(row, status, headers, raw, version)

    def _messages(self, row: int) -> list:
        messages = self.source.render(row)  # rendered again here: planning kept only its key and cost
        if self._preamble:
            messages = self._preamble + messages
        extra = self._extra.get(row)
        return messages + extra if extra else messages

    def _answer(self, row: int, data: dict, latency: float | None) -> None:
        choices = data["choices"]
        if self._n == 1:
            choice = choices[0]
            message = choice["message"]
            content, finish = message["content"], choice.get("finish_reason")
            texts = (content,)
        else:
            choices = sorted(choices, key=lambda c: c.get("index", 0))
            content = texts = [c["message"]["content"] for c in choices]
            finish = [c.get("finish_reason") for c in choices]
        outcome, progress = self.outcomes[row], self.progress
        usage = data.get("usage")
        prompt_tokens = usage.get("prompt_tokens") if usage else None
        if prompt_tokens is None:  # no usage (some gateways, local servers): count our estimate, never zero
            prompt_tokens = self.cost(row) - self._reply_tokens
            completion_tokens = sum(estimate_text_tokens(t) for t in texts if isinstance(t, str))
            progress.usage_estimated += 1
        else:
            completion_tokens = usage.get("completion_tokens") or 0
        outcome.prompt_tokens += prompt_tokens  # summed over attempts: a re-asked answer was paid for too
        outcome.completion_tokens += completion_tokens
        progress.prompt_tokens += prompt_tokens
        progress.completion_tokens += completion_tokens
        if self.settings.max_cost is not None:
            self._spent += cost_of(self.model, prompt_tokens, completion_tokens, batch=self.batch) or 0.0
            if usage:  # learn how much more the endpoint counts than our estimate
                ratio = prompt_tokens / max(1, self.cost(row) - self._reply_tokens)
                if ratio > self._ratio:
                    self._ratio = ratio
        outcome.finish_reason, outcome.latency = finish, latency
        self._open()
        self._streak = 0
        self._answered, self._failing = True, 0
        for text in texts:
            if not text:  # null or empty: retried like a server error, never cached or counted as an answer
                refusal = message.get("refusal") if self._n == 1 else None
                return self._retry(row, f"the model refused: {refusal}" if refusal else
                                   f"empty answer (content {'null' if text is None else 'empty'}, "
                                   f"finish_reason {finish!r})")
        outcome.content = content
        if self.schema is not None:
            try:
                parse = self.schema.parse
                outcome.parsed = [parse(c) for c in content] if self._n > 1 else parse(content)
            except ValueError as exc:
                return self._reask(row, content[0] if self._n > 1 else content, str(exc))
        extra = self.extract(choice, progress) if self.extract is not None and self._n == 1 else None
        if extra is not None:
            outcome.extra = extra
        outcome.status = OK
        outcome.error = None
        if self.cache is not None:
            self.cache.put(self._keys[row], CachedAnswer(content, finish, outcome.prompt_tokens,
                                                         outcome.completion_tokens, self.model, extra))
        progress.done += 1
        self._settled()
        if progress._listeners:
            progress.emit("done", row)
        return None

    def _reask(self, row: int, answer: Any, problem: str) -> None:
        """Ask again, showing the model its invalid answer; after ``max_reasks`` the row fails (text kept)."""
        reasks = self._reasks[row] = self._reasks.get(row, 0) + 1
        if reasks > self.settings.max_reasks:
            return self._fail(row, f"no answer matching the schema after {reasks} tries: {problem}")
        self._extra[row] = [{"role": "assistant", "content": answer if isinstance(answer, str) else ""},
                            {"role": "user", "content": self.schema.reask(problem)}]
        self._costs.pop(row, None)
        self._requeue(row)
        return None

    def _error(self, row: int, status: int, headers: Mapping[str, str], raw: bytes, version: int) -> None:
        message, code, kind = error_fields(raw, self.endpoint.api_key)
        message = self.endpoint.redact(message)
        fatal = fatal_error(status, message, code, kind, f"{status} from {self.endpoint.display_chat_url}")
        if fatal is not None:
            return self._stop_run(fatal)
        if status == 429:
            if "too large" in message.lower():
                return self._fail(row, f"429 request too large: {message}")
            self._open()
            return self._rate_limited(row, retry_after_seconds(headers, message))
        if 300 <= status < 400:
            return self._stop_run(FatalError(
                f"{status} from {self.endpoint.chat_url}: the endpoint redirects (to {headers.get('location', '?')}); "
                "set base_url to the final address", status=status))
        if status in (400, 422) and version != self._version:
            return self._requeue(row)  # refused under parameters that have since been switched: resend
        if status == 400 and "max_tokens" in self.params and "max_completion_tokens" in message:
            # Newer OpenAI models refuse max_tokens; switch the whole run once and resend.
            self.params["max_completion_tokens"] = self.params.pop("max_tokens")
            return self._switch_and_resend(row)
        if (status in (400, 422) and self.schema is not None and not self._preamble
                and ("response_format" in message or "json_schema" in message)):
            # The endpoint has no json_schema mode: ask for json_object and put the schema in words.
            self.params["response_format"] = {"type": "json_object"}
            self._preamble = [{"role": "system", "content": self.schema.instruction()}]
            self._costs.clear()
            return self._switch_and_resend(row)
        if status in _RETRY_STATUS or status >= 500:
            return self._retry(row, f"{status} {message or 'server error'}".strip())
        self._open()  # the endpoint took the key and the model: this row's request is at fault
        return self._fail(row, describe_error(status, message, code))

    def _switch_and_resend(self, row: int) -> None:
        """After changing the shared parameters, re-encode them and send the row again."""
        self._version += 1
        self._prefix = self._encode_prefix()
        self._requeue(row)

    # ---- row bookkeeping ----------------------------------------------------------------

    def _open(self) -> None:
        """The endpoint accepted key and model: lift the one-at-a-time probe."""
        if not self._opened:
            self._opened = True
            self._limit = max(1, self.settings.concurrency)
            self._notify()

    def _retry(self, row: int, reason: str) -> None:
        failures = self._failures[row] = self._failures.get(row, 0) + 1
        self.progress.last_error = reason = self.endpoint.redact(reason)
        if failures > self.settings.max_retries:
            if not self._heard:
                return self._stop_run(EndpointUnreachableError(
                    f"could not reach {self.endpoint.base_url} ({reason}); is the server running and base_url right?"))
            self._fail(row, reason)
            self._failing += 1
            # Rows failing one after another with nothing answered between: the endpoint is down, not the
            # rows bad. Before any answer the rows go one at a time, and a few of them decide.
            limit = self.settings.max_failing_rows if self._answered else min(3, self.settings.max_failing_rows)
            if self._failing >= limit:
                since = "with none answered between" if self._answered else "and no request has been answered yet"
                self._stop_run(EndpointFailingError(
                    f"{self.endpoint.base_url} keeps failing: {self._failing} rows failed one after another after "
                    f"{failures} attempts each, {since} (last: {reason}); the run stopped instead of sending the rest"))
            return None
        s = self.settings
        delay = random.uniform(0, min(s.backoff_cap, s.backoff_base * 2 ** (failures - 1)))
        self._park(row, delay)
        return None

    def _rate_limited(self, row: int, retry_after: float | None) -> None:
        progress = self.progress
        progress.rate_limited += 1
        waits = self._waits[row] = self._waits.get(row, 0) + 1
        if waits > self.settings.max_rate_limit_waits:
            return self._fail(row, f"still rate limited (429) after {waits - 1} waits")
        if retry_after is None:  # no hint: back off globally, growing with consecutive 429s
            self._streak += 1
            s = self.settings
            retry_after = random.uniform(0.5, 1.0) * min(s.backoff_cap, s.backoff_base * 2 ** min(self._streak, 10))
            self._pause_reason = "rate limited (429), backing off"
        elif retry_after > self.settings.max_wait:
            return self._stop_run(RateLimitWaitError(
                f"{self.endpoint.chat_url} answered 429 and asks to wait {_duration(retry_after)} before the next "
                f"request, longer than max_wait={_duration(self.settings.max_wait)}; rerun later (answered rows are "
                "kept and cached), or raise it with nbparrot.configure(max_wait=...)", status=429))
        else:
            self._pause_reason = f"rate limited (429): the endpoint asked to wait {_duration(retry_after)}"
        self.pacer.backoff(retry_after, self._loop.time())
        self._requeue(row)
        if progress._listeners:
            progress.emit("rate_limited", row)
        return None

    def _park(self, row: int, delay: float) -> None:
        """Put a row aside for ``delay`` seconds without holding a concurrency slot."""
        self.progress.retrying += 1
        self._timers[row] = self._loop.call_later(delay, self._unpark, row)
        if self.progress._listeners:
            self.progress.emit("retry", row)

    def _unpark(self, row: int) -> None:
        del self._timers[row]
        self.progress.retrying -= 1
        self._requeue(row)

    def _requeue(self, row: int) -> None:
        self._pending.appendleft(row)
        self._notify()

    def _fail(self, row: int, reason: str) -> None:
        outcome = self.outcomes[row]
        outcome.status, outcome.error = FAILED, reason
        if outcome.attempts == 0:
            self.progress.queued -= 1
        self.progress.failed += 1
        self.progress.last_error = reason
        self._settled()
        if self.progress._listeners:
            self.progress.emit("failed", row)

    def _settle_skipped(self, row: int) -> None:
        outcome = self.outcomes[row]
        outcome.status = SKIPPED
        outcome.error = self.source.skip_reason(row)
        self.progress.skipped += 1
        self.progress.queued -= 1

    def _settle_unsendable(self, row: int, reason: str) -> None:
        """A row that cannot be rendered, failed while planning: nothing is sent for it."""
        outcome = self.outcomes[row]
        outcome.status, outcome.error = FAILED, reason
        progress = self.progress
        progress.failed += 1
        progress.queued -= 1
        progress.last_error = reason
        if progress._listeners:
            progress.emit("failed", row)

    def _settled(self) -> None:
        self._unsettled -= 1
        if not self._unsettled:
            self._notify()

    def _stop_run(self, error: FatalError) -> None:
        if self.fatal is None:
            self.fatal = error
            self.progress.last_error = str(error)
            self._notify()

    def _encode_prefix(self) -> bytes:
        """The shared part of every body, encoded once: ``{...params, "messages": ``."""
        return json.dumps(self.params)[:-1].encode() + (b', "messages": ' if self.params else b'"messages": ')


def _duration(seconds: float) -> str:
    """``90 s``, ``25 min``, ``24 h``: a wait in the unit a person reads it in."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h".replace(".0 h", " h")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out waiting for the answer"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


class _Listed:
    """A plain list of message lists (None = skipped) as the engine's source of requests."""

    def __init__(self, prompts: Sequence[list | None], skip_reasons: Mapping[int, str]):
        self._prompts, self._reasons = prompts, skip_reasons

    def __len__(self) -> int:
        return len(self._prompts)

    def render(self, row: int) -> list | None:
        return self._prompts[row]

    def skip_reason(self, row: int) -> str:
        return self._reasons.get(row, "skipped")


class _Keys:
    """Cache keys by row, packed: 32 bytes a row (in chunks allocated as rows are keyed) instead of a
    64-character str (~113 bytes) in a dict."""

    __slots__ = ("_chunks", "_other")

    def __init__(self, n: int):
        self._chunks: list[bytearray | None] = [None] * ((n + MASK) >> SHIFT)
        self._other: dict[int, str] = {}  # a key that is not 64 hex digits, kept as it is

    def __setitem__(self, row: int, key: str) -> None:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        if len(raw) == 32 and raw.hex() == key:
            chunk = self._chunks[row >> SHIFT]
            if chunk is None:
                chunk = self._chunks[row >> SHIFT] = bytearray(32 * CHUNK)
            at = 32 * (row & MASK)
            chunk[at:at + 32] = raw
        else:
            self._other[row] = key

    def __getitem__(self, row: int) -> str:
        if self._other and row in self._other:
            return self._other[row]
        at = 32 * (row & MASK)
        return self._chunks[row >> SHIFT][at:at + 32].hex()


class _Costs:
    """Each row's budgeted tokens (8 bytes a row, in chunks); -1 while unknown. Dict-like where the engine uses it."""

    __slots__ = ("_tokens",)

    def __init__(self, n: int):
        self._tokens = Chunked("q", n, -1)

    def get(self, row: int, default: Any = None) -> Any:
        tokens = self._tokens[row]
        return default if tokens < 0 else tokens

    def __setitem__(self, row: int, tokens: int) -> None:
        self._tokens[row] = tokens

    def pop(self, row: int, default: Any = None) -> Any:
        tokens = self.get(row, default)
        self._tokens[row] = -1
        return tokens

    def clear(self) -> None:
        self._tokens.clear()


class _Queue:
    """Rows waiting to be sent: the planned ones in an array (8 bytes a row, nothing for the garbage
    collector to walk), with rows put back for another try in a deque in front of them."""

    __slots__ = ("_rows", "_head", "_front")

    def __init__(self) -> None:
        self._rows = array("q")
        self._head = 0
        self._front: deque[int] = deque()

    def extend(self, rows: Sequence[int]) -> None:
        self._rows.extend(rows)

    def appendleft(self, row: int) -> None:
        self._front.appendleft(row)

    def popleft(self) -> int:
        if self._front:
            return self._front.popleft()
        if self._head >= len(self._rows):
            raise IndexError("pop from an empty queue")
        row = self._rows[self._head]
        self._head += 1
        if self._head >= 65536 and 2 * self._head >= len(self._rows):
            del self._rows[:self._head]
            self._head = 0
        return row

    def __getitem__(self, index: int) -> int:
        if index != 0:
            raise IndexError("only the head of the queue can be read")
        if self._front:
            return self._front[0]
        if self._head >= len(self._rows):
            raise IndexError("the queue is empty")
        return self._rows[self._head]

    def __len__(self) -> int:
        return len(self._front) + len(self._rows) - self._head

    def __bool__(self) -> bool:
        return bool(self._front) or self._head < len(self._rows)

    def __iter__(self) -> Any:
        yield from self._front
        yield from self._rows[self._head:]
