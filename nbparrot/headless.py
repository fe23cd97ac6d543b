"""Notebooks that last: where a run goes on when nobody watches the notebook live.

In JupyterLab a run goes on in the background on the kernel's loop and its panel, ``%%llm``
stream and comparison update after the cell has returned. A client that executes a notebook
headlessly (``jupyter nbconvert --execute``, papermill; both drive the kernel with nbclient)
keeps only the messages whose parent is the cell it is executing, and stops listening once the
last cell is done: measured with nbclient 0.11, updates sent by a background task land nowhere,
so the saved notebook would show every panel as it was at its first moment.

Such a client says so in every execute request: it cannot answer ``input()``
(``allow_stdin`` false; JupyterLab, Notebook 7 and ``jupyter console`` send true). Then a
run, a ``%%llm`` stream or a comparison finishes within the cell that starts it, as in a
script: on a fresh event loop in a helper thread (the kernel's loop is busy running the cell),
its output sent under that cell, and the cell returns once it is done. Its saved output is the
finished state, as static HTML.

``nbparrot.configure(background=...)`` decides instead: True, always in the background; False,
always within the cell; "auto" (the default) as described.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import sys
import threading
from typing import Any, Awaitable, Callable, TypeVar

from .config import defaults
from .errors import ConfigError

__all__ = ["in_background", "kernel_shell", "off_loop", "run_coroutine"]

T = TypeVar("T")


def in_background() -> bool:
    """Whether work started now, inside a running loop, should go on after its cell returns.

    Only a kernel's own loop (its main thread) is in question: on any other loop (an asyncio
    program, dask computing partitions in helper threads) work always starts on that loop."""
    if threading.current_thread() is not threading.main_thread():
        return True
    shell = kernel_shell()
    if shell is None:
        return True
    setting = defaults.background
    if setting is True or setting is False:
        return setting
    if setting != "auto":
        raise ConfigError(f"background must be 'auto', True or False, not {setting!r}")
    return _client_is_interactive(shell)


def kernel_shell() -> Any:
    """The IPython shell of the Jupyter kernel this runs in, or None."""
    if "IPython" not in sys.modules:  # not imported: surely no kernel (and importing it costs ~80 ms)
        return None
    from IPython import get_ipython

    shell = get_ipython()
    return shell if shell is not None and getattr(shell, "kernel", None) is not None else None


def _client_is_interactive(shell: Any) -> bool:
    """False when the cell being run came from a client that cannot answer ``input()``
    (nbclient: nbconvert, papermill); True otherwise."""
    parent = getattr(shell, "parent_header", None) or {}
    content = parent.get("content") if isinstance(parent, dict) else None
    if not isinstance(content, dict) or "allow_stdin" not in content:
        return True  # no execute request to go by (e.g. a comm handler): keep the interactive way
    return bool(content["allow_stdin"])


def off_loop(work: Callable[[], T], on_interrupt: Callable[[], None] | None = None) -> T:
    """``work()`` in a helper thread, waited for here: for a thread whose event loop is busy (a
    kernel running a cell), where a loop cannot be run. The thread runs in a copy of this
    context, so what it displays goes to this cell. With ``on_interrupt``, a first interrupt
    (the kernel's stop button, nbclient's timeout) calls it and waits on, as in a script; a
    second one is the kernel's as usual."""
    outcome: dict[str, Any] = {}
    context = contextvars.copy_context()
    over = threading.Event()  # not Thread.join: a join cut short by an interrupt may not wait again

    def target() -> None:
        try:
            outcome["value"] = context.run(work)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            over.set()

    threading.Thread(target=target, name="nbparrot-in-cell", daemon=True).start()
    previous = None
    if on_interrupt is not None and threading.current_thread() is threading.main_thread():
        # our own SIGINT handler: the kernel's would raise in a plain cell, but in a cell with a
        # top-level await (ipykernel 7) only cancel that cell's task, which waits here unseen
        def first_interrupt(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, previous)  # a second one interrupts as usual
            on_interrupt()

        previous = signal.getsignal(signal.SIGINT)
        if previous is None:  # a handler not set from Python
            previous = signal.default_int_handler
        signal.signal(signal.SIGINT, first_interrupt)
    try:
        over.wait()
    finally:
        if previous is not None and signal.getsignal(signal.SIGINT) is first_interrupt:
            signal.signal(signal.SIGINT, previous)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def run_coroutine(make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make()`` to its end on a fresh loop: here if no loop runs in this thread, else in a
    helper thread (``off_loop``); an interrupt cancels it."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    state: dict[str, Any] = {}

    async def main() -> T:
        state["task"] = asyncio.current_task()
        state["loop"] = asyncio.get_running_loop()
        return await make()

    def cancel() -> None:
        loop, task = state.get("loop"), state.get("task")
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop has just closed: the work is over anyway
                pass

    return off_loop(lambda: asyncio.run(main()), on_interrupt=cancel)
