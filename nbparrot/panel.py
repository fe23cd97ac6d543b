"""What a run shows while it goes: an ipywidgets panel in a notebook, a text line elsewhere.

As with ``tqdm.auto``, one API and the display chosen by the environment: ``make_view``
gives a ``Panel`` inside a Jupyter kernel with ipywidgets, and a ``TextLine`` otherwise.
Both refresh on a timer on the run's own loop, at most ~10 times a second, and only send
what changed, so 10,000 rows do not flood the browser or the terminal. The Cancel button's
handler only calls ``run.cancel()``: depending on the kernel and frontend it runs on the
main thread or on a kernel subshell thread, and ``cancel`` is the thread-safe part.
"""

from __future__ import annotations

import html
import sys
from collections import deque
from typing import TYPE_CHECKING, Any, TextIO

from .images.thumbs import row_thumbnails
from .pricing import format_usd

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

__all__ = ["make_view", "Panel", "TextLine", "Silent", "snapshot"]

PANEL_INTERVAL = 0.1  # seconds between panel refreshes
TEXT_INTERVAL = 0.5  # seconds between text refreshes on a terminal


def _in_kernel() -> bool:
    if "IPython" not in sys.modules:  # not imported: surely no kernel (and importing it costs ~80 ms)
        return False
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


class Silent:
    """No display at all (``progress=False``): for runs inside other tools, e.g. dask workers."""

    def __init__(self, run: "Run", in_loop: bool = False):
        self.run = run

    def started(self) -> None:
        """Nothing to show."""

    def finished(self) -> None:
        """Nothing to show."""


def make_view(run: "Run", in_loop: bool) -> "Panel | TextLine":
    """The panel inside a Jupyter kernel with ipywidgets; a text line everywhere else."""
    if in_loop and _in_kernel():
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


class _Rates:
    """Requests and tokens per minute over the last ~10 s, from periodic samples."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int, int]] = deque()

    def update(self, now: float, requests: int, tokens: int) -> tuple[float, float]:
        samples = self._samples
        samples.append((now, requests, tokens))
        while len(samples) > 2 and now - samples[1][0] >= 10.0:
            samples.popleft()
        t0, r0, k0 = samples[0]
        span = now - t0
        if span <= 0:
            return 0.0, 0.0
        return (requests - r0) * 60.0 / span, (tokens - k0) * 60.0 / span


def snapshot(run: "Run", rates: _Rates | None = None) -> dict[str, Any]:
    """Everything a view shows, computed from the run's live counters."""
    p = run.progress
    loop = run._loop
    now = loop.time() if loop is not None and not loop.is_closed() else None
    started = p.started
    end = p.finished if p.finished is not None else now
    elapsed = (end - started) if (started is not None and end is not None) else 0.0
    settled = p.settled
    eta = None
    if 0 < settled < p.total and elapsed > 0 and p.finished is None:
        eta = elapsed / settled * (p.total - settled)
    oldest = None
    if p.sent_at and now is not None:
        oldest = now - min(p.sent_at.values())
    tokens = p.prompt_tokens + p.completion_tokens
    rpm = tpm = None
    if rates is not None and now is not None:
        rpm, tpm = rates.update(now, p.requests, tokens)
    limits = p.limits() if p.limits else {}
    return {
        "total": p.total, "settled": settled, "queued": p.queued, "in_flight": p.in_flight,
        "retrying": p.retrying, "done": p.done, "failed": p.failed, "cancelled": p.cancelled,
        "skipped": p.skipped, "rate_limited": p.rate_limited, "tokens": tokens, "cost": run.cost,
        "projected": run.projected_cost, "cached": p.cached,
        "elapsed": elapsed, "eta": eta, "oldest": oldest, "rpm": rpm, "tpm": tpm,
        "rpm_limit": limits.get("rpm"), "tpm_limit": limits.get("tpm"), "last_error": p.last_error,
        "note": " · ".join(_notes(p, now)) or None,
        "status": run.status,
    }


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


class TextLine(_Ticker):
    """A one-line progress display on stderr (rewritten in place on a terminal)."""

    def __init__(self, run: "Run", stream: TextIO | None = None):
        super().__init__(run)
        self.stream = stream or sys.stderr
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = TEXT_INTERVAL if self._tty else 5.0
        self._last = ""
        self._rates = _Rates()

    def line(self) -> str:
        s = snapshot(self.run, self._rates)
        parts = [f"nbparrot run {self.run.id}: {s['settled']}/{s['total']}", f"{s['done']} done"]
        for key in ("failed", "skipped", "cancelled", "in_flight", "retrying"):
            if s[key]:
                parts.append(f"{s[key]} {key.replace('_', ' ')}")
        parts.append(f"{_fmt_int(s['tokens'])} tok")
        parts.append(format_usd(s["cost"]))
        parts.append(_fmt_secs(s["elapsed"]))
        if s["eta"] is not None:
            parts.append(f"ETA {_fmt_secs(s['eta'])}")
        if s["note"]:
            parts.append(s["note"])
        return " · ".join(parts)

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
        if self.run.error is not None:
            self.stream.write(f"nbparrot: the run stopped: {self.run.error}\n")
        self.stream.flush()


class Panel(_Ticker):
    """The ipywidgets panel: progress, counts, rates against limits, tokens, cost, Cancel."""

    def __init__(self, run: "Run"):
        super().__init__(run)
        import ipywidgets as w

        self._w = w
        self.title = w.HTML()
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, bar_style="info",
                                   layout=w.Layout(width="100%"))
        self.stats = w.HTML()
        self.error = w.HTML()
        self.cancel_button = w.Button(description="Cancel", button_style="danger", icon="stop",
                                      tooltip="Stop this run; finished rows are kept")
        self.cancel_button.on_click(lambda _button: run.cancel())
        self.box = w.VBox([self.title, w.HBox([self.bar, self.cancel_button]), self.stats, self.error])
        self.box.add_class("nbparrot-panel")
        self._rates = _Rates()
        self._shown_in: int | None = None
        self._last: tuple = ()
        self._estimate_shown = False

    def started(self) -> None:
        from IPython.display import display

        self._title()
        self._show_estimate()
        display(self.box)
        self._shown_in = _execution_count()
        super().started()

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

    def _show_estimate(self) -> None:
        """The estimate, once planning has made it (until an error takes the line)."""
        if not self._estimate_shown and self.run.estimate is not None:
            self._estimate_shown = True
            self.error.value = f"<span class='nbparrot-estimate'>estimate: {html.escape(str(self.run.estimate))}</span>"

    def _answered(self) -> None:
        question = getattr(self, "question", None)
        if question is not None and question in self.box.children:
            self.box.children = tuple(c for c in self.box.children if c is not question)

    def display_again(self) -> None:
        """Show the panel again, unless it was just shown by the same cell."""
        if self._shown_in != _execution_count():
            from IPython.display import display

            display(self.box)
            self._shown_in = _execution_count()

    def _title(self) -> None:
        run = self.run
        label = f" · {html.escape(run.label)}" if run.label else ""
        self.title.value = (f"<b>nbparrot run {run.id}</b> · {html.escape(run.model)} · "
                            f"{html.escape(run.engine.endpoint.display_url)}{label} · <i>{run.status}</i>")

    def refresh(self) -> None:
        s = snapshot(self.run, self._rates)
        if s["status"] != "waiting":
            self._answered()
        key = (s["settled"], s["in_flight"], s["retrying"], s["tokens"], s["status"], s["last_error"],
               s["note"], int(s["elapsed"]))
        if key == self._last:
            return
        if not self._last or key[4] != self._last[4]:
            self._title()  # the status changed: preparing, waiting, running
        self._last = key
        if not s["last_error"]:
            self._show_estimate()
        total, finished = s["total"], s["settled"] - s["cancelled"]  # cancelled rows are not progress
        self.bar.value = finished / total if total else 1.0
        self.bar.description = f"{finished}/{total}"
        self.stats.value = self._stats_html(s)
        if s["last_error"]:
            self.error.value = f"<span style='color:#b00'>last error: {html.escape(s['last_error'][:300])}</span>"

    @staticmethod
    def _stats_html(s: dict) -> str:
        counts = " · ".join(f"{name.replace('_', ' ')} <b>{s[name]}</b>" for name in
                            ("queued", "in_flight", "retrying", "done", "cached", "failed", "skipped", "cancelled")
                            if s[name] or name in ("queued", "in_flight", "done", "failed"))
        rate = ""
        if s["rpm"] is not None:
            rpm_limit = f" / {_fmt_int(s['rpm_limit'])}" if s["rpm_limit"] else ""
            tpm_limit = f" / {_fmt_int(s['tpm_limit'])}" if s["tpm_limit"] else ""
            rate = f"<br>{_fmt_int(s['rpm'])}{rpm_limit} req/min · {_fmt_int(s['tpm'])}{tpm_limit} tok/min"
            if s["rate_limited"]:
                rate += f" · 429s <b>{s['rate_limited']}</b>"
        oldest = f" · oldest in flight {_fmt_secs(s['oldest'])}" if s["oldest"] is not None else ""
        eta = f" · ETA {_fmt_secs(s['eta'])}" if s["eta"] is not None else ""
        projected = f" (projected total {format_usd(s['projected'])})" if s["projected"] is not None else ""
        note = f"<br><span class='nbparrot-note'>{html.escape(s['note'])}</span>" if s["note"] else ""
        return (f"<span class='nbparrot-counts'>{counts}</span>{rate}<br>"
                f"tokens <b>{s['tokens']:,}</b> · {format_usd(s['cost'])}{projected} · "
                f"elapsed {_fmt_secs(s['elapsed'])}{eta}{oldest}{note}")

    def close(self) -> None:
        """Turn into a compact summary plus a preview of the first results."""
        run = self.run
        self._title()
        self._answered()
        self.bar.bar_style = {"finished": "success", "cancelled": "warning", "stopped": "warning"}.get(run.status, "danger")
        self.cancel_button.disabled = True
        self.cancel_button.layout.display = "none"
        summary = html.escape(run.summary())
        if run.error is not None:
            summary += f"<br><span style='color:#b00'><b>stopped:</b> {html.escape(str(run.error))}</span>"
        self.stats.value = f"<span class='nbparrot-summary'>{summary}</span>" + _preview_html(run)


def _execution_count() -> int | None:
    try:
        from IPython import get_ipython

        return get_ipython().execution_count
    except Exception:  # noqa: BLE001 - display bookkeeping must never break a run
        return None


def _preview_html(run: "Run", rows: int = 5, width: int = 160) -> str:
    """Prompt beside answer for the first rows, so iterating on a prompt needs no extra cell."""
    out = []
    describe = getattr(run, "describe_answer", None)  # a run whose answers are not text (embeddings)
    for k, outcome in enumerate(run.outcomes[:rows]):
        prompt = run.prepared.user_text(k) or ""
        if outcome.status != "ok":
            answer = f"[{outcome.status}] {outcome.error or ''}"
        else:
            answer = describe(k) if describe is not None else outcome.content
        if isinstance(answer, list):
            answer = " | ".join(map(str, answer))
        cut = lambda t: html.escape(t if len(t) <= width else t[: width - 1] + "…")  # noqa: E731
        out.append(f"<tr><td style='text-align:left'>{row_thumbnails(run.prepared, k)}{cut(str(prompt))}</td>"
                   f"<td style='text-align:left'>{cut(str(answer))}</td></tr>")
    if not out:
        return ""
    return ("<table class='nbparrot-preview' style='margin-top:4px'><tr><th style='text-align:left'>prompt</th>"
            "<th style='text-align:left'>answer</th></tr>" + "".join(out) + "</table>")

