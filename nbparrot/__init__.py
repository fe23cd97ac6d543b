"""nbparrot: run thousands of LLM calls over a pandas DataFrame from a notebook.

``nbparrot.map(df, "Summarize: {text}", model=...)`` starts a batch on the notebook kernel's
own event loop and returns a ``Run`` at once (``await`` it for the result); in a script it
runs to completion. See README.md.
"""

from .api import map
from .config import configure, defaults
from .errors import (
    AuthenticationError,
    BudgetExceededError,
    ConfigError,
    EndpointFailingError,
    EndpointUnreachableError,
    FatalError,
    LogprobsUnavailableError,
    RateLimitWaitError,
    ModelNotFoundError,
    NbparrotError,
    PermissionDeniedError,
    QuotaExceededError,
    RunCancelledError,
    RunNotFinishedError,
    TemplateError,
)
from .operators.decisions import classify, filter  # noqa: A004 - nbparrot.filter, as nbparrot.map
from .operators.embeddings import embed, search, sim_join
from .operators.table import agg, join, topk
from .operators.scoring import compare
from .operators.similarity import as_matrix
from .pricing import set_price
from .run import Run, live_runs
from .accessor import register as _register_accessors

_register_accessors()


def load_ipython_extension(ipython) -> None:  # noqa: ANN001 - IPython's hook
    """``%load_ext nbparrot``: register the ``%llm`` / ``%%llm`` magics."""
    from .magics import load_ipython_extension as load

    load(ipython)


def _register_magics_in_a_kernel() -> None:
    """``import nbparrot`` inside a Jupyter kernel registers the magics too."""
    import sys

    if "IPython" not in sys.modules:  # not running under IPython: nothing to do (and no import cost)
        return
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None and getattr(shell, "kernel", None) is not None and "llm" not in shell.magics_manager.magics["cell"]:
        load_ipython_extension(shell)


_register_magics_in_a_kernel()

__version__ = "0.1.0"

__all__ = [
    "map", "filter", "classify", "compare", "embed", "search", "sim_join", "agg", "topk", "join", "as_matrix", "Run",
    "live_runs", "configure", "defaults", "set_price",
    "NbparrotError", "ConfigError", "TemplateError", "FatalError", "AuthenticationError",
    "PermissionDeniedError", "ModelNotFoundError", "QuotaExceededError", "EndpointUnreachableError",
    "EndpointFailingError", "RateLimitWaitError", "LogprobsUnavailableError", "BudgetExceededError", "RunNotFinishedError", "RunCancelledError",
]

import sys as _sys

if "dask.dataframe" in _sys.modules:  # dask already imported: register ddf.llm / ddf.parrot too
    from . import dask as _dask  # noqa: F401,E402
