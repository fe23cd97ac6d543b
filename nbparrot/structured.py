"""Structured outputs: a schema in, validated values out, fields as columns.

``Schema`` accepts a pydantic model, a mapping of field name to type (``{"name": str,
"year": int}``), or ``list[Model]`` for answers that are lists of objects (one document ->
many question/answer pairs). It gives the ``response_format`` to send (``json_schema``;
endpoints that refuse it get ``json_object`` plus the schema in an instruction) and parses
answers into plain dicts, raising ``ValueError`` with a short reason the model can be re-asked
with. A list schema travels as ``{"items": [...]}`` because ``json_schema`` wants an object at
the top.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Mapping

from .errors import ConfigError

__all__ = ["Schema"]


class Schema:
    """A validated answer shape built from a pydantic model, a field mapping, or ``list[...]``."""

    def __init__(self, spec: Any):
        import pydantic

        self.is_list = typing.get_origin(spec) is list
        item = typing.get_args(spec)[0] if self.is_list and typing.get_args(spec) else spec
        if isinstance(item, Mapping):
            try:
                item = pydantic.create_model("Answer", **{str(k): (t, ...) for k, t in item.items()})
            except (TypeError, pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError) as exc:
                raise ConfigError(f"schema {spec!r} is not a mapping of field names to types: {exc}") from None
        if not (isinstance(item, type) and issubclass(item, pydantic.BaseModel)):
            raise ConfigError("schema must be a pydantic model, a dict of field name to type, or list[Model]; "
                              f"got {spec!r}")
        self.model = item
        self.name = item.__name__
        self.fields = list(item.model_fields)
        item_schema = item.model_json_schema()
        if self.is_list:
            defs = item_schema.pop("$defs", None)
            schema: dict[str, Any] = {"type": "object", "properties": {"items": {"type": "array", "items": item_schema}},
                                      "required": ["items"]}
            if defs:
                schema["$defs"] = defs
            self._adapter = pydantic.TypeAdapter(list[item])
        else:
            schema = item_schema
            self._adapter = None
        self.json_schema = schema

    def dtypes(self) -> dict[str, Any]:
        """The pandas dtype of each field's column: nullable ones (``boolean``, ``Int64``, the text dtype),
        so a row without an answer is NA without changing the dtype; ``object`` for other types."""
        text = text_dtype()
        return {name: _field_dtype(info.annotation, text) for name, info in self.model.model_fields.items()}

    def response_format(self) -> dict[str, Any]:
        """The ``response_format`` body field for endpoints that support ``json_schema``."""
        return {"type": "json_schema", "json_schema": {"name": self.name[:64], "schema": self.json_schema}}

    def instruction(self) -> str:
        """What to tell a model in ``json_object`` mode, where the schema cannot be sent as such."""
        return ("Answer with only a JSON object that matches this JSON schema, and nothing else:\n"
                + json.dumps(self.json_schema, separators=(",", ":")))

    def parse(self, text: Any) -> Any:
        """A dict (or a list of dicts for a list schema) from an answer; ``ValueError`` says what is wrong."""
        import pydantic

        if not isinstance(text, str):
            raise ValueError("the answer is empty")
        try:
            if self.is_list:
                data = json.loads(text)
                items = data.get("items") if isinstance(data, dict) else data
                return [m.model_dump() for m in self._adapter.validate_python(items)]
            return self.model.model_validate_json(text).model_dump()
        except json.JSONDecodeError as exc:
            raise ValueError(f"the answer is not valid JSON ({exc.msg} at position {exc.pos})") from None
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'answer'}: {e['msg']}" for e in exc.errors()[:5])
            raise ValueError(f"the JSON does not match the schema: {problems}") from None

    def reask(self, error: str) -> str:
        """The follow-up message that asks a model to correct an invalid answer."""
        return f"That answer cannot be used: {error}. Reply again with only the corrected JSON."


def text_dtype() -> Any:
    """What pandas makes of a list of strings with gaps: object (pandas 2) or str (pandas 3)."""
    import pandas as pd

    return pd.Series(["x", None]).dtype


def _field_dtype(annotation: Any, text: Any) -> Any:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in args if a is not type(None)]
        if len(kept) == 1:
            annotation = kept[0]
    return {str: text, int: "Int64", float: "float64", bool: "boolean"}.get(annotation, object)
