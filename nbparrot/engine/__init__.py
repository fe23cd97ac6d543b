"""The batch engine: send every row's request once, paced, retried, and accounted for.

- ``core``: ``Engine`` — the dispatcher, one task per attempt, the budget, cancel and stop.
- ``planning``: before the first request, each row settled (skipped, unsendable, cached), keyed and costed.
- ``answers``: what each answer does to its row: done, retried, re-asked, failed, or the run stopped.
- ``progress``: the live counters a panel reads; ``settings``: how hard a run pushes.
- ``columns``: compact per-row storage (packed keys, token budgets, the queue) for a million rows.
- ``words``: waits and transport errors in words.

Outcomes live in ``nbparrot.outcomes`` (column-wise, one per row).
"""

from ..outcomes import CANCELLED, FAILED, OK, PENDING, SKIPPED, Outcome, Outcomes
from .core import Engine
from .progress import Progress
from .settings import LOOKUP_KEYS, PAUSE_SHOWN, PLAN_SLICE, EngineSettings

__all__ = ["Engine", "EngineSettings", "Outcome", "Outcomes", "Progress", "PENDING", "OK", "FAILED", "CANCELLED",
           "SKIPPED", "PAUSE_SHOWN", "PLAN_SLICE", "LOOKUP_KEYS"]
