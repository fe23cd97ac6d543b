"""``embed``: the run, its result (a Series of float32 vectors, ``run.matrix()``) and the checks it shares."""

from __future__ import annotations

from typing import Any

import numpy as np

from ...api import launch, resolve
from ...errors import ConfigError
from ...options import RUN, check_options, takes_options
from ...results import _meta_columns
from ...run import Run
from .engine import DEFAULT_MODEL, EmbedEngine, MAX_INPUTS, _OK
from .inputs import Inputs, texts_of


class EmbedRun(Run):
    """A ``Run`` of embeddings: ``matrix()`` gives the vectors as one array."""

    def matrix(self) -> np.ndarray:
        """The vectors as one float32 array of (rows x dims), in row order; rows without a vector
        (skipped, failed, cancelled) are NaN. The run's own array: it is not copied."""
        if not self.done():
            self.result()  # raises RunNotFinishedError with the usual advice
        engine: EmbedEngine = self.engine
        if engine.vectors is None:
            return np.zeros((len(engine.outcomes), 0), dtype=np.float32)
        missing = np.frombuffer(engine.outcomes.status, dtype=np.uint8) != _OK
        if missing.any():
            engine.vectors[missing] = np.nan
        return engine.vectors

    def describe_answer(self, row: int) -> str:
        """A short text for a row's vector in the panel's preview."""
        vector = self.engine.vector(row)
        if vector is None:
            return ""
        head = ", ".join(f"{v:.3f}" for v in vector[:3])
        return f"[{head}, …] ({len(vector)} dims)"


def _vector_series(run: EmbedRun, rows: range, index: Any, name: str) -> Any:
    import pandas as pd

    engine: EmbedEngine = run.engine
    values = np.empty(len(rows), dtype=object)
    if engine.vectors is not None:
        status = np.frombuffer(engine.outcomes.status, dtype=np.uint8)[rows.start:rows.stop]
        have = np.flatnonzero(status == _OK)
        block = engine.vectors[rows.start:rows.stop]
        for k in have.tolist():  # one view per row (a list assigned at once would be broadcast as 2-D)
            values[k] = block[k]
    return pd.Series(values, index=index, name=name, dtype=object)


class _EmbedShape:
    """``embed``'s result: a Series of vectors (or, for a list of dicts, the dicts with the vector)."""

    def __init__(self, name: str, meta: bool):
        self.name, self.meta = name, meta

    def __call__(self, run: EmbedRun) -> Any:
        prepared: Inputs = run.prepared
        rows = range(len(prepared))
        series = _vector_series(run, rows, prepared.index, self.name)
        if prepared.records is not None:
            columns = {self.name: series.tolist()}
            if self.meta:
                columns.update(_meta_columns(run, list(rows)))
            return [{**record, **{c: values[k] for c, values in columns.items()}}
                    for k, record in enumerate(prepared.records)]
        if not self.meta:
            return series
        import pandas as pd

        return pd.DataFrame({self.name: series, **_meta_columns(run, list(rows))}, index=prepared.index)


# ---- shared checks -----------------------------------------------------------------------


def _check_common(options: dict, model: Any, dimensions: Any, per_request: Any) -> dict:
    mode = options.pop("mode", "live")
    options.pop("poll_interval", None)
    if mode == "batch":
        raise ConfigError("embeddings do not run through the Batch API (mode='batch') in this version: use the "
                          "default live mode (embeddings cost $0.02-0.13 per million tokens, and the run packs "
                          "2,048 texts per request)")
    if mode != "live":
        raise ConfigError(f"mode must be 'live' or 'batch', not {mode!r}")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model must be an embedding model's name, not {model!r}")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise ConfigError(f"dimensions must be a positive integer, not {dimensions!r}")
    if isinstance(per_request, bool) or not isinstance(per_request, int) or not 1 <= per_request <= MAX_INPUTS:
        raise ConfigError(f"per_request must be an integer from 1 to {MAX_INPUTS:,}, not {per_request!r}")
    return options


def _no_meta(options: dict, what: str) -> None:
    if options.get("meta"):
        raise ConfigError(f"meta=True gives provenance per embedded row, which {what} does not return; use "
                          "embed(..., meta=True), or run.errors and run.usage of this run")


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer, not {k!r}")
    return int(k)


def _check_threshold(threshold: Any) -> float | None:
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or \
            not -1.0 <= float(threshold) <= 1.0:
        raise ConfigError(f"threshold must be a cosine similarity between -1 and 1, not {threshold!r}")
    return float(threshold)


def _params(model: str, dimensions: int | None) -> dict:
    return {"model": model, **({"dimensions": dimensions} if dimensions is not None else {})}


def _start(setup: Any, inputs: Inputs, params: dict, shape: Any, label: str, per_request: int) -> EmbedRun:
    return launch(setup, inputs, params, shape, engine=EmbedEngine, label=label, run_class=EmbedRun,
                  per_request=per_request)


# ---- embed -------------------------------------------------------------------------------


@takes_options(RUN)
def embed(
    data: Any,
    template_or_column: Any,
    *,
    model: str = DEFAULT_MODEL,
    dimensions: int | None = None,
    per_request: int = MAX_INPUTS,
    name: str = "embedding",
    **options: Any,
) -> EmbedRun:
    """Embed each row's text with ``/v1/embeddings``; a Series of float32 vectors on the frame's index.

    ``template_or_column`` is a column name (its text as is) or a ``{field}`` template. Returns a
    ``Run`` (``await`` it in a notebook; in a script it has finished): ``run.result()`` is the Series
    (None where a row has no vector: skipped for a missing value, failed, cancelled; see
    ``run.errors``), ``run.matrix()`` one (rows x dims) float32 array with NaN rows there. Vectors are
    cached per text (base URL, model, dimensions), so a rerun, or ``search`` / ``sim_join`` over the
    same texts, sends only what is not cached; identical texts are sent once.

    model: an embedding model (text-embedding-3-small, -3-large, ada-002, ...).
    dimensions: shorter vectors from the text-embedding-3 models (e.g. 256).
    per_request: texts per request, at most 2,048 (a gateway may allow fewer).
    name: the Series' name (the key added to each dict for a list of dicts).
    """
    options = check_options(embed, _check_common(dict(options), model, dimensions, per_request))
    options["model"] = model
    setup = resolve(options)
    prepared = texts_of(data, template_or_column, on_missing=options["on_missing"], what="template_or_column")
    inputs = Inputs([("data", prepared)])
    return _start(setup, inputs, _params(model, dimensions), _EmbedShape(name, bool(options["meta"])),
                  f"embed {prepared.templates[0]}", per_request)


# ---- search ------------------------------------------------------------------------------

