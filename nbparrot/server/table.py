"""Truth for the table operators (``agg``, ``topk``, ``join``): markers a test puts in its rows, and the
answers they get, so a test can check a result against rules it reproduces.

All the rules read the **last user message** (the decision text, as :mod:`.decisions` does).

* **Rows seen** (``agg``): ``<<row:ID>>`` marks a row. A plain-text answer to a message holding
  row markers, or ``<<seen:ID,ID,...>>`` lists (a lower level's answers), is ``<<seen:...>>`` with
  every ID found, in order (rows first, then the lists' IDs). Each answered request whose message
  holds row markers is logged with its IDs in ``GET /stats``'s ``rows_seen`` (a list per request,
  in the order they were answered): a test checks from the server's side that every row went into
  exactly one first-level request. A refused request (e.g. ``context_length_exceeded``) logs nothing.
* **Scores** (``topk``): ``<<score:N>>`` (N a non-negative integer) marks a row's true merit. An
  integer field of a structured answer whose decision text holds exactly one score marker is
  ``N // 10`` clamped to the field's ``minimum``..``maximum`` (:func:`expected_score`): a coarse
  score, as a model's 0-100 rating is. A string enum field whose decision text holds as many score
  markers as the enum has labels (two or more) is the label in the position of the highest
  marker, the first of equal ones (:func:`expected_choice`): a pairwise comparison sees the exact
  merits, so rows tied on the coarse score can still be ordered.
* **Keys** (``join``): ``<<key:K>>`` marks a row's key. A boolean field whose decision text holds key
  markers is true exactly when some key appears at least twice (:func:`expected_match`): a pair
  of a left and a right row matches when they share a key. ``mock-weak`` inverts it on ``<<hard>>``
  texts, as it does the other decisions.

Plain-text answers (no ``response_format``) follow the same truths in words, so tools that read
text, as LOTUS's operators do, can be measured on the same data: two or more score markers get
``Document N`` (N the 1-based position of the highest, the wording LOTUS's comparisons ask for),
key markers ``True`` or ``False``.

Anything without these markers gets the usual answers of :mod:`.chat` and :mod:`.decisions`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

__all__ = ["ROW_MARKER", "SCORE_MARKER", "KEY_MARKER", "rows_in", "text_answer", "expected_seen", "expected_score",
           "expected_choice", "expected_match"]

ROW_MARKER = "<<row:"
SCORE_MARKER = "<<score:"
KEY_MARKER = "<<key:"
_ROWS = re.compile(r"<<row:([^<>\s,]+)>>")
_SEEN = re.compile(r"<<seen:([^<>]*)>>")
_SCORES = re.compile(r"<<score:(\d+)>>")
_KEYS = re.compile(r"<<key:([^<>\s]+)>>")


def rows_in(text: str) -> list[str]:
    """The IDs of the ``<<row:ID>>`` markers in ``text``, in order."""
    return _ROWS.findall(text) if ROW_MARKER in text else []


def text_answer(text: str) -> str | None:
    """The plain-text answer to a message holding the markers (see the module docstring), else None."""
    if ROW_MARKER in text or "<<seen:" in text:
        ids = _ROWS.findall(text)
        for listed in _SEEN.findall(text):
            ids += [i for i in listed.split(",") if i]
        return f"<<seen:{','.join(ids)}>>"
    if SCORE_MARKER in text:
        found = [int(n) for n in _SCORES.findall(text)]
        if len(found) >= 2:
            return f"Document {found.index(max(found)) + 1}"
    match = expected_match(text)
    if match is not None:
        return "True" if match else "False"
    return None


def expected_seen(answer: str | None) -> list[str]:
    """The IDs an ``agg`` answer says it covered (what ``text_answer`` put in it)."""
    return [i for listed in _SEEN.findall(answer or "") for i in listed.split(",") if i]


def expected_score(text: str, low: int = 0, high: int = 100) -> int | None:
    """The integer fields' value for a decision text with exactly one score marker, else None."""
    if SCORE_MARKER not in text:
        return None
    found = _SCORES.findall(text)
    if len(found) != 1:
        return None
    return max(low, min(high, int(found[0]) // 10))


def expected_choice(text: str, labels: Sequence[str]) -> str | None:
    """The enum value for a decision text with one score marker per label (two or more), else None."""
    if SCORE_MARKER not in text:
        return None
    found = [int(n) for n in _SCORES.findall(text)]
    labels = list(dict.fromkeys(labels))
    if len(labels) < 2 or len(found) != len(labels):
        return None
    return labels[found.index(max(found))]


def expected_match(text: str) -> bool | None:
    """The boolean fields' value for a decision text with key markers, else None."""
    if KEY_MARKER not in text:
        return None
    keys = _KEYS.findall(text)
    if not keys:
        return None
    return max(Counter(keys).values()) >= 2
