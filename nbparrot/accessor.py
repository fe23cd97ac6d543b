"""The pandas accessor: ``df.llm.map(template, model=...)`` (also ``df.parrot.map``).

It is ``nbparrot.map`` with the DataFrame already given, so every option is the same. If
another installed package has already registered ``df.llm``, nbparrot leaves it alone and
stays reachable as ``df.parrot``, and says so once.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pandas as pd

from . import api
from .operators import decisions, embeddings, table
from .run import Run

__all__ = ["LLMAccessor", "register"]


class LLMAccessor:
    """``df.llm``: LLM calls over this DataFrame's rows."""

    def __init__(self, frame: pd.DataFrame):
        self._frame = frame

    def map(self, template: Any, **options: Any) -> Run:
        """Render ``template`` for every row and send it; see ``nbparrot.map`` for every option."""
        return api.map(self._frame, template, **options)

    def filter(self, predicate: Any, **options: Any) -> Run:
        """The rows for which the model says ``predicate`` is true; see ``nbparrot.filter``."""
        return decisions.filter(self._frame, predicate, **options)

    def classify(self, template: Any, labels: Any, **options: Any) -> Run:
        """One of ``labels`` per row, as a Categorical; see ``nbparrot.classify``."""
        return decisions.classify(self._frame, template, labels, **options)

    def embed(self, template_or_column: Any, **options: Any) -> Run:
        """Each row's text (a column, or a {field} template) as a float32 vector; see ``nbparrot.embed``."""
        return embeddings.embed(self._frame, template_or_column, **options)

    def search(self, query: str, **options: Any) -> Run:
        """The rows most similar to ``query``, best first, with ``similarity``; see ``nbparrot.search``."""
        return embeddings.search(self._frame, query, **options)

    def sim_join(self, right: Any, **options: Any) -> Run:
        """For each row, its most similar rows of ``right``; see ``nbparrot.sim_join``."""
        return embeddings.sim_join(self._frame, right, **options)

    def agg(self, template: str, **options: Any) -> Run:
        """One answer per group of rows (all rows with ``by=None``); see ``nbparrot.agg``."""
        return table.agg(self._frame, template, **options)

    def topk(self, criterion: str, k: int, **options: Any) -> Run:
        """The ``k`` rows that best meet ``criterion``, best first, with ``rank``; see ``nbparrot.topk``."""
        return table.topk(self._frame, criterion, k, **options)

    def join(self, right: Any, predicate: str, **options: Any) -> Run:
        """The (row, ``right`` row) pairs for which ``predicate`` holds; see ``nbparrot.join``."""
        return table.join(self._frame, right, predicate, **options)


def copy_signature(method: Any, func: Any) -> None:
    """Give an accessor method ``(self, ..., **options)`` the signature and docs of ``func(data, ...)``."""
    signature = inspect.signature(func)
    method.__signature__ = signature.replace(
        parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
        + list(signature.parameters.values())[1:])  # all but the data (sim_join's left)
    method.__doc__ = (method.__doc__ or "") + "\n\n" + (func.__doc__ or "")


def copy_map_signature(method: Any) -> None:
    """Give an accessor's ``map(template, **options)`` the signature and docs of ``nbparrot.map``."""
    copy_signature(method, api.map)


def register_accessors(owner: type, register_accessor: Any, accessor: type, shown: str) -> list[str]:
    """Register ``.parrot`` always and ``.llm`` unless another package owns it; returns the names.

    ``owner`` is the frame class (pandas' or dask's), ``register_accessor`` its library's
    registration function, ``shown`` how users write it ("df", "ddf"). Registering our own
    accessor again (a module reload) is silent.
    """
    ours = lambda existing: getattr(existing, "__qualname__", None) == accessor.__qualname__  # noqa: E731
    names = ["parrot"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        register_accessor("parrot")(accessor)
        existing = getattr(owner, "llm", None)  # an accessor class, or whatever else holds the name
        if existing is None or ours(existing):
            register_accessor("llm")(accessor)
            return names + ["llm"]
    where = getattr(existing, "__module__", None) or type(existing).__name__
    warnings.warn(f"{shown}.llm is already registered by another package ({where}); "
                  f"nbparrot is available as {shown}.parrot", stacklevel=3)
    return names


copy_map_signature(LLMAccessor.map)
copy_signature(LLMAccessor.filter, decisions.filter)
copy_signature(LLMAccessor.classify, decisions.classify)
copy_signature(LLMAccessor.embed, embeddings.embed)
copy_signature(LLMAccessor.search, embeddings.search)
copy_signature(LLMAccessor.sim_join, embeddings.sim_join)
copy_signature(LLMAccessor.agg, table.agg)
copy_signature(LLMAccessor.topk, table.topk)
copy_signature(LLMAccessor.join, table.join)


def register() -> list[str]:
    """Register ``df.parrot`` and, unless another package owns it, ``df.llm``."""
    return register_accessors(pd.DataFrame, pd.api.extensions.register_dataframe_accessor, LLMAccessor, "df")
