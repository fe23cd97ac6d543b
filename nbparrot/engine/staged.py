"""A run in stages: engines one after another under one ``Run`` (one task, one panel, one budget).

Some operators choose what to send next from what came back: a cascade (the cheap model on every
row, the strong one on a sample, then on the rows the cheap one was unsure of), a multi-level
aggregation (chunk answers reduced again). ``StagedEngine`` stands where an ``Engine`` does for
``Run``, the panel and the result shapes; each stage is a plain ``Engine`` over its own requests,
so pacing, retries, re-asks, the cache and the first-request probe work in every stage unchanged.

The operator gives a *plan* (see ``StagePlan``):

* ``first(staged) -> Stage``: the first stage, made with ``staged.stage(...)``. It is planned
  before anything is sent (cache lookups, its estimate), as a plain run is.
* ``estimate(staged) -> Estimate``: the whole run's estimate, the later stages' share included
  (``confirm_over`` and the panel's estimate line use it).
* ``next(staged, done) -> Stage | None``: after stage ``done`` finished, the next one built from
  the answers so far, or None when nothing is left to send.
* ``settle(staged, reason)``: fill ``staged.outcomes`` (what the Run, its shape and ``errors``
  read) from the stages' outcomes, every row without a final outcome given CANCELLED with
  ``reason`` when one is given. Called after every stage and once at the end (then with a
  reason, also after a Cancel, a budget stop or a fatal error): it must be idempotent.
* ``model_of(request) -> str`` (the model behind a final outcome, for ``meta=True``) and
  ``describe() -> str`` (one line for the run's summary, "" for none).

What the stages share: one ``Progress``, counting *requests* (its total grows as stages are
added), so the panel, Cancel and ``await`` span the run; ``max_cost``, each stage getting what
the earlier ones left; the cache. Usage and cost are kept per stage, priced at the stage's model
(``StagedRun`` in ``nbparrot.run`` reports them per model).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any, Mapping, Protocol

from ..config import Endpoint
from ..outcomes import Outcomes
from ..pricing import Estimate
from .core import Engine
from .progress import Progress
from .settings import EngineSettings

__all__ = ["Stage", "StagedEngine", "StagePlan"]


class StagePlan(Protocol):
    """What a staged operator provides (see the module docstring)."""

    def first(self, staged: "StagedEngine") -> "Stage": ...
    def estimate(self, staged: "StagedEngine") -> Estimate: ...
    def next(self, staged: "StagedEngine", done: "Stage") -> "Stage | None": ...
    def settle(self, staged: "StagedEngine", reason: str | None) -> None: ...
    def model_of(self, request: int) -> str: ...
    def describe(self) -> str: ...


class Stage:
    """One stage: its name (shown in the panel), its engine, and its share of the shared counters."""

    def __init__(self, name: str, engine: Engine):
        self.name, self.engine, self.model = name, engine, engine.model
        self._start: tuple[int, int, int] | None = None  # (requests, prompt, completion) of the progress at its start
        self._end: tuple[int, int, int] | None = None

    def usage(self, progress: Progress) -> tuple[int, int, int]:
        """Requests, prompt and completion tokens this stage has sent so far."""
        if self._start is None:
            return 0, 0, 0
        end = self._end or (progress.requests, progress.prompt_tokens, progress.completion_tokens)
        return tuple(b - a for a, b in zip(self._start, end))  # type: ignore[return-value]

    def cost(self, progress: Progress) -> float | None:
        _, prompt, completion = self.usage(progress)
        return self.engine.usd(prompt, completion)  # at the stage's endpoint's price


class StagedEngine:
    """Engine-shaped front of a staged run (see the module docstring)."""

    batch = False

    def __init__(self, endpoint: Endpoint, settings: EngineSettings, plan: StagePlan, outcomes: Outcomes, *,
                 schema: Any = None, cache: Any = None, refresh: bool = False):
        self.endpoint, self.settings, self.planner, self.outcomes = endpoint, settings, plan, outcomes
        self.schema, self.cache, self._refresh = schema, cache, refresh
        self.progress = Progress(0)
        self.stages: list[Stage] = []
        self.current: Stage | None = None
        self.estimate: Estimate | None = None
        self.params: dict[str, Any] = {}
        self.models: tuple[str, ...] = ()  # the stages' models, for the run's title

    # ---- what the plan calls ------------------------------------------------------------

    def stage(self, name: str, params: Mapping[str, Any], source: Any, **engine_options: Any) -> Stage:
        """A new stage over ``source`` (a ``Prepared``-like object), sharing the progress, the cache
        and what is left of ``max_cost``; ``engine_options`` go to its ``Engine`` (``schema``
        defaults to the run's, ``extract``)."""
        n = len(source)
        progress = self.progress
        progress.total += n
        progress.queued += n
        settings = self.settings
        if settings.max_cost is not None:
            spent = sum(stage.cost(progress) or 0.0 for stage in self.stages)
            settings = replace(settings, max_cost=max(settings.max_cost - spent, 0.0))
        engine_options.setdefault("schema", self.schema)
        engine = Engine(self.endpoint, params, source, settings, progress=progress, cache=self.cache,
                        refresh=self._refresh, **engine_options)
        stage = Stage(name, engine)
        if not self.stages:
            self.params = engine.params
        self.stages.append(stage)
        return stage

    # ---- what Run calls -----------------------------------------------------------------

    @property
    def planned(self) -> bool:
        return self.estimate is not None

    def _first(self) -> Stage:
        return self.stages[0] if self.stages else self.planner.first(self)

    def plan(self) -> Estimate:
        """The first stage planned here, synchronously, and the whole run's estimate."""
        if self.estimate is None:
            self._first().engine.plan()
            self.estimate = self.planner.estimate(self)
        return self.estimate

    async def prepare(self) -> Estimate:
        """``plan`` on the running loop, in slices (the first stage's ``prepare``)."""
        if self.estimate is None:
            await self._first().engine.prepare()
            self.estimate = self.planner.estimate(self)
        return self.estimate

    async def run(self) -> Outcomes:
        """Each stage in turn until the plan has none left, or one stops (Cancel, budget, fatal)."""
        loop = asyncio.get_running_loop()
        progress = self.progress
        if progress.started is None:
            progress.started = loop.time()
        await self.prepare()
        stage: Stage | None = self.stages[0]
        reason: str | None = "cancelled before an answer arrived"
        try:
            while stage is not None:
                self.current = stage
                progress.finished = None
                stage._start = (progress.requests, progress.prompt_tokens, progress.completion_tokens)
                await stage.engine.prepare()  # its cache lookups (the planning's own note shows meanwhile)
                progress.note = stage.name
                await stage.engine.run()
                stage._end = (progress.requests, progress.prompt_tokens, progress.completion_tokens)
                engine = stage.engine
                if engine.fatal is not None or engine.budget_stop is not None:
                    reason = f"not sent: the run stopped ({engine.fatal or engine.budget_stop})"
                    break
                self.planner.settle(self, None)
                stage = self.planner.next(self, stage)
            else:
                reason = None  # every stage done: the plan has settled every row
            progress.note = None
        finally:
            current = self.current
            if current is not None and current._start is not None and current._end is None:
                current._end = (progress.requests, progress.prompt_tokens, progress.completion_tokens)
            self.planner.settle(self, reason)
            progress.finished = loop.time()
        return self.outcomes

    def abandon(self, reason: str) -> None:
        """Every row without a final outcome gets CANCELLED with ``reason`` (nothing left pending)."""
        for stage in self.stages:
            stage.engine.abandon(reason)
        self.planner.settle(self, reason)

    @property
    def fatal(self) -> Any:
        return next((s.engine.fatal for s in self.stages if s.engine.fatal is not None), None)

    @property
    def budget_stop(self) -> Any:
        return next((s.engine.budget_stop for s in self.stages if s.engine.budget_stop is not None), None)
