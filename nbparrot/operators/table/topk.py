"""``topk``: the k best rows by a criterion, best first: a scored pass, then a partial quicksort of the
rows tied around the cut, by pairwise comparisons.

1. **Scoring**: every row once, ``{"score": 0..100}`` by structured output (N requests).
2. **Ordering what the scores leave open**: rows are ranked by score; each run of equal scores is
   a block whose inner order is unknown. Every block that reaches into the first k places is
   split around a pivot (its middle row): each other row of the block is compared with it,
   ``{"better": "A" | "B"}``, all blocks' comparisons in one pass; the rows that beat the pivot
   go before it, the rest after. Blocks that fall wholly past place k are dropped. Passes repeat
   until every block in the first k places is one row.

Requests: N + the comparisons. A block of b rows costs b - 1 comparisons per split, so selecting
the top of a block of m tied rows and ordering it costs about 2m + 1.4 k log2 k comparisons in
expectation (quickselect plus quicksort), in about log2 m + log2 k passes: linear in the rows,
never all pairs. With a 0-100 score, ties at the cut are few: 200 rows, k = 5 cost 200 scores
and a handful of comparisons on the bundled server (``bench/table_ops.py``); if every row got
the same score it would be about 2N + 1.4 k log2 k. A comparison that fails counts the row as
not better than the pivot (the failure is in ``run.errors``).
"""

from __future__ import annotations

import math
import typing
import warnings
from typing import Any

from ... import api
from ...errors import ConfigError
from ...options import CHAT, RUN, check_options, takes_options
from ...outcomes import OK
from ...structured import Schema
from ...tokens import estimate_prompt_tokens
from .items import as_frame, items_of, left_out
from ...staged import PlanEstimate, Requests, StagedRun, Work, launch_staged

__all__ = ["topk"]

SCORE_SYSTEM = ("Rate how well the user's message meets this criterion, from 0 (not at all) to 100 (fully): {}\n"
                'Reply with only a JSON object: {{"score": <an integer from 0 to 100>}}.')
COMPARE_SYSTEM = ("The user's message holds two items, A and B. Which one meets this criterion better: {}\n"
                  'Reply with only a JSON object: {{"better": "A"}} or {{"better": "B"}}.')


def _score_schema() -> Schema:
    import pydantic

    return Schema({"score": typing.Annotated[int, pydantic.Field(ge=0, le=100)]})


def _compare_schema() -> Schema:
    return Schema({"better": typing.Literal["A", "B"]})


class _TopkWork(Work):
    """The passes of one ``topk`` run: scores, then comparison rounds."""

    def __init__(self, setup: Any, frame: Any, texts: list[str | None], instruction: str, k: int):
        self.setup, self.frame, self.texts, self.k = setup, frame, texts, k
        own = setup.system
        self.score_system = SCORE_SYSTEM.format(instruction)
        self.compare_system = COMPARE_SYSTEM.format(instruction)
        if own:
            self.score_system, self.compare_system = f"{own}\n\n{self.score_system}", f"{own}\n\n{self.compare_system}"
        self.body = setup.chat_body()
        self.rows = [r for r, t in enumerate(texts) if t is not None]
        self.scores: dict[int, int] = {}
        self.blocks: list[list[int]] = []  # the ranking so far: blocks of rows in rank order
        self.failed_compares = 0

    def _score_requests(self) -> Requests:
        labels = self.frame.index[self.rows].tolist()
        return Requests([[{"role": "system", "content": self.score_system},
                          {"role": "user", "content": self.texts[r]}] for r in self.rows], labels, "topk scores")

    def _compare_requests(self, pairs: list[tuple[int, int]], round_: int) -> Requests:
        return Requests([[{"role": "system", "content": self.compare_system},
                          {"role": "user", "content": f"A: {self.texts[a]}\n\nB: {self.texts[b]}"}] for a, b in pairs],
                        [f"round {round_}: {a} vs {b}" for a, b in pairs], f"topk round {round_}")

    def _guess(self) -> int:
        """Comparisons to expect before the scores are known (a guess: ties at the cut are usually few)."""
        k, n = self.k, len(self.rows)
        return min(n * (n - 1) // 2, 2 * k + math.ceil(k * math.log2(k + 1)))

    async def plan(self, staged: Any) -> PlanEstimate:
        staged.progress.own_note = "preparing the scores"
        engine = staged.engine(self._score_requests(), self.body, schema=_score_schema())
        scores = await engine.prepare()
        passes = [("scores", scores, "")]
        round_ = 0
        if not scores.requests:  # found whole in the cache: plan the comparison rounds through it too
            self._scored(engine.outcomes)
            while (splits := self._open()):
                round_ += 1
                pairs = self._pairs(splits)
                engine = staged.engine(self._compare_requests(pairs, round_), self.body, schema=_compare_schema())
                found = await engine.prepare()
                if found.requests:
                    break
                self._split(splits, pairs, engine.outcomes)
            else:
                passes.append(("comparisons", staged.estimate_of(self.setup.model, 0, 0, 0), ""))
        if len(passes) == 1:
            guess = self._guess()
            per = estimate_prompt_tokens(self._compare_requests([(self.rows[0], self.rows[-1])], 0).messages[0]) \
                if self.rows else 0
            reply = self.body.get("max_tokens") or self.body.get("max_completion_tokens") or 0
            passes.append(("comparisons", staged.estimate_of(self.setup.model, guess, guess * per, guess * reply), "~"))
        self.scores, self.blocks, self.failed_compares = {}, [], 0
        return PlanEstimate(passes)

    async def run(self, staged: Any) -> None:
        requests = self._score_requests()
        engine = staged.engine(requests, self.body, schema=_score_schema())
        staged.progress.own_note = "scoring every row"
        run = staged.start(engine, requests, "topk scores")
        finished = await staged.follow(run, shown=True, later=self._guess())
        self._scored(run.outcomes)
        round_ = 0
        while finished and (splits := self._open()):
            round_ += 1
            pairs = self._pairs(splits)
            requests = self._compare_requests(pairs, round_)
            engine = staged.engine(requests, self.body, schema=_compare_schema())
            await engine.prepare()
            if engine.estimate.requests and staged.over_budget(f"comparison round {round_}"):
                return
            staged.progress.own_note = f"comparison round {round_}: {len(splits)} block(s) tied at the cut"
            run = staged.start(engine, requests, f"topk round {round_}")
            finished = await staged.follow(run, later=self._guess() // 2)
            if finished:  # else the blocks stay as they were: the ranking known before this round
                self._split(splits, pairs, run.outcomes)

    def _scored(self, outcomes: Any) -> None:
        """The scores from the scoring pass, and the first blocks: rows of equal score, best first."""
        for k, row in enumerate(self.rows):
            outcome = outcomes[k]
            if outcome.status == OK and isinstance(outcome.parsed, dict):
                self.scores[row] = int(outcome.parsed["score"])
        for row in sorted(self.scores, key=lambda r: -self.scores[r]):  # stable: ties keep input order
            if self.blocks and self.scores[self.blocks[-1][0]] == self.scores[row]:
                self.blocks[-1].append(row)
            else:
                self.blocks.append([row])
        self._cut()

    @staticmethod
    def _pairs(splits: list[tuple[list[int], int]]) -> list[tuple[int, int]]:
        return [(row, pivot) for block, pivot in splits for row in block if row != pivot]

    def _split(self, splits: list[tuple[list[int], int]], pairs: list[tuple[int, int]], outcomes: Any) -> None:
        """Each split block becomes the rows that beat its pivot, the pivot, and the rest."""
        better = set()
        for k, (row, _) in enumerate(pairs):
            outcome = outcomes[k]
            if outcome.status == OK and isinstance(outcome.parsed, dict):
                if outcome.parsed.get("better") == "A":
                    better.add(row)
            else:
                self.failed_compares += 1
        pivots = {id(block): pivot for block, pivot in splits}
        blocks = []
        for block in self.blocks:
            pivot = pivots.get(id(block))
            if pivot is None:
                blocks.append(block)
                continue
            above = [r for r in block if r != pivot and r in better]
            below = [r for r in block if r != pivot and r not in better]
            blocks += [b for b in (above, [pivot], below) if b]
        self.blocks = blocks
        self._cut()

    def _open(self) -> list[tuple[list[int], int]]:
        """The blocks of two or more rows that reach into the first k places, each with its pivot."""
        out, start = [], 0
        for block in self.blocks:
            if start >= self.k:
                break
            if len(block) > 1:
                out.append((block, block[len(block) // 2]))
            start += len(block)
        return out

    def _cut(self) -> None:
        """Drop the blocks wholly past place k."""
        kept, start = [], 0
        for block in self.blocks:
            if start >= self.k:
                break
            kept.append(block)
            start += len(block)
        self.blocks = kept

    def ranking(self) -> list[int]:
        return [row for block in self.blocks for row in block][: self.k]


class _TopkShape:
    """The k best rows (all columns, the input's index), best first, with ``score`` and ``rank``."""

    def __init__(self, work: _TopkWork, items: Any):
        self.work, self.items = work, items

    def __call__(self, run: StagedRun) -> Any:
        work = self.work
        rows = work.ranking()
        if run.done():
            if self.items.skipped:
                warnings.warn(left_out(self.items), stacklevel=4)
            if len(rows) < work.k and run.status == "finished":
                warnings.warn(f"only {len(rows)} row(s) got a score (see run.errors): fewer than k={work.k}",
                              stacklevel=4)
            if work.failed_compares:
                warnings.warn(f"{work.failed_compares} comparison(s) failed (see run.errors); the order of the "
                              "rows they involved may be off", stacklevel=4)
        out = work.frame.take(rows)
        out = out.assign(score=[work.scores[r] for r in rows], rank=list(range(1, len(rows) + 1)))
        return out


@takes_options(RUN, CHAT)
def topk(data: Any, criterion: str, k: int, **options: Any) -> StagedRun:
    """The ``k`` rows that best meet ``criterion`` (a template: its ``{fields}`` name the columns each row
    shows, e.g. ``"the most urgent {ticket}"``), best first.

    Every row is scored once (0-100, structured output); the rows tied around the cut are then
    ordered by pairwise comparisons, a few at a time (see ``nbparrot.operators.table.topk``): the
    requests grow linearly with the rows, never with their pairs. The result is a DataFrame of the
    k rows (all columns, the input's index) with ``score`` (the model's 0-100) and ``rank`` (1 =
    best). Rows with a missing value are left out (``on_missing``); rows whose score failed too
    (``run.errors``).

    k: how many rows (1 to the number of rows).
    """
    options = check_options(topk, options)
    frame = as_frame(data)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be a positive integer, not {k!r}")
    if k > len(frame):
        raise ConfigError(f"k={k} is more than the {len(frame)} row(s) there are")
    items = items_of(frame, criterion, options["on_missing"])
    setup = api.resolve(options)
    setup.text_only("topk")
    work = _TopkWork(setup, frame, items.texts, items.instruction, k)
    return launch_staged(setup, work, _TopkShape(work, items), f"topk {k}: {criterion}")
