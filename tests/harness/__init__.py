"""Test harness: real kernels, real JupyterLab, real Chromium.

- ``kernel.KernelHarness``: an ipykernel driven over the Jupyter protocol with
  a frontend-like widget mirror (``click``, ``set_state``, subshell comms).
- ``envs.kernel_python``: interpreters for other ipykernel versions (cached venvs).
- ``lab.JupyterLab`` / ``lab.Browser``: JupyterLab server + Playwright/Chromium.

Browser tests are marked ``@pytest.mark.browser`` (register the marker in the
project's pytest config).  ``lab`` is imported lazily so the kernel harness
works without jupyterlab/playwright installed.
"""

from .envs import KERNEL_VERSIONS, kernel_python, kernel_version_id, kernel_version_params
from .kernel import (
    ExecError,
    ExecResult,
    KernelDied,
    KernelHarness,
    WidgetUpdate,
    strip_ansi,
    wait_until,
)

__all__ = [
    "KERNEL_VERSIONS",
    "ExecError",
    "ExecResult",
    "KernelDied",
    "KernelHarness",
    "WidgetUpdate",
    "kernel_python",
    "kernel_version_id",
    "kernel_version_params",
    "strip_ansi",
    "wait_until",
]
