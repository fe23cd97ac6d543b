"""Table operators: ``agg`` (one answer per group, folded to fit the context), ``topk`` (the k best rows
by a criterion) and ``join`` (the pairs of two tables a predicate holds for, optionally narrowed by
embeddings first).

Each is a run of several passes on the shared runtime (``nbparrot.staged``): one ``Run`` at once in a
notebook with one panel and Cancel, one estimate of every pass before anything is sent,
``max_cost`` / ``confirm_over`` over the whole, the cache (a rerun sends nothing) and one outcome
per request in each pass (``run.passes``, ``run.errors``).
"""

from .agg import agg
from .join import join
from .topk import topk

__all__ = ["agg", "topk", "join"]
