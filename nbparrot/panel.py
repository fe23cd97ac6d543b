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
The views are here; what they show is ``nbparrot.panel_state.snapshot``, the HTML ``nbparrot.panel_html``.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

from .engine.words import retries_text
from .pace import Pace, format_eta
from .headless import kernel_shell
from .panel_html import display_static, faults_html, static_bundle, stats_html, title_html
from .panel_state import _fit, _fmt_int, _fmt_secs, _retried, snapshot
from .pricing import format_usd

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

__all__ = ["make_view", "Panel", "StaticView", "TextLine", "Silent", "close_widgets"]

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

        bundle = {**self.box._repr_mimebundle_(), **static_bundle(self.run)}
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
            display_static(self.run, self.preview)
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
        final = static_bundle(self.run, self.preview)  # no widget view: it would not survive the kernel
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

        self._last = static_bundle(self.run)
        self._output = display(self._last, raw=True, display_id=True)
        self._shown_in = _execution_count()
        super().started()

    def refresh(self) -> None:
        bundle = static_bundle(self.run, self.preview)
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
        display_static(self.run, self.preview)
        self._shown_in = _execution_count()


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
