"""A deterministic instance of a JSON schema, whose strings carry the row's ``tag#i``.

Covers the subset pydantic and users emit: ``$ref`` (local), ``const``, ``enum``, ``anyOf`` /
``oneOf`` (first non-null option), ``allOf`` (merged), objects, arrays (two items, clamped to
``minItems`` / ``maxItems``, ``prefixItems``), strings (with common formats and lengths), numbers
within their bounds, booleans.

Booleans, string enums and arrays of string enum items (multi-label) follow the decision rules
of :mod:`.decisions` when a decider is given (every chat answer gives one), and the table
operators' marker rules of :mod:`.table` (scores, comparisons, keys) where their markers are; each such value is
recorded in ``decisions`` under its path (``$``, ``$.field``, ``$.field[0]``) for the logprobs.
Without a decider (or for a non-string enum) the value is hash-picked from the path and choice.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from typing import TYPE_CHECKING, Any

from .table import expected_choice, expected_match, expected_score

if TYPE_CHECKING:
    from .decisions import _Decider


def _string_enum(schema: Any) -> list[str] | None:
    """The ``enum`` of a schema if it is a non-empty list of strings."""
    values = schema.get("enum") if isinstance(schema, dict) else None
    if isinstance(values, list) and values and all(isinstance(v, str) for v in values):
        return values
    return None


class _SchemaFaker:
    """Builds a deterministic instance of a JSON schema whose strings carry the row's tag."""

    max_depth = 8

    def __init__(self, root: dict, label: str, seed: int, decider: _Decider | None = None) -> None:
        """Remember the root (for $ref), the ``tag#i`` label, a per-choice seed and the request's decider."""
        self.root = root
        self.label = label
        self.seed = seed
        self.decider = decider
        #: path -> (value, alternatives, probability) of each decided value
        self.decisions: dict[str, tuple[bool | str, list[bool | str], float]] = {}

    def decide(self, path: str, value: bool | str, choices: list) -> bool | str:
        """Record a decided value and its alternatives (the other choices)."""
        assert self.decider is not None
        self.decisions[path] = (value, [c for c in dict.fromkeys(choices) if c != value], self.decider.confidence)
        return value

    def pick(self, path: str, count: int) -> int:
        """A deterministic index in [0, count) for this choice and schema path."""
        return (self.seed + zlib.crc32(path.encode())) % count

    def resolve(self, ref: str) -> dict:
        """Resolve a local ``#/$defs/Name`` style reference."""
        node: Any = self.root
        if not ref.startswith("#"):
            return {}
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return {}
            node = node[part]
        return node if isinstance(node, dict) else {}

    def make(self, schema: Any, path: str = "$", name: str = "value", depth: int = 0) -> Any:
        """Return a value valid for ``schema`` (the common subset pydantic and users emit)."""
        if not isinstance(schema, dict):
            return f"{self.label} {name}"
        if depth > self.max_depth:
            return None
        if "$ref" in schema:
            return self.make(self.resolve(schema["$ref"]), path, name, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            labels = _string_enum(schema) if self.decider is not None else None
            if labels is not None:
                choice = expected_choice(self.decider.text, labels)
                return self.decide(path, self.decider.label(labels) if choice is None else choice, labels)
            return schema["enum"][self.pick(path, len(schema["enum"]))]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
                return self.make((non_null or options)[0], path, name, depth + 1)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged: dict = {}
            for part in schema["allOf"]:
                part = self.resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                if isinstance(part, dict):
                    for k, v in part.items():
                        if isinstance(v, dict) and isinstance(merged.get(k), dict):
                            merged[k] = {**merged[k], **v}
                        elif isinstance(v, list) and isinstance(merged.get(k), list):
                            merged[k] = merged[k] + v
                        else:
                            merged[k] = v
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.make({**merged, **rest}, path, name, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"]
            kind = kinds[0] if kinds else "null"
        if kind is None:
            if "properties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        if kind == "object":
            props = schema.get("properties") or {}
            return {key: self.make(sub, f"{path}.{key}", key, depth + 1) for key, sub in props.items()}
        if kind == "array":
            return self.make_array(schema, path, name, depth)
        if kind == "string":
            return self.make_string(schema, path, name)
        if kind == "integer":
            return self.make_number(schema, path, integer=True)
        if kind == "number":
            return self.make_number(schema, path, integer=False)
        if kind == "boolean":
            if self.decider is not None:
                match = expected_match(self.decider.text)
                value = self.decider.boolean() if match is None else match != self.decider.flipped
                return self.decide(path, value, [True, False])
            return self.pick(path, 2) == 0
        return None

    def make_array(self, schema: dict, path: str, name: str, depth: int) -> list:
        """Two elements (clamped to minItems/maxItems), honouring prefixItems."""
        count = max(2, int(schema.get("minItems", 0)))
        if isinstance(schema.get("maxItems"), int):
            count = min(count, schema["maxItems"])
        prefix = schema.get("prefixItems") or []
        items = schema.get("items", {})
        if prefix:
            count = len(prefix) if items is False else max(count, len(prefix))
        elif self.decider is not None:
            item = self.resolve(items["$ref"]) if isinstance(items, dict) and "$ref" in items else items
            labels = _string_enum(item)
            if labels is not None:
                return self.make_labels(schema, path, labels)
        return [
            self.make(prefix[k] if k < len(prefix) else items, f"{path}[{k}]", f"{name}[{k}]", depth + 1)
            for k in range(count)
        ]

    def make_labels(self, schema: dict, path: str, labels: list[str]) -> list[str]:
        """A multi-label answer: the decided labels, cut to maxItems, padded to minItems with the others."""
        assert self.decider is not None
        values = self.decider.labels(labels)
        if isinstance(schema.get("maxItems"), int):
            values = values[: max(0, schema["maxItems"])]
        if isinstance(schema.get("minItems"), int):
            spare = [label for label in dict.fromkeys(labels) if label not in values]
            values += spare[: max(0, schema["minItems"] - len(values))]
        for k, value in enumerate(values):
            self.decide(f"{path}[{k}]", value, labels)
        return values

    def make_string(self, schema: dict, path: str, name: str) -> str:
        """A string carrying the tag, or a well-formed value for common formats."""
        fmt = schema.get("format")
        if fmt == "date-time":
            value = "2024-01-01T00:00:00Z"
        elif fmt == "date":
            value = "2024-01-01"
        elif fmt == "time":
            value = "00:00:00"
        elif fmt == "email":
            value = f"{self.label.replace('#', '-')}@example.com"
        elif fmt in ("uri", "url", "uri-reference"):
            value = f"https://example.com/{self.label.replace('#', '-')}"
        elif fmt == "uuid":
            h = hashlib.md5(f"{self.label}{path}".encode()).hexdigest()
            value = f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}"
        else:
            value = f"{name} {self.label}"
        max_len = schema.get("maxLength")
        if isinstance(max_len, int) and len(value) > max_len:
            value = value[:max_len]
        min_len = schema.get("minLength")
        if isinstance(min_len, int) and len(value) < min_len:
            value += "x" * (min_len - len(value))
        return value

    def make_number(self, schema: dict, path: str, integer: bool) -> int | float:
        """A hash-picked number in [minimum, maximum] (default 0..99)."""
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        high = schema.get("maximum", schema.get("exclusiveMaximum"))
        if "exclusiveMinimum" in schema and "minimum" not in schema:
            low = low + 1 if integer else low + 0.5
        if "exclusiveMaximum" in schema and "maximum" not in schema:
            high = high - 1 if integer else high - 0.5
        low = 0 if low is None else low
        high = low + 99 if high is None else high
        if high < low:
            high = low
        if integer:
            low, high = math.ceil(low), math.floor(high)
            score = expected_score(self.decider.text, low, high) if self.decider is not None else None
            if score is not None:
                return score
            return low + self.pick(path, max(1, high - low + 1))
        span = high - low
        return low + span * self.pick(path, 1000) / 1000 if span else low
