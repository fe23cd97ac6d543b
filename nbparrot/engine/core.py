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
from typing import Any, Callable, Mapping, Sequence

from ..cache import Cache
from ..config import Endpoint
from ..errors import BudgetExceededError, ConfigError, EndpointUnreachableError, FatalError
from ..images.parts import MediaError, encode_messages, expand
from ..outcomes import CANCELLED, PENDING, Outcome, Outcomes
from ..pricing import Estimate, Price, known, preload, price_of
from ..ratelimit import Pacer
from ..structured import Schema
from ..transport import TRANSIENT_ERRORS, ResponseTooLargeError, Transport
from .answers import Answers
from .columns import _Costs, _Keys, _Listed, _Queue
from .planning import Planning
from .progress import Progress
from .settings import EngineSettings, FAN_OUT, PAUSE_SHOWN
from .words import _cannot_connect, _describe, cause


_UNSET = object()  # the price is not looked up yet


class Engine(Planning, Answers):
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
        # looked up once per run (per model and endpoint), never per request: at once for a budget, else
        # while planning (the price database loads in a thread meanwhile, see pricing.preload)
        self._price: Price | None | object = _UNSET
        if self.settings.max_cost is None and not known(self.model, endpoint.base_url):
            preload()
        elif self.settings.max_cost is not None and self.price is None:
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
        self._media = bool(getattr(self.source, "media", None))  # rows hold images / documents, encoded when sent
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
    def price(self) -> Price | None:
        """This run's price (None: unknown), looked up on first use."""
        if self._price is _UNSET:
            self._price = price_of(self.model, self.endpoint.base_url)
        return self._price  # type: ignore[return-value]

    def usd(self, prompt_tokens: float, completion_tokens: float, cached_tokens: float = 0) -> float | None:
        """USD for these tokens at this run's price (Batch API rates for a batch), or None if it is unknown."""
        if self._price is _UNSET and not (prompt_tokens or completion_tokens):
            return 0.0  # nothing spent yet, while the prices may still be loading
        price = self.price
        return None if price is None else price.cost(prompt_tokens, completion_tokens, cached_tokens, self.batch)

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
        ratio, price, batch = self._ratio, self.price, self.batch
        in_flight = price.cost(self._committed_prompt * ratio, self._committed_reply, 0, batch)
        most = price.cost(prompt * ratio, reply, 0, batch)
        if self._spent + in_flight + most > budget:
            self.budget_stop = BudgetExceededError(
                f"stopped at the budget: ${self._spent:,.4f} spent of max_cost=${budget:,.4f}, and the next request "
                f"could cost up to ${most:,.4f} with ${in_flight:,.4f} still in flight (those are let finish); "
                "run.partial() has the answered rows, and a rerun with a higher max_cost sends only the rest")
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
                    f"{self.endpoint.display_url} accepted the connection but has sent nothing for {2 * limit:.0f} s, "
                    "not even to a status check (GET /models); is base_url the right address, and is the server up?"))
        except TRANSIENT_ERRORS:  # refused or reset: the request's own retries report that
            pass

    async def _stop(self) -> None:
        """Cancel what is in flight or waiting; mark every unfinished row (nothing left pending).

        A row waiting to retry was tried and failed: it is ``failed``, with its last error and its
        attempts. A row whose request was in flight is ``cancelled in flight``; the rows never sent
        are ``cancelled`` with the reason the run stopped."""
        parked = list(self._timers)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._ping_task is not None:
            self._ping_task.cancel()
        tasks = list(self._tasks)
        in_flight = [self._tasks[task] for task in tasks]
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # a second cancel while gathering must not leave rows pending
            self._mark_unsent(parked, in_flight)

    def _mark_unsent(self, parked: Sequence[int] = (), in_flight: Sequence[int] = ()) -> None:
        if self.fatal:
            why = f"the run stopped ({self.fatal})"
            reason = f"not sent: {why}"
        elif self.budget_stop:
            why = f"max_cost=${self.settings.max_cost:,.4f} reached"
            reason = f"not sent: {why}"
        else:
            why = "the run was cancelled"
            reason = "cancelled before an answer arrived"
        last_error = self.progress.last_error
        for unit in parked:
            if self.outcomes[unit].status == PENDING:
                self._fail(unit, f"{self.outcomes[unit].error or 'failed'}; not retried: {why}")
        self.progress.last_error = last_error  # the row's own error is not what stopped the run
        self.abandon(reason)
        for unit in in_flight:
            for row in self._rows(unit):
                outcome = self.outcomes[row]
                if outcome.status == CANCELLED and outcome.attempts:
                    outcome.error = f"cancelled in flight: {why}"

    def _rows(self, unit: int) -> list[int]:
        """The rows one request carries (one here; a pack of them for embeddings)."""
        return [unit]

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
        try:
            messages = self._messages(row, wire=False)
            if self._media:  # read, scale and base64 in a thread: a photo's decode must not stall the loop
                body = await loop.run_in_executor(None, encode_messages, messages, self._prefix, b"}")
            else:
                body = b"".join((self._prefix, json.dumps(messages).encode(), b"}"))
            del messages
        except MediaError as exc:  # an image that cannot be read, or is too large even scaled down: nothing sent
            self._release(row)
            self._fail(row, str(exc))
            return
        if outcome.attempts == 0:
            progress.queued -= 1
        outcome.attempts += 1
        progress.requests += 1
        progress.in_flight += 1
        sent = progress.sent_at[row] = loop.time()
        if progress._listeners:
            progress.emit("sent", row)
        version = self._version
        try:
            status, headers, raw = await self._transport.post(body)
        except TRANSIENT_ERRORS as exc:
            self._retry(row, _describe(exc), cause(exc), None if self._heard else _cannot_connect(exc))
            return
        except ResponseTooLargeError as exc:
            self._heard = True
            self._fail(row, f"{exc}; not read (raise it with nbparrot.configure(max_response_bytes=...))")
            return
        finally:
            progress.in_flight -= 1
            progress.sent_at.pop(row, None)
            self._release(row)
        now = loop.time()
        self._heard = True
        self.pacer.observe(headers, mark, now)
        if status == 200:
            try:
                self._answer(row, json.loads(raw), now - sent)
            except (ValueError, KeyError, IndexError, TypeError, AttributeError):
                self._retry(row, f"unreadable answer from the endpoint: {self.endpoint.redact(repr(raw[:200]))}",
                            "unreadable answer")
            return
        self._error(row, status, headers, raw, version)

    def _release(self, row: int) -> None:
        """Give back the budget booked for a row's attempt."""
        if self._committed:
            held_prompt, held_reply = self._committed.pop(row, (0, 0))
            self._committed_prompt -= held_prompt
            self._committed_reply -= held_reply

    def _messages(self, row: int, wire: bool = True) -> list:
        """Row ``row``'s messages; ``wire``: as sent, images read and encoded now (``MediaError`` if they cannot be)."""
        messages = self.source.render(row)  # rendered again here: planning kept only its key and cost
        if self._preamble:
            messages = self._preamble + messages
        extra = self._extra.get(row)
        if extra:
            messages = messages + extra
        return expand(messages) if wire and self._media else messages

    def _encode_prefix(self) -> bytes:
        """The shared part of every body, encoded once: ``{...params, "messages": ``."""
        return json.dumps(self.params)[:-1].encode() + (b', "messages": ' if self.params else b'"messages": ')
