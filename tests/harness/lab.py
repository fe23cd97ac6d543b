"""A real JupyterLab server and a real Chromium, for end-to-end tests.

``JupyterLab`` runs ``python -m jupyter lab`` on 127.0.0.1 (free port, no
token, no XSRF) in its own process group, with its own config/data/runtime/
settings dirs under a temp dir, so no user settings leak in and nothing leaks
out.  ``Browser`` drives Debian's chromium through Playwright's sync API
(never ``playwright install``: the browser binary is the system one, or
``$NBPARROT_CHROMIUM``).

Everything started here is stopped by PID / process group on exit, including
kernels the server started (found by the unique runtime dir in their command
line) and Chromium processes (found by their unique --user-data-dir).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .envs import REPO_ROOT
from .kernel import wait_until

ARTIFACTS_DIR = REPO_ROOT / "build" / "artifacts"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Lab settings applied unless overridden: no news/update checks (no traffic
#: beyond 127.0.0.1, and no "fetch news?" toast over the notebook), and every
#: cell rendered (windowing off) so cells can be found in the DOM.
DEFAULT_SETTINGS: dict[str, dict] = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
}

# DOM selectors for ipywidgets 8 views (jupyterlab_widgets 3.x).
SEL_PROGRESS = ".widget-hprogress"  # IntProgress/FloatProgress, horizontal
SEL_PROGRESS_BAR = ".widget-hprogress .progress-bar"  # style.width = "<pct>%"
SEL_BUTTON = "button.widget-button"  # text content = description
SEL_HTML = ".widget-html"


def chromium_path() -> str:
    return os.environ.get("NBPARROT_CHROMIUM", DEFAULT_CHROMIUM)


def browser_unavailable_reason() -> str | None:
    """Why the browser tests cannot run here (None if they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; no `playwright install` needed)"
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        return "jupyterlab is not installed"
    path = chromium_path()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return f"no chromium at {path} (apt-get install chromium, or set NBPARROT_CHROMIUM)"
    return None


def require_browser() -> None:
    """Skip a browser test when chromium/jupyterlab/playwright are missing; under CI=true, fail instead."""
    import pytest

    reason = browser_unavailable_reason()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test cannot run in CI: {reason}")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with_cmdline(token: str) -> list[int]:
    """PIDs of processes whose command line contains ``token`` (a unique path)."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if token in cmd:
            pids.append(int(entry))
    return pids


def _kill_pids(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def write_notebook(path: str | os.PathLike, cells: list[str], kernel_name: str = "python3") -> Path:
    """Write a notebook with the given code cells for ``kernel_name``."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": kernel_name, "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


class JupyterLab:
    """``with JupyterLab(root_dir) as lab: lab.url ...``

    Parameters
    ----------
    root_dir: notebooks directory (default: a fresh temp dir, ``lab.root_dir``).
    python: interpreter to run the server with (default: this one; its
        ``python3`` kernelspec is the default kernel).
    kernels: extra kernelspecs, name -> python interpreter (e.g. an
        ipykernel 6.29.5 venv from ``envs.kernel_python``).
    settings: JupyterLab user settings, plugin id -> values, merged over
        DEFAULT_SETTINGS; e.g. ``{"@jupyterlab/apputils-extension:kernels-settings":
        {"commsOverSubshells": "disabled"}}``.
    env: extra environment for the server and its kernels.
    """

    def __init__(
        self,
        root_dir: str | os.PathLike | None = None,
        *,
        python: str | None = None,
        kernels: dict[str, str] | None = None,
        settings: dict[str, dict] | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 90.0,
    ) -> None:
        self.python = python or sys.executable
        self._tmp = Path(tempfile.mkdtemp(prefix="nbp-lab-"))
        self.root_dir = Path(root_dir) if root_dir is not None else self._tmp / "root"
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.kernels = dict(kernels or {})
        self.settings = {k: dict(v) for k, v in DEFAULT_SETTINGS.items()}
        for plugin, values in (settings or {}).items():
            self.settings.setdefault(plugin, {}).update(values)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self._tmp / "lab.log"
        self.start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- setup

    def _write_dirs(self) -> dict[str, str]:
        d = {
            "JUPYTER_CONFIG_DIR": self._tmp / "config",
            "JUPYTER_DATA_DIR": self._tmp / "data",
            "JUPYTER_RUNTIME_DIR": self._tmp / "runtime",
            "JUPYTERLAB_SETTINGS_DIR": self._tmp / "settings",
            "JUPYTERLAB_WORKSPACES_DIR": self._tmp / "workspaces",
            "IPYTHONDIR": self._tmp / "ipython",
        }
        for p in d.values():
            p.mkdir(parents=True, exist_ok=True)
        for plugin, values in self.settings.items():
            pkg, _, name = plugin.partition(":")
            f = d["JUPYTERLAB_SETTINGS_DIR"] / pkg / f"{name}.jupyterlab-settings"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(values, indent=1))
        for name, python in self.kernels.items():
            kdir = d["JUPYTER_DATA_DIR"] / "kernels" / name
            kdir.mkdir(parents=True, exist_ok=True)
            (kdir / "kernel.json").write_text(
                json.dumps(
                    {
                        "argv": [python, "-Xfrozen_modules=off", "-m", "ipykernel_launcher",
                                 "-f", "{connection_file}"],
                        "display_name": name,
                        "language": "python",
                        "metadata": {"debugger": True},
                    }
                )
            )
        return {k: str(v) for k, v in d.items()}

    def command(self) -> list[str]:
        # jupyter_server refuses to run as root without it (CI containers).
        root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        return [
            self.python, "-m", "jupyter", "lab", *root,
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            "--IdentityProvider.token=",
            "--PasswordIdentityProvider.hashed_password=",
            "--ServerApp.disable_check_xsrf=True",
            f"--ServerApp.root_dir={self.root_dir}",
            "--ServerApp.terminals_enabled=False",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={self._tmp / 'settings'}",
            f"--LabApp.workspaces_dir={self._tmp / 'workspaces'}",
            "--LanguageServerManager.autodetect=False",
        ]

    def start(self) -> None:
        t0 = time.monotonic()
        dirs = self._write_dirs()
        env = dict(os.environ)
        env.pop("JPY_PARENT_PID", None)
        env.update(dirs)
        env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
        env.update(self.extra_env)
        last_error = None
        for _ in range(3):  # a port picked by free_port() can be taken meanwhile
            self.port = free_port()
            log = open(self.log_path, "ab")
            try:
                self.proc = subprocess.Popen(
                    self.command(), cwd=str(self.root_dir), env=env, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            finally:
                log.close()
            try:
                wait_until(self._ready, self.startup_timeout, interval=0.1,
                           message=lambda: f"JupyterLab not ready in {self.startup_timeout} s:\n{self.log()}")
                self.start_seconds = time.monotonic() - t0
                return
            except RuntimeError as e:  # exited early (e.g. port in use)
                last_error = e
                self._stop_process()
        raise last_error  # type: ignore[misc]

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log()}")
        try:
            self.api("/api/status", timeout=2)
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------------ API

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 10) -> Any:
        """JSON REST call to the server (no auth needed)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        # Never use a proxy for 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def running_kernels(self) -> list[dict]:
        return self.api("/api/kernels")

    # --------------------------------------------------------------- stop

    def _stop_process(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Shut kernels down politely first (they live in their own sessions).
            try:
                for k in self.running_kernels():
                    self.api(f"/api/kernels/{k['id']}", method="DELETE", timeout=10)
            except Exception:
                pass
        self._stop_process()
        # Kernels are started with start_new_session, so they are not in the
        # server's group: find any left by their connection file's directory.
        leftovers = _pids_with_cmdline(str(self._tmp))
        _kill_pids(leftovers)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "JupyterLab":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Browser:
    """Chromium (Debian's, through Playwright) pointed at a ``JupyterLab``.

    ``page`` is the Playwright page; ``console_errors`` collects console
    errors and uncaught page errors.
    """

    def __init__(
        self,
        lab: JupyterLab,
        *,
        artifacts_dir: str | os.PathLike | None = None,
        viewport: tuple[int, int] = (1400, 900),
        timeout_ms: int = 30_000,
        prefix: str = "",
    ) -> None:
        self.lab = lab
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else ARTIFACTS_DIR
        self.viewport = viewport
        self.timeout_ms = timeout_ms
        self.prefix = prefix
        self.console_errors: list[str] = []
        self.console: list[str] = []
        self.screenshots: list[Path] = []
        self._tmp = Path(tempfile.mkdtemp(prefix="nbp-chromium-"))
        self._pw = None
        self.context = None
        self.page = None
        self.launch_seconds: float | None = None

    def __enter__(self) -> "Browser":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        from playwright.sync_api import sync_playwright

        t0 = time.monotonic()
        self._pw = sync_playwright().start()
        self.context = self._pw.chromium.launch_persistent_context(
            str(self._tmp / "profile"),
            executable_path=chromium_path(),
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": self.viewport[0], "height": self.viewport[1]},
            timeout=self.timeout_ms,
        )
        self.context.set_default_timeout(self.timeout_ms)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        self.launch_seconds = time.monotonic() - t0

    def _on_console(self, msg) -> None:
        text = f"{msg.type}: {msg.text}"
        self.console.append(text)
        if msg.type == "error":
            self.console_errors.append(text)

    def close(self) -> None:
        try:
            if self.context is not None:
                self.context.close()
        except Exception:
            pass
        try:
            if self._pw is not None:
                self._pw.stop()
        except Exception:
            pass
        self.context = self.page = self._pw = None
        # Whatever chromium process is left with our profile dir: kill by PID.
        _kill_pids(_pids_with_cmdline(str(self._tmp)))
        shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------ notebook

    def open_notebook(self, path: str, timeout: float = 90) -> None:
        """Open ``/lab/tree/<path>`` and wait until its kernel is idle."""
        t0 = time.monotonic()
        self.page.goto(f"{self.lab.url}/lab/tree/{path}", timeout=timeout * 1000)
        self.page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(
            state="visible", timeout=timeout * 1000
        )
        self.wait_kernel_status("idle", timeout=max(5.0, timeout - (time.monotonic() - t0)))

    def kernel_status(self) -> str | None:
        """Kernel status of the current notebook as the frontend sees it."""
        # Through the exposed app: the DOM execution indicator briefly shows
        # "idle" before the session even exists, so it is only a fallback.
        return self.page.evaluate(
            """() => {
                const app = window.jupyterapp;
                if (!app) {
                    const el = document.querySelector('.jp-Notebook-ExecutionIndicator');
                    return el ? el.getAttribute('data-status') : null;
                }
                const w = app.shell.currentWidget;
                const sc = w && w.sessionContext;
                if (!sc) return null;
                const k = sc.session && sc.session.kernel;
                if (!sc.isReady || !k) return 'not-ready:' + sc.kernelDisplayStatus;
                return k.status;
            }"""
        )

    def kernel_info(self) -> dict | None:
        """The kernel_info reply content the frontend got (spec name, features...)."""
        return self.page.evaluate(
            """async () => {
                const w = window.jupyterapp.shell.currentWidget;
                const k = w.sessionContext.session.kernel;
                const info = await k.info;
                return {name: k.name, supported_features: info.supported_features || [],
                        implementation_version: info.implementation_version};
            }"""
        )

    def wait_kernel_status(self, status: str = "idle", timeout: float = 60) -> None:
        wait_until(lambda: self.kernel_status() == status, timeout, interval=0.1,
                   message=lambda: f"kernel status {self.kernel_status()!r}, wanted {status!r}")

    def cell(self, index: int):
        return self.page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(index)

    def _prompt(self, index: int) -> str:
        return self.cell(index).locator(".jp-InputPrompt").first.inner_text().strip()

    def run_cell(self, index: int, *, wait: bool = True, timeout: float = 60) -> None:
        """Select cell ``index`` (command mode) and press Ctrl+Enter.

        With ``wait``: until its prompt shows a new execution count.
        """
        before = self._prompt(index)
        cell = self.cell(index)
        cell.locator(".jp-InputPrompt").first.click()
        self.page.keyboard.press("Escape")
        self.page.keyboard.press("Control+Enter")
        if wait:
            self.wait_cell_done(index, before, timeout)

    def wait_cell_done(self, index: int, before: str | None = None, timeout: float = 60) -> str:
        """Wait until cell ``index`` shows ``[n]`` with n different from ``before``."""

        def done():
            p = self._prompt(index)
            return p if re.search(r"\[\d+\]", p) and p != before else None

        return wait_until(done, timeout, interval=0.05,
                          message=lambda: f"cell {index} still shows {self._prompt(index)!r}")

    def cell_output_text(self, index: int) -> str:
        out = self.cell(index).locator(".jp-OutputArea")
        return out.inner_text() if out.count() else ""

    def interrupt_kernel(self) -> None:
        """Click the notebook toolbar's interrupt (■) button."""
        self.page.locator(
            ".jp-NotebookPanel:visible .jp-Toolbar [data-jp-item-name='interrupt'] button"
        ).first.click()

    def screenshot(self, name: str) -> Path:
        """Save a PNG to build/artifacts/<prefix><name>.png and return its path."""
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        path = self.artifacts_dir / f"{self.prefix}{name}.png"
        self.page.screenshot(path=str(path))
        self.screenshots.append(path)
        return path
