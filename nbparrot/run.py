"""``Run``: the handle of one batch, in a notebook or in a script.

Inside a running event loop (a Jupyter kernel runs every cell inside one) the batch starts
as a task on that very loop and the call returns at once: the panel shows progress, a later
cell can ``await run``, and the Cancel button stops it. A notebook executed headlessly
(nbconvert, papermill) is the exception: there the run finishes within the cell that starts it,
so the saved notebook holds its final state (see ``nbparrot.headless``). Outside a loop (a script, plain
``python``, the IPython terminal) the same call runs to completion with a text progress
line, and Ctrl-C cancels it while keeping the finished rows; a run stopped by a fatal error
raises it from the call that started it, as ``await run`` would, with the run as ``err.run``. ``asyncio.run`` is never
called inside a running loop and ``nest_asyncio`` is never used: on ipykernel 7 it loses
shell messages (Cancel clicks vanish, queued cells hang).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import signal
import threading
import warnings
from typing import Any, Callable

from .prepare import Prepared
from .engine import CANCELLED, FAILED, SKIPPED, Engine
from .errors import ConfigError, NbparrotError, RunCancelledError, RunNotFinishedError
from .headless import in_background, off_loop
from .pricing import cached_share, format_usd

__all__ = ["Run", "live_runs", "record_usage", "session_usage", "unlisted"]

_ids = itertools.count(1)
_live: dict[int, "Run"] = {}  # strong references: asyncio keeps only weak ones to tasks (a pass is held by its staged run)
_usage: dict[tuple[str, bool], dict[str, int]] = {}  # (model, batch) -> session totals
#: True while a staged run's work runs (see nbparrot.staged): runs started then are its passes, seen
#: (live_runs, ``%llm status`` / ``cancel``) only as the one run they make up
unlisted: contextvars.ContextVar[bool] = contextvars.ContextVar("nbparrot_unlisted", default=False)


def live_runs() -> list["Run"]:
    """Runs started in this process that have not finished yet (safe from any thread)."""
    return list(_live.copy().values())


def record_usage(model: str, *, requests: int = 0, prompt_tokens: int = 0, completion_tokens: int = 0,
                 cached: int = 0, batch: bool = False, cost: float | None = 0.0) -> None:
    """Add to this session's totals (every finished run and single prompt reports here, with its cost:
    None when the price is unknown, which the model's total then is too)."""
    totals = _usage.setdefault((model, batch), {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cached": 0,
                                                "cost": 0.0})
    totals["requests"] += requests
    totals["prompt_tokens"] += prompt_tokens
    totals["completion_tokens"] += completion_tokens
    totals["cached"] += cached
    totals["cost"] = None if cost is None or totals["cost"] is None else totals["cost"] + cost


def session_usage() -> dict[str, dict[str, Any]]:
    """Requests, tokens, cached answers and cost per model for this session (cost None if unknown).

    Work sent through the Batch API is listed apart, as "<model> (batch)", at its own price."""
    return {model + (" (batch)" if batch else ""): dict(t) for (model, batch), t in _usage.items()}


class Run:
    """One batch: awaitable, cancellable from any thread, with its counts, errors, usage and cost."""

    def __init__(self, engine: Engine, prepared: Prepared, *, model: str,
                 shape: Callable[["Run"], Any], label: str = ""):
        self.id = next(_ids)
        self.engine = engine
        self.prepared = prepared
        self.model = model
        self.label = label
        self._shape = shape
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._cancel_requested = False
        self._crash: BaseException | None = None  # an unexpected error inside the run
        self._finished = threading.Event()
        self._result_cache: Any = None
        self._confirmation: asyncio.Future | None = None  # set when the panel must ask before sending
        self._ask_over: float | None = None  # confirm_over, while the estimate to compare it with is not known
        self._early_answer: bool | None = None  # confirm() called before the question was put
        self.view: Any = None  # the panel or text line showing this run

    # ---- starting -----------------------------------------------------------------------

    def start(self, view_factory: Callable[["Run", bool], Any], *, ask: bool = False,
              ask_over: float | None = None, before: Callable[[], None] | None = None) -> "Run":
        """Start on the running loop (returns at once) or, with none, run to completion here.

        ``ask``: the view must get the user's go-ahead (Run / Cancel) before any request.
        ``ask_over`` (USD): ask if the estimate may cost more; decided once planning is done
        (at once if the engine has planned already, or if the view cannot ask: then the whole
        batch is planned here to decide). ``before`` is called once every check has passed,
        just before the run starts.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        background = loop is not None and in_background()
        self.view = view_factory(self, background)
        can_ask = background and hasattr(self.view, "ask")
        if ask_over is not None:
            if not can_ask:  # plan here to decide; where a loop runs, in a helper thread (a staged plan runs a loop)
                off_loop(self.engine.plan) if loop is not None else self.engine.plan()
            if self.engine.planned:
                ask = ask or self._over(ask_over)
            else:
                self._ask_over = ask_over
        if ask:
            if not can_ask:
                raise ConfigError(f"this run is estimated at {self.engine.estimate}, above confirm_over; "
                                  "pass confirm=True to run it anyway")
            self._confirmation = loop.create_future()
        if before is not None:
            before()
        if background:
            self._start_on(loop)
        elif loop is None:
            self._run_here()
            if self.error is not None:  # a script must not go on as if it had answers: raise, as await would
                raise self._with_run(self.error)
        else:  # a kernel executing the notebook headlessly: finish within this cell (see nbparrot.headless)
            off_loop(self._run_here, on_interrupt=self.cancel)
        return self

    def _start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop, self._loop_thread = loop, threading.get_ident()
        if not unlisted.get():
            _live[self.id] = self
        self._task = loop.create_task(self._main())
        self._task.add_done_callback(self._finalize)
        if not self.engine.planned and self.progress.note is None:
            self.progress.note = "preparing"  # the planning's own note, with counts, follows from its first slice
        self.view.started()

    def _run_here(self) -> None:
        """Script mode (and a cell executed headlessly, in a helper thread): our own loop; the first
        Ctrl-C cancels the run (finished rows kept)."""
        loop = asyncio.new_event_loop()
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._task = loop.create_task(self._main())
        self._task.add_done_callback(self._finalize)
        previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigint(signum: int, frame: Any) -> None:
                signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts as usual
                loop.call_soon_threadsafe(self.cancel)
            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            self.view.started()
            loop.run_until_complete(self._task)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _over(self, limit: float) -> bool:
        e = self.engine.estimate
        return e.requests > 0 and (e.max_cost is None or e.max_cost > limit)

    async def _main(self) -> None:
        try:
            await self.engine.prepare()  # what map() did not plan: in slices, while the view says "preparing"
            if self._ask_over is not None and self._over(self._ask_over):
                self._confirmation = self._loop.create_future()
                if self._early_answer is not None:
                    self._confirmation.set_result(self._early_answer)
            if self._confirmation is not None:
                self.view.ask()
                if not await self._confirmation:
                    self._cancel_requested = True
                    self.engine.abandon("not sent: the run was not confirmed")
                    return
                self.progress.started = self._loop.time()  # the time the question was up is not the run's
            await self.engine.run()
        except asyncio.CancelledError:
            self._cancel_requested = True  # the outcomes already say which rows were cancelled
        except BaseException as exc:  # noqa: BLE001 - a run must never die silently
            self._crash = exc
            if self.engine.outcomes.count_status("pending"):
                self.engine.abandon(f"not sent: the run stopped ({type(exc).__name__}: {exc})")
        finally:
            self._finalize()

    def _finalize(self, task: asyncio.Task | None = None) -> None:
        """Close the books once: from ``_main``, or from the task's done callback when the task
        was cancelled before its first step (then ``_main`` never ran at all)."""
        if self._finished.is_set():
            return
        if self.engine.outcomes.count_status("pending"):
            self._cancel_requested = True
            self.engine.abandon("not sent: the run was cancelled before it started")
        _live.pop(self.id, None)
        self._record_usage()
        self._finished.set()
        try:
            self.view.finished()
        except Exception as exc:  # noqa: BLE001 - a display failure must not break the run's end (or its cell)
            warnings.warn(f"nbparrot: run {self.id} ended, but its final display failed "
                          f"({type(exc).__name__}: {exc}); the results are complete", RuntimeWarning, stacklevel=2)

    def _record_usage(self) -> None:
        """Add this run's requests and tokens to the session's totals (once, as it ends)."""
        p = self.progress
        record_usage(self.model, requests=p.requests, prompt_tokens=p.prompt_tokens,
                     completion_tokens=p.completion_tokens, cached=p.cached, batch=self.engine.batch, cost=self.cost)

    # ---- state --------------------------------------------------------------------------

    def confirm(self, go: bool = True) -> None:
        """Answer the panel's question before a costly run: send it (True) or drop it. Any thread.

        Called while the run is still preparing, the answer is kept for the question, if it comes."""
        fut = self._confirmation
        if fut is None and self._ask_over is not None:
            self._early_answer = bool(go)
        if fut is not None and not fut.done():
            self._loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(bool(go)))

    def done(self) -> bool:
        """True once the run has stopped (finished, cancelled, or failed)."""
        return self._settle()

    def _settle(self) -> bool:
        """Whether the run is over, closing its books first when its task has ended but the task's
        done callback (``_finalize``, scheduled with call_soon) has not run yet: another task on the
        loop can see ``task.done()`` before it, e.g. when the run was cancelled before its first step.
        Only on the run's own loop thread; other threads wait for the callback."""
        if self._finished.is_set():
            return True
        task = self._task
        if task is not None and task.done() and threading.get_ident() == self._loop_thread:
            self._finalize()
        return self._finished.is_set()

    @property
    def status(self) -> str:
        """'preparing' (planning: cache lookups and the estimate, nothing sent yet), 'waiting' (for
        confirmation), 'running', 'finished', 'cancelled', 'stopped' (max_cost reached), or
        'failed' (a fatal error stopped it)."""
        if not self.done():
            if self._confirmation is not None and not self._confirmation.done():
                return "waiting"
            if self._task is not None and not self.engine.planned:
                return "preparing"
            return "running" if self._task is not None else "created"
        if self._crash is not None or self.engine.fatal is not None:
            return "failed"
        if self.engine.budget_stop is not None:
            return "stopped"
        return "cancelled" if self._cancel_requested else "finished"

    @property
    def error(self) -> BaseException | None:
        """The error that stopped the whole run, if one did (fatal answer, budget, crash)."""
        return self.engine.fatal or self.engine.budget_stop or self._crash

    @property
    def estimate(self):
        """Requests, tokens and cost (expected, at most) of what this run sends, known before the first
        request; None while the run is still preparing."""
        return self.engine.estimate

    def counts(self) -> dict[str, int]:
        """Rows per state: total, queued, in_flight, retrying, done, failed, cancelled, skipped."""
        p = self.progress
        return {"total": p.total, "queued": p.queued, "in_flight": p.in_flight, "retrying": p.retrying,
                "done": p.done, "failed": p.failed, "cancelled": p.cancelled, "skipped": p.skipped}

    @property
    def progress(self):
        return self.engine.progress

    @property
    def outcomes(self):
        return self.engine.outcomes

    @property
    def usage(self) -> dict[str, dict[str, int]]:
        """Tokens and requests per model (``cached_prompt_tokens``: of the prompt tokens, those the provider
        served from its prompt cache)."""
        p = self.progress
        return {self.model: {"requests": p.requests, "prompt_tokens": p.prompt_tokens,
                             "completion_tokens": p.completion_tokens, "cached_prompt_tokens": p.cached_prompt_tokens,
                             "rows_answered": p.done, "rows_cached": p.cached}}

    @property
    def cost(self) -> float | None:
        """USD spent so far (cached rows cost nothing; prompt tokens the provider cached, its cached-input
        price), or None when the model's price is unknown."""
        p = self.progress
        return self.engine.usd(p.prompt_tokens, p.completion_tokens, p.cached_prompt_tokens)

    def model_of(self, request: int) -> str:
        """The model that answered request ``request`` (one model per run, but for a staged run's passes)."""
        return self.model

    @property
    def projected_cost(self) -> float | None:
        """The whole run's cost as it looks now: spend so far plus the rows left at the average so far."""
        p, spent = self.progress, self.cost
        sent_rows = p.done - p.cached
        if spent is None or not sent_rows:
            return self.estimate.expected_cost if self.estimate else None
        left = p.total - p.settled
        return spent + spent / sent_rows * left

    @property
    def errors(self):
        """Rows without an answer (failed, skipped, cancelled) with the reason and attempts."""
        import pandas as pd

        outcomes = self.engine.outcomes
        rows = [(k, outcomes[k]) for k in outcomes.rows_with(FAILED, SKIPPED, CANCELLED)]
        index = self.prepared.request_index
        shown = self.engine.endpoint.redact  # no key, password or key-looking URL path in a row's error
        columns = {"status": [o.status for _, o in rows],
                   "error": [shown(o.error) if o.error else o.error for _, o in rows],
                   "attempts": [o.attempts for _, o in rows]}
        if self.engine.schema is not None:  # the text a schema rejected, kept for a look
            columns["raw"] = [o.content for _, o in rows]
        return pd.DataFrame(columns, index=index[[k for k, _ in rows]] if rows else index[:0])

    # ---- results ------------------------------------------------------------------------

    def result(self) -> Any:
        """The answers in the input's shape; rows without an answer are NA (see ``errors``).

        Raises ``RunNotFinishedError`` while the run goes on (``await run`` instead), and the
        fatal error if one stopped the run (``partial()`` still gives the finished rows).
        """
        if not self.done():
            raise RunNotFinishedError(
                f"run {self.id} is still going ({self.progress.settled}/{self.progress.total} rows settled): "
                "use `result = await run` in a notebook cell, or check run.done()")
        if self.error is not None:
            raise self._with_run(self.error)
        if self._cancel_requested and self.progress.cancelled:
            warnings.warn(f"run {self.id} was cancelled: {self.progress.done} of {self.progress.total} rows "
                          f"answered; the other {self.progress.total - self.progress.done} are NA", stacklevel=2)
        return self.partial()

    def _with_run(self, error: BaseException) -> BaseException:
        """``error`` with this run attached as ``error.run`` (its finished rows stay reachable)."""
        try:
            error.run = self  # type: ignore[attr-defined]
        except AttributeError:  # an exception type that takes no attributes: raised as it is
            pass
        return error

    def partial(self) -> Any:
        """Whatever is answered so far, in the input's shape (unanswered rows NA), at any time."""
        if self.done() and self._result_cache is not None:
            return self._result_cache
        shaped = self._shape(self)
        if self.done():
            self._result_cache = shaped
        return shaped

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self) -> Any:
        task = self._task
        if task is None:
            raise NbparrotError("this run was never started")
        if not task.done():
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                # The kernel's stop button (or any cancel of the awaiting cell): stop the run too,
                # let it put its rows in order, then say exactly where things are.
                self.cancel()
                await asyncio.wait({task})
                p = self.progress
                raise RunCancelledError(
                    f"interrupted: run {self.id} was cancelled with {p.done} of {p.total} rows answered; "
                    "`run.partial()` returns them (the others are NA)") from None
        return self.result()  # done() closes the books if the task's done callback has not run yet

    def cancel(self) -> None:
        """Stop the run: in-flight requests are cancelled, finished rows kept. Safe from any thread."""
        if self.done() or self._task is None or self._cancel_requested:
            return  # once is enough: a second cancel must not interrupt the first one's cleanup
        self._cancel_requested = True
        if threading.get_ident() == self._loop_thread:
            self._task.cancel()
        else:
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop has just closed: the run is over anyway
                pass

    # ---- guards and display -------------------------------------------------------------

    def _finished_result(self) -> Any:
        if not self.done():
            raise RunNotFinishedError(
                f"run {self.id} has not finished, so it has no values yet: `await` it first "
                "(e.g. `df['answer'] = await run`), or pass into='answer' to fill a column as rows land")
        return self.result()

    def _values(self) -> list:
        result = self._finished_result()
        return list(result) if not hasattr(result, "tolist") else result.tolist()

    def __iter__(self):
        return iter(self._values())

    def __getitem__(self, key: Any) -> Any:
        """``run[k]`` is ``run.result()[k]`` (a finished run only): a Series label, a column, a record."""
        return self._finished_result()[key]

    def __len__(self) -> int:
        return len(self._values())

    def __bool__(self) -> bool:
        return True

    def __array__(self, dtype: Any = None, copy: Any = None):
        import numpy as np

        return np.asarray(self._values(), dtype=dtype if dtype is not None else object)

    def summary(self) -> str:
        """One line: status, counts, tokens, cost and time."""
        p = self.progress
        return self._summary_line(p.done, p.total, [("from cache", p.cached), ("failed", p.failed),
                                                    ("cancelled", p.cancelled), ("skipped", p.skipped)])

    def _summary_line(self, done: int, total: int, counts: list[tuple[str, int]], requests: str = "",
                      words: str = "") -> str:
        """The summary from its parts: answered of total, the non-zero ``counts``, ``requests`` (per model),
        tokens, cost, time, and ``words`` after a semicolon."""
        p = self.progress
        parts = [f"run {self.id} {self.status}: {done}/{total} answered"]
        parts += [f"{count} {name}" for name, count in counts if count]
        if requests:
            parts.append(requests)
        parts.append(f"{p.prompt_tokens + p.completion_tokens:,} tokens")
        share = cached_share(p.prompt_tokens, p.cached_prompt_tokens)
        if share:
            parts.append(share)
        parts.append(format_usd(self.cost))
        if p.started is not None and p.finished is not None:
            parts.append(f"{p.finished - p.started:.1f}s")
        return ", ".join(parts) + (f"; {words}" if words else "")

    def __repr__(self) -> str:
        return f"<nbparrot.Run {self.summary()}>"

    def _ipython_display_(self) -> None:
        if self.view is not None and hasattr(self.view, "display_again"):
            self.view.display_again()
        else:
            print(repr(self))
