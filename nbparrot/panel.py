"""What a run shows while it goes: an ipywidgets panel in a notebook, a text line elsewhere.

As with ``tqdm.auto``, one API and the display chosen by the environment: ``make_view``
gives a ``Panel`` inside a Jupyter kernel with ipywidgets, and a ``TextLine`` otherwise.
Both refresh on a timer on the run's own loop, at most ~10 times a second, and only send
what changed, so 10,000 rows do not flood the browser or the terminal. The Cancel button's
handler only calls ``run.cancel()``: depending on the kernel and frontend it runs on the
main thread or on a kernel subshell thread, and ``cancel`` is the thread-safe part.

What lasts once the kernel is gone (a saved notebook reopened, GitHub, nbviewer): the panel is
displayed with a display id and a static fallback (``text/html`` and ``text/plain``) beside the
widget view, and when the run ends the whole output is replaced by ``final_html`` (summary and
preview) with no widget view, which JupyterLab would otherwise render as "model not found", and
the widgets are closed (nothing keeps the finished run alive through them). A
notebook executed headlessly gets a ``StaticView``: the same HTML, updated in place, no widget.
"""

from __future__ import annotations

import html
import math
import sys
from typing import TYPE_CHECKING, Any, TextIO

from . import look
from .engine.words import retries_text
from .pace import Pace, format_eta
from .headless import kernel_shell
from .images.thumbs import row_thumbnails
from .pricing import cached_share, format_usd

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

__all__ = ["make_view", "Panel", "StaticView", "TextLine", "Silent", "snapshot", "final_html"]

PANEL_INTERVAL = 0.1  # seconds between panel refreshes
TEXT_INTERVAL = 0.5  # seconds between text refreshes on a terminal
STATIC_INTERVAL = 5.0  # seconds between refreshes of a StaticView (a headless run's progress)


class Silent:
    """No display at all (``progress=False``): for runs inside other tools, e.g. dask workers."""

    def __init__(self, run: "Run", background: bool = False):
        self.run = run

    def started(self) -> None:
        """Nothing to show."""

    def finished(self) -> None:
        """Nothing to show."""


def make_view(run: "Run", background: bool) -> "Panel | StaticView | TextLine":
    """The panel inside a Jupyter kernel with ipywidgets, for a run going on in the background;
    static HTML for a run that finishes within its cell in a kernel; a text line everywhere else."""
    if kernel_shell() is not None:
        if not background:
            return StaticView(run)
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            pass
        else:
            return Panel(run)
    return TextLine(run)


def _fmt_int(n: float) -> str:
    n = float(n)
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_secs(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def _retried(p: Any) -> dict[str, int]:
    """Retries by cause, 429 waits among them: requests sent again, not errors."""
    causes = dict(p.retried)
    if p.rate_limited:
        causes["429 rate limited"] = causes.get("429 rate limited", 0) + p.rate_limited
    return causes


def snapshot(run: "Run", pace: Pace | None = None) -> dict[str, Any]:
    """Everything a view shows, computed from the run's live counters."""
    p = run.progress
    loop = run._loop
    now = loop.time() if loop is not None and not loop.is_closed() else None
    started = p.started
    end = p.finished if p.finished is not None else now
    elapsed = (end - started) if (started is not None and end is not None) else 0.0
    settled = p.settled
    oldest = None
    if p.sent_at and now is not None:
        oldest = now - min(p.sent_at.values())
    tokens = p.prompt_tokens + p.completion_tokens
    reading = None
    if pace is not None and now is not None and started is not None and p.finished is None:
        reading = pace.update(now, started, p.requests, tokens, p.done + p.failed - p.cached, p.total - settled)
    limits = p.limits() if p.limits else {}
    return {
        "total": p.total, "settled": settled, "queued": p.queued, "in_flight": p.in_flight,
        "retrying": p.retrying, "done": p.done, "failed": p.failed, "cancelled": p.cancelled,
        "skipped": p.skipped, "rate_limited": p.rate_limited, "tokens": tokens, "cost": run.cost,
        "projected": run.projected_cost, "cached": p.cached,
        "cached_share": cached_share(p.prompt_tokens, p.cached_prompt_tokens),
        "elapsed": elapsed, "eta": reading.eta if reading is not None else None, "oldest": oldest, "pace": reading,
        "rpm_limit": limits.get("rpm"), "tpm_limit": limits.get("tpm"), "last_error": p.last_error,
        "retried": _retried(p), "last_retry": p.last_retry,
        "note": " · ".join(_notes(p, now)) or None,
        "status": run.status,
    }


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


def _notes(p: Any, now: float | None) -> list[str]:
    """The run's own note, a pause with its reason and countdown, and tokens that are estimates."""
    notes = [p.note] if p.note else []
    if p.pause is not None and now is not None and p.finished is None and p.pause[0] > now:
        notes.append(f"paused {_fmt_secs(p.pause[0] - now)}: {p.pause[1]}")
    if p.usage_estimated:
        notes.append(f"tokens of {p.usage_estimated:,} answer(s) estimated: the endpoint sent no usage")
    return notes


class _Ticker:
    """Calls ``refresh`` every ``interval`` seconds on the run's loop until the run ends."""

    interval = PANEL_INTERVAL

    def __init__(self, run: "Run"):
        self.run = run
        self._handle = None

    def started(self) -> None:
        self.refresh()
        self._schedule()

    def _schedule(self) -> None:
        loop = self.run._loop
        if loop is not None and not self.run.done():
            self._handle = loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self.refresh()
        self._schedule()

    def finished(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self.refresh()
        self.close()

    def refresh(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def close(self) -> None:
        """Show the final state."""


def _fit(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, ending in an ellipsis when cut (counts come first, notes last)."""
    return text if len(text) <= width else text[: width - 1] + "…"


class TextLine(_Ticker):
    """A one-line progress display on stderr (rewritten in place on a terminal)."""

    def __init__(self, run: "Run", stream: TextIO | None = None):
        super().__init__(run)
        self.stream = stream or sys.stderr
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = TEXT_INTERVAL if self._tty else 5.0
        self._last = ""
        self._pace = Pace()

    def line(self) -> str:
        """Counts, cost and time, then what is being retried and the notes, in ``width`` columns; tokens
        and the ETA when there is room (a note is cut with an ellipsis rather than left out)."""
        s, width = snapshot(self.run, self._pace), self.width
        parts = [f"nbparrot run {self.run.id}: {s['settled']}/{s['total']}", f"{s['done']} done"]
        extras = []
        why = s["retrying"] and s["last_retry"] and s["status"] == "running"
        if why:  # what is wrong, while it is being retried
            extras.append(f"{s['retrying']} retrying: {s['last_retry']}")
        for key in ("failed", "skipped", "cancelled", "in_flight") + (() if why else ("retrying",)):
            if s[key]:
                parts.append(f"{s[key]} {key.replace('_', ' ')}")
        if s["note"]:
            extras.append(s["note"])
        timing = [_fmt_secs(s["elapsed"])] if extras and not s["cost"] else [format_usd(s["cost"]), _fmt_secs(s["elapsed"])]
        line = " · ".join(parts + timing)
        if not extras:
            eta = [f"ETA {format_eta(s['eta'])}"] if s["eta"] is not None else []
            full = " · ".join(parts + [f"{_fmt_int(s['tokens'])} tok"] + timing + eta)
            line = full if len(full) <= width else " · ".join(parts + timing + eta)
        for extra in extras:
            room = width - len(line) - 3
            if room < 12:
                break
            line += " · " + _fit(extra, room)
        return _fit(line, width)

    @property
    def width(self) -> int:
        """Columns the line may take: the terminal's (one spare, so it never wraps), else 80."""
        if not self._tty:
            return 80
        import shutil

        return max(40, shutil.get_terminal_size((80, 24)).columns - 1)

    def refresh(self) -> None:
        text = self.line()
        if text == self._last:
            return
        self._last = text
        if self._tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        end = "\n" if self._tty else ""
        self.stream.write(end + self.run.summary() + "\n")
        retried = retries_text(_retried(self.run.progress))
        if retried:
            self.stream.write(f"  {retried}\n")
        if self.run.error is not None:
            self.stream.write(f"nbparrot: the run stopped: {self.run.error}\n")
        self.stream.flush()


#: The counts the panel always shows, in this order, so none appears, vanishes or moves.
COUNTS = ("queued", "in_flight", "retrying", "done", "cached", "failed")


class Panel(_Ticker):
    """The ipywidgets panel: progress, counts, rates against limits, tokens, cost, Cancel."""

    def __init__(self, run: "Run"):
        super().__init__(run)
        import ipywidgets as w

        self._w = w
        self.title = w.HTML(layout=w.Layout(width="100%"))
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                   layout=w.Layout(width="100%"))
        self.stats = w.HTML()
        self.error = w.HTML()
        self.cancel_button = w.Button(description="Cancel", button_style="danger", icon="stop",
                                      tooltip="Stop this run; finished rows are kept")
        self.cancel_button.on_click(lambda _button: run.cancel())
        self.box = w.VBox([self.title, w.HBox([self.bar, self.cancel_button]), self.stats, self.error])
        self.box.add_class("nbparrot-panel")
        self.preview = True  # False when another view shows the answers (a comparison of variants)
        self._pace = Pace()
        self._shown_in: int | None = None
        self._handles: list[Any] = []  # every output showing this panel, replaced when the run ends
        self._last: tuple = ()

    def started(self) -> None:
        self._title()
        self._display()
        super().started()

    def _display(self) -> None:
        """The widget view with a static fallback of the state now, under a display id."""
        from IPython.display import display

        bundle = {**self.box._repr_mimebundle_(), **_static_bundle(self.run)}
        self._handles.append(display(bundle, raw=True, display_id=True))
        self._shown_in = _execution_count()

    def ask(self) -> None:
        """Ask Run / Cancel before a run estimated above ``confirm_over`` sends anything."""
        w, run = self._w, self.run
        go = w.Button(description="Run", button_style="warning", icon="play")
        stop = w.Button(description="Cancel", button_style="", icon="times")
        go.on_click(lambda _b: run.confirm(True))
        stop.on_click(lambda _b: run.confirm(False))
        question = w.HTML(f"<b>This run may cost up to {format_usd(run.estimate.max_cost)}</b> "
                          f"(~{format_usd(run.estimate.expected_cost)} expected): send it?")
        self.question = w.HBox([question, go, stop])
        self.question.add_class("nbparrot-confirm")
        self.box.children = (self.question, *self.box.children)

    def _answered(self) -> None:
        question = getattr(self, "question", None)
        if question is not None and question in self.box.children:
            self.box.children = tuple(c for c in self.box.children if c is not question)

    def display_again(self) -> None:
        """Show the panel again (once finished: its final HTML), unless the same cell just showed it."""
        if self._shown_in == _execution_count():
            return
        if self.run.done():
            _display_static(self.run, self.preview)
            self._shown_in = _execution_count()
        else:
            self._display()

    def _title(self) -> None:
        self.title.value = title_html(self.run)

    def refresh(self) -> None:
        s = snapshot(self.run, self._pace)
        if s["status"] != "waiting":
            self._answered()
        key = (s["settled"], s["in_flight"], s["retrying"], s["tokens"], s["status"], s["last_error"],
               s["note"], int(s["elapsed"]), sum(s["retried"].values()))
        if key == self._last:
            return
        if not self._last or key[4] != self._last[4]:
            self._title()  # the status changed: preparing, waiting, running
        self._last = key
        total, finished = s["total"], s["settled"] - s["cancelled"]  # cancelled rows are not progress
        self.bar.value = finished / total if total else 1.0
        self.bar.description = f"{finished}/{total}"
        self.stats.value = stats_html(s)
        self.error.value = faults_html(s, self.run.estimate)
        self.error.layout.display = None if self.error.value else "none"  # no empty line under the stats

    def close(self) -> None:
        """Replace every output showing the panel by the final static HTML (summary and, with
        ``preview``, the first results), then close the widgets: nobody sees them any more, and
        ipywidgets' registry would keep them, and through the Cancel handler the whole run."""
        final = _static_bundle(self.run, self.preview)  # no widget view: it would not survive the kernel
        for handle in self._handles:
            handle.update(final, raw=True)
        close_widgets(self.box, getattr(self, "question", None))

    def hide_preview(self) -> None:
        """Another view shows the answers (a comparison of variants): keep to the summary."""
        self.preview = False
        if self.run.done():
            self.close()


class StaticView(_Ticker):
    """A run that finishes within its cell (a notebook executed headlessly): static HTML under a
    display id, refreshed every few seconds while it goes, and ``final_html`` once it ends."""

    interval = STATIC_INTERVAL

    def __init__(self, run: "Run"):
        super().__init__(run)
        self.preview = True  # as Panel.preview
        self._output: Any = None
        self._last: dict = {}
        self._shown_in: int | None = None

    def started(self) -> None:
        from IPython.display import display

        self._last = _static_bundle(self.run)
        self._output = display(self._last, raw=True, display_id=True)
        self._shown_in = _execution_count()
        super().started()

    def refresh(self) -> None:
        bundle = _static_bundle(self.run, self.preview)
        if bundle != self._last and self._output is not None:
            self._last = bundle
            self._output.update(bundle, raw=True)

    def hide_preview(self) -> None:
        """As ``Panel.hide_preview``."""
        self.preview = False
        self.refresh()

    def display_again(self) -> None:
        """Show the run again in the cell asking for it, unless that cell started it (and shows it)."""
        if self._shown_in == _execution_count():
            return
        _display_static(self.run, self.preview)
        self._shown_in = _execution_count()


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


def _static_bundle(run: "Run", preview: bool = True) -> dict[str, str]:
    """``text/html`` and ``text/plain`` of the run as it is now: final once it is done."""
    body = final_html(run, preview) if run.done() else _live_html(run)
    return {"text/html": body, "text/plain": f"nbparrot {run.summary()}"}


def _display_static(run: "Run", preview: bool = True) -> None:
    from IPython.display import display

    display(_static_bundle(run, preview), raw=True)


def close_widgets(*roots: Any) -> None:
    """Close ``roots`` (None skipped), their children, layouts and styles: their comms, and their
    entries in ipywidgets' registry, which would otherwise keep them (and their handlers) alive."""
    stack = [root for root in roots if root is not None]
    while stack:
        widget = stack.pop()
        stack.extend(getattr(widget, "children", ()))
        stack.extend(part for part in (getattr(widget, "layout", None), getattr(widget, "style", None))
                     if part is not None)
        widget.close()


def _execution_count() -> int | None:
    try:
        from IPython import get_ipython

        return get_ipython().execution_count
    except Exception:  # noqa: BLE001 - display bookkeeping must never break a run
        return None


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
