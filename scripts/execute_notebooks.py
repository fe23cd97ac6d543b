"""Execute the example notebooks headlessly and save them with their outputs.

    python scripts/execute_notebooks.py                 # every notebooks/*.ipynb, in place
    python scripts/execute_notebooks.py quickstart --out build/notebooks

Each notebook starts nbparrot's bundled server on 127.0.0.1 and sends everything there. This
script runs it the way CI renders docs: with nbconvert's ExecutePreprocessor (nbclient), in a
kernel of this interpreter, so every run, ``%%llm`` stream and comparison finishes within its
cell and the saved file holds the final panels (see ``nbparrot.headless``). Nothing can go off
the machine: the kernel gets a fresh answer cache, no proxy settings, and an ``OPENAI_BASE_URL``
on a closed loopback port, so a call that forgot the bundled server fails instead. No timing
metadata is recorded; the outputs themselves still show durations.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NOWHERE = "http://127.0.0.1:9/v1"  # the discard port: a request that was not pointed at the server fails
TIMEOUT = 300  # seconds per cell


def kernel_env(cache_dir: str) -> dict[str, str]:
    """This process's environment for the kernel, minus anything that could send traffic elsewhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and not k.startswith(("OPENAI_", "AZURE_OPENAI_"))}
    env.update({"OPENAI_BASE_URL": NOWHERE, "NBPARROT_CACHE_DIR": cache_dir, "NO_PROXY": "127.0.0.1,localhost"})
    return env


def execute(path: Path, out: Path, cache_dir: str) -> float:
    """Execute ``path`` (in its own directory) and write it with its outputs to ``out``; seconds taken."""
    import nbformat
    from nbconvert.preprocessors import ExecutePreprocessor

    notebook = nbformat.read(path, as_version=4)
    runner = ExecutePreprocessor(timeout=TIMEOUT, record_timing=False, kernel_name="python3")
    started = time.monotonic()
    saved, env = dict(os.environ), kernel_env(cache_dir)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        runner.preprocess(notebook, {"metadata": {"path": str(path.parent)}})
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, out)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="execute the example notebooks and save their outputs")
    parser.add_argument("names", nargs="*", help="notebook names (default: every notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=None, help="directory to write to (default: in place)")
    args = parser.parse_args(argv)
    paths = [NOTEBOOKS / f"{name.removesuffix('.ipynb')}.ipynb" for name in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        parser.error(f"no such notebook in {NOTEBOOKS}: {', '.join(missing)}")
    for path in paths:
        with tempfile.TemporaryDirectory(prefix="nbparrot-cache-") as cache_dir:  # fresh: nothing from a cache
            seconds = execute(path, (args.out or NOTEBOOKS) / path.name, cache_dir)
        print(f"{path.name}: executed in {seconds:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
