"""Token logprobs of an answer, in OpenAI's shape (``choices[i].logprobs.content``).

A chat request with ``logprobs: true`` (and optionally ``top_logprobs`` 0..20) gets, per choice,
``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
"refusal": null}``. ``top_logprobs`` without ``logprobs: true`` is a 400, as OpenAI answers. With
the server's ``logprobs`` setting off (``--logprobs false``) both are accepted and ignored:
``"logprobs": null``, as gateways that drop them do.

Tokens are a simple split whose concatenation is the content:

* Text (and JSON without decisions, or cut by ``max_tokens``): a word with the spaces before it,
  or one punctuation character with the spaces before it (``"[", "abc", "#", "0", "]", " lorem"``).
* Structured answers: the JSON delimiters ``{ } [ ] ", " ": "`` and each ``"`` are tokens of their
  own, string contents are split as text, numbers and ``null`` are one token, and a decided value
  (see :mod:`.decisions`) is exactly one token: ``true``, ``false``, or the label's text between
  its quotes (spaces included).

A decided token's logprob is ``log(p)`` with ``p`` :func:`~.decisions.expected_confidence`; its
``top_logprobs`` start with itself, then the alternatives (the other boolean, the other labels of
the enum) sharing ``(1 - p) * (1 - 1e-6)`` equally. Every other token has probability ``1 - 1e-6``
(logprob about ``-1e-06``). The rest of the list is filler tokens (" the", " a", ...) sharing what
is left, halving from one to the next, so the list has exactly ``top_logprobs`` entries, most likely
first, and its probabilities never sum over 1. The number of logprob tokens need not equal ``usage.completion_tokens``.
Choices whose content is null, and huge answers, get ``"logprobs": null``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

#: probability left to the filler alternatives of every token (of 1 - p at a decision)
FILLER_MASS = 1e-6
#: logprob of every token that is not a decision
PLAIN_LOGPROB = math.log1p(-FILLER_MASS)
#: alternatives offered in top_logprobs after the real candidates
_FILLERS = (" the", " a", ",", ".", " and", " of", " to", " in", " is", " that", " it", " for", " on", " with",
            " as", " was", " at", " by", " an", " be", " this", " or")
_TEXT_TOKEN = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")

#: one token: (text, decision) where decision is (value, alternatives, probability) or None
Piece = tuple[str, Any]


def text_tokens(text: str) -> list[str]:
    """Split text into words and punctuation, each with the spaces before it."""
    return _TEXT_TOKEN.findall(text)


def _token_text(value: Any) -> str:
    """How a decided value or alternative reads as a token: JSON for booleans, the raw text for labels."""
    return value if isinstance(value, str) else json.dumps(value)


def json_pieces(value: Any, decisions: dict, path: str = "$") -> list[Piece]:
    """The tokens of ``json.dumps(value, ensure_ascii=False)``, decided values (by path) as one token each."""
    out: list[Piece] = []
    _walk(value, decisions, path, out)
    return out


def _walk(value: Any, decisions: dict, path: str, out: list[Piece]) -> None:
    """Append the pieces of ``value`` at ``path``."""
    if isinstance(value, dict):
        out.append(("{", None))
        for k, (key, item) in enumerate(value.items()):
            if k:
                out.append((", ", None))
            _walk_string(str(key), None, out)
            out.append((": ", None))
            _walk(item, decisions, f"{path}.{key}", out)
        out.append(("}", None))
    elif isinstance(value, list):
        out.append(("[", None))
        for k, item in enumerate(value):
            if k:
                out.append((", ", None))
            _walk(item, decisions, f"{path}[{k}]", out)
        out.append(("]", None))
    else:
        decision = decisions.get(path)
        if decision is not None and decision[0] != value:
            decision = None
        if isinstance(value, str):
            _walk_string(value, decision, out)
        else:
            out.append((json.dumps(value), decision))


def _walk_string(text: str, decision: Any, out: list[Piece]) -> None:
    """A JSON string: its quotes, and its content split as text (one token if decided)."""
    inner = json.dumps(text, ensure_ascii=False)[1:-1]
    out.append(('"', None))
    if decision is not None:
        out.append((inner, decision))
    else:
        out.extend((token, None) for token in text_tokens(inner))
    out.append(('"', None))


def answer_pieces(content: str, value: Any = None, decisions: dict | None = None) -> list[Piece]:
    """The tokens of an answer: of its JSON ``value`` if it is exactly the content, else of its text."""
    if decisions is not None:
        pieces = json_pieces(value, decisions)
        if "".join(p for p, _ in pieces) == content:
            return pieces
    return [(token, None) for token in text_tokens(content)]


def _entry(token: str, logprob: float) -> dict:
    """One {token, logprob, bytes}."""
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _top(token: str, decision: Any, count: int) -> list[dict]:
    """The ``count`` most likely tokens at this place, most likely first."""
    if count <= 0:
        return []
    if decision is None:
        ranked = [(token, PLAIN_LOGPROB)]
        spare = FILLER_MASS
    else:
        value, alternatives, p = decision
        ranked = [(token, math.log(p))]
        spare = (1.0 - p) * FILLER_MASS
        if alternatives:
            share = math.log((1.0 - p) * (1.0 - FILLER_MASS) / len(alternatives))
            ranked += [(_token_text(alt), share) for alt in alternatives]
    taken = {t for t, _ in ranked}
    fillers = (f for f in _FILLERS if f not in taken)
    while len(ranked) < count:
        spare /= 2
        ranked.append((next(fillers), math.log(spare)))
    return [_entry(t, lp) for t, lp in ranked[:count]]


def logprobs_object(pieces: list[Piece], top_logprobs: int) -> dict:
    """A choice's ``logprobs``: ``{"content": [...], "refusal": None}``."""
    content = []
    for token, decision in pieces:
        entry = _entry(token, PLAIN_LOGPROB if decision is None else math.log(decision[2]))
        entry["top_logprobs"] = _top(token, decision, top_logprobs)
        content.append(entry)
    return {"content": content, "refusal": None}
