"""Drive a real ipykernel over the Jupyter protocol, like a frontend would.

``KernelHarness`` starts a kernel for any python interpreter (through a
throw-away kernelspec), and one background I/O thread owns all of its ZMQ
sockets (shell, control, IOPub).  That thread records every message and keeps
a mirror of the ``jupyter.widget`` comms the way a frontend's widget manager
does, so tests can look at widget state and at *when* updates arrived (for
example: while no cell was running).

Messages from the test thread are handed to the I/O thread through a queue
and a wake-up pipe, so no ZMQ socket is ever used from two threads.

All waits are bounded; nothing here sleeps for a fixed time to make a point.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import queue
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from jupyter_client.session import Session

__all__ = [
    "ExecError",
    "ExecResult",
    "KernelHarness",
    "WidgetUpdate",
    "strip_ansi",
    "wait_until",
]

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")

WIDGET_TARGET = "jupyter.widget"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
KERNEL_NAME = "nbparrot-harness"


def strip_ansi(text: str) -> str:
    return _ANSI_RE.sub("", text)


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises ``TimeoutError`` after ``timeout`` seconds (``message`` may be a
    callable, evaluated only on failure, to describe the state then).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise TimeoutError(text or f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass
class ExecError:
    ename: str
    evalue: str
    traceback: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.traceback) or f"{self.ename}: {self.evalue}"

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}"


@dataclass
class ExecResult:
    """Everything one execute request produced.

    The object is filled in live by the I/O thread: output that a background
    task prints later (its parent header is still this cell) is appended to
    ``stdout``/``outputs`` after ``wait()`` returned.  Times are
    ``time.monotonic()`` values in the test process.
    """

    msg_id: str
    code: str = ""
    status: str | None = None  # "ok" | "error" | "aborted"; None before the reply
    execution_count: int | None = None
    stdout: str = ""
    stderr: str = ""
    error: ExecError | None = None
    displays: list[dict] = field(default_factory=list)  # display_data "data" dicts
    display_updates: list[dict] = field(default_factory=list)  # update_display_data
    execute_result: dict | None = None  # execute_result "data" dict
    outputs: list[tuple[str, dict]] = field(default_factory=list)  # (msg_type, content)
    reply: dict | None = None
    sent_time: float = 0.0
    busy_time: float | None = None
    reply_time: float | None = None
    idle_time: float | None = None

    @property
    def done(self) -> bool:
        return self.reply_time is not None and self.idle_time is not None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def text(self) -> str:
        """``text/plain`` of the execute_result ('' if none)."""
        return (self.execute_result or {}).get("text/plain", "")

    @property
    def widget_views(self) -> list[str]:
        """model ids of the widgets this cell displayed."""
        return [
            d[WIDGET_VIEW_MIME]["model_id"] for d in self.displays if WIDGET_VIEW_MIME in d
        ]

    def raise_for_error(self) -> "ExecResult":
        if self.status != "ok":
            detail = self.error.text if self.error else f"status={self.status}"
            raise AssertionError(
                f"cell failed ({self.status}):\n{self.code}\n--- error ---\n{detail}"
                f"\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
            )
        return self

    def snapshot(self) -> "ExecResult":
        return copy.deepcopy(self)


@dataclass
class WidgetUpdate:
    """One widget comm message from the kernel, as the frontend saw it."""

    t: float  # time.monotonic() at arrival in the test process
    comm_id: str
    method: str  # "open" | "update" | "echo_update" | "custom" | "close"
    state: dict
    parent_msg_id: str | None
    parent_msg_type: str | None
    #: msg_ids of the execute requests the kernel was busy with at arrival
    #: (empty tuple: no cell was running).
    executing: tuple[str, ...]

    @property
    def while_idle(self) -> bool:
        return not self.executing


class KernelDied(RuntimeError):
    pass


class KernelHarness:
    """A real ipykernel, spoken to like a Jupyter frontend.

    >>> with KernelHarness() as k:
    ...     k.execute("print(1 + 1)").stdout
    '2\\n'

    Parameters
    ----------
    python:
        interpreter whose ``-m ipykernel_launcher`` is started (default: this one).
    env:
        extra environment variables for the kernel (added to os.environ).
    cwd:
        working directory of the kernel (default: a fresh temp dir).
    comm_subshell:
        behave like JupyterLab >= 4.4 (``commsOverSubshells``): if the kernel
        reports "kernel subshells", create one and send every comm message
        with ``header["subshell_id"]``.  ``self.subshell_id`` is None when the
        kernel has no subshells (e.g. ipykernel 6).
    startup_timeout:
        seconds for the kernel to answer kernel_info (and IOPub to connect).
    allow_stdin:
        what execute requests say by default: True like JupyterLab, False like nbclient
        (``jupyter nbconvert --execute``, papermill), a client executing a notebook headlessly.
    """

    def __init__(
        self,
        python: str | None = None,
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        comm_subshell: bool = False,
        startup_timeout: float = 60.0,
        isolate_ipython_dir: bool = True,
        allow_stdin: bool = True,
    ) -> None:
        self.python = python or sys.executable
        self.allow_stdin = allow_stdin
        self.extra_env = dict(env or {})
        self.comm_subshell = comm_subshell
        self.startup_timeout = startup_timeout
        self.isolate_ipython_dir = isolate_ipython_dir
        self.subshell_id: str | None = None
        self.kernel_info: dict = {}
        self._ipykernel_version = ""
        self.start_seconds: float | None = None

        self._tmp = Path(tempfile.mkdtemp(prefix="nbp-kernel-"))
        self.cwd = Path(cwd) if cwd is not None else self._tmp / "cwd"
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_path = self._tmp / "kernel.log"
        self._log_file = None

        self._context = zmq.Context()
        self.km: KernelManager | None = None
        self.session: Session | None = None

        # Shared state, guarded by _cond's lock.
        self._cond = threading.Condition()
        self._requests: dict[str, ExecResult] = {}
        self._replies: dict[str, dict] = {}  # parent msg_id -> reply msg (non-execute)
        self._widgets: dict[str, dict] = {}  # comm_id -> state (open comms)
        self._widget_closed: dict[str, dict] = {}
        self._comms: dict[str, str] = {}  # comm_id -> target name, all targets
        self._updates: list[WidgetUpdate] = []
        self._executing: dict[str, None] = {}  # ordered set of busy execute msg_ids
        self._iopub_log: list[tuple[float, dict]] = []
        self._iopub_seen = 0
        self.execution_state: str | None = None
        self._io_error: BaseException | None = None

        self._outbox: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()
        self._io_thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ life

    def __enter__(self) -> "KernelHarness":
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _kernel_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Keep the kernel from inheriting the test run's own kernel/pytest hooks.
        for key in ("JPY_PARENT_PID", "PYTEST_CURRENT_TEST", "PYTEST_ADDOPTS"):
            env.pop(key, None)
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        if self.isolate_ipython_dir:
            env["IPYTHONDIR"] = str(self._tmp / "ipython")
        env.update(self.extra_env)
        return env

    def start(self) -> None:
        t0 = time.monotonic()
        spec_dir = self._tmp / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(
            json.dumps(
                {
                    "argv": [
                        self.python,
                        "-Xfrozen_modules=off",
                        "-m",
                        "ipykernel_launcher",
                        "-f",
                        "{connection_file}",
                    ],
                    "display_name": f"harness ({self.python})",
                    "language": "python",
                    "interrupt_mode": "signal",
                    "metadata": {"debugger": False},
                }
            )
        )
        ksm = KernelSpecManager(kernel_dirs=[str(self._tmp / "kernels")])
        self.km = KernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=ksm,
            context=self._context,
            connection_file=str(self._tmp / "connection.json"),
        )
        self._log_file = open(self.log_path, "ab")
        self.km.start_kernel(
            env=self._kernel_env(),
            cwd=str(self.cwd),
            stdout=self._log_file,
            stderr=self._log_file,
        )
        ks = self.km.session
        self.session = Session(
            key=ks.key, signature_scheme=ks.signature_scheme, username="nbparrot-harness"
        )
        self._io_thread = threading.Thread(
            target=self._io_main, name="kernel-harness-io", daemon=True
        )
        self._io_thread.start()
        self._handshake(self.startup_timeout)
        self.start_seconds = time.monotonic() - t0

    def _handshake(self, timeout: float) -> None:
        """Wait until shell answers and IOPub delivers (IOPub is a late joiner)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                seen_before = self._iopub_seen
            msg_id = self._send("shell", "kernel_info_request", {})
            try:
                reply = self._wait_reply(msg_id, min(2.0, max(0.1, deadline - time.monotonic())))
            except TimeoutError:
                reply = None
            if reply is not None:
                self.kernel_info = reply["content"]
                # IOPub must have delivered something (the status of this request).
                try:
                    wait_until(
                        lambda: self._iopub_seen > seen_before, 0.5, interval=0.01
                    )
                    break
                except TimeoutError:
                    pass
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"kernel did not become ready within {timeout} s; log:\n{self.kernel_log()}"
                )
        # kernel_info's implementation_version is IPython's version, so ask
        # the kernel itself which ipykernel it runs.
        self._ipykernel_version = str(
            self.eval("__import__('ipykernel').__version__", timeout=max(5.0, deadline - time.monotonic()))
        )
        if self.comm_subshell and self.supports_subshells:
            reply = self.request("control", "create_subshell_request", {}, timeout=10)
            self.subshell_id = reply["content"]["subshell_id"]

    @property
    def supports_subshells(self) -> bool:
        return "kernel subshells" in self.kernel_info.get("supported_features", [])

    @property
    def ipykernel_version(self) -> str:
        """ipykernel version, as the kernel reports it (``ipykernel.__version__``).

        Not kernel_info's ``implementation_version``: that is IPython's.
        """
        return self._ipykernel_version

    @property
    def ipykernel_version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", self.ipykernel_version)[:3])

    @property
    def pid(self) -> int | None:
        prov = self.km.provisioner if self.km else None
        return getattr(prov, "pid", None)

    def kernel_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def is_alive(self) -> bool:
        return bool(self.km and self.km.is_alive())

    def _check_alive(self) -> None:
        if self._io_error is not None:
            raise RuntimeError(f"harness I/O thread failed: {self._io_error!r}")
        if self.km is not None and not self.km.is_alive():
            raise KernelDied(f"kernel process is not running; log:\n{self.kernel_log()}")

    def interrupt(self, wake: bool = False) -> None:
        """SIGINT to the kernel, as the ■ toolbar button does.

        Measured on ipykernel 6.29.5 and 7.4.0: during a top-level ``await``
        the SIGINT handler only *schedules* the cancellation (``call_soon``
        from the loop's own thread, which does not wake the selector), so the
        cell is cancelled when the event loop next wakes up for any reason.
        If the cell awaits one long idle sleep that is the end of the sleep.
        ``wake=True`` then sends a ``kernel_info_request`` on shell, which
        wakes the loop like any frontend message would.
        """
        assert self.km is not None
        self.km.interrupt_kernel()
        if wake:
            self._send("shell", "kernel_info_request", {})

    def restart(self, timeout: float | None = None) -> None:
        """Restart the kernel process; widget mirror and subshell are reset."""
        assert self.km is not None
        self.km.restart_kernel(now=False, env=self._kernel_env())
        with self._cond:
            self._widgets.clear()
            self._comms.clear()
            self._executing.clear()
        self.subshell_id = None
        self._handshake(timeout or self.startup_timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the kernel (politely, then SIGKILL to its process group), stop I/O."""
        if self._closed:
            return
        self._closed = True
        km = self.km
        if km is not None:
            prov = km.provisioner
            pid = getattr(prov, "pid", None)
            pgid = getattr(prov, "pgid", None)
            try:
                if km.has_kernel:
                    km.shutdown_wait_time = timeout
                    km.shutdown_kernel(now=False)
            except Exception:
                pass
            # Belt and braces: nothing of the kernel's process group may be
            # left (e.g. children a test started in the kernel).  A group id
            # cannot be reused while the group has members, so this only
            # reaches our own processes.
            proc = getattr(prov, "process", None)
            if pgid:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if pid and proc is not None and proc.poll() is None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if proc is not None:
                try:
                    proc.wait(timeout=5)
                except Exception:
                    pass
            try:
                km.cleanup_resources()
            except Exception:
                pass
        self._stop.set()
        self._wake()
        if self._io_thread is not None:
            self._io_thread.join(timeout=5)
        try:
            self._context.destroy(linger=0)
        except Exception:
            pass
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._log_file is not None:
            self._log_file.close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    # -------------------------------------------------------------- sending

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _make_msg(self, msg_type: str, content: dict, subshell: bool = False) -> dict:
        assert self.session is not None
        with self._cond:
            msg = self.session.msg(msg_type, content)
        if subshell and self.subshell_id is not None:
            msg["header"]["subshell_id"] = self.subshell_id
        return msg

    def _send(self, channel: str, msg_type: str, content: dict, subshell: bool = False) -> str:
        if self._closed:
            raise RuntimeError("harness is shut down")
        msg = self._make_msg(msg_type, content, subshell)
        self._outbox.put((channel, msg))
        self._wake()
        return msg["header"]["msg_id"]

    def _wait_reply(self, msg_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while msg_id not in self._replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no reply to {msg_id} within {timeout} s")
                self._cond.wait(min(remaining, 0.5))
            return self._replies.pop(msg_id)

    def request(self, channel: str, msg_type: str, content: dict, timeout: float = 30) -> dict:
        """Send a request on "shell" or "control" and return the whole reply message."""
        msg_id = self._send(channel, msg_type, content)
        return self._wait_reply(msg_id, timeout)

    # ------------------------------------------------------------ executing

    def execute_nowait(
        self, code: str, *, silent: bool = False, store_history: bool = True,
        user_expressions: dict | None = None, stop_on_error: bool = True,
        allow_stdin: bool | None = None,
    ) -> str:
        """Send an execute_request; return its msg_id at once.

        ``allow_stdin`` defaults to the harness's (True, as JupyterLab sends; nbclient, which
        nbconvert and papermill use, sends False). Nothing answers an ``input()`` here.
        """
        content = {
            "code": code,
            "silent": silent,
            "store_history": store_history and not silent,
            "user_expressions": user_expressions or {},
            "allow_stdin": self.allow_stdin if allow_stdin is None else allow_stdin,
            "stop_on_error": stop_on_error,
        }
        msg = self._make_msg("execute_request", content)
        msg_id = msg["header"]["msg_id"]
        with self._cond:
            self._requests[msg_id] = ExecResult(msg_id=msg_id, code=code, sent_time=time.monotonic())
        self._outbox.put(("shell", msg))
        self._wake()
        return msg_id

    def result(self, msg_id: str) -> ExecResult:
        """A snapshot of what a request produced so far (it may still run)."""
        with self._cond:
            return self._requests[msg_id].snapshot()

    def wait(self, msg_id: str, timeout: float = 60) -> ExecResult:
        """Wait for the execute_reply *and* IOPub idle of ``msg_id``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            res = self._requests[msg_id]
            while not res.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.25))
                if not res.done:
                    self._cond.release()
                    try:
                        self._check_alive()
                    finally:
                        self._cond.acquire()
            if res.done:
                return res
            partial = res.snapshot()
        raise TimeoutError(
            f"cell did not finish within {timeout} s (status={partial.status}):\n{partial.code}\n"
            f"--- stdout so far ---\n{partial.stdout}\n--- stderr so far ---\n{partial.stderr}"
        )

    def execute(self, code: str, timeout: float = 60, *, check: bool = False, **kw) -> ExecResult:
        """Run a cell and wait for it; ``check=True`` raises on a cell error."""
        res = self.wait(self.execute_nowait(code, **kw), timeout)
        if check:
            res.raise_for_error()
        return res

    def eval(self, expr: str, timeout: float = 30) -> Any:
        """Value of ``expr`` in the kernel (via user_expressions, silently).

        Returns the ``literal_eval`` of its repr when possible, else the repr.
        Raises AssertionError if evaluating it raised in the kernel.
        """
        mid = self.execute_nowait("", silent=True, user_expressions={"v": expr})
        res = self.wait(mid, timeout)
        if res.status != "ok":
            raise AssertionError(f"eval request failed: {res.status} {res.error}")
        v = res.reply["user_expressions"]["v"]
        if v.get("status") != "ok":
            raise AssertionError(f"{expr!r} raised {v.get('ename')}: {v.get('evalue')}")
        text = v["data"].get("text/plain", "")
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text

    @property
    def executing(self) -> tuple[str, ...]:
        """msg_ids of execute requests the kernel is busy with right now."""
        with self._cond:
            return tuple(self._executing)

    # --------------------------------------------------------------- widgets

    def widgets(self) -> dict[str, dict]:
        """comm_id -> state of every open ``jupyter.widget`` comm (copies)."""
        with self._cond:
            return copy.deepcopy(self._widgets)

    def widget(self, comm_id: str) -> dict:
        with self._cond:
            if comm_id in self._widgets:
                return copy.deepcopy(self._widgets[comm_id])
            return copy.deepcopy(self._widget_closed[comm_id])

    def find_widgets(self, model_name: str | None = None, **state_filters) -> dict[str, dict]:
        """Open widgets whose ``_model_name`` matches and whose state has the given values.

        ``model_name`` may omit the ``Model`` suffix: "IntProgress" matches
        "IntProgressModel".  Insertion (creation) order is kept.
        """
        out = {}
        for cid, state in self.widgets().items():
            if model_name is not None:
                name = state.get("_model_name", "")
                if name not in (model_name, model_name + "Model"):
                    continue
            if all(state.get(k) == v for k, v in state_filters.items()):
                out[cid] = state
        return out

    def wait_for_widget(self, model_name: str | None = None, timeout: float = 10, **state_filters) -> str:
        """comm_id of the first widget matching (see find_widgets), waiting for it."""
        found = wait_until(
            lambda: self.find_widgets(model_name, **state_filters),
            timeout,
            message=lambda: f"no widget {model_name} {state_filters}; have {self._widget_summary()}",
        )
        return next(iter(found))

    def _widget_summary(self) -> str:
        return ", ".join(
            f"{cid[:8]}:{s.get('_model_name')}" for cid, s in self.widgets().items()
        ) or "none"

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.02,
        message: str | Callable[[], str] | None = None,
    ) -> Any:
        """Poll ``predicate`` (bounded); fails early if the kernel died."""

        def check():
            value = predicate()
            if not value:
                self._check_alive()
            return value

        return wait_until(check, timeout, interval, message)

    def updates(self, comm_id: str | None = None, methods=("update",)) -> list[WidgetUpdate]:
        """Recorded widget messages (default: kernel-side ``update`` only)."""
        with self._cond:
            return [
                u for u in self._updates
                if (comm_id is None or u.comm_id == comm_id)
                and (methods is None or u.method in methods)
            ]

    def updates_since(self, t: float, comm_id: str | None = None, methods=("update",)) -> list[WidgetUpdate]:
        """Widget messages that arrived strictly after monotonic time ``t``."""
        return [u for u in self.updates(comm_id, methods) if u.t > t]

    @property
    def update_count(self) -> int:
        with self._cond:
            return sum(1 for u in self._updates if u.method == "update")

    def iopub_messages(self) -> list[tuple[float, dict]]:
        with self._cond:
            return list(self._iopub_log)

    def display_updates(self, cell: ExecResult) -> list[tuple[float, dict]]:
        """Updates of the displays ``cell`` created, matched by display_id as a frontend does.

        (On ipykernel 6 output sent by a background task after another request carries that
        request's parent header, so the display_id, not the parent, ties an update to its cell.)
        """
        messages = self.iopub_messages()
        ids = {m["content"].get("transient", {}).get("display_id") for _, m in messages
               if m["msg_type"] == "display_data" and m["parent_header"].get("msg_id") == cell.msg_id}
        return [(t, m["content"]) for t, m in messages
                if m["msg_type"] == "update_display_data"
                and m["content"].get("transient", {}).get("display_id") in ids]

    # ------------------------------------------------------- frontend -> kernel

    def send_comm(self, comm_id: str, data: dict) -> str:
        """A frontend ``comm_msg`` on shell (on the subshell if comm_subshell)."""
        return self._send(
            "shell", "comm_msg", {"comm_id": comm_id, "data": data}, subshell=True
        )

    def click(self, comm_id: str) -> str:
        """What a frontend sends when a Button is clicked."""
        return self.send_comm(comm_id, {"method": "custom", "content": {"event": "click"}})

    def set_state(self, comm_id: str, **state) -> str:
        """A frontend-side state change (e.g. a slider moved)."""
        with self._cond:
            if comm_id in self._widgets:
                self._widgets[comm_id].update(copy.deepcopy(state))
        return self.send_comm(comm_id, {"method": "update", "state": state, "buffer_paths": []})

    # ------------------------------------------------------------- I/O thread

    def _io_main(self) -> None:
        assert self.km is not None and self.session is not None
        socks = {
            "shell": self.km.connect_shell(),
            "control": self.km.connect_control(),
            "iopub": self.km.connect_iopub(),
        }
        poller = zmq.Poller()
        for s in socks.values():
            poller.register(s, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(250))
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                while True:
                    try:
                        channel, msg = self._outbox.get_nowait()
                    except queue.Empty:
                        break
                    self.session.send(socks[channel], msg)
                for channel, sock in socks.items():
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        _, parts = self.session.feed_identities(frames)
                        msg = self.session.deserialize(parts)
                        self._handle(channel, msg, time.monotonic())
        except BaseException as e:  # recorded, surfaced by _check_alive
            if not self._stop.is_set():
                self._io_error = e
        finally:
            for s in socks.values():
                s.close(linger=0)

    def _handle(self, channel: str, msg: dict, now: float) -> None:
        msg_type = msg["header"]["msg_type"]
        parent = msg.get("parent_header") or {}
        parent_id = parent.get("msg_id")
        content = msg.get("content") or {}
        with self._cond:
            if channel == "iopub":
                self._iopub_seen += 1
                self._iopub_log.append((now, msg))
                self._handle_iopub(msg_type, parent, parent_id, content, msg, now)
            else:
                req = self._requests.get(parent_id)
                if req is not None and msg_type == "execute_reply":
                    req.reply = content
                    req.status = content.get("status")
                    req.reply_time = now
                    req.execution_count = content.get("execution_count", req.execution_count)
                    if req.status == "error" and req.error is None:
                        req.error = ExecError(
                            content.get("ename", ""),
                            content.get("evalue", ""),
                            [strip_ansi(x) for x in content.get("traceback", [])],
                        )
                elif parent_id is not None:
                    self._replies[parent_id] = msg
            self._cond.notify_all()

    def _handle_iopub(self, msg_type, parent, parent_id, content, msg, now) -> None:
        req = self._requests.get(parent_id)
        if msg_type == "status":
            state = content.get("execution_state")
            self.execution_state = state
            if parent.get("msg_type") == "execute_request":
                if state == "busy":
                    self._executing[parent_id] = None
                elif state == "idle":
                    self._executing.pop(parent_id, None)
            if req is not None:
                if state == "busy" and req.busy_time is None:
                    req.busy_time = now
                elif state == "idle":
                    req.idle_time = now
            return
        if msg_type.startswith("comm_"):
            self._handle_comm(msg_type, parent, parent_id, content, msg, now)
            return
        if req is None:
            return
        if msg_type in ("stream", "display_data", "update_display_data", "execute_result",
                        "error", "clear_output"):
            req.outputs.append((msg_type, content))
        if msg_type == "stream":
            if content.get("name") == "stderr":
                req.stderr += content.get("text", "")
            else:
                req.stdout += content.get("text", "")
        elif msg_type == "display_data":
            req.displays.append(content.get("data", {}))
        elif msg_type == "update_display_data":
            req.display_updates.append(content.get("data", {}))
        elif msg_type == "execute_result":
            req.execute_result = content.get("data", {})
        elif msg_type == "error":
            req.error = ExecError(
                content.get("ename", ""),
                content.get("evalue", ""),
                [strip_ansi(x) for x in content.get("traceback", [])],
            )
        elif msg_type == "execute_input":
            req.execution_count = content.get("execution_count")

    def _handle_comm(self, msg_type, parent, parent_id, content, msg, now) -> None:
        comm_id = content.get("comm_id")
        data = content.get("data") or {}
        if msg_type == "comm_open":
            self._comms[comm_id] = content.get("target_name", "")
            if content.get("target_name") != WIDGET_TARGET:
                return
            state = copy.deepcopy(data.get("state", {}))
            self._widgets[comm_id] = state
            method = "open"
        elif msg_type == "comm_close":
            if comm_id in self._widgets:
                self._widget_closed[comm_id] = self._widgets.pop(comm_id)
                state, method = {}, "close"
            else:
                return
        else:  # comm_msg
            if comm_id not in self._widgets:
                return
            method = data.get("method", "")
            state = copy.deepcopy(data.get("state", {})) if "state" in data else {}
            if method in ("update", "echo_update"):
                # A widget manager applies both (echo_update: the kernel's
                # confirmation of a frontend-side change).
                self._widgets[comm_id].update(state)
            elif method == "custom":
                state = {"content": copy.deepcopy(data.get("content"))}
        self._updates.append(
            WidgetUpdate(
                t=now,
                comm_id=comm_id,
                method=method,
                state=state,
                parent_msg_id=parent_id,
                parent_msg_type=parent.get("msg_type"),
                executing=tuple(self._executing),
            )
        )
