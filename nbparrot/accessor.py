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
from .run import Run

__all__ = ["LLMAccessor", "register"]


class LLMAccessor:
    """``df.llm``: LLM calls over this DataFrame's rows."""

    def __init__(self, frame: pd.DataFrame):
        self._frame = frame

    def map(self, template: Any, **options: Any) -> Run:
        """Render ``template`` for every row and send it; see ``nbparrot.map`` for every option."""
        return api.map(self._frame, template, **options)


_signature = inspect.signature(api.map)
LLMAccessor.map.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
    + [p for name, p in _signature.parameters.items() if name != "data"])
LLMAccessor.map.__doc__ = (LLMAccessor.map.__doc__ or "") + "\n\n" + (api.map.__doc__ or "")


def register() -> list[str]:
    """Register ``df.parrot`` always and ``df.llm`` unless another package owns it; returns the names."""
    names = ["parrot"]
    pd.api.extensions.register_dataframe_accessor("parrot")(LLMAccessor)
    existing = getattr(pd.DataFrame, "llm", None)  # an accessor class, or whatever else holds the name
    if existing is None or existing is LLMAccessor:
        pd.api.extensions.register_dataframe_accessor("llm")(LLMAccessor)
        names.append("llm")
    else:
        where = getattr(existing, "__module__", None) or type(existing).__name__
        warnings.warn(f"df.llm is already registered by another package ({where}); "
                      "nbparrot is available as df.parrot", stacklevel=3)
    return names
