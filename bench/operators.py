"""Benchmarks of the operators: embed, search, sim_join, and filter / classify against map (bundled server, loopback only).

    .venv/bin/python bench/operators.py                 # everything (~10-17 min on 2 cores)
    .venv/bin/python bench/operators.py --parts embed   # one part: embed, search, join, decide
    .venv/bin/python bench/operators.py --parts decide --profile-dir /tmp/prof   # + cProfile dumps
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
- **decide** (``--parts decide``): ``map``, ``filter`` (``mask=True``), ``classify`` (4 labels) and
  ``classify(confidence=True)`` on the same DataFrame of bench.py's part-1 rows (440-character user
  prompts; map keeps bench.py's 58-character system prompt, filter/classify send their own
  instruction as the system message), model ``mock``, concurrency 256, ``max_tokens=64``, server
  latency 50 ms and 16 completion tokens for free text; 5,000 and 20,000 rows, cache ``"off"`` and
  cache on in a fresh directory per worker. Timed: the call, ``run.result()`` (the shaping) and the
  cache's flush; reported: CPU us per request (getrusage user+sys of the worker, all threads),
  wall / theory (theory = N x 0.05 s / 256), and the ratio of each operator's CPU per request to
  map's in the same cell. ``--repeat`` runs (default 2), interleaved; each figure is the fastest run
  (lowest CPU and lowest wall, taken separately). Every decision is checked against the server's
  rule (``expected_decision`` / ``expected_label``). ``--profile-dir DIR`` writes a cProfile dump
  of each worker's timed phase.
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
    from nbparrot.operators.embeddings import query

    corpus = next(iter(query._memo.values())).matrix
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
    from nbparrot.operators.embeddings.query import _frame_corpus
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


DECIDE_OPS = ("map", "filter", "classify", "classify-conf")
DECIDE_NS = (5_000, 20_000)
DECIDE_CACHES = ("off", "on")
DECIDE_CONCURRENCY = 256
DECIDE_LATENCY_MS = 50.0
DECIDE_COMPLETION_TOKENS = 16  # bench.py part 1: free-text answers of 16 tokens
DECIDE_MODEL = "mock"
DECIDE_LABELS = ["billing", "shipping", "returns", "other"]


def w_decide(ns: argparse.Namespace) -> dict:
    """One decide cell: map / filter / classify / classify(confidence) over bench.py's part-1 rows."""
    import gc

    sys.path.insert(0, str(HERE))
    import bench  # noqa: E402 - bench.py's workload, as it is
    import pandas as pd

    import nbparrot
    from nbparrot.api import open_cache
    from nbparrot.server import expected_tag
    from nbparrot.server.decisions import expected_decision, expected_label

    data = bench.throughput_rows(ns.n)
    frame = pd.DataFrame(data)
    users = [bench.TP_TEMPLATE.format(**row) for row in data]
    common: dict[str, Any] = dict(base_url=ns.base_url, api_key=KEY, model=DECIDE_MODEL,
                                  concurrency=DECIDE_CONCURRENCY, max_tokens=bench.MAX_TOKENS, progress=False)
    cache = None
    if ns.cache == "off":
        common["cache"] = "off"
    else:
        cache = open_cache()
        cache.info()  # the file exists before the clock starts, as it would in a session
    profiler = None
    if ns.profile:
        import cProfile

        profiler = cProfile.Profile()
    gc.collect()
    stop = _window()
    if profiler:
        profiler.enable()
    if ns.op == "map":
        run = nbparrot.map(frame, bench.TP_TEMPLATE, system=bench.TP_SYSTEM, **common)
    elif ns.op == "filter":
        run = nbparrot.filter(frame, bench.TP_TEMPLATE, mask=True, **common)
    else:
        run = nbparrot.classify(frame, bench.TP_TEMPLATE, DECIDE_LABELS, confidence=ns.op == "classify-conf",
                                **common)
    result = run.result()
    if cache is not None:
        cache.flush()
    if profiler:
        profiler.disable()
    timed = stop()
    if profiler:
        profiler.dump_stats(ns.profile)
    # every answer checked against the server's rule for its own row
    if ns.op == "map":
        expected = [expected_tag([{"role": "system", "content": bench.TP_SYSTEM}, {"role": "user", "content": u}])
                    for u in users]
        got = [a.startswith(f"[{tag}]") if isinstance(a, str) else None for a, tag in zip(result.tolist(), expected)]
    elif ns.op == "filter":
        got = [None if pd.isna(v) else bool(v) == expected_decision(u) for v, u in zip(result.tolist(), users)]
    else:
        labels = result["label"] if isinstance(result, pd.DataFrame) else result
        got = [None if pd.isna(v) else v == expected_label(u, DECIDE_LABELS) for v, u in zip(labels.tolist(), users)]
    out = {"op": ns.op, "n": ns.n, "cache": ns.cache, "nbparrot_from": str(Path(nbparrot.__file__).parent),
           "status": run.status, "requests": run.progress.requests,
           "cached": run.progress.cached, **timed, "cpu_us_per_req": timed["cpu_s"] / ns.n * 1e6,
           "ok": sum(g is True for g in got), "wrong": sum(g is False for g in got),
           "failed": sum(g is None for g in got), "peak_rss_mb": _rusage()[1] / 2 ** 20}
    if ns.op == "classify-conf":
        conf = result["confidence"]
        out["confidence_missing"] = int(conf.isna().sum())
    return out


WORKERS = {"setup": w_setup, "embed": w_embed, "map": w_map, "search": w_search, "join": w_join,
           "decide": w_decide}


# ---- parent ---------------------------------------------------------------------------------


SRC = ROOT  # the directory the workers (and the server) import nbparrot from; --commit changes it


def spawn(ns_args: list[str], cache: Path, log: Path) -> dict:
    result = log.with_suffix(".json")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
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


def run_decide(ns: argparse.Namespace, tmp: Path) -> dict:
    """The decide part: every (n, cache, op) cell ``ns.repeat`` times, interleaved; fastest of each."""
    from nbparrot.server import ServerProcess

    profile_dir = Path(ns.profile_dir) if ns.profile_dir else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    ns_list = tuple(ns.decide_ns or DECIDE_NS)
    cells = [(n, cache, op) for n in ns_list for cache in DECIDE_CACHES for op in DECIDE_OPS]
    runs: dict[tuple, list[dict]] = {cell: [] for cell in cells}
    load0 = os.getloadavg()
    with ServerProcess(cpu=SERVER_CPU, latency_ms=DECIDE_LATENCY_MS, completion_tokens=DECIDE_COMPLETION_TOKENS,
                       max_lifetime=3600.0) as server:
        for rep in range(max(1, ns.repeat)):  # interleaved: a burst of outside load hits one run of a cell
            for n, cache, op in cells:
                name = f"decide-{op}-{n}-cache{cache}-r{rep}"
                server.reset()
                before = server.stats()
                args = ["decide", "--op", op, "--n", str(n), "--cache", cache, "--base-url", server.base_url]
                if profile_dir:
                    args += ["--profile", str(profile_dir / f"{name}.prof")]
                res = spawn(args, tmp / f"cache-{name}", tmp / f"{name}.log")
                after = server.stats()
                res.update(op=op, n=n, cache=cache, run=rep, server_requests=after["requests"],
                           server_cpu_s=after["cpu_seconds"] - before["cpu_seconds"])
                if "wall_s" in res:
                    res["theory_s"] = n * DECIDE_LATENCY_MS / 1000.0 / DECIDE_CONCURRENCY
                    res["wall_over_theory"] = res["wall_s"] / res["theory_s"]
                    print(f"- {name}: {res['cpu_us_per_req']:.0f} us/req, {res['wall_over_theory']:.2f}x theory, "
                          f"other load {100 * res['other_load']:.0f} %, ok {res['ok']}/{n}, "
                          f"{res['server_requests']} requests", file=sys.stderr)
                runs[(n, cache, op)].append(res)
    cells_out = []
    for (n, cache, op), cell_runs in runs.items():
        good = [r for r in cell_runs if "wall_s" in r]
        cell: dict[str, Any] = {"op": op, "n": n, "cache": cache, "runs": cell_runs}
        if good:
            best_cpu = min(good, key=lambda r: r["cpu_us_per_req"])
            best_wall = min(good, key=lambda r: r["wall_s"])
            cell.update(cpu_us_per_req=best_cpu["cpu_us_per_req"], wall_s=best_wall["wall_s"],
                        wall_over_theory=best_wall["wall_over_theory"], theory_s=best_wall["theory_s"],
                        other_load=[r["other_load"] for r in good], ok=min(r["ok"] for r in good),
                        wrong=max(r["wrong"] for r in good), failed=max(r["failed"] for r in good),
                        requests=max(r["server_requests"] for r in good))
        cells_out.append(cell)
    for cell in cells_out:
        base = next((c for c in cells_out if c["op"] == "map" and c["n"] == cell["n"] and c["cache"] == cell["cache"]),
                    None)
        if base and "cpu_us_per_req" in base and "cpu_us_per_req" in cell:
            cell["cpu_ratio_to_map"] = cell["cpu_us_per_req"] / base["cpu_us_per_req"]
    import nbparrot

    return {"machine": _machine(), "nbparrot_from": str(Path(nbparrot.__file__).parent), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "concurrency": DECIDE_CONCURRENCY, "latency_ms": DECIDE_LATENCY_MS, "model": DECIDE_MODEL,
            "labels": DECIDE_LABELS, "repeat": max(1, ns.repeat), "cells": cells_out}


def decide_table(part: dict) -> str:
    lines = ["| N | cache | operator | CPU µs/req | ratio to map | wall s | wall/theory | requests | ok / wrong / failed "
             "| other load on CPU 0 (per run) |", "|---:|---|---|---:|---:|---:|---:|---:|---|---|"]
    for c in part["cells"]:
        if "cpu_us_per_req" not in c:
            lines.append(f"| {c['n']:,} | {c['cache']} | {c['op']} | failed |" + " |" * 6)
            continue
        ratio = c.get("cpu_ratio_to_map")
        lines.append(f"| {c['n']:,} | {c['cache']} | {c['op']} | {c['cpu_us_per_req']:.0f} | "
                     f"{'–' if ratio is None else f'{ratio:.2f}×'} | {c['wall_s']:.2f} | {c['wall_over_theory']:.2f}× | "
                     f"{c['requests']:,} | {c['ok']} / {c['wrong']} / {c['failed']} | "
                     f"{' / '.join(f'{100 * x:.0f} %' for x in c['other_load'])} |")
    return "\n".join(lines)


def _machine() -> dict:
    return {"python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="*", default=["embed", "search", "join", "decide"],
                        choices=["embed", "search", "join", "decide"])
    parser.add_argument("--out", default=str(HERE / "operators.json"))
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--left", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--worker", default=None, choices=sorted(WORKERS))
    parser.add_argument("--model", default="text-embedding-3-small")
    parser.add_argument("--dims", type=int, default=None)
    parser.add_argument("--base-url", default="")
    parser.add_argument("--result", default="")
    parser.add_argument("--repeat", type=int, default=2, help="decide: runs per cell, interleaved (fastest kept)")
    parser.add_argument("--decide-ns", type=int, nargs="+", help="decide: row counts (default 5000 20000)")
    parser.add_argument("--profile-dir", help="decide: write a cProfile dump of each worker's timed phase here")
    parser.add_argument("--report", metavar="JSON", help="print the decide table of an earlier run and exit")
    parser.add_argument("--commit", help="measure this commit's nbparrot (exported with git archive to a temporary "
                        "directory) instead of the working tree, e.g. HEAD while the tree is being edited")
    parser.add_argument("--op", choices=DECIDE_OPS, help=argparse.SUPPRESS)
    parser.add_argument("--cache", choices=DECIDE_CACHES, help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.report:
        print(decide_table(json.loads(Path(ns.report).read_text())["decisions"]))
        return
    if ns.worker:
        os.sched_setaffinity(0, {CLIENT_CPU})
        Path(ns.result).write_text(json.dumps(WORKERS[ns.worker](ns)))
        return

    global SRC
    tmp = Path(tempfile.mkdtemp(prefix="nbparrot-bench-ops-"))
    commit = None
    if ns.commit:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", ns.commit], capture_output=True,
                                text=True, check=True).stdout.strip()
        SRC = tmp / "src"
        SRC.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "nbparrot"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(SRC)], input=archive, check=True)
        sys.path.insert(0, str(SRC))
    from nbparrot.server import ServerProcess

    out: dict[str, Any] = {}
    if set(ns.parts) & {"embed", "search", "join"}:
        out["machine"] = _machine()
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
    if "decide" in ns.parts:
        out["decisions"] = {"nbparrot_commit": commit or "working tree", **run_decide(ns, tmp)}
        print(decide_table(out["decisions"]))
    if ns.out:
        # the parts run now replace theirs; the other parts' figures in the file are kept
        path = Path(ns.out)
        previous = json.loads(path.read_text()) if path.exists() and path.stat().st_size else {}
        path.write_text(json.dumps({**previous, **out}, indent=1))
    print(f"logs in {tmp}")


if __name__ == "__main__":
    main()
