"""Benchmark of image columns: client CPU per request and peak memory for 10,000 rows of 1 MB photos.

    .venv/bin/python bench/images.py                       # the three cases below (~3-5 min on 2 cores)
    .venv/bin/python bench/images.py --rows 2000 --out ''  # a quicker look, nothing written

The images are generated into a temporary directory (removed at the end): ``--distinct`` (default
1,000) different JPEGs of about 1 MB, each made unique by a comment segment, so the disk holds about
1 GB whatever ``--rows`` is; row ``i`` names file ``i % distinct``. Every answer is checked: it must
carry the server's mark of the very file its row names (``image_tag`` of its bytes).

The server (``ServerProcess(cpu=1)``, latency 50 ms) is pinned to CPU 1; each case runs in a fresh
worker pinned to CPU 0. Timed: the ``nbparrot.map`` call to its result (planning: every row's file
read and hashed for its cache key and its header read for its tokens; then every request encoded
when it is sent). Reported: wall, client CPU per request (getrusage user+sys of the worker), and
the peak RSS of the worker (``ru_maxrss``) and its growth over the RSS just before the call.

Cases: ``as-is``: 1600 x 1200 photos (under the 2048-px limit: sent as they are, no decoding),
cache on; ``no-cache``: the same with ``cache="off"`` (no hashing: only headers read while
planning); ``downscaled``: 3000 x 2250 photos, decoded, scaled to 2048 px and re-encoded before
sending, on a tenth of the rows (the decode dominates: it is the CPU a user pays for sending photos
larger than the endpoint uses); ``downscaled-1024`` (not in the default set): the same with
``max_image_px=1024``, where the JPEG decoder reads the photo at half size (draft mode).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER_CPU, CLIENT_CPU = 1, 0
KEY = "sk-bench-images"
DEADLINE = 900.0  # seconds per worker
TARGET = 1_000_000  # bytes per photo, about


def make_photos(directory: Path, count: int, size: tuple[int, int]) -> list[str]:
    """``count`` distinct JPEGs of about 1 MB: one encoded photo-like image, a unique comment in each copy."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([x * 200, y * 180, (1 - x) * 160], axis=-1)
    quality, data = 90, b""
    for amplitude in (4, 8, 12, 18, 26, 36, 50, 70):  # noise until the JPEG is about 1 MB
        pixels = np.clip(base + rng.normal(0, amplitude, base.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "JPEG", quality=quality)
        data = out.getvalue()
        if len(data) >= TARGET * 0.9:
            break
    paths = []
    for i in range(count):
        comment = f"nbparrot bench photo {i}".encode()
        segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
        path = directory / f"photo{i:05d}.jpg"
        path.write_bytes(data[:2] + segment + data[2:])
        paths.append(str(path))
    return paths


def _cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _peak_rss() -> int:
    """VmHWM: the peak RSS of this process image (``ru_maxrss`` would carry the parent's over the exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict) -> dict:
    """One timed case, in this (fresh, pinned) process."""
    os.sched_setaffinity(0, {CLIENT_CPU})
    import pandas as pd

    import nbparrot
    from nbparrot.server import image_tag

    paths = json.loads(Path(spec["paths"]).read_text())
    rows = spec["rows"]
    frame = pd.DataFrame({"photo": [paths[i % len(paths)] for i in range(rows)]})
    # before the clock starts: the mark each file's row must carry (a downscaled photo's bytes are new: its
    # rows must share one mark, different from every other file's)
    scaled = spec["case"].startswith("downscaled")
    expected = {p: f"[image:{image_tag(Path(p).read_bytes())}]" for p in paths} if not scaled else None
    rss0 = _rss()
    cpu0, t0 = _cpu(), time.perf_counter()
    run = nbparrot.map(frame, "Describe this photo in five words: {photo}", images=["photo"],
                       max_image_px=spec.get("max_image_px"),
                       base_url=spec["base_url"], api_key=KEY, model="mock", max_tokens=16,
                       concurrency=spec["concurrency"], cache=spec["cache"], progress=False)
    answers = run.result()
    t1 = time.perf_counter()
    cpu1, peak = _cpu(), _peak_rss()
    marks = {p: {a.split()[1] for a, q in zip(answers, frame["photo"]) if q == p and isinstance(a, str)} for p in paths}
    if expected is None:
        expected = {p: next(iter(m)) if len(m) == 1 else None for p, m in marks.items()}
        if len(set(expected.values()) - {None}) != len(paths):
            expected = {p: None for p in paths}
    ok = sum(isinstance(a, str) and expected[p] is not None and expected[p] in a for a, p in zip(answers, frame["photo"]))
    return {"case": spec["case"], "rows": rows, "ok": ok, "failed": int(answers.isna().sum()),
            "wall_s": round(t1 - t0, 2), "cpu_s": round(cpu1 - cpu0, 2),
            "cpu_us_per_request": round((cpu1 - cpu0) / rows * 1e6), "rss_before_mb": round(rss0 / 1e6),
            "peak_rss_mb": round(peak / 1e6), "growth_mb": round((peak - rss0) / 1e6),
            "estimate_prompt_tokens": run.estimate.prompt_tokens if run.estimate else None,
            "concurrency": spec["concurrency"], "cache": spec["cache"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--distinct", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--cases", nargs="*", default=["as-is", "no-cache", "downscaled"])
    parser.add_argument("--out", default=str(HERE / "images.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return

    from nbparrot.server import ServerProcess

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nbparrot-bench-images-") as tmp, \
            ServerProcess(cpu=SERVER_CPU, latency_ms=50, completion_tokens=8) as server:
        sets = {}
        for name, size in (("as-is", (1600, 1200)), ("downscaled", (3000, 2250))):
            if any(c.startswith(name) or (name == "as-is" and c == "no-cache") for c in ns.cases):
                folder = Path(tmp) / name
                folder.mkdir()
                count = ns.distinct if name == "as-is" else max(1, ns.distinct // 10)
                paths = make_photos(folder, count, size)
                listed = folder / "paths.json"
                listed.write_text(json.dumps(paths))
                sets[name] = (listed, Path(paths[0]).stat().st_size)
                print(f"{name}: {count} photos {size[0]}x{size[1]}, {sets[name][1] / 1e6:.2f} MB each", file=sys.stderr)
        for case in ns.cases:
            scaled = case.startswith("downscaled")
            listed, size = sets["downscaled" if scaled else "as-is"]
            spec = {"case": case, "paths": str(listed), "base_url": server.base_url, "concurrency": ns.concurrency,
                    "rows": ns.rows // 10 if scaled else ns.rows, "cache": "off" if case == "no-cache" else "use",
                    "max_image_px": 1024 if case == "downscaled-1024" else None}
            env = {**os.environ, "NBPARROT_CACHE_DIR": str(Path(tmp) / f"cache-{case}"), "PYTHONPATH": str(ROOT)}
            done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                                  text=True, timeout=DEADLINE, env=env)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"worker for {case} failed")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["photo_mb"] = round(size / 1e6, 2)
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
        server_stats = server.stats()
    print("| case | rows | photo | ok | wall s | client CPU µs/request | RSS before MB | peak RSS MB | growth MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['rows']:,} | {r['photo_mb']} MB | {r['ok']:,} | {r['wall_s']} | "
              f"{r['cpu_us_per_request']:,} | {r['rss_before_mb']} | {r['peak_rss_mb']} | {r['growth_mb']} |")
    if ns.out:
        machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
                   "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                         cwd=ROOT).stdout.strip()}
        Path(ns.out).write_text(json.dumps({"machine": machine, "results": results,
                                            "server_requests": server_stats.get("requests")}, indent=1) + "\n")


if __name__ == "__main__":
    main()
