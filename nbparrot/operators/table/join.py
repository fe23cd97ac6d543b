"""``join``: the pairs of a left and a right row for which the model says a predicate holds.

The predicate is a template over both tables: ``{left.col}`` and ``{right.col}`` name a column of
either side (a bare ``{col}`` is allowed where only one side has that column). Each pair is one
request, the one ``nbparrot.filter`` sends, over a frame of the pairs' used columns: N x M requests,
all planned for the estimate before anything is sent (and sent as planned), under ``confirm_over``
and ``max_cost``. ``filter``'s own options are forwarded: with ``cascade=`` the pairs go through
``filter`` itself (its cascade is a staged run of its own).

``candidates=k`` first embeds both sides (the texts the predicate names, or ``embed_on``) and
keeps, for each left row, its k most similar right rows (``nbparrot.sim_join``'s engine and
``nearest``): N x k requests instead of N x M. Its estimate plans the embedding pass and counts
N x k pair requests at the average prompt of a sample of pairs (exact once the vectors are cached).
"""

from __future__ import annotations

import inspect
import string
import typing
from types import SimpleNamespace
from typing import Any

import numpy as np

from ... import api
from ...engine import Engine
from ...errors import ConfigError, TemplateError
from ...options import CHAT, RUN, check_options, takes_options
from ...prepare import prepare
from ...structured import Schema
from .. import decisions
from ..embeddings.engine import DEFAULT_MODEL, MAX_INPUTS, EmbedEngine
from ..embeddings.inputs import Inputs, texts_of
from ..embeddings.join import _joined
from ..embeddings.query import _frame_corpus
from ..embeddings.vectors import EmbedRun, _params
from ..similarity import nearest
from .items import as_frame
from ...staged import PlanEstimate, StagedRun, Work, launch_staged

__all__ = ["join", "MAX_PAIRS"]

MAX_PAIRS = 5_000_000  # pairs a join without candidates= may ask about (their frame is built in memory)
SAMPLE_PAIRS = 1000  # pairs whose prompts are measured for the candidates estimate


def pair_template(predicate: Any, left: Any, right: Any) -> tuple[str, list[tuple[str, str, Any]]]:
    """The predicate with each ``{left.col}`` / ``{right.col}`` (or unambiguous ``{col}``) replaced by a
    plain field of the pairs' frame, and those fields: ``(field, side, column)``."""
    if not isinstance(predicate, str):
        raise TemplateError(f"the join predicate must be a string template, not {type(predicate).__name__}")
    columns = {"left": {str(c): c for c in left.columns}, "right": {str(c): c for c in right.columns}}
    try:
        parsed = list(string.Formatter().parse(predicate))
    except ValueError as exc:
        raise TemplateError(f"cannot read template {predicate!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
    out, fields, named = [], [], {}
    for literal, field, spec, conversion in parsed:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if spec or conversion:
            raise TemplateError(f"template {predicate!r}: {{{field}}} has a format spec or conversion; "
                                "only {left.column} / {right.column} fields are allowed")
        side, dot, column = field.partition(".")
        if not dot:
            sides = [s for s in ("left", "right") if field in columns[s]]
            if len(sides) != 1:
                where = "both tables have it" if sides else "neither table has it"
                raise TemplateError(f"template {predicate!r}: {{{field}}} is ambiguous or unknown ({where}); write "
                                    f"{{left.{field}}} or {{right.{field}}}")
            side, column = sides[0], field
        elif side not in ("left", "right") or not column:
            raise TemplateError(f"template {predicate!r}: {{{field}}} must be {{left.column}} or {{right.column}}")
        if column not in columns[side]:
            names = ", ".join(list(columns[side])[:40]) or "(none)"
            raise TemplateError(f"template {predicate!r} uses {{{field}}}, but the {side} table has no column "
                                f"{column!r}; its columns: {names}")
        key = (side, column)
        if key not in named:
            named[key] = f"{side[0]}{len(named)}"
            fields.append((named[key], side, columns[side][column]))
        out.append("{" + named[key] + "}")
    sides = {side for _, side, _ in fields}
    if "right" not in sides:
        raise ConfigError(f"the join predicate {predicate!r} names no right-hand column: write {{right.column}} "
                          "for the right table's values (and {left.column} for the left's)")
    if "left" not in sides:
        raise ConfigError(f"the join predicate {predicate!r} names no left-hand column: write {{left.column}}")
    return "".join(out), fields


def _pairs_frame(left: Any, right: Any, fields: list, lpos: np.ndarray, rpos: np.ndarray) -> Any:
    import pandas as pd

    data = {}
    for name, side, column in fields:
        frame, positions = (left, lpos) if side == "left" else (right, rpos)
        data[name] = frame[column].to_numpy(dtype=object)[positions]
    return pd.DataFrame(data, index=pd.RangeIndex(len(lpos)))


class _JoinWork(Work):
    """The passes of one ``join``: (embeddings,) then the pairs through ``filter``."""

    def __init__(self, setup: Any, left: Any, right: Any, predicate: str, template: str, fields: list,
                 forward: dict, candidates: int | None, embed: dict):
        self.predicate = predicate
        self.setup, self.left, self.right, self.template, self.fields = setup, left, right, template, fields
        self.forward, self.candidates, self.embed = forward, candidates, embed
        self.lpos = self.rpos = np.zeros(0, dtype=np.int64)
        self.similarity: np.ndarray | None = None
        self.embedder: EmbedEngine | None = None
        self.pairs: Engine | None = None  # the pairs' engine as planned (sent as it is, unless a cascade decides them)
        self.decided: Any = None  # the pairs pass's run

    def _all_pairs(self) -> None:
        n, m = len(self.left), len(self.right)
        self.lpos, self.rpos = np.repeat(np.arange(n), m), np.tile(np.arange(m), n)

    def _filter_engine(self, staged: Any, frame: Any) -> Engine:
        """An engine of exactly the requests ``filter`` sends for ``frame`` (to plan and estimate them)."""
        setup = self.setup
        prepared = prepare(frame, self.template, system=decisions._system(setup.system, decisions.FILTER_INSTRUCTION),
                           on_missing=setup.options["on_missing"], media=setup.media)
        schema = Schema({"answer": typing.Annotated[bool, decisions._strict()]})
        return staged.engine(prepared, setup.chat_body(), schema=schema)

    def _nearest(self, engine: EmbedEngine, inputs: Inputs) -> None:
        holder = SimpleNamespace(engine=engine)
        left_rows, left, _ = _frame_corpus(holder, inputs.span("left"))
        right_rows, right, _ = _frame_corpus(holder, inputs.span("right"))
        if len(left_rows) and len(right_rows):
            found, scores = nearest(left, right, self.candidates, normalized=True)
        else:
            found = np.zeros((len(left_rows), 0), dtype=np.int64)
            scores = np.zeros((len(left_rows), 0), dtype=np.float32)
        keep = found >= 0
        self.lpos = np.repeat(left_rows, keep.sum(axis=1))
        self.rpos = right_rows[found[keep]]
        self.similarity = scores[keep].astype(np.float64)

    def _inputs(self) -> Inputs:
        on_missing = self.setup.options["on_missing"]
        left_on, right_on = self.embed["on"]
        return Inputs([("left", texts_of(self.left, left_on, on_missing=on_missing, what="embed_on")),
                       ("right", texts_of(self.right, right_on, on_missing=on_missing, what="embed_on"))])

    async def plan(self, staged: Any) -> PlanEstimate:
        passes = []
        if self.candidates is None:
            self._all_pairs()
        else:
            staged.progress.own_note = "preparing the embeddings"
            inputs = self._inputs()
            self.embedder = staged.engine(inputs, _params(self.embed["model"], self.embed["dimensions"]),
                                          kind=EmbedEngine, per_request=MAX_INPUTS)
            vectors = await self.embedder.prepare()
            passes.append(("embeddings", vectors, ""))
            if vectors.requests:  # the pairs are not known yet: N x k, at the prompts of a sample
                n = len(self.left) * min(self.candidates, len(self.right))
                take = min(SAMPLE_PAIRS, n)
                if take:
                    picks = np.arange(take)
                    sample = _pairs_frame(self.left, self.right, self.fields, picks % len(self.left),
                                          (picks * 7919) % len(self.right))
                    engine = self._filter_engine(staged, sample)
                    engine.cache = None
                    e = await engine.prepare()
                    per, reply = e.prompt_tokens / max(1, e.requests), e.max_completion_tokens / max(1, e.requests)
                else:
                    per = reply = 0
                passes.append(("pairs", staged.estimate_of(self.setup.model, n, int(per * n), int(reply * n)), "≤"))
                return PlanEstimate(passes)
            self._nearest(self.embedder, inputs)
        staged.progress.own_note = f"preparing {len(self.lpos):,} pairs"
        self.pairs = self._filter_engine(staged, _pairs_frame(self.left, self.right, self.fields, self.lpos, self.rpos))
        passes.append(("pairs", await self.pairs.prepare(), ""))
        return PlanEstimate(passes)

    async def run(self, staged: Any) -> None:
        if self.embedder is not None:
            inputs = self.embedder.source
            staged.progress.own_note = "embedding both tables"
            run = staged.start(self.embedder, inputs, "join: embeddings", run_class=EmbedRun)
            if not await staged.follow(run, later=len(self.left) * self.candidates):
                return
            self._nearest(self.embedder, inputs)
        left = staged.left()
        if left is not None and left <= 0 and staged.over_budget("the pairs"):
            return
        staged.progress.own_note = f"{len(self.lpos):,} pairs"
        label = f"join pairs: {self.predicate}"
        if self.forward.get("cascade"):  # filter's cascade decides the pairs: a staged run of its own
            frame = _pairs_frame(self.left, self.right, self.fields, self.lpos, self.rpos)
            options = {**self.forward, "progress": False, "confirm": True, "confirm_over": None, "max_cost": left}
            self.decided = decisions.filter(frame, self.template, mask=True, **options)
            self.decided.label = label
        else:  # the engine planned with the estimate (the pairs known after the embeddings: planned now)
            engine = self.pairs or self._filter_engine(
                staged, _pairs_frame(self.left, self.right, self.fields, self.lpos, self.rpos))
            self.decided = staged.start(engine, engine.source, label)
        await staged.follow(self.decided, shown=True)


class _JoinShape:
    """The matching pairs: left columns, right columns (clashes suffixed), ``similarity`` with candidates."""

    def __init__(self, work: _JoinWork, suffixes: tuple[str, str]):
        self.work, self.suffixes = work, suffixes

    def __call__(self, run: StagedRun) -> Any:
        work = self.work
        decided = work.decided
        if decided is not None:
            keep = np.fromiter((value is True for value in decisions._decisions(decided, "answer")), dtype=bool)
        else:
            keep = np.zeros(0, dtype=bool)
        lpos, rpos = work.lpos[: len(keep)][keep], work.rpos[: len(keep)][keep]
        similarity = work.similarity[: len(keep)][keep] if work.similarity is not None else np.zeros(len(lpos))
        out = _joined(work.left, work.right, lpos, rpos, similarity, self.suffixes)
        return out if work.similarity is not None else out.drop(columns="similarity")


def _filter_keywords() -> set[str]:
    """What ``filter`` takes besides its data, predicate and the shared options (join forwards them)."""
    own = set(inspect.signature(decisions.filter).parameters) - {"data", "predicate", "mask", "name"}
    return own - set(getattr(decisions.filter, "__nbparrot_options__", ()))


@takes_options(RUN, CHAT)
def join(left: Any, right: Any, predicate: str, *, candidates: int | None = None, embed_on: Any = None,
         embed_model: str = DEFAULT_MODEL, dimensions: int | None = None,
         suffixes: tuple[str, str] = ("_left", "_right"), **options: Any) -> StagedRun:
    """The pairs of a ``left`` row and a ``right`` row for which the model says ``predicate`` is true.

    ``predicate`` names the two tables' columns as ``{left.col}`` and ``{right.col}`` (a bare
    ``{col}`` where only one table has it), e.g. ``"{left.title} is a paper that {right.claim}
    cites"``; it must name a column of each. Every pair is one ``filter`` request (a yes/no by
    structured output; every option of ``filter`` is forwarded): N x M requests, shown in the
    estimate before any is sent, under ``confirm_over`` and ``max_cost``. The result is a DataFrame
    of the left columns and the right columns (names on both sides get ``suffixes``), left rows in
    input order, a fresh RangeIndex; pairs without a decision are left out (``run.errors``).

    candidates: first keep, for each left row, its k most similar right rows by embeddings (then
        N x k requests, and a ``similarity`` column, each left row's pairs most similar first).
    embed_on: ``(left, right)`` columns or templates to embed; default the columns the predicate
        names on each side, joined by spaces.
    embed_model, dimensions: the embedding model for ``candidates`` (as ``sim_join``'s ``model``).
    suffixes: added to column names found on both sides.
    """
    extra = _filter_keywords()
    shared = {key: value for key, value in options.items() if key not in extra}
    checked = check_options(join, shared)
    forward = {**shared, **{key: value for key, value in options.items() if key in extra}}
    left_frame, right_frame = as_frame(left, "left"), as_frame(right, "right")
    template, fields = pair_template(predicate, left_frame, right_frame)
    if not (isinstance(suffixes, (tuple, list)) and len(suffixes) == 2 and all(isinstance(s, str) for s in suffixes)
            and suffixes[0] != suffixes[1]):
        raise ConfigError(f"suffixes must be two different strings, not {suffixes!r}")
    setup = api.resolve(checked)
    embed = {}
    if candidates is not None:
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ConfigError(f"candidates must be a positive integer (right rows per left row), not {candidates!r}")
        if embed_on is None:
            embed_on = tuple(" ".join("{" + str(column) + "}" for _, s, column in fields if s == side)
                             for side in ("left", "right"))
            embed_on = tuple(on[1:-1] if on.count("{") == 1 and on[1:-1] in frame.columns else on
                             for on, frame in zip(embed_on, (left_frame, right_frame)))
        if not (isinstance(embed_on, (tuple, list)) and len(embed_on) == 2):
            raise ConfigError(f"embed_on must be (left, right): two columns or templates, not {embed_on!r}")
        embed = {"on": tuple(embed_on), "model": embed_model, "dimensions": dimensions}
        texts_of(left_frame, embed_on[0], what="embed_on")  # unknown columns: refused now
        texts_of(right_frame, embed_on[1], what="embed_on")
    elif len(left_frame) * len(right_frame) > MAX_PAIRS:
        raise ConfigError(f"{len(left_frame):,} x {len(right_frame):,} = {len(left_frame) * len(right_frame):,} pairs is "
                          f"more than a join asks about without candidates= (at most {MAX_PAIRS:,}); pass "
                          "candidates=k to ask only about each left row's k most similar right rows")
    work = _JoinWork(setup, left_frame, right_frame, predicate, template, fields, forward, candidates, embed)
    models = (embed_model,) if candidates is not None else ()  # every model a pass uses: each priced under max_cost
    models += tuple(forward["cascade"]) if forward.get("cascade") else (setup.model,)
    return launch_staged(setup, work, _JoinShape(work, tuple(suffixes)), f"join: {predicate}", models=models)
