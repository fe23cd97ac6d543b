"""A run as static HTML: the panel's title, counts and faults, a finished run's summary and
preview (``final_html``), and the ``text/html`` + ``text/plain`` bundle that stands in for the
widget where there is no kernel (a saved notebook, a notebook executed headlessly).
"""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any

from . import look
from .engine.words import retries_text
from .images.thumbs import row_thumbnails
from .pace import format_eta
from .panel_state import _fit, _fmt_int, _fmt_secs, _retried, snapshot
from .pricing import format_usd

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

__all__ = ["COUNTS", "title_html", "stats_html", "faults_html", "summary_html", "final_html", "static_bundle",
           "display_static"]


#: The counts the panel always shows, in this order, so none appears, vanishes or moves.
COUNTS = ("queued", "in_flight", "retrying", "done", "cached", "failed")


def _rates_text(s: dict) -> str:
    """Requests and tokens against the limits: per minute once a minute has passed, counts before."""
    reading = s["pace"]
    if reading is None:
        return ""
    limit = lambda key: f" (limit {_fmt_int(s[key])}/min)" if s[key] else ""  # noqa: E731
    if reading.full:
        return (f"requests {_fmt_int(reading.per_minute(reading.requests))}/min{limit('rpm_limit')} · "
                f"tokens {_fmt_int(reading.per_minute(reading.tokens))}/min{limit('tpm_limit')}")
    tokens = f" · tokens {_fmt_int(reading.tokens)}{limit('tpm_limit')}" if s["tpm_limit"] else ""
    return f"requests {_fmt_int(reading.requests)} in the first {max(1, math.ceil(reading.window))} s{limit('rpm_limit')}{tokens}"


def title_html(run: "Run") -> str:
    """One line that never wraps: run, status, model and host; the full URL and template in a tooltip."""
    from urllib.parse import urlsplit

    url = run.engine.endpoint.display_url
    host = urlsplit(url).netloc or url
    tip = url + (f"\n{run.label}" if run.label else "")
    return (f"<div class='nbparrot-title' title='{html.escape(tip)}' style='white-space:nowrap;overflow:hidden;"
            f"text-overflow:ellipsis;color:{look.TEXT}'><b>nbparrot run {run.id}</b> · <i>{run.status}</i> · "
            f"{html.escape(run.model)} · {html.escape(host)}</div>")


def stats_html(s: dict) -> str:
    """Counts (always the same ones), pace against the limits, tokens, cost and time."""
    width = len(f"{s['total']:,}")
    counts = [f"{look.num(s[name], width)} {name.replace('_', ' ')}" for name in COUNTS]
    if s["skipped"]:
        counts.append(f"{look.num(s['skipped'], width)} skipped")
    eta = f" · ETA {format_eta(s['eta'])}" if s["eta"] is not None else ""
    oldest = f" · oldest in flight {_fmt_secs(s['oldest'])}" if s["oldest"] is not None else ""
    projected = f" (projected {format_usd(s['projected'])})" if s["projected"] is not None else ""
    rates = _rates_text(s)
    cache_share = f" ({s['cached_share']})" if s.get("cached_share") else ""
    lines = [f"<span class='nbparrot-counts'>{' · '.join(counts)}</span>",
             f"tokens <b>{s['tokens']:,}</b>{cache_share} · {format_usd(s['cost'])}{projected} · "
             f"elapsed {_fmt_secs(s['elapsed'])}{eta}{oldest}"]
    if rates:
        lines.append(f"<span class='nbparrot-rates'>{rates}</span>")
    return (f"<div class='nbparrot-stats' style='color:{look.TEXT};font-variant-numeric:tabular-nums;"
            f"line-height:1.5'>{'<br>'.join(lines)}</div>")


def faults_html(s: dict, estimate: Any = None) -> str:
    """Retries in neutral words, rows that failed in the end in the error colour, the run's notes."""
    lines = []
    retried = retries_text(s["retried"])
    if retried:
        tip = f" title='last: {html.escape(s['last_retry'])}'" if s.get("last_retry") else ""
        lines.append(f"<span class='nbparrot-retries'{tip} style='color:{look.MUTED}'>{html.escape(retried)}</span>")
    if s["last_error"]:
        failed = f"{s['failed']:,} failed" if s["failed"] else "stopped"
        lines.append(look.error(f"<b>{failed}</b>: {html.escape(s['last_error'][:300])}", "nbparrot-failed"))
    if s["note"]:
        lines.append(look.muted(html.escape(s["note"]), "nbparrot-note"))
    if estimate is not None and s["status"] in ("preparing", "waiting", "running") and not s["settled"]:
        lines.append(look.muted(f"estimate: {html.escape(str(estimate))}", "nbparrot-estimate"))
    return "<br>".join(lines)


def summary_html(run: "Run", preview: bool = True) -> str:
    """A finished run: its one-line summary, retries, what failed, and (with ``preview``) the first answers."""
    p = run.progress
    parts = [f"<span class='nbparrot-summary' style='color:{look.TEXT}'>{html.escape(run.summary())}</span>"]
    retried = retries_text(_retried(p))
    if retried:
        parts.append(look.muted(html.escape(retried), "nbparrot-retries"))
    if run.error is not None:
        parts.append(look.error(f"<b>stopped:</b> {html.escape(str(run.error))}", "nbparrot-failed"))
    elif p.failed and p.last_error:
        parts.append(look.error(f"<b>{p.failed:,} failed</b> (see run.errors); the last: "
                                f"{html.escape(p.last_error[:300])}", "nbparrot-failed"))
    return "<br>".join(parts) + (_preview_html(run) if preview else "")


def final_html(run: "Run", preview: bool = True) -> str:
    """A finished run as static HTML (title, summary, with ``preview`` the first answers): what
    replaces its panel when it ends, and what a saved notebook shows without a kernel."""
    return f"<div class='nbparrot-panel nbparrot-final'>{title_html(run)}{summary_html(run, preview)}</div>"


def _live_html(run: "Run") -> str:
    """A run still going, as static HTML: title, a progress line, the panel's counts and faults."""
    s = snapshot(run)
    finished = s["settled"] - s["cancelled"]
    faults = faults_html(s)
    return (f"<div class='nbparrot-panel nbparrot-static'>{title_html(run)}"
            f"<progress value='{finished}' max='{max(s['total'], 1)}'></progress> {finished}/{s['total']}"
            f"{stats_html(s)}{faults}</div>")


def static_bundle(run: "Run", preview: bool = True) -> dict[str, str]:
    """``text/html`` and ``text/plain`` of the run as it is now: final once it is done."""
    body = final_html(run, preview) if run.done() else _live_html(run)
    return {"text/html": body, "text/plain": f"nbparrot {run.summary()}"}


def display_static(run: "Run", preview: bool = True) -> None:
    from IPython.display import display

    display(static_bundle(run, preview), raw=True)


def _preview_html(run: "Run", rows: int = 5, width: int = 160) -> str:
    """Prompt beside answer for the first rows, so iterating on a prompt needs no extra cell."""
    out, tips = [], []
    describe = getattr(run, "describe_answer", None)  # a run whose answers are not text (embeddings)
    for k, outcome in enumerate(run.outcomes[:rows]):
        prompt = str(run.prepared.user_text(k) or "")
        if outcome.status != "ok":
            answer = f"[{outcome.status}] {outcome.error or ''}"
        else:
            answer = describe(k) if describe is not None else outcome.content
        if isinstance(answer, list):
            answer = " | ".join(map(str, answer))
        answer = str(answer)
        shown = html.escape(_fit(answer, width))
        if outcome.status != "ok":
            shown = look.error(shown)
        elif outcome.cached:
            shown += " " + look.muted("· cached", "nbparrot-cached")
        out.append([row_thumbnails(run.prepared, k) + html.escape(_fit(prompt, width)), shown])
        tips.append([_fit(prompt, 2000) if len(prompt) > width else "", _fit(answer, 2000) if len(answer) > width else ""])
    if not out:
        return ""
    return look.table("nbparrot-preview", ["prompt", "answer"], out, escape=False, tooltips=tips)
