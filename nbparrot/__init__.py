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
    EndpointUnreachableError,
    FatalError,
    ModelNotFoundError,
    NbparrotError,
    PermissionDeniedError,
    QuotaExceededError,
    RunCancelledError,
    RunNotFinishedError,
    TemplateError,
)
from .pricing import set_price
from .run import Run, live_runs
from .accessor import register as _register_accessors

_register_accessors()

__version__ = "0.1.0"

__all__ = [
    "map", "Run", "live_runs", "configure", "defaults", "set_price",
    "NbparrotError", "ConfigError", "TemplateError", "FatalError", "AuthenticationError",
    "PermissionDeniedError", "ModelNotFoundError", "QuotaExceededError", "EndpointUnreachableError",
    "BudgetExceededError", "RunNotFinishedError", "RunCancelledError",
]
