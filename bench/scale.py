"""nbparrot at scale: how long ``map`` blocks, how late the loop runs, and memory per row.

One command starts the bundled mock server (``nbparrot.server.ServerProcess``, loopback only,
pinned to CPU 1, latency 0) and runs every cell in a fresh worker process pinned to CPU 0:

    .venv/bin/python bench/scale.py                       # 10k, 100k, 1M rows (about 15 minutes)
    .venv/bin/python bench/scale.py --ns 10000 100000     # a subset
    .venv/bin/python bench/scale.py --report bench/scale_results.json

Workload: a DataFrame of N rows (``id`` int64, ``text`` pandas' default string dtype), the
template and 58-character system message of ``bench.py``'s part 1 (a ~440-character user
prompt per row), ``max_tokens=64``, 16 completion tokens back, concurrency 256.

Clients (``--clients``):

* ``nbparrot``: ``nbparrot.map(df, ...)`` with defaults (answer cache on, in a fresh empty
  directory), called inside a running loop as in a notebook: it returns at once and the run
  goes on as a task.
* ``nbparrot-nocache``: the same with ``cache="off"``.
* ``aiohttp``: the floor. One ``aiohttp.ClientSession(TCPConnector(limit=C))`` and an
  ``asyncio.Semaphore(C)``; a producer renders each row with ``str.format`` from column blocks
  as it acquires the semaphore (at most C requests alive at once), ``json.dumps`` / ``json.loads``,
  the answers kept in a list. No retries, pacing, cache or bookkeeping.

Measured in the worker, on the loop that runs the batch:

* start call: wall time of the ``nbparrot.map`` call (the time the calling cell is blocked);
* preparing: from the call until the engine has planned every row (status "preparing" until then);
* loop lateness: a heartbeat task sleeps 10 ms in a loop on the same loop, from just before the
  call until the run's task has ended, and records how late each wake-up is. "Largest stall" is
  the largest lateness; stalls > 50 ms are counted; p99 is over all wake-ups. Full (generation 2)
  garbage collections are timed with ``gc.callbacks``;
* memory: the heartbeat also reads the resident set size (``/proc/self/statm``) every wake-up;
  "RSS per row" = (largest RSS during the run - RSS once the DataFrame is built and pandas,
  aiohttp and nbparrot are imported) / N. ``ru_maxrss`` is reported too (it includes building
  the frame);
* building the result (``run.partial()``: a Series of N answers) is timed after the run, outside
  the heartbeat window: it is the user's own cell, not a stall of a running batch;
* "own CPU" stalls: the machine is shared, and a wake-up is also late when the core ran another
  process. For each wake-up the worker also takes the CPU time of its own process (all threads,
  pinned to one core) over the interval: lateness beyond what it spent on the CPU itself is not
  counted there; "without a full GC": the largest stall with no generation-2 collection starting
  inside it;
* correctness: every answer must start with ``[<expected_tag(its own messages)>]``.

Each worker has a deadline (``--deadline``, default 280 s): at the deadline it cancels the run,
keeps what finished, and reports how far it got. The parent kills a worker 60 s after that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import bench as base  # noqa: E402 - the same workload text and machine helpers as bench.py

SERVER_CPU, CLIENT_CPU = base.SERVER_CPU, base.CLIENT_CPU
MODEL, API_KEY, MAX_TOKENS = base.MODEL, base.API_KEY, base.MAX_TOKENS
SYSTEM, TEMPLATE = base.TP_SYSTEM, base.TP_TEMPLATE
NS = (10_000, 100_000, 1_000_000)
CLIENTS = ("nbparrot", "nbparrot-nocache", "aiohttp")
DEFAULT_CLIENTS = ("nbparrot", "nbparrot-nocache", "aiohttp")
CONCURRENCY = 256
DEADLINE = 280.0
KILL_GRACE = 60.0
BEAT = 0.010  # heartbeat period, seconds
STALL = 0.050  # a wake-up later than this is a stall
POOL = 1000  # distinct review texts; every prompt is still distinct (it carries the row id)


# =========================================================================== worker


def build_frame(n: int) -> Any:
    """N rows: ``id`` and a review text of a length that makes the user prompt ~440 characters."""
    import random

    import numpy as np
    import pandas as pd

    rng = random.Random(7)
    head = len(TEMPLATE.format(id=n, text=""))
    pool = np.array([base._filler_text(rng, base.TP_USER_CHARS - head) for _ in range(POOL)], dtype=object)
    return pd.DataFrame({"id": np.arange(n, dtype=np.int64), "text": pd.array(pool[np.arange(n) % POOL], dtype="str")})


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Heartbeat:
    """Sleeps BEAT in a loop; records how late each wake-up is, the RSS, and when ``watch()`` first holds."""

    def __init__(self, watch: Any = None):
        self.late: list[float] = []
        self.own_late: list[float] = []
        self.stalls: list[tuple[float, float, float]] = []  # (perf_counter at the sleep, s late, of which own CPU)
        self.rss_max = 0
        self.watch, self.watched_at = watch, None
        self._task = None

    def start(self) -> None:
        import asyncio

        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        cpu = time.process_time
        while True:
            before, cpu_before, wall = loop.time(), cpu(), time.perf_counter()
            await asyncio.sleep(BEAT)
            late = loop.time() - before - BEAT
            # the part of the lateness this process spent on the CPU (all its threads, pinned to one core):
            # time the core gave to other processes (the server is pinned elsewhere) is not counted
            own = max(0.0, min(late, cpu() - cpu_before - BEAT))
            self.late.append(late)
            self.own_late.append(own)
            if late > STALL:
                self.stalls.append((wall, late, own))
            self.rss_max = max(self.rss_max, _rss())
            if self.watch is not None and self.watched_at is None and self.watch():
                self.watched_at = time.perf_counter()

    async def stop(self) -> None:
        import asyncio

        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.rss_max = max(self.rss_max, _rss())

    def figures(self, gc_timer: "GcTimer", t0: float) -> dict:
        late = sorted(self.late) or [0.0]
        own = sorted(self.own_late) or [0.0]
        # a stall with a full collection inside it, or without one
        with_gc = [any(wall <= at <= wall + BEAT + lateness for at in gc_timer.at) for wall, lateness, _ in self.stalls]
        no_gc = [lateness for (_, lateness, _), g in zip(self.stalls, with_gc) if not g]
        biggest = sorted(zip(self.stalls, with_gc), key=lambda x: -x[0][1])[:30]
        return {"beats": len(self.late), "stall_max_ms": 1000 * late[-1],
                "stalls_over_50ms": sum(x > STALL for x in late),
                "own_stall_max_ms": 1000 * own[-1], "own_stalls_over_50ms": sum(x > STALL for x in own),
                "late_p99_ms": 1000 * late[min(len(late) - 1, int(0.99 * len(late)))],
                "late_p50_ms": 1000 * late[len(late) // 2],
                "stall_max_without_gc_ms": 1000 * max(no_gc, default=0.0), "stalls_without_gc": len(no_gc),
                "largest_stalls": [(round(wall - t0, 3), round(1000 * lateness, 1), round(1000 * o, 1), g)
                                   for (wall, lateness, o), g in biggest]}


class GcTimer:
    """Times full (generation 2) collections through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self.at: list[float] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._t0)
            self.at.append(self._t0)

    def figures(self) -> dict:
        return {"gc_full_collections": len(self.pauses),
                "gc_full_max_ms": 1000 * max(self.pauses, default=0.0),
                "gc_full_largest": sorted((round(1000 * p, 1) for p in self.pauses), reverse=True)[:10]}


def worker(ns: argparse.Namespace) -> dict:
    import asyncio
    import gc

    os.sched_setaffinity(0, {ns.cpu})
    import aiohttp  # noqa: F401 - imported before the baseline, as in a notebook that has used it
    import numpy as np  # noqa: F401
    import pandas as pd  # noqa: F401

    import nbparrot
    from nbparrot.server import expected_tag

    n = ns.n
    df = build_frame(n)
    gc.collect()
    rss_base = _rss()
    out: dict[str, Any] = {"client": ns.client, "n": n, "concurrency": ns.concurrency}
    gc_timer = GcTimer()

    busy0, span0, span_cpu0 = base._cpu_busy(), time.perf_counter(), base._rusage()[0]

    async def main() -> list:
        loop = asyncio.get_running_loop()
        answers: Any = None
        if ns.client.startswith("nbparrot"):
            extra = {"cache": "off"} if ns.client == "nbparrot-nocache" else {}
            holder: dict[str, Any] = {}
            beat = Heartbeat(lambda: getattr(holder["run"].engine, "planned", True) if "run" in holder else False)
            gc.callbacks.append(gc_timer)
            beat.start()
            await asyncio.sleep(0.05)  # the heartbeat is going
            cpu0, t0 = base._rusage()[0], time.perf_counter()
            out["_t0"] = t0
            run = holder["run"] = nbparrot.map(df, TEMPLATE, system=SYSTEM, base_url=ns.base_url, api_key=API_KEY,
                                               concurrency=ns.concurrency, max_tokens=MAX_TOKENS, **extra)
            t_call = time.perf_counter()
            out["start_call_ms"] = 1000 * (t_call - t0)
            out["status_at_return"] = run.status
            out["estimate_at_return"] = run.estimate is not None
            done, _ = await asyncio.wait({run._task}, timeout=ns.deadline)
            if not done:
                out["deadline_hit"] = True
                run.cancel()
                await asyncio.wait({run._task})
            t1, cpu1 = time.perf_counter(), base._rusage()[0]
            await beat.stop()
            gc.callbacks.remove(gc_timer)
            p = run.progress
            out.update(status=run.status, wall_s=t1 - t0, cpu_s=cpu1 - cpu0, requests=p.requests, done=p.done,
                       failed=p.failed, cancelled=p.cancelled,
                       preparing_s=(beat.watched_at - t0) if beat.watched_at else None,
                       first_errors=sorted({o.error for o in run.outcomes[:2000] if o.error})[:3])
            tr = time.perf_counter()
            result = run.partial()
            out["result_s"] = time.perf_counter() - tr
            answers = result.tolist()
        else:  # raw aiohttp: the floor
            import aiohttp

            beat = Heartbeat()
            gc.callbacks.append(gc_timer)
            beat.start()
            await asyncio.sleep(0.05)
            cpu0, t0 = base._rusage()[0], time.perf_counter()
            out["_t0"] = t0
            answers = [None] * n
            errors: list[str] = []
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=ns.concurrency),
                                            headers={"Authorization": f"Bearer {API_KEY}"})
            url = ns.base_url + "/chat/completions"
            sem = asyncio.Semaphore(ns.concurrency)
            tasks: set = set()

            async def one(i: int, messages: list) -> None:
                try:
                    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS})
                    async with session.post(url, data=body.encode(), headers={"Content-Type": "application/json"}) as resp:
                        data = json.loads(await resp.read())
                    answers[i] = data["choices"][0]["message"]["content"]
                except Exception as exc:  # noqa: BLE001 - counted as a failed row
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                finally:
                    sem.release()

            async def produce() -> None:
                ids, texts = df["id"], df["text"]
                for start in range(0, n, 1024):
                    block = zip(ids.iloc[start:start + 1024].tolist(), texts.iloc[start:start + 1024].tolist())
                    for j, (id_, text) in enumerate(block):
                        await sem.acquire()
                        messages = [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": TEMPLATE.format(id=id_, text=text)}]
                        task = loop.create_task(one(start + j, messages))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))

            producer = loop.create_task(produce())
            out["start_call_ms"] = None
            done, _ = await asyncio.wait({producer}, timeout=ns.deadline)
            if not done:
                out["deadline_hit"] = True
                producer.cancel()
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(producer, *tasks, return_exceptions=True)
            t1, cpu1 = time.perf_counter(), base._rusage()[0]
            await beat.stop()
            gc.callbacks.remove(gc_timer)
            await session.close()
            sent = sum(a is not None for a in answers)
            out.update(status="deadline" if out.get("deadline_hit") else "finished", wall_s=t1 - t0,
                       cpu_s=cpu1 - cpu0, requests=sent + len(errors), done=sent, failed=len(errors),
                       first_errors=sorted(set(errors))[:3], result_s=None, preparing_s=None)
        out.update(beat.figures(gc_timer, out.pop("_t0")))
        out.update(gc_timer.figures())
        out["rss_base_mb"] = rss_base / 2**20
        out["rss_peak_run_mb"] = beat.rss_max / 2**20
        out["rss_per_row_bytes"] = (beat.rss_max - rss_base) / n
        out["ru_maxrss_mb"] = base._rusage()[1] / 1024
        return answers

    answers = asyncio.run(main())
    busy1 = base._cpu_busy()
    out["total_s"], out["worker_cpu_s"] = time.perf_counter() - span0, base._rusage()[0] - span_cpu0
    # CPU time each core gave to anything over the cell (the worker is on CPU 0, the server on CPU 1)
    out["busy_s"] = {k: busy1[k] - busy0[k] for k in busy1 if k in busy0}
    ok = wrong = missing = 0
    for i, (id_, text) in enumerate(zip(df["id"].tolist(), df["text"].tolist())):
        answer = answers[i]
        if not isinstance(answer, str):
            missing += 1
            continue
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEMPLATE.format(id=id_, text=text)}]
        if answer.startswith("[" + expected_tag(messages) + "]"):
            ok += 1
        else:
            wrong += 1
    out.update(ok=ok, wrong=wrong, unanswered=missing, cpu_us_per_req=out["cpu_s"] / max(1, out["requests"]) * 1e6)
    return out


# =========================================================================== parent


def wait_for_quiet(limit: float, share: float = 0.15) -> float:
    """Wait (at most ``limit`` seconds) until both cores were less than ``share`` busy over 3 s; returns the
    last busy share seen. The machine is shared: a cell started while others run their benchmarks
    measures them too."""
    end = time.monotonic() + limit
    while True:
        before = base._cpu_busy()
        time.sleep(3.0)
        after = base._cpu_busy()
        busy = max(((after[k] - before[k]) / 3.0 for k in after if k in before), default=0.0)
        if busy < share or time.monotonic() >= end:
            return busy


def spawn(args: list[str], deadline: float, tmp: Path, name: str, code: Path = ROOT) -> dict:
    result, log = tmp / f"{name}.json", tmp / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cpu", str(CLIENT_CPU), "--result", str(result),
           "--deadline", str(deadline), *args]
    env = dict(os.environ)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(code) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NBPARROT_CACHE_DIR"] = str(tmp / f"cache-{name}")  # fresh and empty: every row is sent
    with open(log, "w") as err:
        try:
            code: Any = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                       timeout=deadline + KILL_GRACE + 120).returncode
        except subprocess.TimeoutExpired:
            code = "killed"
    if code == 0 and result.exists():
        return json.loads(result.read_text())
    tail = log.read_text(errors="replace")[-1500:]
    print(f"  worker {name} failed ({code}):\n{tail}", file=sys.stderr)
    return {"status": f"worker {code}", "worker_log_tail": tail}


def _f(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def table(results: list[dict]) -> str:
    head = ("| client | N | start call ms | status at return | preparing s | largest stall ms | stalls > 50 ms "
            "| largest stall, own CPU ms | > 50 ms, own CPU | largest stall without a full GC ms | p99 late ms | full GCs (max ms) | other load CPU0 / CPU1 | RSS/row B | peak RSS MB (base) | wall s | CPU µs/req | rows ok / wrong "
            "/ unanswered | result() s | status |")
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        if "wall_s" not in r:
            lines.append(f"| {r.get('client')} | {r.get('n', 0):,} | {r.get('status')} |" + " |" * 17)
            continue
        lines.append(
            f"| {r['client']} | {r['n']:,} | {_f(r.get('start_call_ms'), '{:.1f}')} | {r.get('status_at_return', '–')} "
            f"| {_f(r.get('preparing_s'), '{:.2f}')} | {r['stall_max_ms']:.1f} | {r['stalls_over_50ms']} "
            f"| {r['own_stall_max_ms']:.1f} | {r['own_stalls_over_50ms']} | {r['stall_max_without_gc_ms']:.1f} "
            f"| {r['late_p99_ms']:.1f} | {r['gc_full_collections']} ({r['gc_full_max_ms']:.0f}) "
            f"| {_f(r.get('other_load_client_core'), '{:.0%}')} / {_f(r.get('other_load_server_core'), '{:.0%}')} "
            f"| {r['rss_per_row_bytes']:,.0f} | {r['rss_peak_run_mb']:,.0f} ({r['rss_base_mb']:,.0f}) | {r['wall_s']:.1f} "
            f"| {r['cpu_us_per_req']:,.0f} | {r['ok']:,} / {r['wrong']:,} / {r['unanswered']:,} "
            f"| {_f(r.get('result_s'), '{:.2f}')} | {r['status']}{' (deadline)' if r.get('deadline_hit') else ''} |")
    return "\n".join(lines)


def parent(ns: argparse.Namespace) -> None:
    if ns.report:
        print(table(json.loads(Path(ns.report).read_text())["cells"]))
        return
    from nbparrot.server import ServerProcess

    clients = ns.clients or list(DEFAULT_CLIENTS)
    ns_list = ns.ns or list(NS)
    out: dict[str, Any] = {"machine": base.machine(), "concurrency": ns.concurrency, "deadline_s": ns.deadline,
                           "latency_ms": ns.latency_ms, "code": ns.code or str(ROOT), "cells": []}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="nbparrot-scale-") as tmpdir, \
            ServerProcess(cpu=SERVER_CPU, latency_ms=ns.latency_ms, completion_tokens=16, max_lifetime=7200.0) as server:
        for n in ns_list:
            for client in clients:
                name = f"{client}-{n}"
                server.reset()
                quiet = wait_for_quiet(ns.quiet_wait) if ns.quiet_wait else None
                server_cpu0 = server.stats()["cpu_seconds"]
                print(f"- {name} ...", end=" ", flush=True, file=sys.stderr)
                res = spawn(["--worker", "--client", client, "--n", str(n), "--concurrency", str(ns.concurrency),
                             "--base-url", server.base_url], ns.deadline, Path(tmpdir), name,
                            Path(ns.code).resolve() if ns.code else ROOT)
                res.update(client=client, n=n, busy_before_start=quiet)
                if "wall_s" in res:
                    res["server_cpu_s"] = server.stats()["cpu_seconds"] - server_cpu0
                    busy, span = res.get("busy_s") or {}, res["total_s"]
                    if f"cpu{CLIENT_CPU}" in busy:  # the CPU other processes used on each core during the cell
                        res["other_load_client_core"] = max(0.0, busy[f"cpu{CLIENT_CPU}"] - res["worker_cpu_s"]) / span
                    if f"cpu{SERVER_CPU}" in busy:
                        res["other_load_server_core"] = max(0.0, busy[f"cpu{SERVER_CPU}"] - res["server_cpu_s"]) / span
                if "wall_s" in res:
                    print(f"start {_f(res.get('start_call_ms'), '{:.1f}')} ms, stall max {res['stall_max_ms']:.0f} ms, "
                          f"{res['rss_per_row_bytes']:.0f} B/row, {res['done']:,}/{n:,} done in {res['wall_s']:.0f} s",
                          file=sys.stderr)
                out["cells"].append(res)
    out["total_seconds"] = time.time() - started
    print(table(out["cells"]))
    if ns.out:
        Path(ns.out).write_text(json.dumps(out, indent=1))
        print(f"results written to {ns.out} ({out['total_seconds']:.0f} s in all)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", help="row counts (default 10000 100000 1000000)")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--deadline", type=float, default=DEADLINE, help="seconds per cell before it is cancelled")
    parser.add_argument("--out", default=str(HERE / "scale_results.json"), help="JSON results file ('' = none)")
    parser.add_argument("--report", metavar="RESULTS_JSON", help="print the table of an earlier run and exit")
    parser.add_argument("--code", help="measure the nbparrot package in this directory instead (e.g. an older commit "
                                       "unpacked with git archive)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="the mock server's latency (default 0)")
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="before each cell wait up to this many seconds for both cores to be nearly idle")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=CLIENT_CPU, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        if not (ns.base_url or "").startswith(("http://127.0.0.1:", "http://localhost:")):
            parser.error("workers only talk to the loopback mock server")
        Path(ns.result).write_text(json.dumps(worker(ns)))
    else:
        parent(ns)


if __name__ == "__main__":
    main()
