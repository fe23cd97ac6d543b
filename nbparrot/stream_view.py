"""The ``%%llm`` stream view: the answer streamed into the cell's output as Markdown, with a Stop
button and a "still going" cue under it while it streams (``StreamView``).
"""

from __future__ import annotations

import asyncio
import html
import time
from typing import Any

from IPython.display import HTML, display

from . import look
from .headless import kernel_shell
from .panel import close_widgets
from .tokens import estimate_text_tokens

__all__ = ["StreamView"]

_REFRESH = 0.1  # seconds between streamed display updates


class StreamView:
    """The streamed answer in the cell's output, redrawn at most every ``_REFRESH`` seconds; below it,
    while it streams in a kernel with ipywidgets, a Stop button and a "still going" line."""

    def __init__(self, n: int):
        self._n = n
        self.texts = [""] * n
        self.stopping = False  # Stop was clicked: the task's cancellation is ours
        self._handle = display(_markdown("*waiting for the answer…*"), raw=True, display_id=True)
        self._last = 0.0
        self._started = time.monotonic()
        self._cue: Any = None
        self._controls: Any = None
        self._box: Any = None
        self._timer: asyncio.TimerHandle | None = None
        # the IPython terminal prints every update in full (no display to redraw): the final text only
        self._live = kernel_shell() is not None

    def controls(self, task: asyncio.Task) -> None:
        """Show Stop and the cue under the answer; Stop cancels ``task`` and keeps what arrived."""
        if kernel_shell() is None:
            return
        try:
            import ipywidgets as w
        except ImportError:
            return
        loop = task.get_loop()
        self._cue = w.HTML(self._cue_html())
        stop = w.Button(description="Stop", icon="stop", tooltip="Stop the answer here; the text so far is kept",
                        layout=w.Layout(width="auto"))

        def stop_now() -> None:
            if not task.done():
                self.stopping = True
                task.cancel()

        # the click may be handled on a kernel subshell thread: hand the cancel to the loop
        stop.on_click(lambda _button: loop.call_soon_threadsafe(stop_now))
        self._box = w.HBox([stop, self._cue])
        self._box.add_class("nbparrot-stream")
        self._controls = display(self._box, display_id=True)
        self._tick(loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Refresh the cue once a second, so a pause before the first token still shows life."""
        self._cue.value = self._cue_html()
        self._timer = loop.call_later(1.0, self._tick, loop)

    def _cue_html(self) -> str:
        seconds = time.monotonic() - self._started
        tokens = sum(estimate_text_tokens(t) for t in self.texts)
        what = f"streaming… {seconds:.0f} s, ~{tokens:,} tokens" if tokens else f"waiting for the first token… {seconds:.0f} s"
        return f"<span class='nbparrot-cue' style='color:{look.MUTED}'>{what}</span>"

    def _end(self) -> None:
        """Take the controls away: the stream is over."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._controls is not None:
            self._controls.update(HTML(""))
            self._controls = None
            close_widgets(self._box)  # their comms, layouts and styles too: nothing is left to click

    def update(self, texts: list[str], final: bool = False, note: str = "") -> None:
        self.texts = list(texts)
        now = time.monotonic()
        if not final and (now - self._last < _REFRESH or not self._live):
            return
        self._last = now
        if final:
            self._end()
        elif self._cue is not None:
            self._cue.value = self._cue_html()
        if self._n == 1:
            text = texts[0]
        else:
            text = "\n\n".join(f"**Answer {k + 1}**\n\n{t}" for k, t in enumerate(texts))
        if note:
            text += f"\n\n<small>{html.escape(note)}</small>"
        self._handle.update(_markdown(text or "*(empty answer)*"), raw=True)

    def stopped(self) -> None:
        """Stop was clicked: keep the text so far, and say it was cut short."""
        tokens = sum(estimate_text_tokens(t) for t in self.texts)
        self.update(self.texts, final=True, note=f"stopped after {time.monotonic() - self._started:.0f} s, "
                                                 f"~{tokens:,} tokens in (not cached)")

    def fail(self, message: str) -> None:
        """The stream failed: the text that arrived (if any) stays, with the error under it."""
        self._end()
        arrived = "\n\n".join(t for t in self.texts if t)
        error = f"**nbparrot error:** {message}"
        self._handle.update(_markdown(f"{arrived}\n\n{error}" if arrived else error), raw=True)


def _markdown(text: str) -> dict[str, str]:
    """Markdown with itself as the plain-text fallback (a saved notebook read as text keeps the answer)."""
    return {"text/markdown": text, "text/plain": text}
