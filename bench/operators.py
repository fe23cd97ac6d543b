"""Benchmarks of the embedding operators: embed, search, sim_join (bundled server, loopback only).

    .venv/bin/python bench/operators.py                 # everything (~5-10 min on 2 cores)
    .venv/bin/python bench/operators.py --parts embed   # one part: embed, search, join
    .venv/bin/python bench/operators.py --out bench/operators.json

The server (``ServerProcess(cpu=1)``) is pinned to CPU 1; every timed phase runs in a fresh worker
process pinned to CPU 0 with ``OPENBLAS_NUM_THREADS=1`` (one core for the client, BLAS included).
Each part has its own answer cache directory; a *setup* worker fills it (untimed) where a part
measures work on cached vectors.

- **embed**: ``nbparrot.operators.embeddings.embed`` over N=100,000 distinct short rows (~60
  characters), server latency 50 ms, default concurrency; ``text-embedding-3-small`` at its 1,536
  dimensions and at ``dimensions=256``, and ``mock-embed`` (64). Reported: requests per 100 rows
  (server count), wall, client CPU per row (getrusage user+sys of the worker, all threads, over the
  call and the cache's flush), and for comparison ``nbparrot.map`` over 5,000 rows of bench.py's
  part-1 workload (440-character prompts, 16 completion tokens, c=256, latency 50 ms, cache on):
  CPU per request, measured the same way in the same session.
- **search**: 100,000 rows already embedded (in the cache), at 256 and 1,536 dimensions. Reported:
  the first ``search`` in a fresh process (the frame's vectors read from the cache: 0 requests for
  them, 1 for the query), then 20 more queries, each a new text (1 input sent each; the frame's unit
  vectors kept in memory): median and worst wall per query, and the ranking alone (``nearest``).
  Server latency 0 (the query's round trip to the local server is in the figure).
- **join**: ``sim_join`` of 20,000 x 100,000 rows already embedded at 256 dimensions, top-1: wall,
  CPU, and extra peak memory (``ru_maxrss`` at the end minus the RSS just before the call).
"""

from __future__ import annotations

import argparse
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
KEY = "sk-bench-embed"
DEADLINE = 600.0  # seconds per worker
TOPICS = ("refund", "shipping", "invoice", "password", "delivery", "discount", "warranty", "login", "upgrade",
          "cancellation", "billing", "coupon", "tracking", "return")


def rows(n: int, prefix: str = "customer") -> list[str]:
    """``n`` distinct short texts (~60 characters)."""
    return [f"{prefix} {i} asks about {TOPICS[i % 14]} and {TOPICS[(i * 5 + 3) % 14]}, order {i * 7919 % 100003}"
            for i in range(n)]


def _rusage() -> tuple[float, int]:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss * 1024


def _busy() -> float:
    """Busy seconds of the client's CPU since boot, all processes (from /proc/stat)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{CLIENT_CPU} "):
                values = [int(v) for v in line.split()[1:9]]
                return (sum(values) - values[3] - values[4]) / tick
    return 0.0


def _window() -> Any:
    """A timer over a phase: wall, own CPU, and the CPU others took on the client's core meanwhile."""
    t0, cpu0, busy0 = time.perf_counter(), _rusage()[0], _busy()

    def stop() -> dict:
        wall, cpu = time.perf_counter() - t0, _rusage()[0] - cpu0
        return {"wall_s": wall, "cpu_s": cpu, "other_load": max(0.0, (_busy() - busy0 - cpu) / wall)}

    return stop


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- workers (each in its own pinned process) ---------------------------------------------


def w_setup(ns: argparse.Namespace) -> dict:
    """Embed the frames a later worker reads from the cache (untimed)."""
    import pandas as pd

    from nbparrot.operators.embeddings import embed

    out = {}
    for name, n, prefix in (("left", ns.left, "question"), ("right", ns.n, "customer")):
        if not n:
            continue
        run = embed(pd.DataFrame({"text": rows(n, prefix)}), "text", model=ns.model, dimensions=ns.dims,
                    base_url=ns.base_url, api_key=KEY, progress=False)
        out[name] = run.summary()
    from nbparrot.api import open_cache

    open_cache().flush()
    return out


def w_embed(ns: argparse.Namespace) -> dict:
    import pandas as pd

    from nbparrot.api import open_cache
    from nbparrot.operators.embeddings import embed

    frame = pd.DataFrame({"text": rows(ns.n)})
    cache = open_cache()
    cache.info()  # the file exists before the clock starts, as it would in a session
    stop = _window()
    run = embed(frame, "text", model=ns.model, dimensions=ns.dims, base_url=ns.base_url, api_key=KEY,
                progress=False)
    cache.flush()
    timed = stop()
    result = run.result()
    return {"rows": ns.n, "done": run.progress.done, "requests": run.progress.requests, **timed,
            "cpu_us_per_row": timed["cpu_s"] / ns.n * 1e6, "dims": int(result.iloc[0].shape[0]),
            "status": run.status}


def w_map(ns: argparse.Namespace) -> dict:
    """bench.py's part-1 workload through nbparrot.map, for the CPU-per-request baseline."""
    sys.path.insert(0, str(HERE))
    import bench  # noqa: E402 - bench.py's workload, as it is

    import nbparrot
    from nbparrot.api import open_cache

    data = bench.throughput_rows(ns.n)
    cache = open_cache()
    cache.info()
    stop = _window()
    run = nbparrot.map(data, bench.TP_TEMPLATE, system=bench.TP_SYSTEM, base_url=ns.base_url, api_key=KEY,
                       concurrency=256, max_tokens=bench.MAX_TOKENS, progress=False)
    cache.flush()
    timed = stop()
    return {"rows": ns.n, "done": run.progress.done, "requests": run.progress.requests, **timed,
            "cpu_us_per_row": timed["cpu_s"] / ns.n * 1e6, "status": run.status}


def w_search(ns: argparse.Namespace) -> dict:
    import numpy as np
    import pandas as pd

    from nbparrot.operators.embeddings import search
    from nbparrot.operators.similarity import nearest

    frame = pd.DataFrame({"text": rows(ns.n)})
    common = dict(on="text", k=10, model=ns.model, dimensions=ns.dims, base_url=ns.base_url, api_key=KEY,
                  progress=False)
    stop = _window()
    first = search(frame, "a refund for a damaged parcel", **common)
    top = first.result()
    first_timed = stop()
    assert len(top) == 10, top
    times, ranking = [], []
    for q in range(ns.queries):
        t = time.perf_counter()
        run = search(frame, f"question {q}: where is my {TOPICS[q % 14]} for order {q * 31}", **common)
        run.result()
        times.append(time.perf_counter() - t)
        assert run.progress.requests == 1 and run.progress.total == 1
    from nbparrot.operators import embeddings

    corpus = next(iter(embeddings._memo.values())).matrix
    query = corpus[:1].copy()
    for _ in range(5):
        t = time.perf_counter()
        nearest(query, corpus, 10, normalized=True)
        ranking.append(time.perf_counter() - t)
    return {"rows": ns.n, "dims": ns.dims, "first_s": first_timed["wall_s"], "first_cpu_s": first_timed["cpu_s"],
            "first_other_load": first_timed["other_load"], "first_requests": first.progress.requests,
            "first_cached": first.progress.cached, "query_median_ms": float(np.median(times)) * 1e3,
            "query_max_ms": max(times) * 1e3, "ranking_median_ms": float(np.median(ranking)) * 1e3,
            "queries": ns.queries}


def w_join(ns: argparse.Namespace) -> dict:
    import pandas as pd

    from nbparrot.operators.embeddings import sim_join

    left = pd.DataFrame({"text": rows(ns.left, "question")})
    right = pd.DataFrame({"text": rows(ns.n, "customer")})
    rss0 = _rss()
    stop = _window()
    run = sim_join(left, right, on="text", k=1, model=ns.model, dimensions=ns.dims, base_url=ns.base_url,
                   api_key=KEY, progress=False)
    joined = run.result()
    timed = stop()
    _, peak = _rusage()
    # the ranking alone, again, on the same unit vectors (to split the time between reading and ranking)
    from nbparrot.operators.embeddings import _frame_corpus
    from nbparrot.operators.similarity import nearest

    _, lm, _ = _frame_corpus(run, run.prepared.span("left"))
    _, rm, _ = _frame_corpus(run, run.prepared.span("right"))
    ranking = _window()
    nearest(lm, rm, 1, normalized=True)
    ranked = ranking()
    return {"left": ns.left, "right": ns.n, "dims": ns.dims, "pairs": len(joined), **timed,
            "ranking_wall_s": ranked["wall_s"], "ranking_cpu_s": ranked["cpu_s"],
            "requests": run.progress.requests, "cached": run.progress.cached,
            "extra_peak_mb": (peak - rss0) / 2 ** 20, "rss_before_mb": rss0 / 2 ** 20}


WORKERS = {"setup": w_setup, "embed": w_embed, "map": w_map, "search": w_search, "join": w_join}


# ---- parent ---------------------------------------------------------------------------------


def spawn(ns_args: list[str], cache: Path, log: Path) -> dict:
    result = log.with_suffix(".json")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NBPARROT_CACHE_DIR"] = str(cache)
    env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *ns_args, "--result", str(result)]
    with open(log, "w") as err:
        try:
            code: Any = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                       timeout=DEADLINE).returncode
        except subprocess.TimeoutExpired:
            code = "killed at the deadline"
    if code == 0 and result.exists():
        return json.loads(result.read_text())
    tail = log.read_text(errors="replace")[-2000:]
    print(f"  worker {' '.join(ns_args)} failed ({code}):\n{tail}", file=sys.stderr)
    return {"status": f"worker {code}", "log": tail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="*", default=["embed", "search", "join"])
    parser.add_argument("--out", default=str(HERE / "operators.json"))
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--left", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--worker", default=None, choices=sorted(WORKERS))
    parser.add_argument("--model", default="text-embedding-3-small")
    parser.add_argument("--dims", type=int, default=None)
    parser.add_argument("--base-url", default="")
    parser.add_argument("--result", default="")
    ns = parser.parse_args()
    if ns.worker:
        os.sched_setaffinity(0, {CLIENT_CPU})
        Path(ns.result).write_text(json.dumps(WORKERS[ns.worker](ns)))
        return

    from nbparrot.server import ServerProcess

    out: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                       "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                             capture_output=True, text=True).stdout.strip()}}
    tmp = Path(tempfile.mkdtemp(prefix="nbparrot-bench-ops-"))
    base = ["--n", str(ns.n), "--left", str(ns.left), "--queries", str(ns.queries)]
    if "embed" in ns.parts:
        out["embed"] = []
        with ServerProcess(cpu=SERVER_CPU, latency_ms=50) as server:
            for model, dims in (("text-embedding-3-small", None), ("text-embedding-3-small", 256), ("mock-embed", None)):
                before = server.stats()
                args = [*base, "--base-url", server.base_url, "--model", model] + (["--dims", str(dims)] if dims else [])
                name = f"embed-{model}-{dims}"
                res = spawn(["embed", *args], tmp / f"cache-{name}", tmp / f"{name}.log")
                after = server.stats()
                res.update(model=model, server_requests=after["embedding_requests"] - before["embedding_requests"],
                           server_inputs=after["embedded_inputs"] - before["embedded_inputs"],
                           server_cpu_s=after["cpu_seconds"] - before["cpu_seconds"])
                res["requests_per_100_rows"] = res["server_requests"] / ns.n * 100
                out["embed"].append(res)
                print(json.dumps(res))
            res = spawn(["map", "--n", "5000", "--base-url", server.base_url], tmp / "cache-map", tmp / "map.log")
            out["map_baseline"] = res
            print(json.dumps(res))
    if "search" in ns.parts:
        out["search"] = []
        with ServerProcess(cpu=SERVER_CPU) as server:
            for dims in (256, 1536):
                cache = tmp / f"cache-search-{dims}"
                args = [*base, "--base-url", server.base_url, "--dims", str(dims)]
                spawn(["setup", *args, "--left", "0"], cache, tmp / f"setup-search-{dims}.log")
                res = spawn(["search", *args], cache, tmp / f"search-{dims}.log")
                out["search"].append(res)
                print(json.dumps(res))
    if "join" in ns.parts:
        with ServerProcess(cpu=SERVER_CPU) as server:
            cache = tmp / "cache-join"
            args = [*base, "--base-url", server.base_url, "--dims", "256"]
            spawn(["setup", *args], cache, tmp / "setup-join.log")
            before = server.stats()
            res = spawn(["join", *args], cache, tmp / "join.log")
            res["server_requests"] = server.stats()["embedding_requests"] - before["embedding_requests"]
            out["join"] = res
            print(json.dumps(res))
    if ns.out:
        Path(ns.out).write_text(json.dumps(out, indent=1))
    print(f"logs in {tmp}")


if __name__ == "__main__":
    main()
