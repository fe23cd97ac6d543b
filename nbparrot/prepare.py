"""From data and a template to one chat request per row, checked before anything is sent.

``prepare`` accepts a pandas DataFrame or a list of dicts, and a template that is a string
(the user message), a list of ``{"role", "content"}`` messages whose contents are templates
(few-shot prompts), or a list of strings: several templates, each rendered for every row
(one request per row x template, row by row). Every field is checked against the data's columns first, so a
typo costs nothing. Rows with a missing value (None, NaN, NA) in a field the template uses
are skipped and marked by default (``on_missing="skip"``); ``"empty"`` renders them as empty
text and ``"error"`` refuses the whole batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import ConfigError, TemplateError
from .templates import Template, is_missing

__all__ = ["Prepared", "prepare", "MISSING_POLICIES"]

MISSING_POLICIES = ("skip", "empty", "error")


@dataclass
class Prepared:
    """The requests of a batch and what is needed to give results back in the input's shape."""

    prompts: list[list[dict] | None]  # messages per request; None = skipped
    skip_reasons: dict[int, str] = field(default_factory=dict)
    frame: Any = None  # the input DataFrame, when it was one
    records: Sequence[Mapping] | None = None  # the input dicts, when they were
    templates: list[str] = field(default_factory=list)  # template texts; several = one request per row x template

    @property
    def variants(self) -> int:
        return max(1, len(self.templates))

    def row_of(self, request: int) -> int:
        """The input row a request was rendered from."""
        return request // self.variants

    def template_of(self, request: int) -> str:
        """The template text a request was rendered from (messages as JSON)."""
        return self.templates[request % self.variants] if self.templates else ""

    @property
    def index(self) -> Any:
        """Input row labels: the DataFrame's index, or positions for a list of dicts."""
        if self.frame is not None:
            return self.frame.index
        import pandas as pd

        return pd.RangeIndex(len(self.prompts) // self.variants)

    @property
    def request_index(self) -> Any:
        """One label per request: the input labels, repeated when there are several templates."""
        index = self.index
        return index if self.variants == 1 else index.repeat(self.variants)

    def user_text(self, row: int) -> str | None:
        """The rendered last user message of a row (for previews)."""
        prompt = self.prompts[row]
        if prompt is None:
            return None
        for message in reversed(prompt):
            if message.get("role") == "user":
                return message.get("content")
        return prompt[-1].get("content")


def _variants(template: Any, system: str | None) -> list[list[tuple[str, Template]]]:
    """One message-template list per template variant."""
    if (isinstance(template, Sequence) and not isinstance(template, str) and template
            and all(isinstance(t, str) for t in template)):
        return [_message_templates(t, system) for t in template]
    return [_message_templates(template, system)]


def _message_templates(template: str | Sequence[Mapping[str, str]], system: str | None) -> list[tuple[str, Template]]:
    if isinstance(template, str):
        messages: list[tuple[str, Template]] = [("user", Template(template))]
    elif isinstance(template, Sequence) and template and all(isinstance(m, Mapping) for m in template):
        messages = []
        for k, message in enumerate(template):
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant", "developer") or not isinstance(content, str):
                raise TemplateError(f"message {k} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {dict(message)!r}")
            messages.append((role, Template(content)))
    else:
        raise TemplateError("template must be a string, a list of strings (several templates), "
                            "or a non-empty list of {'role', 'content'} messages")
    if system is not None:
        if not isinstance(system, str):
            raise TemplateError(f"system must be a string, not {type(system).__name__}")
        messages.insert(0, ("system", Template(system)))
    return messages


def prepare(data: Any, template: str | Sequence[Mapping[str, str]], *, system: str | None = None,
            on_missing: str = "skip") -> Prepared:
    """Render every row's messages; raises ``TemplateError``/``ConfigError`` before any request."""
    if on_missing not in MISSING_POLICIES:
        raise ConfigError(f"on_missing must be one of {', '.join(MISSING_POLICIES)}, not {on_missing!r}")
    variants = _variants(template, system)
    messages = [m for variant in variants for m in variant]
    fields = list(dict.fromkeys(f for _, t in messages for f in t.fields))
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        if not data.columns.is_unique:
            dupes = sorted({str(c) for c in data.columns[data.columns.duplicated()]})
            raise ConfigError(f"the DataFrame has duplicate column names: {', '.join(dupes)}")
        names = [str(c) for c in data.columns]
        for _, t in messages:
            t.check(names)
        by_name = {str(c): c for c in data.columns}
        n = len(data)
        columns = {f: data[by_name[f]].tolist() for f in fields}
        missing = {f: data[by_name[f]].isna().tolist() for f in fields}
        prepared = Prepared(prompts=[], frame=data)
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)
        bad = next((k for k, r in enumerate(rows) if not isinstance(r, Mapping)), None)
        if bad is not None:
            raise ConfigError(f"data must be a DataFrame or a list of dicts; item {bad} is a {type(rows[bad]).__name__}")
        n = len(rows)
        for f in fields:
            lacking = [k for k, r in enumerate(rows) if f not in r]
            if lacking:
                where = ", ".join(map(str, lacking[:5])) + (" ..." if len(lacking) > 5 else "")
                keys = sorted({str(key) for r in rows for key in r})
                raise TemplateError(f"template field {{{f}}} is missing from {len(lacking)} record(s) (at {where}); keys present: {', '.join(keys)}")
        columns = {f: [r[f] for r in rows] for f in fields}
        missing = {f: [is_missing(v) for v in columns[f]] for f in fields}
        prepared = Prepared(prompts=[], records=rows)
    else:
        raise ConfigError(f"data must be a pandas DataFrame or a list of dicts, not {type(data).__name__}")

    if fields and on_missing != "skip":
        bad_rows = sorted({k for f in fields for k, m in enumerate(missing[f]) if m})
        if bad_rows and on_missing == "error":
            labels = list(prepared.index[bad_rows[:5]])
            raise TemplateError(f"{len(bad_rows)} row(s) have missing values in the template's fields (rows {labels}); "
                                "fill them, or pass on_missing='skip' or 'empty'")
        for f in fields:
            col = columns[f]
            for k, m in enumerate(missing[f]):
                if m:
                    col[k] = ""
    rendered = [[(role, t.render_columns(columns, n), t.fields) for role, t in variant] for variant in variants]
    prompts: list[list[dict] | None] = []
    for i in range(n):
        for variant in rendered:
            prompts.append([{"role": role, "content": texts[i]} for role, texts, _ in variant])
    if fields and on_missing == "skip":
        for v, variant in enumerate(rendered):
            for f in dict.fromkeys(f for _, _, used in variant for f in used):
                for k, m in enumerate(missing[f]):
                    request = k * len(rendered) + v
                    if m and prompts[request] is not None:
                        prompts[request] = None
                        prepared.skip_reasons[request] = f"skipped: missing value in {f!r}"
    prepared.prompts = prompts
    several = not isinstance(template, str) and all(isinstance(t, str) for t in template)
    prepared.templates = ([template] if isinstance(template, str) else list(template) if several
                          else [json.dumps(list(map(dict, template)))])
    return prepared
