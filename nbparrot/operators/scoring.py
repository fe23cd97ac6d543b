"""Score prompt variants against a labelled column: accuracy, cost and latency per variant.

``compare(df, [variant1, variant2], expect="label", sample=K)`` -- and ``%%llm --over df --sample K
--expect label`` with ``---`` lines between the variants -- runs every variant over the same rows
and scores each answer against the row's value in the ``expect`` column:

* ``task="filter"`` / ``"classify"``: exact match of the decision. Expected values are read as
  booleans (True / False, yes / no, 1 / 0) or as one of the labels (any case); anything else is a
  ``ConfigError`` before any request.
* ``task="map"`` (free text): a judge, the same yes/no decision ``filter`` makes, on the same
  runtime (cache, budget, panel): ``judge`` is its template, with the fields ``{answer}``,
  ``{expected}`` and ``{prompt}`` (default ``JUDGE``), sent to ``judge_model`` (default the
  variants' model). ``judge=False`` scores by exact match of the stripped, case-folded text.

Rows without an expected value are left out before anything is sent. It is one ``Run`` (a
``ScoredRun``; with a judge in two passes, the variants then the judge, see
``nbparrot.staged``); once it is done ``run.scores`` has one row per variant (its template,
accuracy, correct answers of scored rows, rows answered, answers from the cache, cost of the others
(as ``run.cost``: a cached answer costs nothing), mean latency, and the judge's cost, likewise), and ``run.result()`` the rows -- the ones where the
variants' answers differ first -- with the expected value, each variant's answer and whether it is
right. ``scores_html(run)`` renders both (what ``%%llm --expect`` shows). An answer missing
(failed, cancelled) counts as wrong: accuracy is over every scored row.
"""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

from .. import api
from ..engine import Engine
from ..errors import ConfigError
from ..options import CHAT, RUN, check_options, takes_options
from ..outcomes import OK, Outcomes
from ..prepare import prepare
from ..pricing import format_usd
from ..staged import PlanEstimate, Staged, StagedRun, Work, launch_staged
from ..templates import Template
from .decisions import classify_request, filter_request, normalize_labels

__all__ = ["compare", "ScoredRun", "scores_html", "JUDGE", "TASKS"]

TASKS = ("map", "filter", "classify")
JUDGE = ("Does the answer give the same information as the expected answer?\n"
         "Answer: {answer}\nExpected answer: {expected}")
_TRUE, _FALSE = {"true", "yes", "y", "t", "1"}, {"false", "no", "n", "f", "0"}


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().casefold()
        return True if word in _TRUE else False if word in _FALSE else None
    return None


def _expected(values: list, task: str, labels: list[str] | None) -> list:
    """The expected values as the task decides them; ``ConfigError`` naming values that cannot be."""
    if task == "filter":
        out = [_as_bool(v) for v in values]
        bad = [v for v, b in zip(values, out) if b is None]
        what = "true/false (or yes/no, 1/0)"
    elif task == "classify":
        lookup = {label.casefold(): label for label in labels}
        out = [lookup.get(v.strip().casefold()) if isinstance(v, str) else None for v in values]
        bad = [v for v, b in zip(values, out) if b is None]
        what = f"one of the labels {labels}"
    else:
        return [str(v) for v in values]
    if bad:
        raise ConfigError(f"expect: {len(bad)} expected value(s) are not {what}, e.g. {bad[0]!r}")
    return out


def _same_text(a: Any, b: Any) -> bool:
    return isinstance(a, str) and a.strip().casefold() == str(b).strip().casefold()


class ScoringWork(Work):
    """The variants' pass, then the judge's (free text); the run's outcomes are the variants' answers."""

    def __init__(self, prepared: Any, body: Mapping[str, Any], schema: Any, task: str, field: str | None,
                 expected: list, judge: str | None, judge_body: Mapping[str, Any] | None, judge_system: str | None,
                 judge_schema: Any):
        self.prepared, self.body, self.schema, self.task, self.field = prepared, body, schema, task, field
        self.expected, self.judge, self.judge_body = expected, judge, judge_body
        self.judge_system, self.judge_schema = judge_system, judge_schema
        self.outcomes = Outcomes(len(prepared))  # until ``plan`` makes the variants' pass: then its own
        self.answers: Engine | None = None  # the variants' pass
        self.judging: Engine | None = None  # the judge's pass, once started
        self.judged: list[int] = []  # judge request j -> the variant request it judges
        self.model = str(body["model"])

    def _judge_engine(self, staged: Staged) -> Engine:
        """The judge's pass over the variants' text answers so far."""
        outcomes, prepared, k = self.answers.outcomes, self.prepared, self.prepared.variants
        self.judged = [r for r in outcomes.rows_with(OK) if isinstance(outcomes[r].content, str)]
        records = [{"answer": outcomes[r].content, "expected": self.expected[r // k],
                    "prompt": prepared.user_text(r) or ""} for r in self.judged]
        source = prepare(records, self.judge, system=self.judge_system)
        return staged.engine(source, self.judge_body, schema=self.judge_schema)

    async def plan(self, staged: Staged) -> PlanEstimate:
        """The variants as planned; the judge planned through the cache when they are found whole
        there, else at most one request per answer."""
        staged.progress.own_note = "preparing the variants"
        self.answers = staged.engine(self.prepared, self.body, schema=self.schema)
        self.outcomes = self.answers.outcomes
        first = await self.answers.prepare()
        passes = [("variants", first, "")]
        if self.judge is not None and not first.requests:
            passes.append(("judge", await self._judge_engine(staged).prepare(), ""))
        elif self.judge is not None:
            n = len(self.prepared)
            reply = first.max_completion_tokens // max(1, first.requests)
            most = int(self.judge_body.get("max_tokens") or self.judge_body.get("max_completion_tokens") or 0)
            passes.append(("judge", staged.estimate_of(str(self.judge_body["model"]), n,
                                             n * (first.prompt_tokens // max(1, first.requests) + reply), n * most), "≤"))
        return PlanEstimate(passes)

    async def run(self, staged: Staged) -> None:
        k = self.prepared.variants
        staged.progress.own_note = f"scoring: {k} variant(s) on {self.prepared.rows:,} rows"
        run = staged.start(self.answers, self.prepared, "scoring: the variants")
        later = len(self.prepared) if self.judge is not None else 0
        if not await staged.follow(run, shown=True, later=later) or self.judge is None:
            return
        judge = self._judge_engine(staged)
        await judge.prepare()
        if judge.estimate.requests and staged.over_budget("the judge"):
            return
        staged.progress.own_note = f"scoring: the judge on {len(self.judged):,} answers"
        self.judging = judge
        await staged.follow(staged.start(judge, judge.source, "scoring: the judge"))

    def model_of(self, request: int) -> str:
        return self.model

    # ---- scores ---------------------------------------------------------------------

    def answer(self, outcome: Any) -> Any:
        if outcome.status != OK:
            return None
        if self.field is None:
            return outcome.content
        parsed = outcome.parsed
        return parsed.get(self.field) if isinstance(parsed, dict) else None

    def verdicts(self) -> list:
        """Per variant request: right (True), wrong (False), or None when there is no answer or verdict."""
        if self.answers is None:
            return []
        outcomes, k = self.answers.outcomes, self.prepared.variants
        values = [self.answer(outcomes[r]) for r in range(len(outcomes))]
        if self.judge is None:
            same = _same_text if self.task == "map" else (lambda a, b: a == b)
            return [None if v is None else same(v, self.expected[r // k]) for r, v in enumerate(values)]
        out: list = [None] * len(values)
        if self.judging is not None:
            judge = self.judging.outcomes
            for j, r in enumerate(self.judged):
                parsed = judge[j].parsed if judge[j].status == OK else None
                if isinstance(parsed, dict):
                    out[r] = parsed.get("answer")
        return out


class ScoredRun(StagedRun):
    """The ``Run`` of ``compare``: ``scores`` per variant once it is done, ``result()`` the rows."""

    @property
    def scores(self) -> Any:
        """One row per variant: template, accuracy, correct, scored, answered, cached (answers from the cache),
        cost (of the answers not from the cache, as ``run.cost``), mean latency, judge cost (likewise)."""
        import pandas as pd

        plan: ScoringWork = self.engine.work
        outcomes, k = self.outcomes, self.prepared.variants
        verdicts = plan.verdicts()
        judge_costs = [0.0] * k
        if plan.judging is not None:
            judge = plan.judging
            for j, r in enumerate(plan.judged):
                o = judge.outcomes[j]
                if o.cached:
                    continue
                usd = judge.usd(o.prompt_tokens, o.completion_tokens, o.cached_tokens)
                judge_costs[r % k] = None if usd is None or judge_costs[r % k] is None else judge_costs[r % k] + usd
        rows = []
        for v in range(k):
            requests = range(v, len(outcomes), k)
            costs = [plan.answers.usd(outcomes[r].prompt_tokens, outcomes[r].completion_tokens, outcomes[r].cached_tokens)
                     for r in requests if outcomes[r].status == OK and not outcomes[r].cached]
            latencies = [outcomes[r].latency for r in requests if outcomes[r].latency is not None]
            correct = sum(1 for r in requests if verdicts and verdicts[r] is True)
            scored = len(requests)
            rows.append({"template": self.prepared.templates[v], "accuracy": correct / scored if scored else math.nan,
                         "correct": correct, "scored": scored,
                         "answered": sum(1 for r in requests if outcomes[r].status == OK),
                         "cached": sum(1 for r in requests if outcomes[r].status == OK and outcomes[r].cached),
                         "cost": None if any(c is None for c in costs) else sum(costs),
                         "mean_latency": sum(latencies) / len(latencies) if latencies else None,
                         "judge_cost": judge_costs[v] if plan.judge is not None else None})
        return pd.DataFrame(rows, index=pd.RangeIndex(1, k + 1, name="variant"))


class _RowsShape:
    """The scored rows, those where the variants' answers differ first: expected, answer and right per variant."""

    def __call__(self, run: ScoredRun) -> Any:
        import pandas as pd

        plan: ScoringWork = run.engine.work
        prepared, k = run.prepared, run.prepared.variants
        outcomes, verdicts = run.outcomes, plan.verdicts()
        columns: dict[str, list] = {"expected": list(plan.expected)}
        answers = [[plan.answer(outcomes[r * k + v]) for v in range(k)] for r in range(prepared.rows)]
        for v in range(k):
            columns[f"answer {v + 1}"] = [row[v] for row in answers]
            columns[f"right {v + 1}"] = pd.array([verdicts[r * k + v] if verdicts else None
                                                  for r in range(prepared.rows)], dtype="boolean")
        key = lambda a: a.strip().casefold() if isinstance(a, str) else a  # noqa: E731
        columns["disagree"] = [len({repr(key(a)) for a in row}) > 1 for row in answers]
        frame = pd.DataFrame(columns, index=prepared.index)
        return frame.sort_values("disagree", ascending=False, kind="stable")


@takes_options(RUN, CHAT)
def compare(data: Any, variants: str | Sequence[str], *, expect: str, task: str = "map", labels: Any = None,
            sample: int | None = None, judge: str | bool | None = None, judge_model: str | None = None,
            **options: Any) -> ScoredRun:
    """Run each prompt variant over ``data`` and score it against the column ``expect``; see the module docs.

    task: "map" (free text, scored by a judge), "filter" or "classify" (``labels``), scored by exact match.
    sample: only this many rows (a fixed random sample), after rows without an expected value are dropped.
    judge: the judge's template ({answer}, {expected}, {prompt}); False: exact match of the text.
    judge_model: the model that judges (default: the variants' model).
    """
    import pandas as pd

    options = check_options(compare, options)
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, not {task!r}")
    if not isinstance(data, pd.DataFrame):
        raise ConfigError(f"compare scores a DataFrame's rows, not a {type(data).__name__}")
    if expect not in data.columns:
        raise ConfigError(f"expect={expect!r}: no such column (columns: {', '.join(map(str, data.columns))})")
    templates = [variants] if isinstance(variants, str) else list(variants)
    if not templates or not all(isinstance(t, str) and t.strip() for t in templates):
        raise ConfigError("variants must be one or more non-empty template strings")
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, int) or sample < 1):
        raise ConfigError(f"sample must be a positive number of rows, not {sample!r}")
    names = descriptions = None
    if task == "classify":
        if labels is None:
            raise ConfigError("task='classify' needs labels=")
        names, descriptions = normalize_labels(labels)
    elif labels is not None:
        raise ConfigError("labels= goes with task='classify'")
    if task != "map" and judge not in (None, False):
        raise ConfigError("a judge scores free text (task='map'); filter and classify are scored by exact match")
    judge_template = (JUDGE if judge in (None, True) else judge) if task == "map" and judge is not False else None
    if judge_template is not None:
        if not isinstance(judge_template, str):
            raise ConfigError(f"judge must be a template string, True or False, not {type(judge).__name__}")
        Template(judge_template).check(["answer", "expected", "prompt"], what="judge's fields")
    frame = data[data[expect].notna()]
    if sample is not None and sample < len(frame):
        frame = frame.sample(n=sample, random_state=0).sort_index(kind="stable")
    expected = _expected(frame[expect].tolist(), task, names)
    setup = api.resolve(options)
    if task == "filter":
        system, schema = filter_request(setup.system)
    elif task == "classify":
        system, schema = classify_request(setup.system, names, descriptions)
    else:
        system, schema = setup.system, None
    prepared = prepare(frame, templates if len(templates) > 1 else templates[0], system=system,
                       on_missing=options["on_missing"], media=setup.media)
    body = setup.chat_body()
    judge_body = judge_system = judge_schema = None
    if judge_template is not None:
        judge_body = {**body, "model": judge_model or setup.model}
        judge_body.pop("temperature", None)
        judge_system, judge_schema = filter_request(None)
    field = {"filter": "answer", "classify": "label"}.get(task)
    work = ScoringWork(prepared, body, schema, task, field, expected, judge_template, judge_body, judge_system,
                       judge_schema)
    models = (setup.model,) if judge_body is None or judge_body["model"] == setup.model \
        else (setup.model, judge_body["model"])
    return launch_staged(setup, work, _RowsShape(), f"scoring {len(templates)} variant(s) against {expect!r}",
                         models=models, run_class=ScoredRun)


def scores_html(run: ScoredRun, width: int = 120) -> str:
    """The per-variant scores and the rows (disagreements first, ✓ / ✗ per answer), as HTML."""
    import pandas as pd

    cut = lambda t: html.escape(str(t) if len(str(t)) <= width else str(t)[: width - 1] + "…")  # noqa: E731
    scores = run.scores
    head = "".join(f"<th style='text-align:left'>{h}</th>" for h in
                   ("variant", "prompt", "accuracy", "correct", "answered", "cost", "mean latency"))
    lines = []
    for v, s in scores.iterrows():
        latency = f"{s['mean_latency']:.2f}s" if s["mean_latency"] is not None and s["mean_latency"] == s["mean_latency"] else "–"
        cost = "cached" if s["answered"] and s["cached"] == s["answered"] and not s["cost"] else format_usd(s["cost"])
        cost += f" + judge {format_usd(s['judge_cost'])}" if run.engine.work.judge else ""
        lines.append(f"<tr><td>{v}</td><td style='text-align:left'><code>{cut(s['template'])}</code></td>"
                     f"<td><b>{s['accuracy']:.0%}</b></td><td>{s['correct']}/{s['scored']}</td>"
                     f"<td>{s['answered']}</td><td>{cost}</td><td>{latency}</td></tr>")
    table = f"<table class='nbparrot-scores'><tr>{head}</tr>{''.join(lines)}</table>"
    rows = run.partial()
    k = len(scores)
    head = "<th></th><th style='text-align:left'>expected</th>" + "".join(
        f"<th style='text-align:left'>variant {v + 1}</th>" for v in range(k))
    body = []
    for label, row in rows.iterrows():
        cells = []
        for v in range(k):
            right = row[f"right {v + 1}"]
            mark = "·" if right is None or right is pd.NA else "✓" if right else "✗"
            answer = row[f"answer {v + 1}"]
            cells.append(f"<td style='text-align:left;vertical-align:top'>{mark} {cut('' if answer is None else answer)}</td>")
        flag = " class='nbparrot-disagree'" if row["disagree"] else ""
        body.append(f"<tr{flag}><th>{html.escape(str(label))}</th><td style='text-align:left'>{cut(row['expected'])}</td>"
                    f"{''.join(cells)}</tr>")
    return (table + f"<table class='nbparrot-scored-rows' style='margin-top:4px'><tr>{head}</tr>"
            f"{''.join(body)}</table>")
