"""What the engine does with each answer: settle the row, retry it, re-ask it, fail it, or stop the run."""

from __future__ import annotations

import random
from typing import Any, Mapping

from ..cache import CachedAnswer
from ..errors import (
    EndpointFailingError,
    EndpointUnreachableError,
    FatalError,
    RateLimitWaitError,
    describe_error,
    error_fields,
    fatal_error,
)
from ..outcomes import FAILED, OK, PENDING, SKIPPED
from ..ratelimit import retry_after_seconds
from ..tokens import estimate_text_tokens
from .settings import _RETRY_STATUS
from .words import _duration, status_cause


class Answers:
    """The answer-handling half of ``Engine`` (a mixin: the state lives in ``Engine.__init__``)."""

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
        cached_tokens = 0
        if prompt_tokens is None:  # no usage (some gateways, local servers): count our estimate, never zero
            prompt_tokens = self.cost(row) - self._reply_tokens
            completion_tokens = sum(estimate_text_tokens(t) for t in texts if isinstance(t, str))
            progress.usage_estimated += 1
        else:
            completion_tokens = usage.get("completion_tokens") or 0
            details = usage.get("prompt_tokens_details")  # the provider's prompt cache: cheaper tokens
            if details.__class__ is dict:
                cached_tokens = details.get("cached_tokens") or 0
        outcome.prompt_tokens += prompt_tokens  # summed over attempts: a re-asked answer was paid for too
        outcome.completion_tokens += completion_tokens
        progress.prompt_tokens += prompt_tokens
        progress.completion_tokens += completion_tokens
        if cached_tokens:
            outcome.cached_tokens += cached_tokens
            progress.cached_prompt_tokens += cached_tokens
        if self.settings.max_cost is not None:
            self._spent += self.price.cost(prompt_tokens, completion_tokens, cached_tokens, self.batch)
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
                                   f"finish_reason {finish!r})", "refused" if refusal else "empty answer")
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
            return self._stop_run(fatal, row)
        if status == 429:
            if "too large" in message.lower():
                return self._fail(row, f"429 request too large: {message}")
            self._open()
            return self._rate_limited(row, retry_after_seconds(headers, message))
        if 300 <= status < 400:
            return self._stop_run(FatalError(
                f"{status} from {self.endpoint.display_chat_url}: the endpoint redirects "
                f"(to {self.endpoint.redact(headers.get('location', '?'))}); "
                "set base_url to the final address", status=status), row)
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
            return self._retry(row, f"{status} {message or 'server error'}".strip(), status_cause(status))
        self._open()  # the endpoint took the key and the model: this row's request is at fault
        reason = describe_error(status, message, code)
        if self._media and status in (400, 415, 422):
            reason += (" — this request carries images or PDFs as content parts: not every endpoint takes them "
                       "(PDFs go as 'file' parts, which OpenAI's chat completions takes; many compatible servers do not)")
        return self._fail(row, reason)

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

    def _retry(self, row: int, reason: str, cause: str, cannot_connect: tuple[int, str] | None = None) -> None:
        """Try the row again after a backoff (``cause`` counts it), or fail it after ``max_retries``.
        ``cannot_connect`` (before anything has answered: see ``words._cannot_connect``) gives fewer
        retries: no endpoint is there."""
        failures = self._failures[row] = self._failures.get(row, 0) + 1
        reason = self.endpoint.redact(reason)
        retries = self.settings.max_retries if cannot_connect is None else min(cannot_connect[0], self.settings.max_retries)
        if failures > retries:
            if not self._heard:
                return self._stop_run(EndpointUnreachableError(
                    f"could not reach {self.endpoint.display_url}: {reason}; is the server running and base_url right?"),
                    row)
            self._fail(row, reason)
            self._failing += 1
            # Rows failing one after another with nothing answered between: the endpoint is down, not the
            # rows bad. Before any answer the rows go one at a time, and a few of them decide.
            limit = self.settings.max_failing_rows if self._answered else min(3, self.settings.max_failing_rows)
            if self._failing >= limit:
                since = "with none answered between" if self._answered else "and no request has been answered yet"
                self._stop_run(EndpointFailingError(
                    f"{self.endpoint.display_url} keeps failing: {self._failing} rows failed one after another after "
                    f"{failures} attempts each, {since} (last: {reason}); the run stopped instead of sending the rest"))
            return None
        self.outcomes[row].error = reason  # its last error, kept while it waits (an answer clears it)
        self.progress.count_retry(cause, reason)
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
                f"{self.endpoint.display_chat_url} answered 429 and asks to wait {_duration(retry_after)} before the next "
                f"request, longer than max_wait={_duration(self.settings.max_wait)}; rerun later (answered rows are "
                "kept and cached), or raise it with nbparrot.configure(max_wait=...)", status=429), row)
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

    def _stop_run(self, error: FatalError, row: int | None = None) -> None:
        """Stop the whole run with ``error``; ``row``, whose answer showed it, fails with it."""
        if row is not None and self.outcomes[row].status == PENDING:
            self._fail(row, str(error))
        if self.fatal is None:
            self.fatal = error
            self.progress.last_error = str(error)
            self._notify()
