"""``agg``: one answer per group of rows, folded level by level when a group does not fit the context.

Level 1 packs each group's rows, in input order, into requests that fit the model's context
(the prompt estimate plus ``max_tokens`` for the answer); every row goes into exactly one of them
and no request mixes groups. Each next level packs a group's answers from the level before the
same way, until one answer per group is left; a group that fits in one request is answered at
level 1. Levels run one after another, each one pass of the shared runtime (``nbparrot.staged``): the
panel says which level is being worked, Cancel stops the level in flight, and ``max_cost`` is
one budget over all of them. A request refused with ``context_length_exceeded`` (the estimate
was short for this tokenizer) is split in two halves and both are sent, at the same level,
down to a single item. The estimate, before anything is sent, gives the requests of level 1 and
an upper bound for each level above it (answers counted at ``max_tokens``); levels found whole
in the cache are planned through, so a rerun is estimated, and sends, 0 requests.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Sequence

from ... import api
from ...errors import ConfigError
from ...options import CHAT, RUN, check_options, takes_options
from ...outcomes import OK
from ...tokens import estimate_prompt_tokens, estimate_text_tokens
from .items import Items, as_frame, items_of, left_out
from ...staged import PlanEstimate, Requests, StagedRun, Work, launch_staged

__all__ = ["agg", "CONTEXT_TOKENS", "context_tokens_of"]

#: Context windows (tokens) of known models; others need ``context_tokens=``.
CONTEXT_TOKENS = {
    "gpt-5": 400_000, "gpt-5-mini": 400_000, "gpt-5-nano": 400_000,
    "gpt-4.1": 1_047_576, "gpt-4.1-mini": 1_047_576, "gpt-4.1-nano": 1_047_576,
    "gpt-4o": 128_000, "gpt-4o-mini": 128_000, "o3": 200_000, "o4-mini": 200_000, "o3-mini": 200_000,
    "gpt-4-turbo": 128_000, "gpt-3.5-turbo": 16_385,
}
_SNAPSHOT = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{4})$")

AGG_SYSTEM = ("You answer one request about a whole set of items at once. Read every item given and reply "
              "with one answer for all of them together.")
ROWS_HEADER = "Items:"
ANSWERS_HEADER = ("Each answer below was given to this request for a different part of the items. Combine them "
                  "into one answer for all the items:")


def context_tokens_of(model: str) -> int | None:
    """The context window of a known model (a dated snapshot falls back to its family), else None."""
    return CONTEXT_TOKENS.get(model) or CONTEXT_TOKENS.get(_SNAPSHOT.sub("", model))


class _Chunk:
    """One request's items (row texts at level 1, answers above), and what became of it."""

    __slots__ = ("group", "texts", "answer", "failed", "halves")

    def __init__(self, group: int, texts: list[str]):
        self.group, self.texts = group, texts
        self.answer: str | None = None
        self.failed = False
        self.halves: list[_Chunk] = []

    def leaves(self) -> list["_Chunk"]:
        return [leaf for half in self.halves for leaf in half.leaves()] if self.halves else [self]


def _exceeded(error: str | None) -> bool:
    text = (error or "").lower()
    return "context_length_exceeded" in text or "maximum context length" in text


class _AggWork(Work):
    """The levels of one ``agg`` run: packing, planning and running them."""

    def __init__(self, setup: Any, groups: list[list[str]], instruction: str, context: int):
        self.setup, self.groups, self.instruction = setup, groups, instruction
        self.body = setup.chat_body()
        self.reply = int(self.body.get("max_tokens") or self.body.get("max_completion_tokens"))
        own = setup.system
        self.system = AGG_SYSTEM if not own else f"{own}\n\n{AGG_SYSTEM}"
        self.fixed = {header: estimate_prompt_tokens(self._messages(header, [])) for header in (ROWS_HEADER, ANSWERS_HEADER)}
        self.room = {header: context - self.reply - fixed for header, fixed in self.fixed.items()}
        self.fit = self.room[ANSWERS_HEADER] // (self.reply + 3)  # answers of max_tokens one request can combine
        if self.fit < 2:
            raise ConfigError(f"a context of {context:,} tokens leaves room for fewer than two answers of "
                              f"max_tokens={self.reply:,} (plus the prompt, ~{self.fixed[ANSWERS_HEADER]:,} tokens) "
                              "to combine; raise context_tokens or lower max_tokens")
        self.answers: list[str | None] = [None] * len(groups)
        self.levels = 0

    def _messages(self, header: str, texts: list[str]) -> list[dict]:
        items = "\n".join(f"{n}. {text}" for n, text in enumerate(texts, 1))
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": f"{self.instruction}\n\n{header}\n{items}"}]

    def _pack(self, group: int, texts: list[str], header: str) -> list[_Chunk]:
        """``texts`` in order, in as few chunks as fit the room (a text too long for any goes alone)."""
        room, chunks, current, used = self.room[header], [], [], 0
        for text in texts:
            cost = estimate_text_tokens(f"{len(current) + 1}. {text}\n")
            if current and used + cost > room:
                chunks.append(_Chunk(group, current))
                current = []
                cost = estimate_text_tokens(f"1. {text}\n")
                used = 0
            current.append(text)
            used += cost
        if current:
            chunks.append(_Chunk(group, current))
        return chunks

    def _level(self, level: int, before: list[list[_Chunk]] | None) -> list[list[_Chunk]]:
        """Each group's chunks at ``level`` (from its rows, or the answers of ``before``); [] when it is done."""
        if before is None:
            return [self._pack(g, texts, ROWS_HEADER) if texts else [] for g, texts in enumerate(self.groups)]
        out = []
        for g, chunks in enumerate(before):
            leaves = [leaf for chunk in chunks for leaf in chunk.leaves()]
            if not leaves:
                out.append([])
            elif any(leaf.answer is None for leaf in leaves):
                out.append([])  # a request of this group failed or was cancelled: no answer for it
            elif len(leaves) == 1:
                self.answers[g] = leaves[0].answer
                out.append([])
            else:
                out.append(self._pack(g, [leaf.answer for leaf in leaves], ANSWERS_HEADER))
        return out

    def _requests(self, level: int, chunks: list[_Chunk]) -> Requests:
        header = ROWS_HEADER if level == 1 else ANSWERS_HEADER
        return Requests([self._messages(header, c.texts) for c in chunks],
                        [f"level {level}, group {c.group + 1}, request {k + 1}" for k, c in enumerate(chunks)],
                        f"agg level {level}")

    def _bound(self, staged: Any, level: int, chunks: list[list[_Chunk]]) -> list[tuple[str, Any, str]]:
        """An upper bound for each level after ``level``: every answer counted at max_tokens."""
        counts = [len(c) for c in chunks]
        passes = []
        while any(n > 1 for n in counts):
            level += 1
            requests = sum(math.ceil(n / self.fit) for n in counts if n > 1)
            answers = sum(n for n in counts if n > 1)
            prompt = requests * self.fixed[ANSWERS_HEADER] + answers * (self.reply + 3)
            passes.append((f"level {level}", staged.estimate_of(self.setup.model, requests, prompt, requests * self.reply), "≤"))
            counts = [math.ceil(n / self.fit) if n > 1 else 0 for n in counts]
        return passes

    async def plan(self, staged: Any) -> PlanEstimate:
        passes: list[tuple[str, Any, str]] = []
        level, before = 1, None
        while True:
            chunks = self._level(level, before)
            flat = [c for group in chunks for c in group]
            if not flat:
                break
            staged.progress.own_note = f"preparing level {level}"
            engine = staged.engine(self._requests(level, flat), self.body)
            e = await engine.prepare()
            passes.append((f"level {level}", e, ""))
            if e.requests:
                passes += self._bound(staged, level, chunks)
                break
            for k, chunk in enumerate(flat):  # found whole in the cache: the next level's texts are known
                chunk.answer = engine.outcomes[k].content
            level, before = level + 1, chunks
        self.answers = [None] * len(self.groups)
        self.levels = sum(1 for _ in passes)
        return PlanEstimate(passes or [("level 1", staged.estimate_of(self.setup.model, 0, 0, 0), "")])

    async def run(self, staged: Any) -> None:
        level, before = 1, None
        while True:
            chunks = self._level(level, before)
            flat = [c for group in chunks for c in group]
            if not flat:
                return
            finished = await self._send(staged, level, flat)
            level, before = level + 1, chunks
            if not finished:
                self._level(level, before)  # the groups whose last request landed still get their answer
                return

    async def _send(self, staged: Any, level: int, chunks: list[_Chunk]) -> bool:
        """One level: its chunks, then the halves of any refused for its length, until none is; False if stopped."""
        todo, attempt = chunks, 0
        while todo:
            staged.progress.own_note = f"level {level} of {'≤' if level < self.levels else ''}{max(level, self.levels)}" + (
                f" (re-split {attempt})" if attempt else "")
            requests = self._requests(level, todo) if not attempt else Requests(
                self._requests(level, todo).messages,
                [f"level {level}, re-split {attempt}, request {k + 1}" for k in range(len(todo))],
                f"agg level {level} (re-split)")
            engine = staged.engine(requests, self.body)
            await engine.prepare()
            if engine.estimate.requests and staged.over_budget(f"level {level}"):
                return False
            later = max(0, staged.estimate.requests - sum(r.progress.total for r in staged.runs) - engine.estimate.requests)
            run = staged.start(engine, requests, requests.templates[0])
            finished = await staged.follow(run, shown=True, later=later)
            again = []
            for k, chunk in enumerate(todo):
                outcome = run.outcomes[k]
                if outcome.status == OK:
                    chunk.answer = outcome.content
                elif len(chunk.texts) > 1 and _exceeded(outcome.error):
                    half = len(chunk.texts) // 2
                    chunk.halves = [_Chunk(chunk.group, chunk.texts[:half]), _Chunk(chunk.group, chunk.texts[half:])]
                    again += chunk.halves
                    staged.resolved.add((run.id, requests.labels[k]))
                else:
                    chunk.failed = True
            if not finished:
                return False
            todo, attempt = again, attempt + 1
        return True


class _AggShape:
    """A Series of one answer per group (indexed by the group keys), or the one answer with ``by=None``."""

    def __init__(self, work: _AggWork, keys: Any, name: str, items: Items):
        self.work, self.keys, self.name, self.items = work, keys, name, items

    def __call__(self, run: StagedRun) -> Any:
        import pandas as pd

        if self.items.skipped and run.done():
            warnings.warn(left_out(self.items), stacklevel=4)
        answers = self.work.answers
        if self.keys is None:
            return answers[0] if answers else None
        return pd.Series(answers, index=self.keys, name=self.name, dtype=object)


@takes_options(RUN, CHAT)
def agg(data: Any, template: str, *, by: str | Sequence[str] | None = None, context_tokens: int | None = None,
        name: str = "answer", **options: Any) -> StagedRun:
    """Reduce many rows to one answer per group: ``template`` is the request (e.g. ``"What do these
    {review}s complain about?"``), and its ``{fields}`` name the columns each row contributes.

    In the request the fields read as their column names; each row is one numbered item (its one
    field's value, or ``field: value | ...``). A group larger than the context is folded: its rows
    packed into requests that fit, their answers combined, level by level, until one is left.
    The result is a Series indexed by the group keys (``by``: a column or a list of columns; rows
    whose key is missing form their own group), or the single answer (a str) with ``by=None``;
    None where a group's requests failed or were cancelled (see ``run.errors``).

    by: the column(s) to group by; None: all rows together.
    context_tokens: the model's context window; default from a table of known models
        (``nbparrot.operators.table.agg.CONTEXT_TOKENS``), required for others.
    name: the name of the result Series.
    """
    options = check_options(agg, options)
    frame = as_frame(data)
    items = items_of(frame, template, options["on_missing"])
    by_list = [by] if isinstance(by, str) else list(by) if by is not None else []
    missing = [b for b in by_list if b not in frame.columns]
    if missing or (by is not None and not by_list):
        raise ConfigError(f"by={by!r} names no column of the data ({', '.join(map(repr, missing)) or 'empty'}); "
                          f"columns: {', '.join(map(str, frame.columns[:40]))}")
    setup = api.resolve(options)
    setup.text_only("agg")
    context = context_tokens if context_tokens is not None else context_tokens_of(setup.model)
    if context is None:
        raise ConfigError(f"the context window of {setup.model!r} is not known: pass context_tokens= "
                          "(e.g. context_tokens=128_000)")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ConfigError(f"context_tokens must be a positive integer, not {context!r}")
    if by_list:
        grouper = frame.groupby(by_list if len(by_list) > 1 else by_list[0], sort=True, dropna=False)
        numbers, keys = grouper.ngroup().tolist(), grouper.size().index
    else:
        numbers, keys = [0] * len(frame), None
    groups: list[list[str]] = [[] for _ in range(len(keys) if keys is not None else 1)]
    for group, text in zip(numbers, items.texts):
        if text is not None:
            groups[group].append(text)
    work = _AggWork(setup, groups, items.instruction, context)
    label = f"agg: {template}" + (f" by {', '.join(map(str, by_list))}" if by_list else "")
    return launch_staged(setup, work, _AggShape(work, keys, name, items), label)
