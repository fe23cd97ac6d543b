"""Deterministic decisions: the boolean and label values of structured answers, and their confidence.

When a structured answer (``response_format`` json_schema, or json_object with the schema given in
words, see :func:`schema_in_words`) has a boolean field or a string field with an ``enum``, its
value follows a rule that tests reproduce with :func:`expected_decision`, :func:`expected_label`
and :func:`expected_labels`. The rules only read the **last user message** (the "decision text"),
so a system prompt, the json_object fallback's schema instruction, ``n`` and the temperature
change nothing; a re-ask is a new last user message and is decided on its own text.

* **boolean**: true if the decision text contains ``<<yes>>``, else false if it contains
  ``<<no>>``, else true exactly when ``int(sha1(text)[:8], 16)`` is even (sha1 of the UTF-8 text).
* **enum** (labels in the schema's order, duplicates dropped): the first label that appears in the
  decision text as a whole word, case-insensitively (not preceded or followed by a letter, digit or
  ``_``), else ``labels[int(sha1(text)[:8], 16) % len(labels)]``.
* **array of enum items** (multi-label): every label that appears, in the schema's order, else the
  one hash-picked label above.
* Every boolean field of one answer gets the same value, every enum field the rule's label of its
  own label set.

Confidence: the probability the answer's decision tokens get in logprobs (:mod:`.logprobs`) is
``low + (high - low) * int(sha1(text)[8:16], 16) / 0xFFFFFFFF`` with (low, high) = (0.55, 0.99)
(:func:`expected_confidence`).

Weak and strong models: ``mock-weak`` on a decision text containing ``<<hard>>`` gets it wrong with
low confidence, (low, high) = (0.5, 0.6): the opposite boolean; the label after the rule's one
(``labels[(i + 1) % len(labels)]``); for multi-label, only the label after the rule's first one. On
other texts it follows the rule with high confidence, (0.9, 0.99). ``mock-strong`` and every other
model always follow the rule, with the default range. With a single label there is nothing to get
wrong.

Put the list of labels in a system message or the schema, not in the last user message: there, the
first label would always "appear".
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Sequence

from .config import HARD_MARKER, NO_MARKER, WEAK_MODEL, YES_MARKER
from .prompts import _prompt_parts

#: (low, high) of the decision probability: every model but mock-weak, mock-weak on plain rows, on <<hard>> rows.
CONFIDENCE_RANGE = (0.55, 0.99)
WEAK_EASY_RANGE = (0.9, 0.99)
WEAK_HARD_RANGE = (0.5, 0.6)


@functools.lru_cache(maxsize=1024)
def _word_pattern(label: str) -> re.Pattern:
    """A case-insensitive pattern finding ``label`` as a whole word."""
    return re.compile(r"(?<!\w)" + re.escape(label) + r"(?!\w)", re.IGNORECASE)


def _unique(labels: Sequence[str]) -> list[str]:
    """The labels in order, without duplicates."""
    return list(dict.fromkeys(labels))


class _Decider:
    """The decisions of one request: its decision text (last user message) and model."""

    __slots__ = ("text", "pick", "flipped", "confidence")

    def __init__(self, text: str, model: str) -> None:
        """Hash the decision text once; note whether mock-weak errs on it, and the confidence."""
        self.text = text
        digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
        self.pick = int(digest[:8], 16)
        weak = model == WEAK_MODEL
        self.flipped = weak and HARD_MARKER in text
        low, high = WEAK_HARD_RANGE if self.flipped else WEAK_EASY_RANGE if weak else CONFIDENCE_RANGE
        self.confidence = low + (high - low) * int(digest[8:16], 16) / 0xFFFFFFFF

    def boolean(self) -> bool:
        """The value of a boolean field."""
        if YES_MARKER in self.text:
            value = True
        elif NO_MARKER in self.text:
            value = False
        else:
            value = self.pick % 2 == 0
        return value != self.flipped

    def matching(self, labels: list[str]) -> list[str]:
        """The labels appearing as whole words in the decision text."""
        return [label for label in labels if label and _word_pattern(label).search(self.text)]

    def label(self, labels: Sequence[str]) -> str:
        """The value of a string enum field."""
        labels = _unique(labels)
        found = self.matching(labels)
        value = found[0] if found else labels[self.pick % len(labels)]
        if self.flipped and len(labels) > 1:
            value = labels[(labels.index(value) + 1) % len(labels)]
        return value

    def labels(self, labels: Sequence[str]) -> list[str]:
        """The value of an array of string enum items (multi-label)."""
        labels = _unique(labels)
        values = self.matching(labels) or [labels[self.pick % len(labels)]]
        if self.flipped and len(labels) > 1:
            values = [labels[(labels.index(values[0]) + 1) % len(labels)]]
        return values


def decision_text(messages: list[dict] | str) -> str:
    """The text the rules read: the last user message (a string is taken as that message)."""
    return messages if isinstance(messages, str) else _prompt_parts(messages)[2]


def expected_decision(messages: list[dict] | str, model: str = "mock") -> bool:
    """The value the server gives boolean fields of a structured answer to ``messages``."""
    return _Decider(decision_text(messages), model).boolean()


def expected_label(messages: list[dict] | str, labels: Sequence[str], model: str = "mock") -> str:
    """The value the server gives a string field whose ``enum`` is ``labels``."""
    return _Decider(decision_text(messages), model).label(labels)


def expected_labels(messages: list[dict] | str, labels: Sequence[str], model: str = "mock") -> list[str]:
    """The value the server gives an array field whose items' ``enum`` is ``labels`` (multi-label)."""
    return _Decider(decision_text(messages), model).labels(labels)


def expected_confidence(messages: list[dict] | str, model: str = "mock") -> float:
    """The probability of the decision tokens in the answer's logprobs (``exp(logprob)``)."""
    return _Decider(decision_text(messages), model).confidence


_SCHEMA_WORDS = re.compile(r"json schema", re.IGNORECASE)


def schema_in_words(prompt_text: str) -> dict | None:
    """The schema of a json_object request that gives it in words, or None.

    It is the first JSON object following the words "JSON schema" (any case) in the prompt text,
    as nbparrot's fallback instruction puts it: "... matches this JSON schema, and nothing else:
    {...}". An object without ``type``, ``properties``, ``$ref``, ``anyOf``, ``oneOf``, ``allOf`` or
    ``enum`` is not taken for a schema.
    """
    decoder = json.JSONDecoder()
    for match in _SCHEMA_WORDS.finditer(prompt_text):
        start = prompt_text.find("{", match.end())
        if start < 0:
            return None
        try:
            value, _ = decoder.raw_decode(prompt_text, start)
        except ValueError:
            continue
        if isinstance(value, dict) and value.keys() & {"type", "properties", "$ref", "anyOf", "oneOf", "allOf", "enum"}:
            return value
    return None
