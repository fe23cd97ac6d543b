"""``filter`` and ``classify``: a decision per row, through structured output, never a guess.

Both are ``map`` with a fixed answer shape. ``filter`` asks for ``{"answer": true|false}`` and
``classify`` for ``{"label": <one of the labels>}`` (``{"labels": [...]}`` with ``multi=True``);
the shape goes as a ``json_schema`` response format (endpoints without it get ``json_object``
and the schema in words, learned on the first request, as ``map`` does). The instruction and
the labels (with their descriptions) go in a system message, so the user message is the
row's own text. An answer that does not fit the shape (not a boolean, a label outside the
set) is re-asked up to ``max_reasks`` times and then fails its row: it never reaches the
result. Everything else is ``map``'s runtime: a ``Run`` at once in a notebook, the panel and
Cancel, the estimate, ``max_cost`` / ``confirm_over``, the cache and resume, ``meta=True``.

``confidence=True`` on ``classify`` also asks for ``logprobs`` and gives the probability the
model put on the chosen label's tokens (None where the endpoint returns no logprobs, which
the panel says once).

``cascade=(cheap, strong)`` on either sends the strong model only a sample and the rows the
cheap one is unsure of (``nbparrot.operators.cascade``); ``filter_request`` / ``classify_request``
give the system prompt and schema of a decision to other operators (joins, scoring's judge).
"""

from __future__ import annotations

import enum
import json
import math
import typing
from typing import Any, Mapping, Sequence

from .. import api
from ..errors import ConfigError
from ..options import BATCH, CHAT, RUN, check_options, takes_options
from ..outcomes import OK
from ..prepare import prepare
from ..results import _meta_columns
from ..run import Run
from ..structured import Schema
from .cascade import check_cascade, launch as launch_cascade

__all__ = ["filter", "classify", "normalize_labels", "value_probability", "filter_request", "classify_request"]

FILTER_INSTRUCTION = ("Decide whether the user's message is true. Reply with only a JSON object: "
                      '{"answer": true} if it is, {"answer": false} if it is not.')


def _system(own: str | None, instruction: str) -> str:
    """The user's system prompt (a template) followed by our instruction (literal text: braces escaped)."""
    literal = instruction.replace("{", "{{").replace("}", "}}")
    return literal if not own else f"{own}\n\n{literal}"


def _decisions(run: Run, field: str) -> list:
    """Each request's decided value (None where the row has no decision)."""
    outcomes = run.outcomes
    values: list = [None] * len(outcomes)
    answered = outcomes.code(OK)
    for chunk in outcomes.parsed.chunks:
        if chunk:
            for k, parsed in chunk.items():
                if outcomes.status[k] == answered and isinstance(parsed, dict):
                    values[k] = parsed.get(field)
    return values


def _by_variant(prepared: Any, values: list, column: Any) -> Any:
    """Several templates (``%%llm --filter`` variants): a frame with one column per template."""
    import pandas as pd

    k = prepared.variants
    return pd.DataFrame({template: column(values[v::k]) for v, template in enumerate(prepared.templates)},
                        index=prepared.index)


def _with_meta(run: Run, frame: Any, rows: list[int]) -> Any:
    import pandas as pd

    return pd.concat([frame, pd.DataFrame(_meta_columns(run, rows), index=frame.index)], axis=1)


class _FilterShape:
    """The rows the model said true of, in input order (or the boolean mask with ``mask=True``)."""

    def __init__(self, mask: bool, meta: bool, name: str):
        self.mask, self.meta, self.name = mask, meta, name

    def __call__(self, run: Run) -> Any:
        import pandas as pd

        decided = _decisions(run, "answer")
        prepared = run.prepared
        if prepared.variants > 1:
            return _by_variant(prepared, decided, lambda values: pd.array(values, dtype="boolean"))
        if self.mask:
            return pd.Series(pd.array(decided, dtype="boolean"), index=prepared.index, name=self.name)
        keep = [k for k, value in enumerate(decided) if value is True]
        if prepared.records is not None:
            return [dict(prepared.records[k]) for k in keep]
        kept = prepared.frame.iloc[keep]
        return _with_meta(run, kept, keep) if self.meta else kept


@takes_options(RUN, CHAT, BATCH)
def filter(data: Any, predicate: str | Sequence[Mapping[str, str]], *, mask: bool = False,  # noqa: A001
           name: str = "keep", cascade: tuple[str, str] | None = None, target: float | None = None,
           cascade_sample: int | None = None, **options: Any) -> Run:
    """Keep the rows for which the model says ``predicate`` (a template, e.g. ``"{text} asks for a refund"``) is true.

    The result is the kept rows (same index and columns, input order); rows without a decision
    (failed, skipped, cancelled) are left out and listed in ``run.errors``. ``mask=True`` gives
    the boolean Series instead (NA where there is no decision), named ``name``.

    cascade: ``(cheap_model, strong_model)``: the cheap model decides every row, the strong one
        a sample and the rows the cheap one is unsure of, so that agreement with the strong
        model meets ``target`` (default 0.9); ``cascade_sample`` rows learn where "unsure" starts.
        ``run.cascade`` reports how it went (see ``nbparrot.operators.cascade``).
    """
    options = check_options(filter, options)
    spec = check_cascade(cascade, target, cascade_sample, options)
    setup = api.resolve(options)
    system, schema = filter_request(setup.system)
    prepared = prepare(data, predicate, system=system, on_missing=options["on_missing"],
                       media=setup.media)
    shape, label = _FilterShape(mask, options["meta"], name), f"filter: {prepared.templates[0]}"
    if spec is not None:
        return launch_cascade(setup, prepared, setup.chat_body(), shape, spec=spec, schema=schema, field="answer",
                              label=label)
    return api.launch(setup, prepared, setup.chat_body(), shape, schema=schema, label=label)


def normalize_labels(labels: Any) -> tuple[list[str], dict[str, str]]:
    """The label names, and their descriptions, from a list, a dict of label -> description, or an Enum.

    Raises ``ConfigError`` for an empty set, duplicates, or labels that are not non-empty strings."""
    descriptions: dict[str, str] = {}
    if isinstance(labels, type) and issubclass(labels, enum.Enum):
        names = [m.value if isinstance(m.value, str) else m.name for m in labels]
    elif isinstance(labels, Mapping):
        names = list(labels)
        for label, text in labels.items():
            if not isinstance(text, str):
                raise ConfigError(f"the description of label {label!r} must be a string, not {type(text).__name__}")
            descriptions[label] = text
    elif isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ConfigError(f"labels must be a list of strings, a dict of label -> description, or an Enum; "
                          f"got {type(labels).__name__}")
    else:
        names = list(labels)
    if not names:
        raise ConfigError("labels is empty: give at least one label")
    bad = [label for label in names if not isinstance(label, str) or not label.strip()]
    if bad:
        raise ConfigError(f"labels must be non-empty strings; got {bad[0]!r}")
    seen: set[str] = set()
    dupes = sorted({label for label in names if label in seen or seen.add(label)})
    if dupes:
        raise ConfigError(f"duplicate label(s): {', '.join(map(repr, dupes))}")
    return names, descriptions


def _classify_instruction(labels: list[str], descriptions: dict[str, str], multi: bool) -> str:
    lines = [f"- {label}: {descriptions[label]}" if label in descriptions else f"- {label}" for label in labels]
    if multi:
        how = ('Classify the user\'s message with every label that applies, from this list:\n' + "\n".join(lines)
               + '\nReply with only a JSON object: {"labels": [<the labels that apply>]}.')
    else:
        how = ('Classify the user\'s message with exactly one label from this list:\n' + "\n".join(lines)
               + '\nReply with only a JSON object: {"label": <the label>}.')
    return how


def value_probability(choice: Mapping[str, Any], field: str) -> float | None:
    """The probability the model gave the value of ``field`` in a JSON answer, from the choice's logprobs.

    The value's characters are found in the answer text, and the logprobs of the tokens that
    cover them are added up: the probability of that exact value, given what came before it.
    None where the endpoint sent no logprobs or the value cannot be found in them."""
    tokens = (choice.get("logprobs") or {}).get("content") or []
    content = (choice.get("message") or {}).get("content")
    if not tokens or not isinstance(content, str):
        return None
    try:
        value = json.loads(content).get(field)
    except (ValueError, AttributeError):
        return None
    text = "".join(t.get("token", "") for t in tokens)
    key = text.find(json.dumps(field))
    needle = json.dumps(value, ensure_ascii=False)
    start = text.find(needle, key + 1 if key >= 0 else 0)
    if key < 0 or start < 0:
        return None
    if isinstance(value, str):  # the quotes are not the decision
        start, end = start + 1, start + len(needle) - 1
    else:
        end = start + len(needle)
    total, offset, covered = 0.0, 0, False
    for token in tokens:
        first, offset = offset, offset + len(token.get("token", ""))
        if offset > start and first < end:
            total += float(token.get("logprob", 0.0))
            covered = True
    return math.exp(total) if covered else None


class _ClassifyShape:
    """A Categorical Series of the labels (lists with ``multi``), or with ``confidence`` a frame."""

    def __init__(self, labels: list[str], multi: bool, confidence: bool, meta: bool, name: str):
        self.labels, self.multi, self.confidence, self.meta, self.name = labels, multi, confidence, meta, name

    def __call__(self, run: Run) -> Any:
        import pandas as pd

        prepared = run.prepared
        decided = _decisions(run, "labels" if self.multi else "label")
        if prepared.variants > 1:
            return _by_variant(prepared, decided, lambda values: values if self.multi
                               else pd.Categorical(values, categories=self.labels))
        index = prepared.index
        if self.multi:
            values: Any = pd.Series(decided, index=index, name=self.name, dtype=object)
        else:
            values = pd.Series(pd.Categorical(decided, categories=self.labels), index=index, name=self.name)
        if prepared.records is not None:
            return [{**record, self.name: value} for record, value in zip(prepared.records, decided)]
        if not (self.confidence or self.meta):
            return values
        frame = values.to_frame()
        if self.confidence:
            outcomes = run.outcomes
            frame["confidence"] = pd.array([outcomes[k].extra if decided[k] is not None else None
                                            for k in range(len(decided))], dtype="Float64")
        return _with_meta(run, frame, list(range(len(decided)))) if self.meta else frame


@takes_options(RUN, CHAT, BATCH)
def classify(data: Any, template: str | Sequence[Mapping[str, str]], labels: Any, *, multi: bool = False,
             confidence: bool = False, name: str = "label", cascade: tuple[str, str] | None = None,
             target: float | None = None, cascade_sample: int | None = None, **options: Any) -> Run:
    """Put every row into one of ``labels`` (a list, a dict of label -> description, or an Enum).

    The result is a pandas Categorical Series whose categories are exactly the labels, NA where
    a row has no answer; ``multi=True`` gives a list of labels per row. An answer outside the
    labels is re-asked, then fails its row. ``confidence=True`` adds a ``confidence`` column: the
    probability of the chosen label from the endpoint's logprobs (None where it returns none).

    cascade: ``(cheap_model, strong_model)`` with ``target`` and ``cascade_sample``, as for
        ``filter``: the strong model labels only a sample and the rows the cheap one is unsure of
        (with ``confidence=True`` those rows have no confidence: the strong model is not asked for it).
    """
    options = check_options(classify, options)
    names, descriptions = normalize_labels(labels)
    if multi and confidence:
        raise ConfigError("confidence=True needs one label per row; it cannot be used with multi=True")
    spec = check_cascade(cascade, target, cascade_sample, options)
    if multi and spec is not None:
        raise ConfigError("cascade= reads the confidence of one label per row; it cannot be used with multi=True")
    setup = api.resolve(options)
    system, schema = classify_request(setup.system, names, descriptions, multi)
    body = setup.chat_body()
    extract = None
    if confidence:
        body["logprobs"] = True  # no top_logprobs: the chosen label's own tokens are all it reads (4x smaller answers)
        extract = _read_confidence
    prepared = prepare(data, template, system=system, on_missing=options["on_missing"],
                       media=setup.media)
    shape = _ClassifyShape(names, multi, confidence, options["meta"], name)
    label = f"classify into {len(names)} labels: {prepared.templates[0]}"
    if spec is not None:
        return launch_cascade(setup, prepared, setup.chat_body(), shape, spec=spec, schema=schema, field="label",
                              label=label)
    return api.launch(setup, prepared, body, shape, schema=schema, extract=extract, label=label)


def filter_request(own_system: str | None) -> tuple[str, Schema]:
    """The system prompt (the user's, then the instruction) and answer schema of a yes/no decision."""
    return _system(own_system, FILTER_INSTRUCTION), Schema({"answer": typing.Annotated[bool, _strict()]})


def classify_request(own_system: str | None, names: list[str], descriptions: dict[str, str],
                     multi: bool = False) -> tuple[str, Schema]:
    """The system prompt and answer schema of a choice among ``names`` (several with ``multi``)."""
    choice = typing.Literal[tuple(names)]  # type: ignore[valid-type]
    schema = Schema({"labels": list[choice]} if multi else {"label": choice})
    return _system(own_system, _classify_instruction(names, descriptions, multi)), schema


def _strict() -> Any:
    import pydantic

    return pydantic.Strict()


NO_LOGPROBS = "the endpoint returns no logprobs: confidence is None"


def _read_confidence(choice: Mapping[str, Any], progress: Any) -> float | None:
    """The chosen label's probability; says once in the panel when the endpoint sends no logprobs."""
    if not choice.get("logprobs") and progress.note is None:
        progress.note = NO_LOGPROBS
    return value_probability(choice, "label")
