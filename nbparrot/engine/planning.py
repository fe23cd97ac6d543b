"""Planning before the first request: each row rendered once to settle it (skipped, unsendable,
cached) and to key and cost it; in slices on the loop, or at once in a script."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ..cache import CachedAnswer, request_key
from ..outcomes import OK
from ..prepare import RenderError
from ..pricing import Estimate, estimate, known, preload
from ..tokens import estimate_prompt_tokens
from .columns import _Keys
from .settings import LOOKUP_KEYS, PLAN_SLICE


class Planning:
    """The planning half of ``Engine`` (a mixin: the state lives in ``Engine.__init__``)."""

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
        if not known(self.model, self.endpoint.base_url):  # the price database, loading in a thread
            await loop.run_in_executor(None, preload().wait)
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
        base, params, model = self.endpoint.base_url, self.params, self.model
        opened = self.cache is None
        every = 0 if getattr(source, "media", None) else 63  # rows between clock checks: an image row may take ms
        sending = prompt_tokens = 0
        row = 0
        while row < n:
            progress.note = f"preparing: {row:,} of {n:,} rows"
            end = clock() + PLAN_SLICE
            rows = []
            while row < n and (row & every or clock() < end):
                k, row = row, row + 1
                try:
                    messages = render(k)
                    if messages is None:
                        self._settle_skipped(k)
                        continue
                    if keyed:  # before the cost: an image's bytes, read to hash them, also give its size
                        keys[k] = request_key(base, {**params, "messages": messages})
                    costs[k] = estimate_prompt_tokens(messages, model) + reply_tokens
                except RenderError as exc:  # a value that cannot be rendered, an image that cannot be read
                    self._settle_unsendable(k, str(exc))
                    continue
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
        self.estimate = estimate(self.model, sending, prompt_tokens, reply_tokens * sending, batch=self.batch,
                                 base_url=self.endpoint.base_url)
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

    def cost(self, row: int) -> int:
        """Tokens a row's request is budgeted at: prompt estimate + n x max_tokens (memoised per row)."""
        tokens = self._costs.get(row)
        if tokens is None:
            tokens = self._costs[row] = estimate_prompt_tokens(self._messages(row, wire=False), self.model) + self._reply_tokens
        return tokens

    # ---- dispatch -----------------------------------------------------------------------
