"""Prompt templates: ``{column}`` fields filled from a row, safely.

Templates are data, not code. A field is a bare name (``{text}``); attribute and index
access (``{x.__class__}``, ``{x[0]}``) are refused, ``{{`` and ``}}`` are literal braces, and a
value is inserted as text and never read again as template syntax (a cell holding ``"{x}"``
stays ``"{x}"``). Every field is checked against the available names before any request.
"""

from __future__ import annotations

import string
from typing import Iterable, Mapping, Sequence

from .errors import TemplateError

__all__ = ["Template", "is_missing"]

_FORMATTER = string.Formatter()


class Template:
    """A parsed template: literal text and field names, rendered by plain concatenation."""

    __slots__ = ("text", "fields", "_literals", "_names")

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TemplateError(f"a template must be a string, not {type(text).__name__}")
        self.text = text
        literals: list[str] = []
        names: list[str] = []
        try:
            parsed = list(_FORMATTER.parse(text))
        except ValueError as exc:  # unbalanced braces
            raise TemplateError(f"cannot read template {text!r}: {exc} (write {{{{ and }}}} for literal braces)") from None
        pending = ""
        for literal, field, spec, conversion in parsed:
            pending += literal
            if field is None:
                continue
            if field == "" or not field.isidentifier():
                if field == "":
                    problem = "an empty field {}"
                elif "." in field or "[" in field:
                    problem = f"{{{field}}}: attribute and index access are not allowed in templates"
                else:
                    problem = f"{{{field}}} is not a plain name"
                raise TemplateError(f"template {text!r} has {problem}; use {{column_name}}, and {{{{ }}}} for literal braces")
            if spec or conversion:
                raise TemplateError(f"template {text!r}: {{{field}}} has a format spec or conversion; only plain {{name}} fields are allowed")
            literals.append(pending)
            names.append(field)
            pending = ""
        literals.append(pending)
        self._literals = tuple(literals)
        self._names = tuple(names)
        self.fields = tuple(dict.fromkeys(names))

    def check(self, available: Iterable[str], *, what: str = "columns") -> None:
        """Raise ``TemplateError`` naming every unknown field and the names that are available."""
        have = set(available)
        unknown = [f for f in self.fields if f not in have]
        if unknown:
            names_ = sorted(map(str, have))
            listed = ", ".join(names_[:40]) + (f", ... ({len(names_) - 40} more)" if len(names_) > 40 else "") or "(none)"
            names = ", ".join(f"{{{f}}}" for f in unknown)
            raise TemplateError(f"template {self.text!r} uses {names}, which is not among the {what}: {listed}")

    def render(self, values: Mapping[str, object]) -> str:
        """The template with each field replaced by ``str(value)``."""
        lits, names = self._literals, self._names
        if not names:
            return lits[0]
        parts = [lits[0]]
        for k, name in enumerate(names):
            value = values[name]
            parts.append(value if isinstance(value, str) else str(value))
            parts.append(lits[k + 1])
        return "".join(parts)

    def render_columns(self, columns: Mapping[str, Sequence[object]], n: int) -> list[str]:
        """Render ``n`` rows at once from column lists (the fast path for DataFrames)."""
        lits, names = self._literals, self._names
        if not names:
            return [lits[0]] * n
        cols = [columns[name] for name in names]
        out = []
        for i in range(n):
            parts = [lits[0]]
            for k, col in enumerate(cols):
                value = col[i]
                parts.append(value if isinstance(value, str) else str(value))
                parts.append(lits[k + 1])
            out.append("".join(parts))
        return out

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


def is_missing(value: object) -> bool:
    """True for None, NaN, pandas.NA and NaT: values a template should not silently print."""
    if value is None:
        return True
    if isinstance(value, float):
        return value != value
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover - pandas is a dependency
        return False
