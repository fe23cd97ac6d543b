"""Cosine similarity over embedding matrices: the k nearest rows, chunked so memory stays flat.

``nearest(queries, corpus, k)`` answers both ``search`` (one query) and ``sim_join`` (one
query per left row). Both sides are float32 and L2-normalised once, so cosine similarity is
a matrix product. The product is computed for a block of queries at a time, sized so that
the block's scores take at most ``block_bytes`` (64 MiB by default): a 100,000 × 100,000
join never builds the full N×M matrix, and the extra memory is the two normalised copies
plus one block. Top-k per row is ``argpartition`` (linear), then a sort of the k survivors.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["as_matrix", "normalize", "nearest"]

BLOCK_BYTES = 64 * 1024 * 1024


def as_matrix(vectors: Any) -> np.ndarray:
    """One float32 2-D array from a 2-D array, or a sequence/Series of 1-D vectors of equal length.

    Raises ``ValueError`` naming the problem for missing vectors or mixed lengths."""
    if isinstance(vectors, np.ndarray) and vectors.ndim == 2:
        return vectors.astype(np.float32, copy=False)
    items: Sequence[Any] = list(getattr(vectors, "tolist", lambda: vectors)()) if not isinstance(vectors, list) else vectors
    if not items:
        return np.zeros((0, 0), dtype=np.float32)
    missing = [k for k, v in enumerate(items) if v is None or (isinstance(v, float) and v != v)]
    if missing:
        raise ValueError(f"{len(missing)} row(s) have no embedding (first at position {missing[0]})")
    sizes = {len(v) for v in items}
    if len(sizes) != 1:
        raise ValueError(f"embeddings of different lengths: {sorted(sizes)[:5]}")
    return np.stack(items).astype(np.float32, copy=False)


def normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as a new float32 array."""
    matrix = np.array(matrix, dtype=np.float32, copy=True)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    np.divide(matrix, norms, out=matrix, where=norms > 0)
    return matrix


def nearest(queries: np.ndarray, corpus: np.ndarray, k: int, *, threshold: float | None = None,
            normalized: bool = False, block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the ``k`` most similar corpus rows: ``(indices, scores)``, each (Q, k), best first.

    With ``threshold``, pairs below it get index -1 and score NaN. ``normalized=True`` says both
    inputs already have unit rows (skips a copy)."""
    if queries.ndim != 2 or corpus.ndim != 2:
        raise ValueError("queries and corpus must be 2-D arrays")
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(f"embeddings of different dimensions: {queries.shape[1]} and {corpus.shape[1]} "
                         "(were they made with the same model and dimensions?)")
    if not normalized:
        queries, corpus = normalize(queries), normalize(corpus)
    n_q, n_c = queries.shape[0], corpus.shape[0]
    k = min(k, n_c)
    indices = np.full((n_q, k), -1, dtype=np.int64)
    scores = np.full((n_q, k), np.nan, dtype=np.float32)
    if not n_q or not k:
        return indices, scores
    block = max(1, min(n_q, block_bytes // (4 * n_c)))
    corpus_t = corpus.T  # a view: BLAS reads it transposed, no copy
    sims = np.empty((block, n_c), dtype=np.float32)
    rows = np.arange(block)[:, None]
    for start in range(0, n_q, block):
        stop = min(n_q, start + block)
        out = sims[: stop - start]
        np.matmul(queries[start:stop], corpus_t, out=out)
        if k == 1:
            top = out.argmax(axis=1)[:, None]
        else:
            top = np.argpartition(out, n_c - k, axis=1)[:, n_c - k:] if k < n_c else np.broadcast_to(
                np.arange(n_c), out.shape).copy()
            order = np.argsort(-out[rows[: stop - start], top], axis=1, kind="stable")
            top = np.take_along_axis(top, order, axis=1)
        indices[start:stop] = top
        scores[start:stop] = out[rows[: stop - start], top]
    if threshold is not None:
        below = ~(scores >= threshold)
        indices[below] = -1
        scores[below] = np.nan
    return indices, scores
