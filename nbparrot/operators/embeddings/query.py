"""``search``: the rows most like a query, best first; the frames' unit vectors kept in memory between queries."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np

from ...api import resolve
from ...errors import ConfigError, NbparrotError
from ...options import RUN, check_options, takes_options
from ...outcomes import SKIPPED, Outcomes
from ...prepare import Prepared
from ...tokens import estimate_text_tokens
from ..similarity import nearest, normalize
from .engine import DEFAULT_MODEL, EmbedEngine, MAX_INPUTS, MAX_INPUT_TOKENS, MEMO_BYTES, MEMO_ENTRIES, _OK
from .inputs import Inputs, texts_of
from .vectors import EmbedRun, _check_common, _check_k, _check_threshold, _no_meta, _params, _start


_memo: OrderedDict[tuple, "_Corpus"] = OrderedDict()


class _Corpus:
    """A frame's unit vectors, as ``search`` keeps them: valid while the columns it read are unchanged."""

    __slots__ = ("columns", "positions", "matrix")

    def __init__(self, columns: dict, positions: np.ndarray, matrix: np.ndarray):
        self.columns, self.positions, self.matrix = columns, positions, matrix

    def matches(self, columns: dict) -> bool:
        held = self.columns
        return held.keys() == columns.keys() and all(
            held[name] is columns[name] or held[name].equals(columns[name]) for name in held)


def clear_memo() -> None:
    """Forget the vectors ``search`` keeps in memory (the cache on disk keeps them)."""
    _memo.clear()


def _memo_key(setup: Any, prepared: Prepared, params: dict) -> tuple:
    return (setup.endpoint.base_url, json.dumps(params, sort_keys=True), prepared.templates[0],
            prepared.on_missing, tuple(prepared._columns))


def _remember(key: tuple, corpus: _Corpus) -> None:
    _memo[key] = corpus
    _memo.move_to_end(key)
    while len(_memo) > 1 and (len(_memo) > MEMO_ENTRIES or
                              sum(c.matrix.nbytes for c in _memo.values()) > MEMO_BYTES):
        _memo.popitem(last=False)


def _ranked(data: Any, positions: np.ndarray, corpus: np.ndarray, query: np.ndarray, k: int,
            threshold: float | None) -> Any:
    """The rows of ``data`` nearest to ``query``, best first, with their ``similarity``."""
    import pandas as pd

    if len(positions) and len(query) != corpus.shape[1]:
        raise ConfigError(f"the query has {len(query)} dimensions and the rows {corpus.shape[1]}")
    found, scores = nearest(normalize(query[None, :]), corpus, k, threshold=threshold, normalized=True)
    keep = found[0] >= 0
    rows, similarity = positions[found[0][keep]], scores[0][keep].astype(np.float64)
    if isinstance(data, pd.DataFrame):
        out = data.take(rows)
        out["similarity"] = similarity
        return out
    return [{**data[r], "similarity": float(s)} for r, s in zip(rows.tolist(), similarity.tolist())]


def _frame_corpus(run: EmbedRun, span: range) -> tuple[np.ndarray, np.ndarray, int]:
    """The unit vectors of the rows of ``span`` that have one, their positions, and how many rows lack one
    for a reason other than a missing value."""
    engine: EmbedEngine = run.engine
    status = np.frombuffer(engine.outcomes.status, dtype=np.uint8)[span.start:span.stop]
    positions = np.flatnonzero(status == _OK)
    lacking = int(np.count_nonzero((status != _OK) & (status != Outcomes.code(SKIPPED))))
    if engine.vectors is None or not len(positions):
        return positions, np.zeros((0, engine.dims or 0), dtype=np.float32), lacking
    return positions, _unit_rows(engine.vectors[span.start:span.stop][positions]), lacking


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` (a fresh array) with its rows scaled to unit length, in place."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return matrix


class _SearchShape:
    def __init__(self, data: Any, k: int, threshold: float | None, memo: tuple | None, corpus: _Corpus | None,
                 columns: dict):
        self.data, self.k, self.threshold, self.memo, self.corpus, self.columns = data, k, threshold, memo, corpus, columns

    def __call__(self, run: EmbedRun) -> Any:
        engine: EmbedEngine = run.engine
        inputs: Inputs = run.prepared
        query_row = inputs.span("query").start
        query = engine.vector(query_row)
        if query is None:
            why = engine.outcomes[query_row].error or engine.outcomes[query_row].status
            if run.done():
                raise NbparrotError(f"the query could not be embedded: {why}")
            return self._empty()
        corpus = self.corpus
        if corpus is None:
            positions, matrix, lacking = _frame_corpus(run, inputs.span("data"))
            if lacking:
                warnings.warn(f"{lacking} row(s) have no embedding (see run.errors) and are left out of the "
                              "search", stacklevel=3)
            corpus = _Corpus(self.columns, positions, matrix)
            if run.done() and not lacking and self.memo is not None:
                _remember(self.memo, corpus)
        return _ranked(self.data, corpus.positions, corpus.matrix, query, self.k, self.threshold)

    def _empty(self) -> Any:
        import pandas as pd

        if isinstance(self.data, pd.DataFrame):
            return self.data.iloc[:0].assign(similarity=np.zeros(0))
        return []


@takes_options(RUN)
def search(
    data: Any,
    query: str,
    *,
    on: Any,
    k: int = 10,
    threshold: float | None = None,
    model: str = DEFAULT_MODEL,
    dimensions: int | None = None,
    per_request: int = MAX_INPUTS,
    **options: Any,
) -> EmbedRun:
    """The ``k`` rows most similar (cosine) to the text ``query``, best first, with a ``similarity`` column.

    ``on`` is a column (its text as is) or a ``{field}`` template, as ``embed`` takes. The rows'
    vectors come from the cache (``embed`` over the same texts fills it; a frame never embedded is
    embedded here, with the panel); the last frames searched also stay in memory while their
    columns are unchanged, so a second query costs one embedding and a matrix product. Returns a
    ``Run`` whose result is a DataFrame: the input's columns and index plus ``similarity`` (a list
    of dicts for a list of dicts). Rows without a vector are left out, with a warning if they failed.

    k: how many rows (fewer if the frame has fewer).
    threshold: leave out rows less similar than this (cosine, -1..1).
    model, dimensions, per_request: as for ``embed``; the query is embedded with the same model.
    """
    k, threshold = _check_k(k), _check_threshold(threshold)
    if not isinstance(query, str) or not query:
        raise ConfigError(f"query must be a non-empty string, not {query!r}")
    if estimate_text_tokens(query) > MAX_INPUT_TOKENS:
        raise ConfigError(f"the query is about {estimate_text_tokens(query):,} tokens, over the "
                          f"{MAX_INPUT_TOKENS:,}-token limit of one embedding input")
    options = check_options(search, _check_common(dict(options), model, dimensions, per_request))
    _no_meta(options, "search")
    options["model"] = model
    setup = resolve(options)
    prepared = texts_of(data, on, on_missing=options["on_missing"])
    params = _params(model, dimensions)
    import pandas as pd

    memo, corpus, columns = None, None, {}
    if isinstance(data, pd.DataFrame) and setup.cache is not None and not setup.refresh:
        columns = dict(prepared._columns)
        memo = _memo_key(setup, prepared, params)
        corpus = _memo.get(memo)
        if corpus is not None and not corpus.matches(columns):
            corpus = None
            del _memo[memo]
    parts: list = [("query", [query])] if corpus is not None else [("data", prepared), ("query", [query])]
    shape = _SearchShape(data, k, threshold, memo, corpus, columns)
    return _start(setup, Inputs(parts), params, shape, f"search {prepared.templates[0]}: {query[:40]!r}",
                  per_request)


# ---- sim_join ----------------------------------------------------------------------------


