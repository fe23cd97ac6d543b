"""The mock server in a subprocess (:class:`ServerProcess`): what tests, the demo and benchmarks use."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from collections import deque
from pathlib import Path
from typing import Any

from .cli import config_to_argv
from .config import SUBPROCESS_MAX_LIFETIME, ServerConfig

_LISTENING_RE = re.compile(r"nbparrot server listening on http://(\[[^\]]+\]|[^:/]+):(\d+)/v1")


def _terminate(proc: subprocess.Popen) -> None:
    """Terminate a child process, killing it if it does not exit within 5 s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerProcess:
    """The mock server in a subprocess: what tests, the demo and benchmarks use."""

    def __init__(self, config: ServerConfig | None = None, *, cpu: int | None = None, **overrides: Any) -> None:
        """Prepare (not start) a server from ``config`` with ``overrides`` of its fields."""
        config = dataclasses.replace(config or ServerConfig(), **overrides)
        if config.max_lifetime is None:
            config = dataclasses.replace(config, max_lifetime=SUBPROCESS_MAX_LIFETIME)
        self.config = config
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.base_url = ""
        self.root_url = ""
        self._stderr: deque[str] = deque(maxlen=200)
        self._finalizer: weakref.finalize | None = None

    def start(self, timeout: float = 15.0) -> ServerProcess:
        """Launch ``python -m nbparrot.server`` (port 0 unless configured) and wait for its "listening" line."""
        if self.proc is not None:
            return self
        cmd = [sys.executable, "-m", "nbparrot.server", *config_to_argv(dataclasses.replace(self.config, port=0)),
               "--port", str(self.config.port), "--parent-pid", str(os.getpid())]
        if self.cpu is not None:
            cmd += ["--cpu", str(self.cpu)]
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, env=env, text=True, encoding="utf-8",
                                            errors="replace")
        self._finalizer = weakref.finalize(self, _terminate, proc)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True).start()
        threading.Thread(target=_pump, args=(proc.stderr, self._stderr.append), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                if proc.poll() is not None:
                    time.sleep(0.1)  # let the stderr pump catch the traceback
                    self.stop()
                    raise RuntimeError(f"mock server exited with {proc.returncode}: {self.stderr_tail()}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mock server did not start within {timeout:.0f}s: {self.stderr_tail()}")
                continue
            match = _LISTENING_RE.search(line)
            if match:
                host, self.port = match.group(1), int(match.group(2))
                self.root_url = f"http://{host}:{self.port}"
                self.base_url = self.root_url + "/v1"
                return self

    def stderr_tail(self) -> str:
        """The last lines the server wrote to stderr (for error messages)."""
        return "".join(self._stderr).strip()[-4000:]

    def _request(self, method: str, path: str) -> Any:
        """One JSON request to the server's control endpoints (no proxies: loopback only)."""
        if not self.root_url:
            raise RuntimeError("server not started")
        req = urllib.request.Request(self.root_url + path, method=method, data=b"" if method == "POST" else None)
        with _NO_PROXY_OPENER.open(req, timeout=10) as resp:
            return json.loads(resp.read())

    def stats(self) -> dict:
        """GET /stats."""
        return self._request("GET", "/stats")

    def reset(self) -> None:
        """POST /stats/reset: zero the counters and refill the limiter buckets."""
        self._request("POST", "/stats/reset")

    def stop(self) -> None:
        """Terminate the server (kill after 5 s); safe to call twice."""
        if self.proc is not None:
            _terminate(self.proc)
        if self._finalizer is not None:
            self._finalizer.detach()

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> ServerProcess:
        """Start on entering a with-block."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop on leaving a with-block."""
        self.stop()

    def __repr__(self) -> str:
        """Show where it listens."""
        return f"ServerProcess({self.base_url or 'not started'})"


def _pump(stream: Any, sink: Any) -> None:
    """Copy lines from a child pipe into ``sink`` until EOF (keeps the child from blocking)."""
    try:
        for line in stream:
            sink(line)
    except (OSError, ValueError):
        pass
    finally:
        stream.close()

