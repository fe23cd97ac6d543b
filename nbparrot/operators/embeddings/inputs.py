"""The texts to embed: a column or a template over the rows, planned once, with their keys and sizes."""

from __future__ import annotations

from typing import Any, Sequence


from ...errors import ConfigError, TemplateError
from ...prepare import Prepared, RenderError, prepare
from ...templates import Template


class Inputs:
    """The texts of one embedding run, from one or more parts: a frame's rows (a ``Prepared``) or a
    few plain texts (a query). Stands where a ``Prepared`` does for ``Run``, the panel and the
    engine: ``len``, ``render(k)`` (the text, None for a skipped row, ``RenderError``), ``skip_reason``,
    ``user_text``, ``index`` / ``request_index`` and ``frame`` / ``records`` of the first part."""

    variants = 1

    def __init__(self, parts: Sequence[tuple[str, Prepared | list[str]]]):
        self.parts = list(parts)
        if any(isinstance(part, Prepared) and part.media for _, part in self.parts):
            raise ConfigError("embeddings take text, and this column holds images (bytes, PIL images or arrays); "
                              "embed a text column, or describe the images with map first")
        self.starts = [0]
        for _, part in self.parts:
            self.starts.append(self.starts[-1] + (part.rows if isinstance(part, Prepared) else len(part)))
        first = self.parts[0][1]
        self.frame = first.frame if isinstance(first, Prepared) else None
        self.records = first.records if isinstance(first, Prepared) else None
        self.rows = self.starts[-1]
        self.templates = [_label(part) for _, part in self.parts]
        if len(self.parts) == 1 and isinstance(first, Prepared):
            render = first.render  # the hot path: one frame, no part lookup

            def render_one(k: int) -> str | None:
                messages = render(k)
                return None if messages is None else messages[0]["content"]

            self.render = render_one  # type: ignore[method-assign]

    def __len__(self) -> int:
        return self.rows

    def _part(self, k: int) -> tuple[int, Any]:
        starts = self.starts
        for p in range(len(self.parts)):
            if k < starts[p + 1]:
                return k - starts[p], self.parts[p][1]
        raise IndexError(k)

    def render(self, k: int) -> str | None:
        local, part = self._part(k)
        if isinstance(part, Prepared):
            messages = part.render(local)
            return None if messages is None else messages[0]["content"]
        return part[local]

    def skip_reason(self, k: int) -> str:
        local, part = self._part(k)
        return part.skip_reason(local) if isinstance(part, Prepared) else "skipped"

    def user_text(self, k: int) -> str | None:
        try:
            return self.render(k)
        except (RenderError, TemplateError, ConfigError):
            return None

    def row_of(self, k: int) -> int:
        return k

    def template_of(self, k: int) -> str:
        for p in range(len(self.parts)):
            if k < self.starts[p + 1]:
                return self.templates[p]
        return ""

    def span(self, name: str) -> range:
        """The requests of the part called ``name``."""
        for p, (part_name, _) in enumerate(self.parts):
            if part_name == name:
                return range(self.starts[p], self.starts[p + 1])
        raise KeyError(name)

    @property
    def index(self) -> Any:
        first = self.parts[0][1]
        if isinstance(first, Prepared):
            return first.index
        import pandas as pd

        return pd.RangeIndex(len(first))

    @property
    def request_index(self) -> Any:
        import pandas as pd

        if len(self.parts) == 1:
            return self.index
        names, labels = [], []
        for name, part in self.parts:
            index = part.index if isinstance(part, Prepared) else pd.RangeIndex(len(part))
            names += [name] * len(index)
            labels += list(index)
        return pd.MultiIndex.from_arrays([names, labels], names=["part", "row"])


def _label(part: Any) -> str:
    return part.templates[0] if isinstance(part, Prepared) else "(query)"


def texts_of(data: Any, on: Any, *, on_missing: str = "skip", what: str = "on") -> Prepared:
    """A ``Prepared`` rendering ``on`` for each row of ``data``: a column's (or a dict key's) text as
    is, or a ``{field}`` template. ``TemplateError`` for an unknown column or field, before anything."""
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        try:
            is_column = on in data.columns
        except TypeError:  # unhashable
            is_column = False
        if is_column:
            if isinstance(on, str) and on.isidentifier():
                return prepare(data, "{" + on + "}", system=None, on_missing=on_missing)
            if not data.columns.is_unique:
                prepare(data, "", system=None)  # the duplicate-names ConfigError
            view = data[[on]].set_axis(["text"], axis=1)  # no copy under copy-on-write
            prepared = prepare(view, "{text}", system=None, on_missing=on_missing)
            prepared.frame = data
            prepared.templates = [str(on)]
            return prepared
        names = [str(c) for c in data.columns]
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        first = data[0] if len(data) and isinstance(data[0], dict) else {}
        if isinstance(on, str) and on in first:
            if on.isidentifier():
                return prepare(data, "{" + on + "}", system=None, on_missing=on_missing)
            rows = [{"text": r[on]} if isinstance(r, dict) and on in r else r for r in data]
            prepared = prepare(rows, "{text}", system=None, on_missing=on_missing)
            prepared.records = data
            return prepared
        names = sorted({str(key) for r in data[:1000] if isinstance(r, dict) for key in r})
    else:
        raise ConfigError(f"data must be a pandas DataFrame or a list of dicts, not {type(data).__name__}")
    if not isinstance(on, str):
        raise TemplateError(f"{what}={on!r} is not a column; columns: {', '.join(names[:40]) or '(none)'}")
    if not Template(on).fields:  # a plain word that is no column: a typo, not a constant text to embed
        raise TemplateError(f"{what}={on!r} is neither a column nor a template with {{fields}}; "
                            f"columns: {', '.join(names[:40]) or '(none)'}")
    return prepare(data, on, system=None, on_missing=on_missing)


# ---- the engine --------------------------------------------------------------------------


