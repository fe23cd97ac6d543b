"""How long a Batch API run over image rows holds the asyncio loop (the kernel's, in a notebook).

A heartbeat task on the same loop ticks every 5 ms while ``mode="batch"`` builds, uploads and follows
its files over N noise PNGs (1600 x 1200, ~5.7 MB each: sent as they are, three 200 MB files for 60);
the longest gap between two ticks is how long the notebook (and its Cancel button) froze at most.
Usage: ``python bench/batch_loop.py [--rows 60]`` (the photos go to a temp dir, removed at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import pandas as pd
from PIL import Image

import nbparrot
from nbparrot.server import ServerProcess


async def measure(paths: list[str], base_url: str) -> tuple[float, float, int]:
    gaps: list[float] = []
    last = time.perf_counter()

    async def heartbeat() -> None:
        nonlocal last
        while True:
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
            await asyncio.sleep(0.005)

    beat = asyncio.ensure_future(heartbeat())
    run = nbparrot.map(pd.DataFrame({"photo": paths}), "Describe {photo}", images=["photo"], mode="batch",
                       base_url=base_url, api_key="sk-bench", model="mock", poll_interval=0.05, cache="off",
                       progress=False)  # planning (hashing each photo for its key) happens here, before the run
    started = last = time.perf_counter()
    gaps.clear()
    await run
    beat.cancel()
    return time.perf_counter() - started, max(gaps), len(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, ServerProcess(batch_seconds=0.2) as server:
        paths = []
        for i in range(args.rows):
            path = Path(folder) / f"photo{i}.png"
            Image.effect_noise((1600, 1200), 40 + i % 40).convert("RGB").save(path)
            paths.append(str(path))
        wall, stall, beats = asyncio.run(measure(paths, server.base_url))
    print(f"{args.rows} rows: run {wall:.2f} s, longest loop stall {stall * 1000:.0f} ms, {beats} heartbeats")


if __name__ == "__main__":
    main()
