"""Prompt variants side by side (a ``%%llm`` cell with ``---`` lines): a column of answers per
variant under its prompt and a tokens / cost / latency line, shown when the run ends.
"""

from __future__ import annotations

import asyncio
import html
import json
from typing import Any

from IPython.display import HTML, display

from . import look
from .images.thumbs import row_thumbnails
from .pricing import cost_of, format_usd
from .run import Run

__all__ = ["comparison_html", "show_comparison_when_done"]

_tasks: set[asyncio.Task] = set()  # strong references to the tasks waiting to show a comparison


def show_comparison_when_done(run: Run, variants: list[str], render: Any = None) -> None:
    """Once the run ends, show one column per variant and tokens / cost / latency per variant
    (or what ``render(run, variants)`` makes of it: the scores of ``--expect``); at once if it
    has ended already (a notebook executed headlessly finishes it within the cell)."""
    render = render or comparison_html
    hide = getattr(run.view, "hide_preview", None)
    if hide is not None:
        hide()  # the comparison below shows the answers: the panel keeps to its summary
    if run.done():
        display(HTML(render(run, variants)))
        return
    handle = display(HTML("<i>comparing variants…</i>"), display_id=True)

    async def show() -> None:
        await asyncio.wait({run._task})
        handle.update(HTML(render(run, variants)))

    task = run._loop.create_task(show())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


def comparison_html(run: Run, variants: list[str]) -> str:
    """Side-by-side answers (a column per variant) under each variant's prompt and usage line."""
    k = len(variants)
    rows = len(run.outcomes) // k
    labels = list(run.prepared.index) if run.prepared.frame is not None else [""] * rows
    usage, prompts = ["usage"], ["prompt"]
    for v in range(k):
        outs = [run.outcomes[r * k + v] for r in range(rows)]
        usage.append(html.escape(_usage(run, outs)))
        prompts.append(f"<code>{html.escape(variants[v][:200])}</code>")
    body = [prompts, usage]
    for r in range(rows):
        body.append([row_thumbnails(run.prepared, r * k) + html.escape(str(labels[r])),
                     *(_answer_cell(run.outcomes[r * k + v]) for v in range(k))])
    return look.table("nbparrot-compare", ["", *(f"variant {v + 1}" for v in range(k))], body, escape=False)


def _usage(run: Run, outs: list[Any]) -> str:
    """``12 tokens · $0.000123 · mean latency 0.42s``; cached answers said as such, at no cost."""
    cached = sum(1 for o in outs if o.cached)
    sent = [o for o in outs if not o.cached]
    tokens = sum(o.prompt_tokens + o.completion_tokens for o in outs)
    parts = ["cached" if cached == len(outs) else f"{cached} of {len(outs)} cached"] if cached else []
    parts.append(f"{tokens:,} tokens")
    if sent:
        costs = [cost_of(run.model, o.prompt_tokens, o.completion_tokens, o.cached_tokens, batch=run.engine.batch,
                         base_url=run.engine.endpoint.base_url) for o in sent]
        parts.append(format_usd(None if any(c is None for c in costs) else sum(costs)))
        latencies = [o.latency for o in sent if o.latency is not None]
        if latencies:
            parts.append(f"mean latency {sum(latencies) / len(latencies):.2f}s")
    else:
        parts.append("no cost")
    return " · ".join(parts)


def _answer_cell(outcome: Any) -> str:
    """One answer in the comparison: failures in the error colour, cached ones marked."""
    if outcome.status != "ok":
        return look.error(html.escape(f"[{outcome.status}] {outcome.error or ''}"))
    text = html.escape(str(_shown(outcome)))
    return text + (" " + look.muted("· cached", "nbparrot-cached") if outcome.cached else "")


def _shown(outcome: Any) -> str:
    """An answer as text: a decision's value (filter, classify) rather than its JSON wrapper."""
    value = outcome.parsed if outcome.parsed is not None else outcome.content
    if isinstance(value, dict) and len(value) == 1:
        value = next(iter(value.values()))
    return value if isinstance(value, str) else json.dumps(value)
