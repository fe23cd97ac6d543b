"""Results in the input's own shape: a Series, a DataFrame of fields, tidy long rows, or dicts.

- A DataFrame in, plain answers out: a Series on the DataFrame's index, named.
- ``schema`` fields become columns, in nullable dtypes (``boolean``, ``Int64``, text); a one-field
  schema gives that field's values as a Series named after it; ``meta=True`` adds provenance columns (rendered prompt,
  template, model, params, finish_reason, tokens, cost, latency, attempts, cached, error).
- ``n > 1`` gives a list per row; ``dedupe`` drops repeated answers keeping first-seen order;
  ``explode`` gives one row per choice (a ``choice`` column) and, for list schemas, one row
  per item. When rows multiply (``explode``, several templates) the input's columns come along,
  so each output row stands on its own; the index repeats the input's labels.
- A list of dicts in: the same dicts (copied) with the answer or its fields added.
Rows without an answer are NA (None) here; ``Run.errors`` says why.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .engine import OK
from .pricing import cost_of

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

__all__ = ["Shape", "shape"]

META_COLUMNS = ("prompt", "template", "model", "params", "finish_reason", "prompt_tokens", "completion_tokens",
                "cost", "latency", "attempts", "cached", "error")


class Shape:
    """How a run's answers are laid out; ``nbparrot.map`` and ``df.llm.map`` build one per run."""

    __slots__ = ("name", "explode", "dedupe", "meta")

    def __init__(self, name: str = "answer", *, explode: bool = False, dedupe: bool = False, meta: bool = False):
        self.name, self.explode, self.dedupe, self.meta = name, explode, dedupe, meta

    def __call__(self, run: "Run") -> Any:
        return shape(run, self)


def _dedupe(values: list) -> tuple[list, list[int]]:
    seen: set[str] = set()
    kept, positions = [], []
    for k, value in enumerate(values):
        key = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            kept.append(value)
            positions.append(k)
    return kept, positions


def _answer_of(run: "Run", outcome: Any) -> Any:
    if outcome.status != OK:
        return None
    schema = run.engine.schema
    if schema is None:
        return outcome.content
    parsed = outcome.parsed
    if len(schema.fields) == 1 and isinstance(parsed, dict):  # a one-field schema: that field's value
        return parsed.get(schema.fields[0])
    return parsed


def _answers(run: "Run") -> list:
    """Every request's answer (None where there is none), read from the outcome columns at once."""
    outcomes = run.outcomes
    column = outcomes.parsed if run.engine.schema is not None else outcomes.content
    status, answered = outcomes.status, outcomes.code(OK)
    values: list = [None] * len(outcomes)
    for chunk in column.chunks:
        if chunk:
            for k, value in chunk.items():
                if status[k] == answered:
                    values[k] = value
    return values


def shape(run: "Run", layout: Shape) -> Any:
    """Lay the run's outcomes out as ``layout`` says (see the module docstring)."""
    prepared, schema, n = run.prepared, run.engine.schema, run.engine._n
    records_in = prepared.records is not None
    multiplies = layout.explode or prepared.variants > 1
    fields = schema.fields if schema is not None else None
    out_rows: list[int] = []  # input row of each output row
    out_requests: list[int] = []  # request of each output row
    choice_of: list[int | None] = []
    item_of: list[int | None] = []
    values: list[Any] = []
    answers = _answers(run)
    if n == 1 and not layout.explode:  # one output row per request: no per-row loop
        values, out_requests = answers, list(range(len(answers)))
        out_rows = out_requests if prepared.variants == 1 else [prepared.row_of(k) for k in out_requests]
        answers = []
    for k, value in enumerate(answers):
        choices: list[tuple[int | None, Any]]
        if n > 1 and value is not None:
            kept, positions = _dedupe(value) if layout.dedupe else (value, list(range(len(value))))
            choices = list(zip(positions, kept)) if layout.explode else [(None, kept)]
        else:
            choices = [(None, value)]
        for choice, v in choices:
            items: list[tuple[int | None, Any]] = [(None, v)]
            if layout.explode and schema is not None and schema.is_list and v is not None:
                items = list(enumerate(v)) or [(None, None)]
            for item, iv in items:
                out_rows.append(prepared.row_of(k))
                out_requests.append(k)
                choice_of.append(choice)
                item_of.append(item)
                values.append(iv)

    columns: dict[str, list] = {}
    if prepared.variants > 1:
        columns["template"] = [prepared.template_of(k) for k in out_requests]
    if layout.explode and n > 1:
        columns["choice"] = choice_of
    if layout.explode and schema is not None and schema.is_list:
        columns["item"] = item_of
    one_object_each = fields is not None and (layout.explode if (schema.is_list or n > 1) else True)
    if one_object_each:
        for f in fields:
            columns[f] = [v.get(f) if isinstance(v, dict) else None for v in values]
    else:
        columns[layout.name] = values
    if layout.meta:
        columns.update(_meta_columns(run, out_requests))

    if records_in:
        records = prepared.records
        return [{**records[r], **{c: col[j] for c, col in columns.items()}} for j, r in enumerate(out_rows)]

    import pandas as pd

    index = prepared.index.take(out_rows)
    if one_object_each:  # fields in nullable dtypes: a row without an answer is NA, the dtype stays
        for f, dtype in schema.dtypes().items():
            columns[f] = _typed(columns[f], dtype)
    if not multiplies and not layout.meta and len(columns) == 1:
        # plain answers, or a one-field schema's values (named after the field), as one Series
        (column, column_values), = columns.items()
        return pd.Series(column_values, index=index, name=column)
    frame = pd.DataFrame(columns, index=index)
    if multiplies:
        inputs = prepared.frame.take(out_rows)
        inputs.index = index
        frame = pd.concat([inputs.drop(columns=[c for c in inputs.columns if c in frame.columns]), frame], axis=1)
    return frame


def _typed(values: list, dtype: Any) -> Any:
    """``values`` as a pandas array of ``dtype``; the plain list when that does not fit (or for ``object``)."""
    if dtype is object:
        return values
    import pandas as pd

    try:
        return pd.array(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        return values


def _meta_columns(run: "Run", requests: list[int]) -> dict[str, list]:
    prepared, outcomes = run.prepared, run.outcomes
    batch, base_url = run.engine.batch, run.engine.endpoint.base_url  # priced once per model (pricing.price_of)
    params = json.dumps({k: v for k, v in run.engine.params.items() if k != "response_format"}, sort_keys=True)
    meta: dict[str, list] = {c: [] for c in META_COLUMNS}
    for k in requests:
        o, model = outcomes[k], run.model_of(k)
        meta["prompt"].append(prepared.user_text(k))
        meta["template"].append(prepared.template_of(k))
        meta["model"].append(model)
        meta["params"].append(params)
        meta["finish_reason"].append(o.finish_reason)
        meta["prompt_tokens"].append(o.prompt_tokens)
        meta["completion_tokens"].append(o.completion_tokens)
        meta["cost"].append(0.0 if o.cached else cost_of(model, o.prompt_tokens, o.completion_tokens, o.cached_tokens,
                                                         batch=batch, base_url=base_url))
        meta["latency"].append(o.latency)
        meta["attempts"].append(o.attempts)
        meta["cached"].append(o.cached)
        meta["error"].append(o.error)
    return meta


class ColumnSink:
    """Writes each answer into ``frame[column]`` soon after it lands (pending rows stay NA).

    Answers are collected as they arrive and written in one vectorised assignment at most
    every ``interval`` seconds and once more when the run ends, so a cancelled run leaves
    every finished answer in place without a pandas write per request on the hot path.
    """

    interval = 0.2

    def __init__(self, run: "Run", frame: Any, column: str):
        self.run, self.frame, self.column = run, frame, column
        self._landed: list[int] = []
        self._timer = None

    def begin(self) -> None:
        """Set up the column once the run is sure to start: rows already answered (from the
        cache, when planning is done) filled in, the others NA; then follow the answers as they
        land, cached ones included when planning settles them after the start."""
        import numpy as np

        outcomes = self.run.outcomes
        values = np.empty(len(outcomes), dtype=object)  # all None
        for k in outcomes.rows_with(OK):  # from the cache, when planning settled them before the start
            values[k] = _answer_of(self.run, outcomes[k])
        self.frame[self.column] = values
        self.run.progress.subscribe(self._on_event)

    def _on_event(self, event: str, row: int) -> None:
        if event == "done":
            self._landed.append(row)
            if self._timer is None:
                self._timer = self.run._loop.call_later(self.interval, self.flush)
        elif event == "finished":
            self.flush()

    def flush(self) -> None:
        """Write what has landed since the last flush."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        landed, self._landed = self._landed, []
        if not landed:
            return
        outcomes = self.run.outcomes
        position = self.frame.columns.get_loc(self.column)
        self.frame.iloc[landed, position] = _objects([_answer_of(self.run, outcomes[k]) for k in landed])


def _objects(values: list) -> Any:
    """A 1-d object array of ``values`` (lists and dicts stay whole, one per cell)."""
    import numpy as np

    array = np.empty(len(values), dtype=object)
    for k, value in enumerate(values):
        array[k] = value
    return array
