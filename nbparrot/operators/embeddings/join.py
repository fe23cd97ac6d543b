"""``sim_join``: for each left row its k most similar right rows, chunked so the full matrix is never built."""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ...api import resolve
from ...errors import ConfigError
from ...options import RUN, check_options, takes_options
from ..similarity import nearest
from .engine import DEFAULT_MODEL, MAX_INPUTS
from .inputs import Inputs, texts_of
from .query import _frame_corpus
from .vectors import EmbedRun, _check_common, _check_k, _check_threshold, _no_meta, _params, _start


class _JoinShape:
    def __init__(self, left: Any, right: Any, k: int, threshold: float | None, suffixes: tuple[str, str]):
        self.left, self.right, self.k, self.threshold, self.suffixes = left, right, k, threshold, suffixes

    def __call__(self, run: EmbedRun) -> Any:
        inputs: Inputs = run.prepared
        left_rows, left, left_lacking = _frame_corpus(run, inputs.span("left"))
        right_rows, right, right_lacking = _frame_corpus(run, inputs.span("right"))
        if left_lacking or right_lacking:
            warnings.warn(f"{left_lacking} left and {right_lacking} right row(s) have no embedding (see "
                          "run.errors) and are left out of the join", stacklevel=3)
        if len(left_rows) and len(right_rows):
            found, scores = nearest(left, right, self.k, threshold=self.threshold, normalized=True)
        else:
            found = np.zeros((len(left_rows), 0), dtype=np.int64)
            scores = np.zeros((len(left_rows), 0), dtype=np.float32)
        keep = found >= 0  # best first within each left row; left rows stay in input order
        pairs_left = np.repeat(left_rows, keep.sum(axis=1))
        pairs_right = right_rows[found[keep]]
        return _joined(self.left, self.right, pairs_left, pairs_right, scores[keep].astype(np.float64),
                       self.suffixes)


def _joined(left: Any, right: Any, lpos: np.ndarray, rpos: np.ndarray, similarity: np.ndarray,
            suffixes: tuple[str, str]) -> Any:
    """Left columns + right columns (clashing names suffixed, as pandas' merge does) + similarity."""
    import pandas as pd

    lf = left.take(lpos).reset_index(drop=True)
    rf = right.take(rpos).reset_index(drop=True)
    clash = (set(lf.columns) & set(rf.columns)) | ({"similarity"} & (set(lf.columns) | set(rf.columns)))
    lf = lf.rename(columns={c: f"{c}{suffixes[0]}" for c in lf.columns if c in clash})
    rf = rf.rename(columns={c: f"{c}{suffixes[1]}" for c in rf.columns if c in clash})
    out = pd.concat([lf, rf], axis=1)
    out["similarity"] = similarity
    return out


def _as_frame(data: Any, side: str) -> Any:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return pd.DataFrame(list(data))
    raise ConfigError(f"{side} must be a pandas DataFrame or a list of dicts, not {type(data).__name__}")


@takes_options(RUN)
def sim_join(
    left: Any,
    right: Any,
    *,
    left_on: Any = None,
    right_on: Any = None,
    on: Any = None,
    k: int = 1,
    threshold: float | None = None,
    suffixes: tuple[str, str] = ("_left", "_right"),
    model: str = DEFAULT_MODEL,
    dimensions: int | None = None,
    per_request: int = MAX_INPUTS,
    **options: Any,
) -> EmbedRun:
    """For each row of ``left``, its ``k`` most similar rows of ``right`` (cosine), with the similarity.

    ``left_on`` / ``right_on`` (or ``on`` for both) are columns (their text as is) or ``{field}``
    templates. Both sides are embedded in one run (one panel; texts found in the cache, or on both
    sides, are sent once). The result is a DataFrame of the left columns, the right columns (names
    on both sides get ``suffixes``, as in pandas' merge; so does a column named ``similarity``) and
    ``similarity``: left rows in input order, each one's matches best first, a fresh RangeIndex.
    Rows without a vector take no part, with a warning if they failed. The similarities are computed
    a block of left rows at a time: the full left x right matrix is never built.

    k: matches per left row (fewer if ``right`` has fewer rows).
    threshold: drop pairs less similar than this (cosine, -1..1); a left row may then have none.
    suffixes: added to column names found on both sides.
    """
    k, threshold = _check_k(k), _check_threshold(threshold)
    left_on = on if left_on is None else left_on
    right_on = left_on if right_on is None else right_on
    if left_on is None:
        raise ConfigError("sim_join needs left_on= and right_on= (or on= for both): the columns or templates to compare")
    if not (isinstance(suffixes, (tuple, list)) and len(suffixes) == 2 and all(isinstance(s, str) for s in suffixes)
            and suffixes[0] != suffixes[1]):
        raise ConfigError(f"suffixes must be two different strings, not {suffixes!r}")
    options = check_options(sim_join, _check_common(dict(options), model, dimensions, per_request))
    _no_meta(options, "sim_join")
    options["model"] = model
    setup = resolve(options)
    left_frame, right_frame = _as_frame(left, "left"), _as_frame(right, "right")
    left_texts = texts_of(left_frame, left_on, on_missing=options["on_missing"], what="left_on")
    right_texts = texts_of(right_frame, right_on, on_missing=options["on_missing"], what="right_on")
    inputs = Inputs([("left", left_texts), ("right", right_texts)])
    shape = _JoinShape(left_frame, right_frame, k, threshold, tuple(suffixes))
    label = f"sim_join {left_texts.templates[0]} ~ {right_texts.templates[0]}"
    return _start(setup, inputs, _params(model, dimensions), shape, label, per_request)
