"""Interpreters for kernels of a given ipykernel version.

``kernel_python(None)`` is the interpreter running the tests (the main venv,
ipykernel 7.x).  ``kernel_python("6.29.5")`` builds, once, a venv under
``<repo>/build/kernels/ipykernel-6.29.5`` with that ipykernel, ipywidgets and
the repo installed in editable mode, and returns its python.

The build is guarded by a file lock, so concurrent test processes (e.g.
pytest-xdist workers, or two people's runs on one machine) do not build the
same venv at once.  A marker file is written last; a venv without a marker is
a half-finished build and is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS_DIR = REPO_ROOT / "build" / "kernels"

#: Kernel versions the protocol-level tests run against: ``None`` = the
#: ipykernel of the interpreter running the tests (7.x), plus the last 6.x.
KERNEL_VERSIONS: list[str | None] = [None, "6.29.5"]

#: Seconds allowed for one pip call while building a kernel venv.
PIP_TIMEOUT = float(os.environ.get("NBPARROT_KERNEL_PIP_TIMEOUT", "900"))
#: Seconds to wait for another process that holds the build lock.
LOCK_TIMEOUT = float(os.environ.get("NBPARROT_KERNEL_LOCK_TIMEOUT", "1200"))

MARKER = "nbparrot-harness.json"


def kernel_version_id(version: str | None) -> str:
    """A readable pytest id for a KERNEL_VERSIONS entry."""
    return "ipykernel-current" if version is None else f"ipykernel-{version}"


def kernel_version_params(build_timeout: float = PIP_TIMEOUT + 300) -> list:
    """KERNEL_VERSIONS as ``pytest.param``s with readable ids.

    Versions that may need a venv build get a ``pytest.mark.timeout`` large
    enough for that first build (pytest-timeout counts fixture setup).
    """
    import pytest

    return [
        pytest.param(v, id=kernel_version_id(v))
        if v is None
        else pytest.param(v, id=kernel_version_id(v), marks=pytest.mark.timeout(build_timeout))
        for v in KERNEL_VERSIONS
    ]


def venv_dir(version: str) -> Path:
    return KERNELS_DIR / f"ipykernel-{version}"


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _project_fingerprint() -> str:
    """Hash of what the project install depends on (dependencies, build system).

    Other edits to pyproject.toml (pytest options, extras) do not trigger a
    re-install of the project into the kernel venvs.
    """
    pyproject = REPO_ROOT / "pyproject.toml"
    try:
        import tomllib

        with open(pyproject, "rb") as f:
            data = tomllib.load(f)
        key = json.dumps(
            [data.get("build-system"), data.get("project", {}).get("dependencies")],
            sort_keys=True,
        ).encode()
    except (ImportError, OSError, ValueError):
        key = pyproject.read_bytes() if pyproject.exists() else b""
    return hashlib.sha256(key).hexdigest()[:16]


def _project_dependencies() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        return []
    try:
        with open(REPO_ROOT / "pyproject.toml", "rb") as f:
            return list(tomllib.load(f).get("project", {}).get("dependencies", []))
    except (OSError, ValueError):
        return []


@contextmanager
def _file_lock(path: Path, timeout: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not lock {path} within {timeout:.0f} s")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log, timeout: float = PIP_TIMEOUT) -> None:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    # pip's own child processes are in the same session; on timeout the
    # whole group is killed.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(cmd)}")
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)


def _check(python: Path, version: str) -> str | None:
    """None if the venv has the right ipykernel, ipywidgets and nbparrot; else why not."""
    if not python.exists():
        return "no interpreter"
    code = (
        "import importlib.util, ipykernel, ipywidgets, sys\n"
        f"assert ipykernel.__version__ == {version!r}, ipykernel.__version__\n"
        # find_spec rather than import: the package may be mid-edit by someone
        # else; the venv is fine as long as it resolves to this repo.
        "spec = importlib.util.find_spec('nbparrot')\n"
        "assert spec is not None, 'nbparrot not installed'\n"
        "print(spec.submodule_search_locations and list(spec.submodule_search_locations)[0])\n"
    )
    try:
        out = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "import check timed out"
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or ["import check failed"])[-1]
    location = out.stdout.strip()
    if location and Path(location).resolve() != (REPO_ROOT / "nbparrot").resolve():
        return f"nbparrot resolves to {location}, not this repo"
    return None


def _base_ok(python: Path, version: str) -> bool:
    """True if the venv exists with the wanted ipykernel and an ipywidgets."""
    if not python.exists():
        return False
    code = (
        "import ipykernel, ipywidgets\n"
        f"assert ipykernel.__version__ == {version!r}, ipykernel.__version__\n"
    )
    try:
        return subprocess.run([str(python), "-c", code], capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _install_project(python: Path, log) -> str:
    """Install the repo in editable mode; return how it was installed.

    If the editable install fails (e.g. pyproject.toml is mid-edit), fall back
    to installing the declared dependencies and a .pth file pointing at the
    repo root, which gives the same import behaviour.
    """
    try:
        _run([str(python), "-m", "pip", "install", "-e", str(REPO_ROOT)], log)
        return "editable"
    except (subprocess.CalledProcessError, RuntimeError) as e:
        log.write(f"editable install failed ({e}); falling back to deps + .pth\n")
    deps = _project_dependencies()
    if deps:
        _run([str(python), "-m", "pip", "install", *deps], log)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    Path(purelib, "nbparrot_harness_repo.pth").write_text(str(REPO_ROOT) + "\n")
    return "pth"


def kernel_python(version: str | None = None, *, rebuild: bool = False) -> str:
    """Path of a python whose ``-m ipykernel_launcher`` is ipykernel ``version``.

    ``None`` means the interpreter running the tests.  Other versions get a
    cached venv under ``build/kernels/``; the first call builds it (about a
    minute with warm pip caches), later calls only check it (about 1 s).
    """
    if version is None:
        return sys.executable
    path = venv_dir(version)
    python = _venv_python(path)
    marker = path / MARKER
    fingerprint = _project_fingerprint()

    def up_to_date() -> bool:
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            return False
        return info.get("version") == version and info.get("pyproject") == fingerprint

    if not rebuild and up_to_date() and _check(python, version) is None:
        return str(python)

    with _file_lock(KERNELS_DIR / f".ipykernel-{version}.lock", LOCK_TIMEOUT):
        # Somebody else may have finished the build while we waited.
        if not rebuild and up_to_date() and _check(python, version) is None:
            return str(python)
        log_path = KERNELS_DIR / f"ipykernel-{version}.build.log"
        t0 = time.monotonic()
        with open(log_path, "a") as log:
            log.write(f"\n=== build {time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
            try:
                if rebuild or not _base_ok(python, version):
                    if path.exists():
                        shutil.rmtree(path)
                    _run([sys.executable, "-m", "venv", str(path)], log, timeout=300)
                    _run(
                        [str(python), "-m", "pip", "install", f"ipykernel=={version}", "ipywidgets"],
                        log,
                    )
                # else: the kernel side is fine and only the project changed
                # (e.g. a new dependency): just re-install the project.
                marker.unlink(missing_ok=True)
                how = _install_project(python, log)
            except Exception as e:
                raise RuntimeError(
                    f"building the ipykernel {version} venv failed: {e}; see {log_path}"
                ) from e
            problem = _check(python, version)
            if problem is not None:
                raise RuntimeError(
                    f"ipykernel {version} venv at {path} is unusable after build: {problem}; "
                    f"see {log_path}"
                )
            marker.write_text(
                json.dumps(
                    {
                        "version": version,
                        "pyproject": fingerprint,
                        "project_install": how,
                        "build_seconds": round(time.monotonic() - t0, 1),
                    }
                )
            )
            log.write(f"built in {time.monotonic() - t0:.1f} s ({how})\n")
    return str(python)


if __name__ == "__main__":  # python -m tests.harness.envs 6.29.5
    for v in sys.argv[1:] or ["6.29.5"]:
        t = time.monotonic()
        print(kernel_python(v), f"{time.monotonic() - t:.1f} s")
