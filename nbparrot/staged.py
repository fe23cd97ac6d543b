"""Runs made of several passes of requests, seen and steered as one ``Run``: ``agg``'s levels,
``topk``'s scoring and rounds, ``join``'s embedding and pairs, a cascade's cheap model, sample and
unsure rows, scoring's variants and judge.

A ``StagedRun`` is a ``Run`` whose engine is a ``Staged``: the operator's own code (a ``Work``, with
``async plan(staged)`` and ``async run(staged)``) decides the passes, and each pass is an ordinary
child ``Run`` (its own engine, model, cache, retries and outcomes, started silently on the same
loop, and not listed: ``live_runs()`` and ``%llm status`` / ``cancel`` see only the staged run). So the promises of one run hold across the passes: the call returns at once in a notebook
with one panel (its note names the pass) and one Cancel, ``await run`` gives the final result, the
estimate covers every pass before anything is sent (shown pass by pass; passes found whole in the
cache are planned through, so a rerun is estimated at 0 requests), ``confirm_over`` asks once, and
``max_cost`` is one budget: each pass may spend what the earlier ones left. Cancel stops the pass in
flight (its answered requests are kept, and cached) and starts no further pass; a rerun resumes
from the cache. Usage and cost are each pass's, at its own model (``run.usage`` per model), recorded
by the passes, each once.

A work whose answers are one per input row (a cascade, scoring) also gives ``prepared`` (the rows'
requests) and ``outcomes`` (each row's final outcome, assembled from its passes): those are then
the run's own (its result, ``errors``, ``meta=True``, the panel's preview), ``model_of`` names the
model behind each row, and the summary counts rows. Any other work's result is its own (its shape
reads the work), and ``run.errors`` lists the passes' failed requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Callable, Iterator

from .engine import Engine
from .errors import BudgetExceededError, ConfigError
from .outcomes import CANCELLED, OK, Outcomes
from .panel import Silent, make_view
from .pricing import Estimate, estimate, format_usd, price_of
from .run import Run, unlisted

__all__ = ["Work", "Requests", "PlanEstimate", "Staged", "StagedRun", "launch_staged"]


class Work:
    """What an operator gives a staged run (see the module docstring): ``plan`` and ``run`` its passes;
    a per-row work also sets ``prepared`` and ``outcomes`` (and ``schema``, the rows' answer schema)."""

    prepared: Any = None
    outcomes: Outcomes | None = None
    schema: Any = None

    async def plan(self, staged: "Staged") -> "PlanEstimate":
        """Every pass's estimate, before anything is sent (planning through passes found whole in the cache)."""
        raise NotImplementedError

    async def run(self, staged: "Staged") -> None:
        """The passes, each made with ``staged.engine``, started with ``staged.start``, awaited with ``staged.follow``."""
        raise NotImplementedError

    def settle(self, reason: str) -> None:
        """The run has stopped: every row still without a final outcome gets CANCELLED with ``reason``."""
        if self.outcomes is not None:
            self.outcomes.settle_pending(CANCELLED, reason)

    def model_of(self, request: int) -> str | None:
        """The model behind request ``request``'s final answer (None: the run's model)."""
        return None

    def describe(self) -> str:
        """Words for the end of the run's summary line ("" for none)."""
        return ""


class Requests:
    """One pass's requests as message lists; it stands where a ``Prepared`` does for the engine,
    ``Run`` and the panel (``render``, ``user_text``, ``request_index``, ...)."""

    variants = 1
    frame = None
    records = None

    def __init__(self, messages: list[list[dict]], labels: list[Any], template: str):
        self.messages, self.labels, self.templates, self.rows = messages, labels, [template], len(messages)

    def __len__(self) -> int:
        return self.rows

    def render(self, k: int) -> list[dict]:
        return self.messages[k]

    def skip_reason(self, k: int) -> str:
        return "skipped"

    def user_text(self, k: int) -> str | None:
        return self.messages[k][-1]["content"] if k < self.rows else None

    def row_of(self, k: int) -> int:
        return k

    def template_of(self, k: int) -> str:
        return self.templates[0]

    @property
    def index(self) -> Any:
        import pandas as pd

        return pd.Index(self.labels, dtype=object)

    request_index = index


class PlanEstimate:
    """The estimate of every pass, summed (``requests``, tokens, expected and most cost), and
    shown pass by pass, each with how sure it is: "" (planned), "≤" (an upper bound), "~" (a guess)."""

    def __init__(self, passes: list[tuple[str, Estimate, str]]):
        self.passes = passes
        self.requests = sum(e.requests for _, e, _ in passes)
        self.prompt_tokens = sum(e.prompt_tokens for _, e, _ in passes)
        self.max_completion_tokens = sum(e.max_completion_tokens for _, e, _ in passes)
        self.expected_cost = _total(e.expected_cost for _, e, _ in passes)
        self.max_cost = _total(e.max_cost for _, e, _ in passes)

    def __str__(self) -> str:
        total = Estimate(self.requests, self.prompt_tokens, self.max_completion_tokens, self.expected_cost,
                         self.max_cost)
        parts = "; ".join(f"{name}: {sure}{e.requests:,}" for name, e, sure in self.passes)
        return f"{total} — requests by pass: {parts}"


def _total(values: Iterator[float | None]) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


class StagedProgress:
    """The passes' live counters added up (what the panel and the text line read), plus the
    requests of passes not started yet (``later``: queued, in the total) and the work's own note."""

    _SUMMED = ("queued", "in_flight", "retrying", "done", "cancelled", "skipped", "cached", "requests",
               "rate_limited", "prompt_tokens", "completion_tokens", "cached_prompt_tokens", "usage_estimated")

    def __init__(self, staged: "Staged"):
        self._staged = staged
        self.later = 0
        self.started: float | None = None
        self.finished: float | None = None
        self.own_note: str | None = None
        self._own_error: str | None = None
        self._listeners: list = []

    def _each(self) -> list:
        return [run.progress for run in self._staged.runs]

    def __getattr__(self, name: str) -> Any:
        if name in StagedProgress._SUMMED:
            total = sum(getattr(p, name) for p in self._each())
            return total + self.later if name == "queued" else total
        raise AttributeError(name)

    # A request refused and then made good by a later pass (agg's re-split) is not a failure: its
    # attempt stays in ``requests`` and tokens, but not in ``failed``, ``settled`` or ``total``.

    @property
    def failed(self) -> int:
        return sum(p.failed for p in self._each()) - len(self._staged.resolved)

    @property
    def total(self) -> int:
        return sum(p.total for p in self._each()) + self.later - len(self._staged.resolved)

    @property
    def settled(self) -> int:
        return sum(p.settled for p in self._each()) - len(self._staged.resolved)

    def _current(self) -> Any:
        run = self._staged.current
        return run.progress if run is not None and not run.done() else None

    @property
    def note(self) -> str | None:
        current = self._current()
        notes = [n for n in (self.own_note, current.note if current is not None else None) if n]
        return " · ".join(notes) or None

    @note.setter
    def note(self, value: str | None) -> None:
        self.own_note = value

    @property
    def last_error(self) -> str | None:
        errors = [p.last_error for p in self._each() if p.last_error]
        return self._own_error or (errors[-1] if errors else None)

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self._own_error = value

    @property
    def retried(self) -> dict[str, int]:
        """Retries by cause over every pass (the panel's neutral retries line)."""
        causes: dict[str, int] = {}
        for p in self._each():
            for name, count in p.retried.items():
                causes[name] = causes.get(name, 0) + count
        return causes

    @property
    def last_retry(self) -> str | None:
        retries = [p.last_retry for p in self._each() if p.last_retry]
        return retries[-1] if retries else None

    @property
    def pause(self) -> Any:
        current = self._current()
        return current.pause if current is not None else None

    @property
    def sent_at(self) -> dict:
        current = self._current()
        return current.sent_at if current is not None else {}

    @property
    def limits(self) -> Callable[[], dict] | None:
        current = self._current()
        return current.limits if current is not None else None

    def subscribe(self, listener: Callable[[str, int], None]) -> None:
        self._listeners.append(listener)

    def emit(self, event: str, row: int) -> None:
        for listener in self._listeners:
            listener(event, row)


class Staged:
    """The engine of a ``StagedRun``: plans (``prepare``/``plan``) and runs (``run``) the work's passes."""

    batch = False

    def __init__(self, setup: Any, work: Work, models: tuple[str, ...]):
        self.setup, self.work, self.models = setup, work, models
        self.endpoint = setup.endpoint
        self.runs: list[Run] = []  # the passes started, in order
        self.current: Run | None = None  # the pass in flight
        self.shown: Run | None = None  # the pass the panel's preview shows
        self.resolved: set[tuple[int, Any]] = set()  # (run id, request label): failures a later pass made good
        self.progress = StagedProgress(self)
        self.estimate: PlanEstimate | None = None
        self._planned = False
        self._budget_stop: BudgetExceededError | None = None

    # ---- what Run reads -------------------------------------------------------------------

    @property
    def planned(self) -> bool:
        return self._planned

    @property
    def fatal(self) -> Any:
        return next((run.engine.fatal for run in self.runs if run.engine.fatal is not None), None)

    @property
    def budget_stop(self) -> BudgetExceededError | None:
        found = next((run.engine.budget_stop for run in self.runs if run.engine.budget_stop is not None), None)
        return self._budget_stop or found

    def preview(self) -> Run | None:
        """The pass whose requests and outcomes stand for the run's: none for a per-row work (its own
        are), else the one shown, or the last started."""
        if self.work.prepared is not None:
            return None
        return self.shown or (self.runs[-1] if self.runs else None)

    @property
    def outcomes(self) -> Outcomes:
        run = self.preview()
        if run is not None:
            return run.outcomes
        return self.work.outcomes if self.work.outcomes is not None else Outcomes(0)

    @property
    def schema(self) -> Any:
        return self.work.schema

    @property
    def params(self) -> dict[str, Any]:
        """The first pass's request parameters (what ``meta=True`` shows)."""
        return self.runs[0].engine.params if self.runs else {}

    def abandon(self, reason: str) -> None:
        """Stop every pass still going (each marks its own unsent requests), and settle the work's rows."""
        for run in self.runs:
            if not run.done():
                run.cancel()
        self.work.settle(reason)

    # ---- planning and running --------------------------------------------------------------

    def plan(self) -> PlanEstimate:
        """``prepare`` to the end where no loop runs (a script asked to confirm first)."""
        if not self._planned:
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self.prepare())
            finally:
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()
        return self.estimate

    async def prepare(self) -> PlanEstimate:
        """The work's estimate of every pass, before anything is sent."""
        if not self._planned:
            self.estimate = await self.work.plan(self)
            self.progress.later = self.estimate.requests
            self.progress.own_note = None
            self._planned = True
        return self.estimate

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        if self.progress.started is None:
            self.progress.started = loop.time()
        await self.prepare()
        listed = unlisted.set(True)  # the passes' runs are this run's, not runs of their own
        try:
            await self.work.run(self)
        finally:
            unlisted.reset(listed)
            stop = self.fatal or self.budget_stop
            self.work.settle(f"not sent: the run stopped ({stop})" if stop else "cancelled before an answer arrived")
            self.progress.later = 0
            self.progress.finished = loop.time()
            self.progress.emit("finished", -1)

    # ---- helpers for the work ----------------------------------------------------------------

    def engine(self, prepared: Any, body: dict, *, kind: type[Engine] = Engine, **engine_options: Any) -> Engine:
        """An engine for one pass, with the run's endpoint, limits and cache (its budget is set as it starts)."""
        setup = self.setup
        settings = dataclasses.replace(setup.settings, max_cost=None)
        return kind(setup.endpoint, body, prepared, settings, cache=setup.cache, refresh=setup.refresh,
                    **engine_options)

    def estimate_of(self, model: str, requests: int, prompt_tokens: int, max_completion_tokens: int) -> Estimate:
        """A pass not planned yet, estimated at ``model``'s price at this run's endpoint (a gateway's price
        for its model names, which the name alone may not have)."""
        return estimate(model, requests, prompt_tokens, max_completion_tokens, base_url=self.endpoint.base_url)

    def left(self) -> float | None:
        """USD the budget still allows (None: no max_cost)."""
        budget = self.setup.settings.max_cost
        if budget is None:
            return None
        return max(0.0, budget - sum(run.cost or 0.0 for run in self.runs))

    def start(self, engine: Engine, prepared: Any, label: str, *, run_class: type[Run] = Run) -> Run:
        """Start one pass (a silent child run) on this loop, within what the budget has left (a pass
        whose model has no price is refused under a budget: it could not be kept)."""
        left = self.left()
        if left is not None and engine.price is None:
            raise ConfigError(_unpriced(engine.model))
        engine.settings.max_cost = left
        return run_class(engine, prepared, model=engine.model, label=label, shape=lambda run: None).start(Silent)

    async def follow(self, run: Run, *, shown: bool = False, later: int = 0) -> bool:
        """Wait for a pass; a cancel of this run cancels it (and waits for it to put its rows in
        order). True when it finished with nothing stopping it; ``later``: requests still to come after it."""
        self.runs.append(run)
        self.current = run
        if shown:
            self.shown = run
        self.progress.later = later
        task = run._task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            run.cancel()
            await asyncio.wait({task})
            raise
        run.done()  # closes its books if its done callback has not run yet
        if run._crash is not None:
            raise run._crash
        return run.error is None and run.status == "finished"

    def over_budget(self, what: str) -> bool:
        """Before a pass that must send: stop, saying so, when the budget has nothing left."""
        left = self.left()
        if left is not None and left <= 0:
            self._budget_stop = BudgetExceededError(
                f"stopped at the budget: max_cost={format_usd(self.setup.settings.max_cost)} is spent, so {what} "
                "was not started; run.partial() has what is done, and a rerun with a higher max_cost sends only the rest")
            return True
        return False


class StagedRun(Run):
    """A ``Run`` of several passes (see the module docstring); ``run.passes`` lists them."""

    def __init__(self, staged: Staged, *, shape: Callable[[Run], Any], label: str):
        own = staged.work.prepared
        super().__init__(staged, own if own is not None else Requests([], [], label), model=" → ".join(staged.models),
                         shape=shape, label=label)

    @property
    def prepared(self) -> Any:
        """A per-row work's requests; else those of the pass the preview shows (before any: an empty list)."""
        run = self.engine.preview()
        return run.prepared if run is not None else self._own_prepared

    @prepared.setter
    def prepared(self, value: Any) -> None:
        self._own_prepared = value

    @property
    def passes(self) -> list[Run]:
        """The child run of every pass started so far, in order."""
        return list(self.engine.runs)

    @property
    def cost(self) -> float | None:
        """USD spent so far over every pass, each at its model's price (None if one is unknown)."""
        return _total(run.cost for run in self.engine.runs)

    @property
    def usage(self) -> dict[str, dict[str, int]]:
        """Requests, tokens and answered / cached requests per model, summed over the passes."""
        merged: dict[str, dict[str, int]] = {}
        for run in self.engine.runs:
            for model, figures in run.usage.items():
                into = merged.setdefault(model, dict.fromkeys(figures, 0))
                for key, value in figures.items():
                    into[key] = into.get(key, 0) + value
        return merged

    def model_of(self, request: int) -> str:
        return self.engine.work.model_of(request) or self.model

    @property
    def errors(self) -> Any:
        """A per-row work's rows without an answer; else the requests without one, pass by pass (a ``pass``
        column), less those a later pass made good."""
        import pandas as pd

        if self.engine.work.prepared is not None:
            return super().errors
        frames = []
        for run in self.engine.runs:
            errors = run.errors
            resolved = self.engine.resolved
            errors = errors.iloc[[k for k, label in enumerate(errors.index) if (run.id, label) not in resolved]]
            if len(errors):
                frames.append(errors.assign(**{"pass": run.label}))
        if not frames:
            return pd.DataFrame({"status": [], "error": [], "attempts": [], "pass": []})
        return pd.concat(frames)

    def _record_usage(self) -> None:
        """Nothing: each pass recorded its own."""

    def summary(self) -> str:
        """One line: status, answers (a per-row work's rows, else requests), requests per model, tokens,
        cost, time, and the work's own words."""
        work, p = self.engine.work, self.progress
        if work.prepared is not None:
            o = self.outcomes
            done, total = o.count_status(OK), len(o)
            counts = [("from cache", sum(o.cached))] + [(name, o.count_status(name))
                                                        for name in ("failed", "cancelled", "skipped")]
        else:
            done, total = p.done, p.total
            counts = [("from cache", p.cached), ("failed", p.failed), ("cancelled", p.cancelled), ("skipped", p.skipped)]
        by_model = " + ".join(f"{u['requests']:,} requests to {model}" for model, u in self.usage.items())
        return self._summary_line(done, total, counts, by_model, work.describe())


def _unpriced(model: str) -> str:
    return (f"max_cost cannot be kept: the price of {model!r} is unknown; "
            "set it with nbparrot.set_price(model, input=..., output=...)")


def launch_staged(setup: Any, work: Work, shape: Callable[[Run], Any], label: str, *,
                  models: tuple[str, ...] | None = None, run_class: type[StagedRun] = StagedRun) -> StagedRun:
    """Start a run of ``work``'s passes (sent to ``models``, every model a pass uses, in order; default the
    run's) with the shared options' display and confirmation; ``meta=True`` and ``max_cost`` without a
    price for one of the models refused first."""
    models = tuple(models or (setup.model,))
    if setup.options.get("meta") and work.prepared is None:
        raise ConfigError(f"meta=True is not offered for {label.split(':')[0].split()[0]}: run.passes holds each "
                          "pass's run, with its outcomes (run.passes[i].outcomes, .errors, .usage)")
    if setup.settings.max_cost is not None:
        for model in models:
            if price_of(model, setup.endpoint.base_url) is None:
                raise ConfigError(_unpriced(model))
    run = run_class(Staged(setup, work, models), shape=shape, label=label)
    options = setup.options
    return run.start(make_view if options.get("progress", True) else Silent,
                     ask_over=None if options.get("confirm") else options.get("confirm_over"))
