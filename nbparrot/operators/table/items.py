"""Rows as items of a table operator's request: the template's fields read as column names in the
instruction, and each row's values as one item's text."""

from __future__ import annotations

from typing import Any, Sequence

from ...errors import ConfigError, TemplateError
from ...templates import Template, is_missing

__all__ = ["as_frame", "Items", "items_of"]


def as_frame(data: Any, what: str = "data") -> Any:
    """``data`` as a DataFrame (a list of dicts becomes one); ``ConfigError`` for anything else."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return pd.DataFrame(list(data))
    raise ConfigError(f"{what} must be a pandas DataFrame or a list of dicts, not {type(data).__name__}")


class Items:
    """The instruction (``template`` with each ``{field}`` read as its column name) and each row's
    item text (None for a row left out for a missing value)."""

    def __init__(self, instruction: str, fields: list[str], texts: list[str | None]):
        self.instruction, self.fields, self.texts = instruction, fields, texts

    @property
    def skipped(self) -> int:
        return sum(1 for t in self.texts if t is None)


def items_of(frame: Any, template: Any, on_missing: str) -> Items:
    """Check ``template`` against ``frame``'s columns and render each row as an item: its one field's
    value, or ``field: value | field: value``. Errors (``TemplateError`` / ``ConfigError``) before any request."""
    if not isinstance(template, str):
        raise TemplateError(f"template must be a string, not {type(template).__name__}")
    parsed = Template(template)
    if not parsed.fields:
        raise ConfigError(f"template {template!r} names no column: put the columns each row contributes in braces, "
                          "e.g. 'What do these {review}s have in common?'")
    parsed.check([str(c) for c in frame.columns])
    fields = list(parsed.fields)
    by_name = {str(c): c for c in frame.columns}
    columns = [frame[by_name[f]].tolist() for f in fields]
    texts: list[str | None] = []
    for row in range(len(frame)):
        values = [column[row] for column in columns]
        if any(is_missing(v) for v in values):
            if on_missing == "error":
                raise TemplateError(f"row {frame.index[row]!r} has a missing value in {', '.join(fields)}; "
                                    "fill it, or pass on_missing='skip' or 'empty'")
            if on_missing == "skip":
                texts.append(None)
                continue
            values = ["" if is_missing(v) else v for v in values]
        values = [v if isinstance(v, str) else str(v) for v in values]
        texts.append(values[0] if len(values) == 1 else " | ".join(f"{f}: {v}" for f, v in zip(fields, values)))
    return Items(parsed.render({f: f for f in fields}), fields, texts)


def left_out(items: Items) -> str:
    """The warning for rows left out for a missing value."""
    return (f"{items.skipped} row(s) have a missing value in {', '.join(items.fields)} and are left out "
            "(on_missing='skip'; 'empty' includes them as empty text)")
