"""From data and a template to one chat request per row, rendered when it is needed.

``prepare`` accepts a pandas DataFrame or a list of dicts, and a template that is a string
(the user message), a list of ``{"role", "content"}`` messages whose contents are templates
(few-shot prompts), or a list of strings: several templates, each rendered for every row
(one request per row x template, row by row). Every field is checked against the data's
columns first, so a typo costs nothing.

``prepare`` itself does only the cheap checks (fields against columns, duplicate column
names, and for ``on_missing="error"`` the missing-value masks) and keeps references to the
columns the template uses; ``Prepared.render(k)`` builds request ``k``'s messages on demand,
from a small cache of column blocks. Nothing holds every row's messages at once: the engine
renders a row once to plan it (cache key, token cost) and again when it sends it. A DataFrame's
columns are taken as they are when ``prepare`` is called (pandas' copy-on-write keeps them so
if the frame is edited later); a list of dicts is read as the rows are rendered.

Rows with a missing value (None, NaN, NA) in a field the template uses are skipped and marked
by default (``on_missing="skip"``); ``"empty"`` renders them as empty text and ``"error"``
refuses the whole batch. A value that cannot be rendered (its ``str()`` raises, or it holds a
lone surrogate, which is not valid text and cannot be sent as UTF-8) makes ``render`` raise
``RenderError`` naming the column: the engine fails that row alone.

Fields holding images or documents (named with ``images=``, or bytes / PIL images / arrays, see
``_media_fields``) render as content parts: the text around them, and a ``MediaPart`` per image
that reads nothing until the engine asks for its key, its tokens or its bytes (``nbparrot.images``).

For a list of dicts the first ``CHECK_NOW`` records are checked at once (each a mapping with
every field); later records are checked as their block is first rendered, which raises the
same errors (before any request: the engine renders every row while planning).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import ConfigError, RenderError, TemplateError
from .images.parts import MediaOptions, MediaPart, is_media
from .templates import Template, is_missing

__all__ = ["Prepared", "RenderError", "prepare", "MISSING_POLICIES"]

MISSING_POLICIES = ("skip", "empty", "error")
BLOCK_SHIFT = 10
BLOCK = 1 << BLOCK_SHIFT  # rows of column values fetched at a time
KEEP_BLOCKS = 4  # blocks kept: the one being planned or sent, and a few for retries of older rows
CHECK_NOW = 1024  # records of a list of dicts checked before prepare returns


@dataclass
class Prepared:
    """The requests of a batch, rendered on demand, and what is needed to give results back in the input's shape."""

    frame: Any = None  # the input DataFrame, when it was one
    records: Sequence[Mapping] | None = None  # the input dicts, when they were
    templates: list[str] = field(default_factory=list)  # template texts; several = one request per row x template
    rows: int = 0  # input rows (requests = rows x variants)
    on_missing: str = "skip"
    _variants: list[list[tuple[str, Template]]] = field(default_factory=list)
    _fields: list[list[str]] = field(default_factory=list)  # fields used, per variant
    # per variant, per message: (role, template text to format_map with the row's texts, or None, literal text)
    _messages: list[list[tuple[str, str | None, str]]] = field(default_factory=list)
    _columns: dict[str, Any] = field(default_factory=dict)  # field -> the DataFrame column (a Series)
    _blocks: dict[int, tuple[dict[str, list], dict[str, list | None]]] = field(default_factory=dict)
    _current: tuple[int, Any] = (-1, None)  # the block last used: (number, (values, missing))
    _checked: int = 0  # records checked so far (a list of dicts)
    media: frozenset = frozenset()  # fields holding images or documents (see nbparrot.images)
    media_options: MediaOptions = field(default_factory=MediaOptions)
    # per variant, per message: None, or (text format, media field or None) pieces when it holds media
    _segments: list[list[list[tuple[str, str | None]] | None]] = field(default_factory=list)

    @property
    def variants(self) -> int:
        return max(1, len(self.templates))

    def __len__(self) -> int:
        """The number of requests."""
        return self.rows * self.variants

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

        return pd.RangeIndex(self.rows)

    @property
    def request_index(self) -> Any:
        """One label per request: the input labels, repeated when there are several templates."""
        index = self.index
        return index if self.variants == 1 else index.repeat(self.variants)

    # ---- rendering ----------------------------------------------------------------------

    def render(self, request: int) -> list[dict] | None:
        """Request ``request``'s messages; None when it is skipped (a missing value, ``on_missing="skip"``).

        Raises ``RenderError`` when a value cannot be rendered, and for a list of dicts the
        ``TemplateError`` / ``ConfigError`` of a record that is not a mapping or lacks a field.
        """
        row, variant = divmod(request, self.variants) if len(self._variants) > 1 else (request, 0)
        names = self._fields[variant]
        texts: dict[str, str] = {}
        media = self.media
        if names:
            number, block = self._current
            values, missing = block if number == row >> BLOCK_SHIFT else self._block(row)
            j = row & (BLOCK - 1)
            for name in names:
                flags = missing[name]  # None: nothing missing in this block
                if flags is not None and flags[j]:
                    if self.on_missing == "skip":
                        return None
                    texts[name] = ""  # "empty" ("error" has refused such rows already)
            for name in names:
                if name not in texts:
                    value = values[name][j]
                    if media and name in media:
                        texts[name] = MediaPart(value, name, self.media_options)  # type: ignore[assignment]
                    else:
                        texts[name] = value if type(value) is str and value.isascii() else _text(value, name)
        elif self.records is not None and row >= self._checked:
            self._block(row)  # checks the records
        if media:
            return self._with_media(variant, texts)
        # str.format_map fills a checked template (plain {name} fields only) exactly as Template.render
        # does, in C; a value is inserted as text and never read again as template syntax.
        return [{"role": role, "content": text.format_map(texts) if text is not None else literal}
                for role, text, literal in self._messages[variant]]

    def _with_media(self, variant: int, values: dict[str, Any]) -> list[dict]:
        """The messages of a variant whose templates use media fields: content parts, text and ``MediaPart``."""
        out = []
        texts = {name: ("" if isinstance(v, MediaPart) else v) for name, v in values.items()}
        for (role, text, literal), pieces in zip(self._messages[variant], self._segments[variant]):
            if pieces is None:
                out.append({"role": role, "content": text.format_map(texts) if text is not None else literal})
                continue
            content: list = []
            for piece, name in pieces:
                chunk = piece.format_map(texts) if piece else ""
                if chunk.strip():
                    content.append({"type": "text", "text": chunk})
                part = values.get(name) if name is not None else None
                if isinstance(part, MediaPart):
                    content.append(part)
            out.append({"role": role, "content": content})
        return out

    def media_parts(self, request: int) -> list[MediaPart]:
        """The images / documents of a request, for thumbnails (none if it cannot be rendered)."""
        if not self.media:
            return []
        try:
            prompt = self.render(request)
        except (RenderError, TemplateError, ConfigError):
            return []
        return [part for message in prompt or () if isinstance(message.get("content"), list)
                for part in message["content"] if isinstance(part, MediaPart)]

    def skip_reason(self, request: int) -> str:
        """Why ``render`` skipped a request."""
        row, variant = divmod(request, self.variants)
        if self._fields[variant]:
            _, missing = self._block(row)
            for name in self._fields[variant]:
                flags = missing[name]
                if flags is not None and flags[row % BLOCK]:
                    return f"skipped: missing value in {name!r}"
        return "skipped"

    def user_text(self, request: int) -> str | None:
        """The rendered last user message of a request (for previews), or None if it has none."""
        try:
            prompt = self.render(request)
        except (RenderError, TemplateError, ConfigError):
            return None
        if prompt is None:
            return None
        for message in reversed(prompt):
            if message.get("role") == "user":
                return _shown(message.get("content"))
        return _shown(prompt[-1].get("content"))

    def _block(self, row: int) -> tuple[dict[str, list], dict[str, list]]:
        """The values and missing flags of the used columns for the block holding ``row``."""
        number = row >> BLOCK_SHIFT
        block = self._blocks.get(number)
        if block is None:
            start, stop = number * BLOCK, min(self.rows, (number + 1) * BLOCK)
            if self.records is not None:
                block = self._record_block(start, stop)
            else:
                values, missing = {}, {}
                for name, column in self._columns.items():
                    part = column.iloc[start:stop]
                    values[name] = part.tolist()
                    flags = part.isna()
                    missing[name] = flags.tolist() if flags.any() else None
                block = (values, missing)
            if len(self._blocks) >= KEEP_BLOCKS:
                del self._blocks[next(iter(self._blocks))]
            self._blocks[number] = block
        self._current = (number, block)
        return block

    def _record_block(self, start: int, stop: int) -> tuple[dict[str, list], dict[str, list]]:
        rows = self.records[start:stop]
        if stop > self._checked:
            _check_records(rows, start, self._all_fields())
            self._checked = max(self._checked, stop)
        values = {name: [r[name] for r in rows] for name in self._all_fields()}
        missing = {name: [is_missing(v) for v in column] for name, column in values.items()}
        return values, {name: flags if any(flags) else None for name, flags in missing.items()}

    def _all_fields(self) -> list[str]:
        return list(dict.fromkeys(f for names in self._fields for f in names))


def _shown(content: Any) -> Any:
    """A message's content as text for previews: content parts joined, an image as ``[its name]``."""
    if not isinstance(content, list):
        return content
    return "".join(part.get("text", "") if isinstance(part, dict) else f"[{part.label()}]" for part in content)


def _text(value: Any, name: str) -> str:
    """``value`` as text to put in a prompt, or ``RenderError`` saying why it cannot be."""
    if isinstance(value, str):
        text = value
    else:
        if is_media(value):
            raise RenderError(f"cannot render row: {name!r} holds a {type(value).__name__} (an image?) in this row "
                              f"while its first values are not images; name the column in images=[{name!r}]")
        try:
            text = str(value)
        except Exception as exc:  # noqa: BLE001 - any failure of a user's __str__ is this row's error
            raise RenderError(f"cannot render row: str() of the value in {name!r} raised "
                              f"{type(exc).__name__}: {_describe(exc)}") from None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RenderError(f"cannot render row: value in {name!r} is not valid text "
                              f"(lone surrogate \\u{ord(text[exc.start]):04x} at position {exc.start})") from None
    return text


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - an exception whose own str() fails
        return "(no description)"
    return text if len(text) <= 200 else text[:199] + "…"


def _check_records(rows: Sequence[Any], start: int, fields: list[str]) -> None:
    """Each record a mapping with every field; raises ``ConfigError`` / ``TemplateError`` otherwise."""
    for k, r in enumerate(rows):
        if not isinstance(r, Mapping):
            raise ConfigError(f"data must be a DataFrame or a list of dicts; item {start + k} is a {type(r).__name__}")
    for f in fields:
        lacking = [start + k for k, r in enumerate(rows) if f not in r]
        if lacking:
            where = ", ".join(map(str, lacking[:5])) + (" ..." if len(lacking) > 5 else "")
            keys = sorted({str(key) for r in rows for key in r})
            counted = f"{len(lacking)} record(s)" + (f" of {start}-{start + len(rows) - 1}" if start else "")
            raise TemplateError(f"template field {{{f}}} is missing from {counted} (at {where}); "
                                f"keys present: {', '.join(keys)}")


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
    for _, t in messages:
        try:
            t.text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise TemplateError(f"template {t.text!r} is not valid text: lone surrogate "
                                f"\\u{ord(t.text[exc.start]):04x} at position {exc.start}") from None
    return messages


def prepare(data: Any, template: str | Sequence[Mapping[str, str]], *, system: str | None = None,
            on_missing: str = "skip", media: MediaOptions | None = None) -> Prepared:
    """Check the template against the data and return a ``Prepared`` that renders rows on demand.

    Raises ``TemplateError`` / ``ConfigError`` before any request (see the module docstring
    for what is checked now and what as rows are rendered). ``media`` names the fields holding
    images or documents (others are found by their values' type, see ``_media_fields``).
    """
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
        prepared = Prepared(frame=data, rows=len(data), _columns={f: data[by_name[f]] for f in fields})
        if fields and on_missing == "error":
            import numpy as np

            bad = np.zeros(len(data), dtype=bool)
            for f in fields:
                bad |= prepared._columns[f].isna().to_numpy()
            _refuse_missing(prepared, np.flatnonzero(bad).tolist())
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        rows = list(data)
        prepared = Prepared(records=rows, rows=len(rows))
        _check_records(rows[:CHECK_NOW], 0, fields)
        prepared._checked = min(len(rows), CHECK_NOW)
        if fields and on_missing == "error":  # every record now: the whole batch is refused before it starts
            _check_records(rows, 0, fields)
            prepared._checked = len(rows)
            _refuse_missing(prepared, [k for k, r in enumerate(rows) if any(is_missing(r[f]) for f in fields)])
    else:
        raise ConfigError(f"data must be a pandas DataFrame or a list of dicts, not {type(data).__name__}")

    prepared.on_missing = on_missing
    prepared.media_options = media = media or MediaOptions()
    prepared.media = _media_fields(prepared, fields, media)
    prepared._variants = variants
    prepared._fields = [list(dict.fromkeys(f for _, t in variant for f in t.fields)) for variant in variants]
    prepared._messages = [[(role, t.text if t.fields else None, t.render({}) if not t.fields else "")
                           for role, t in variant] for variant in variants]
    prepared._segments = [[_segments(t, prepared.media) for _, t in variant] for variant in variants]
    several = not isinstance(template, str) and all(isinstance(t, str) for t in template)
    prepared.templates = ([template] if isinstance(template, str) else list(template) if several
                          else [json.dumps(list(map(dict, template)))])
    return prepared


def _media_fields(prepared: Prepared, fields: list[str], media: MediaOptions) -> frozenset:
    """The template's fields that hold images or documents: those named in ``images=`` (which must be
    columns), and those whose first non-missing value is bytes, a PIL image or a 2-D/3-D array.
    Strings and paths are never guessed at: they are images only when named."""
    if prepared.frame is not None:
        have = {str(c) for c in prepared.frame.columns}
    else:
        have = {str(k) for r in prepared.records[:CHECK_NOW] for k in r} if prepared.records else set()
    unknown = [c for c in media.columns if c not in have]
    if unknown and (prepared.frame is not None or prepared.records):
        raise ConfigError(f"images= names {', '.join(map(repr, unknown))}, not among the columns: "
                          f"{', '.join(sorted(have)[:40])}")
    found = {f for f in fields if f in media.columns}
    for f in fields:
        if f in found:
            continue
        if prepared.frame is not None:
            column = prepared._columns[f]
            if column.dtype != object:
                continue
            head = column.iloc[:64].tolist()
        else:
            head = [r.get(f) for r in prepared.records[:64]]
        first = next((v for v in head if not is_missing(v)), None)
        if first is not None and is_media(first):
            found.add(f)
    return frozenset(found)


def _segments(template: Template, media: frozenset) -> list[tuple[str, str | None]] | None:
    """A template cut at its media fields: (format text of what comes before, the media field), ending
    with (the rest, None); None when it uses no media field."""
    if not media or not media.intersection(template.fields):
        return None
    pieces: list[tuple[str, str | None]] = []
    current = ""
    for literal, name in zip(template._literals, template._names):
        current += literal.replace("{", "{{").replace("}", "}}")
        if name in media:
            pieces.append((current, name))
            current = ""
        else:
            current += "{" + name + "}"
    pieces.append((current + template._literals[-1].replace("{", "{{").replace("}", "}}"), None))
    return pieces


def _refuse_missing(prepared: Prepared, bad_rows: list[int]) -> None:
    if bad_rows:
        labels = list(prepared.index[bad_rows[:5]])
        raise TemplateError(f"{len(bad_rows)} row(s) have missing values in the template's fields (rows {labels}); "
                            "fill them, or pass on_missing='skip' or 'empty'")
