"""nbparrot benchmark: client overhead / throughput and behaviour under rate limits.

One command starts the bundled mock server (``nbparrot.server.ServerProcess``, loopback
only, pinned to CPU 1) and runs every cell in a fresh worker process pinned to CPU 0:

    .venv/bin/python bench/bench.py                # full matrix (about 10 minutes)
    .venv/bin/python bench/bench.py --quick        # small sanity subset (under a minute)
    .venv/bin/python bench/bench.py --out bench/results.json

Part 1 (throughput): server ``latency_ms=50``; N rows x concurrency C, each row a 58-char
system message + a ~440-char distinct user prompt, ``max_tokens=64``, 16 completion tokens
back. Clients: ``nbparrot.map`` and the plain openai SDK (``AsyncOpenAI(max_retries=0)`` +
``asyncio.Semaphore(C)`` + ``asyncio.gather``). Reported: wall, wall / theory
(theory = N x 0.05 s / C), req/s, client CPU us per request (getrusage user+sys of the
worker over the request phase only), peak RSS, and rows ok / wrong / failed (every answer
must start with ``[<expected_tag(its own messages)>]``).

Part 2 (rate limits): server ``rpm=3000 tpm=200000 latency 200 ms + U(0,100) ms + 2 ms x
completion tokens (32..64)``; 2,000 rows of 190-910 chars + an 88-char system prompt,
``max_tokens=64``, default nbparrot concurrency; bucket of 60 s and of 1 s. Reported: wall,
ideal, wall / ideal, 429s (server count), requests, rows answered, lost, duplicates.

Every worker has its own deadline (it cancels its run) and the parent kills it after a
grace period; the server is stopped on exit. Only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

SERVER_CPU = 1
CLIENT_CPU = 0
MODEL = "gpt-4o-mini"
API_KEY = "sk-bench"
MAX_TOKENS = 64

# ---- part 1 workload ---------------------------------------------------------------------
TP_LATENCY_MS = 50.0
TP_COMPLETION_TOKENS = 16
TP_SYSTEM = "You are a concise assistant. Answer in one short sentence."  # 58 chars
TP_TEMPLATE = ("Summarise customer review #{id} for the product team in one sentence, "
               "keeping any names and numbers.\n\nReview: {text}")
TP_USER_CHARS = 440  # rendered user prompt length, exactly
TP_NS = (5_000, 20_000)
TP_CONCS = (64, 256, 1024)
TP_DEADLINE = 300.0  # per cell, seconds (the SDK needs ~100 s for 20k rows at c1024)
# nbparrot = defaults (answer cache "use", in a fresh empty directory); nbparrot-nocache = cache="off";
# sdk = openai.AsyncOpenAI + Semaphore + gather; aiohttp = raw aiohttp, the floor on this machine
CLIENTS = ("nbparrot", "nbparrot-nocache", "sdk", "aiohttp")
DEFAULT_CLIENTS = CLIENTS

# ---- part 2 workload ---------------------------------------------------------------------
RL_SERVER = dict(rpm=3000, tpm=200_000, latency_ms=200.0, jitter_ms=100.0, per_token_ms=2.0,
                 completion_tokens=32, completion_tokens_max=64)
RL_SYSTEM = "You are a careful analyst. Read the passage below and then reply with a one-line summary"
RL_TEMPLATE = "{text}"
RL_ROWS = 2_000
RL_MIN_CHARS, RL_MAX_CHARS = 190, 910
RL_SEED = 20261121
RL_BURSTS = (60.0, 1.0)
RL_DEADLINE = 400.0

KILL_GRACE = 60.0  # the parent kills a worker this long after its own deadline

_WORDS = ("battery screen delivery support price quality refund colour size weight box manual "
          "charger cable warranty speaker camera sound light handle strap zipper fabric button "
          "order courier store app update login account invoice discount coupon team agent "
          "fast slow broken great awful fine cheap solid flimsy loud quiet bright dim smooth "
          "returned replaced arrived cracked worked failed loved hated expected received").split()

assert len(TP_SYSTEM) == 58, len(TP_SYSTEM)
assert len(RL_SYSTEM) == 88, len(RL_SYSTEM)


def _filler_text(rng: random.Random, length: int) -> str:
    """Deterministic word salad of exactly ``length`` characters."""
    words: list[str] = []
    size = 0
    while size < length:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:length]


def throughput_rows(n: int) -> list[dict]:
    """N distinct rows whose rendered user prompt is exactly TP_USER_CHARS characters."""
    rng = random.Random(7)
    rows = []
    for i in range(n):
        head = TP_TEMPLATE.format(id=i, text="")
        rows.append({"id": i, "text": _filler_text(rng, TP_USER_CHARS - len(head))})
    return rows


def limit_rows(n: int) -> list[dict]:
    """N distinct rows of 190-910 characters (deterministic random lengths)."""
    rng = random.Random(RL_SEED)
    rows = []
    for i in range(n):
        length = rng.randint(RL_MIN_CHARS, RL_MAX_CHARS)
        head = f"Passage {i}: "
        rows.append({"text": head + _filler_text(rng, length - len(head))})
    return rows


def messages_for(system: str, template: str, row: dict) -> list[dict]:
    """The messages nbparrot should send for ``row`` (rendered here independently)."""
    return [{"role": "system", "content": system}, {"role": "user", "content": template.format(**row)}]


def _rusage() -> tuple[float, int]:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss  # maxrss in KiB on Linux


def _cpu_busy() -> dict[str, float]:
    """Busy seconds per CPU since boot (all processes), from /proc/stat; {} where unavailable."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3].isdigit():
                    name, *vals = line.split()
                    vals = [int(v) for v in vals[:8]]
                    out[name] = (sum(vals) - vals[3] - vals[4]) / tick  # minus idle and iowait
    except OSError:
        pass
    return out


def _check(answers: list[Any], expected: list[str]) -> tuple[int, int, int]:
    """(ok, wrong, failed): an answer is ok when it starts with its own row's ``[tag#0]``."""
    ok = wrong = failed = 0
    for answer, tag in zip(answers, expected):
        if not isinstance(answer, str):
            failed += 1
        elif answer.startswith("[" + tag + "]"):
            ok += 1
        else:
            wrong += 1
    return ok, wrong, failed


def _find_prepare() -> Any:
    """nbparrot's rendering step (its module has moved between versions), or None."""
    import importlib

    for module in ("nbparrot.prepare", "nbparrot.batch"):
        try:
            return importlib.import_module(module).prepare
        except (ImportError, AttributeError):
            continue
    return None


def _finished(start, *args, **kwargs):
    """The run ``start`` ran to completion, also when it stopped with an error (a script's map raises it)."""
    from nbparrot.errors import NbparrotError

    try:
        return start(*args, **kwargs)
    except NbparrotError as err:
        if err.run is None:
            raise
        return err.run


def _arm_deadline(seconds: float) -> Any:
    """After ``seconds``, SIGINT ourselves: a script-mode nbparrot run cancels on it and keeps its rows."""
    import signal
    import threading

    timer = threading.Timer(seconds, os.kill, args=(os.getpid(), signal.SIGINT))
    timer.daemon = True
    timer.start()
    return timer


# =========================================================================== workers


def worker_throughput(ns: argparse.Namespace) -> dict:
    """One part-1 cell in this (fresh, pinned) process."""
    import gc

    from nbparrot.server import expected_tag

    rows = throughput_rows(ns.n)
    expected = [expected_tag(messages_for(TP_SYSTEM, TP_TEMPLATE, row)) for row in rows]
    cpu_import, rss_import = _rusage()
    out: dict[str, Any] = {"client": ns.client, "n": ns.n, "concurrency": ns.concurrency}
    profiler = None
    if ns.profile:
        import cProfile

        profiler = cProfile.Profile()

    if ns.client.startswith("nbparrot"):
        import inspect

        import pandas  # noqa: F401 - a user has it imported already; keep its import out of the timing

        import nbparrot

        # The price database loads once per process (a kernel pays it once, in a thread), not per run:
        # kept out of the per-request figure like the imports above, and reported apart.
        c0, _ = _rusage()
        nbparrot.pricing.price_of(MODEL)
        c1, _ = _rusage()
        out["price_db_cpu_s"] = c1 - c0

        extra: dict[str, Any] = {}
        if ns.client == "nbparrot-nocache":
            if "cache" not in inspect.signature(nbparrot.map).parameters:
                raise SystemExit("this nbparrot has no cache= parameter")
            extra["cache"] = "off"

        gc.collect()
        timer = _arm_deadline(ns.deadline)
        busy0 = _cpu_busy()
        cpu0, _ = _rusage()
        t0 = time.perf_counter()
        if profiler:
            profiler.enable()
        run = _finished(nbparrot.map, rows, TP_TEMPLATE, system=TP_SYSTEM, base_url=ns.base_url, api_key=API_KEY,
                        concurrency=ns.concurrency, max_tokens=MAX_TOKENS, **extra)
        if profiler:
            profiler.disable()
        t1 = time.perf_counter()
        cpu1, rss = _rusage()
        busy1 = _cpu_busy()
        timer.cancel()
        answers = [r.get("answer") for r in run.partial()]
        p = run.progress
        out.update(requests=p.requests, rate_limited=p.rate_limited, status=run.status,
                   error=str(run.error) if run.error else None,
                   engine_wall_s=(p.finished - p.started) if p.finished and p.started else None)
        errors = [o.error for o in run.outcomes if o.status != "ok"]
        out["first_errors"] = sorted(set(e for e in errors if e))[:5]
        # the rendering share of map(): prepare() alone, timed the same way, after the run (prepare
        # renders rows on demand since the scale work: then render every row, as planning does once)
        prepare = _find_prepare()
        if prepare is not None:
            c0, _ = _rusage()
            prepared = prepare(rows, TP_TEMPLATE, system=TP_SYSTEM)
            if hasattr(prepared, "render"):
                for k in range(len(prepared)):
                    prepared.render(k)
            c1, _ = _rusage()
            out["prepare_cpu_us_per_row"] = (c1 - c0) / ns.n * 1e6
    else:
        import asyncio

        msgs = [messages_for(TP_SYSTEM, TP_TEMPLATE, row) for row in rows]
        answers = [None] * ns.n
        errors: list[str] = []
        timing: dict[str, Any] = {}

        async def main() -> None:
            sem = asyncio.Semaphore(ns.concurrency)
            if ns.client == "sdk":
                import openai

                client = openai.AsyncOpenAI(base_url=ns.base_url, api_key=API_KEY, max_retries=0)

                async def one(i: int) -> None:
                    async with sem:
                        try:
                            resp = await client.chat.completions.create(model=MODEL, messages=msgs[i],
                                                                        max_tokens=MAX_TOKENS)
                        except Exception as exc:  # noqa: BLE001 - counted as a failed row
                            errors.append(f"{type(exc).__name__}: {exc}"[:200])
                            return
                        answers[i] = resp.choices[0].message.content
            else:  # "aiohttp": the floor on this machine, one session and json in/out, no retries
                import aiohttp

                client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=ns.concurrency),
                                               headers={"Authorization": f"Bearer {API_KEY}"})
                url = ns.base_url + "/chat/completions"

                async def one(i: int) -> None:
                    async with sem:
                        try:
                            body = json.dumps({"model": MODEL, "messages": msgs[i], "max_tokens": MAX_TOKENS})
                            async with client.post(url, data=body.encode(),
                                                   headers={"Content-Type": "application/json"}) as resp:
                                data = json.loads(await resp.read())
                            answers[i] = data["choices"][0]["message"]["content"]
                        except Exception as exc:  # noqa: BLE001 - counted as a failed row
                            errors.append(f"{type(exc).__name__}: {exc}"[:200])

            gc.collect()
            timing["busy0"] = _cpu_busy()
            timing["cpu0"], _ = _rusage()
            timing["t0"] = time.perf_counter()
            if profiler:
                profiler.enable()
            fut = asyncio.gather(*(one(i) for i in range(ns.n)))
            await asyncio.wait({fut}, timeout=ns.deadline)
            if profiler:
                profiler.disable()
            timing["t1"] = time.perf_counter()
            timing["cpu1"], timing["rss"] = _rusage()
            timing["busy1"] = _cpu_busy()
            if not fut.done():
                fut.cancel()
                await asyncio.wait({fut})
                timing["deadline_hit"] = 1.0
            await client.close()

        asyncio.run(main())
        t0, t1, cpu0, cpu1, rss = timing["t0"], timing["t1"], timing["cpu0"], timing["cpu1"], int(timing["rss"])
        busy0, busy1 = timing["busy0"], timing["busy1"]
        out.update(status="deadline" if timing.get("deadline_hit") else "finished",
                   first_errors=sorted(set(errors))[:5])
    if profiler:
        profiler.dump_stats(ns.profile)
    ok, wrong, failed = _check(answers, expected)
    wall = t1 - t0
    cpu = cpu1 - cpu0
    out.update(wall_s=wall, cpu_s=cpu, cpu_us_per_req=cpu / ns.n * 1e6, req_per_s=ns.n / wall,
               peak_rss_mb=rss / 1024, rss_after_setup_mb=rss_import / 1024, import_cpu_s=cpu_import,
               ok=ok, wrong=wrong, failed=failed,
               cpu_busy_s={k: busy1[k] - busy0[k] for k in busy1 if k in busy0})
    return out


def worker_limits(ns: argparse.Namespace) -> dict:
    """One part-2 run (nbparrot, default concurrency) in this process."""
    import gc

    import pandas  # noqa: F401

    import nbparrot
    from nbparrot.server import expected_tag

    rows = limit_rows(ns.n)
    expected = [expected_tag(messages_for(RL_SYSTEM, RL_TEMPLATE, row)) for row in rows]
    gc.collect()
    timer = _arm_deadline(ns.deadline)
    cpu0, _ = _rusage()
    t0 = time.perf_counter()
    run = _finished(nbparrot.map, rows, RL_TEMPLATE, system=RL_SYSTEM, base_url=ns.base_url, api_key=API_KEY,
                    max_tokens=MAX_TOKENS)
    t1 = time.perf_counter()
    cpu1, rss = _rusage()
    timer.cancel()
    answers = [r.get("answer") for r in run.partial()]
    ok, wrong, failed = _check(answers, expected)
    p = run.progress
    errors = sorted(set(o.error for o in run.outcomes if o.status != "ok" and o.error))
    return {"n": ns.n, "wall_s": t1 - t0, "cpu_s": cpu1 - cpu0, "peak_rss_mb": rss / 1024,
            "status": run.status, "error": str(run.error) if run.error else None,
            "client_requests": p.requests, "client_rate_limited": p.rate_limited,
            "concurrency": run.engine.settings.concurrency,
            "ok": ok, "wrong": wrong, "failed": failed, "first_errors": errors[:5]}


def worker_main(ns: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {ns.cpu})
    result = worker_throughput(ns) if ns.worker == "throughput" else worker_limits(ns)
    Path(ns.result).write_text(json.dumps(result))


# =========================================================================== parent


def _spawn_worker(args: list[str], deadline: float, tmp: Path, name: str) -> dict:
    """Run a worker (stderr -> a log file, so nbparrot's progress line costs nothing visible)."""
    result = tmp / f"{name}.json"
    log = tmp / f"{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--cpu", str(CLIENT_CPU), "--result", str(result),
           "--deadline", str(deadline), *args]
    env = dict(os.environ)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(key, None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # nbparrot's answer cache (default "use") goes to a fresh, empty directory per run: every run
    # sends every row, nothing is read from or left in the user's cache
    env["NBPARROT_CACHE_DIR"] = str(tmp / f"cache-{name}")
    with open(log, "w") as err:
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                  timeout=deadline + KILL_GRACE)
            code: Any = proc.returncode
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            code = "killed"
    if code == 0 and result.exists():
        return json.loads(result.read_text())
    tail = log.read_text(errors="replace")[-1500:]
    print(f"  worker {name} failed ({code}):\n{tail}", file=sys.stderr)
    return {"status": f"worker {code}", "worker_log_tail": tail}


def _server_delta(before: dict, after: dict) -> dict:
    return {
        "server_requests": after["requests"],
        "server_ok": after["ok"],
        "server_429": after["rate_limited"],
        "server_too_large": after["too_large"],
        "server_peak_in_flight": after["peak_in_flight"],
        "server_cpu_s": after["cpu_seconds"] - before["cpu_seconds"],
        "server_duplicates": sum(c - 1 for c in after["answered"].values() if c > 1),
        "server_prompt_tokens": after["prompt_tokens"],
    }


def _classify(res: dict) -> None:
    """Derived figures of one part-1 run: ratios, CPU shares, other load, and what bounds it."""
    wall, theory = res["wall_s"], res["theory_s"]
    res["wall_over_theory"] = wall / theory
    res["client_cpu_share"] = res["cpu_s"] / wall
    res["server_cpu_share"] = res["server_cpu_s"] / wall
    busy = res.get("cpu_busy_s") or {}
    # CPU used on each core by processes other than this worker (CPU 0) and the server (CPU 1)
    if f"cpu{CLIENT_CPU}" in busy:
        res["other_load_client_core"] = max(0.0, busy[f"cpu{CLIENT_CPU}"] - res["cpu_s"]) / wall
    if f"cpu{SERVER_CPU}" in busy:
        res["other_load_server_core"] = max(0.0, busy[f"cpu{SERVER_CPU}"] - res["server_cpu_s"]) / wall
    # The run cannot be faster than any of: the latency bound, the client's CPU, the server's CPU.
    floors = {"latency": theory, "client CPU": res["cpu_s"], "server CPU": res["server_cpu_s"]}
    res["bound"] = max(floors, key=floors.get)
    res["floor_s"] = floors[res["bound"]]
    res["client_cpu_bound"] = res["cpu_s"] > theory


def run_throughput(cells: list[tuple[int, int, str]], repeat: int, tmp: Path,
                   profile_dir: Path | None) -> list[dict]:
    from nbparrot.server import ServerProcess

    runs: dict[tuple[int, int, str], list[dict]] = {cell: [] for cell in cells}
    with ServerProcess(cpu=SERVER_CPU, latency_ms=TP_LATENCY_MS, completion_tokens=TP_COMPLETION_TOKENS,
                       max_lifetime=3600.0) as server:
        for rep in range(repeat):  # interleaved, so a burst of outside load hits one run of a cell, not all
            for n, conc, client in cells:
                name = f"tp-{client}-{n}-{conc}-r{rep}"
                server.reset()
                before = server.stats()
                args = ["--worker", "throughput", "--client", client, "--n", str(n), "--concurrency", str(conc),
                        "--base-url", server.base_url]
                if profile_dir is not None:
                    args += ["--profile", str(profile_dir / f"{name}.prof")]
                print(f"- {name} ...", end=" ", flush=True, file=sys.stderr)
                res = _spawn_worker(args, TP_DEADLINE, tmp, name)
                res.update(client=client, n=n, concurrency=conc, run=rep)
                res.update(_server_delta(before, server.stats()))
                res["theory_s"] = n * TP_LATENCY_MS / 1000.0 / conc
                if "wall_s" in res:
                    _classify(res)
                    print(f"{res['wall_s']:.2f}s ({res['wall_over_theory']:.2f}x), {res['cpu_us_per_req']:.0f} us/req, "
                          f"ok {res['ok']}/{n}, other load {100 * res.get('other_load_client_core', 0):.0f}%/"
                          f"{100 * res.get('other_load_server_core', 0):.0f}%", file=sys.stderr)
                runs[(n, conc, client)].append(res)
    results = []
    for cell, cell_runs in runs.items():
        good = [r for r in cell_runs if "wall_s" in r]
        best = dict(min(good, key=lambda r: r["wall_s"]) if good else cell_runs[0])
        if good:
            walls = sorted(r["wall_s"] for r in good)
            cpus = sorted(r["cpu_us_per_req"] for r in good)
            best.update(runs=len(cell_runs), wall_min_s=walls[0], wall_max_s=walls[-1],
                        wall_median_s=walls[len(walls) // 2], cpu_us_per_req_min=cpus[0],
                        cpu_us_per_req_median=cpus[len(cpus) // 2])
        best["all_runs"] = cell_runs
        results.append(best)
    return results


def ideal_limits(rows: list[dict], burst: float, concurrency: int) -> dict:
    """Ideal wall time of a rate-limited run, from what the server charges."""
    import hashlib

    from nbparrot.server import prompt_tokens

    cfg = RL_SERVER
    total_tokens = 0
    latencies = []
    for row in rows:
        msgs = messages_for(RL_SYSTEM, RL_TEMPLATE, row)
        total_tokens += prompt_tokens(msgs) + MAX_TOKENS
        # the server's deterministic completion length: from sha1 of the joined contents
        digest = hashlib.sha1("\n".join(m["content"] for m in msgs).encode()).hexdigest()
        ct, ct_max = cfg["completion_tokens"], cfg["completion_tokens_max"]
        tokens = min(ct + int(digest[12:20], 16) % (ct_max - ct + 1), MAX_TOKENS)
        latencies.append(cfg["latency_ms"] + cfg["jitter_ms"] / 2 + cfg["per_token_ms"] * tokens)
    mean_latency = sum(latencies) / len(latencies) / 1000.0
    tpm, rpm = cfg["tpm"], cfg["rpm"]
    token_ideal = max(0.0, (total_tokens - tpm * burst / 60.0) / (tpm / 60.0)) + mean_latency
    request_ideal = max(0.0, (len(rows) - rpm * burst / 60.0) / (rpm / 60.0)) + mean_latency
    concurrency_ideal = len(rows) * mean_latency / concurrency
    return {"total_tokens": total_tokens, "mean_latency_s": mean_latency, "token_ideal_s": token_ideal,
            "request_ideal_s": request_ideal, "concurrency_ideal_s": concurrency_ideal,
            "ideal_s": max(token_ideal, request_ideal, concurrency_ideal)}


def run_limits(n_rows: int, bursts: tuple[float, ...], tmp: Path) -> list[dict]:
    from nbparrot.config import defaults
    from nbparrot.server import ServerProcess

    rows = limit_rows(n_rows)
    results = []
    for burst in bursts:
        name = f"rl-{n_rows}-burst{burst:g}"
        with ServerProcess(cpu=SERVER_CPU, burst_seconds=burst, max_lifetime=RL_DEADLINE + 2 * KILL_GRACE,
                           **RL_SERVER) as server:
            server.reset()
            before = server.stats()
            print(f"- {name} ...", end=" ", flush=True, file=sys.stderr)
            res = _spawn_worker(["--worker", "limits", "--n", str(n_rows), "--base-url", server.base_url],
                                RL_DEADLINE, tmp, name)
            res.update(_server_delta(before, server.stats()))
        res.update(n=n_rows, burst_seconds=burst)
        res.update(ideal_limits(rows, burst, res.get("concurrency") or defaults.concurrency))
        if "wall_s" in res:
            res["wall_over_ideal"] = res["wall_s"] / res["ideal_s"]
            res["lost"] = n_rows - res["ok"]
            res["share_429"] = res["server_429"] / max(1, res["server_requests"])
            print(f"{res['wall_s']:.1f}s (ideal {res['ideal_s']:.1f}s), {res['server_429']} x 429, "
                  f"ok {res['ok']}/{n_rows}", file=sys.stderr)
        results.append(res)
    return results


# =========================================================================== report


def _f(value: Any, fmt: str = "{:.2f}") -> str:
    return "–" if value is None else fmt.format(value)


def throughput_table(results: list[dict]) -> str:
    head = ("| client | N | conc | wall s | theory s | wall/theory | req/s | CPU µs/req | client CPU s "
            "| server CPU s | bound by | client core busy | other load CPU0 / CPU1 | peak RSS MB "
            "| ok / wrong / failed | runs (wall range s) |")
    lines = [head, "|---|---:|---:|" + "---:|" * 7 + "---|---:|---|---:|---|---|"]
    for r in results:
        if "wall_s" not in r:
            lines.append(f"| {r['client']} | {r['n']:,} | {r['concurrency']} | {r.get('status')} |" + " |" * 12)
            continue
        status = "" if r.get("status") in ("finished", None) else f" ({r['status']})"
        other = (f"{100 * r.get('other_load_client_core', 0):.0f} % / {100 * r.get('other_load_server_core', 0):.0f} %"
                 if "other_load_client_core" in r else "–")
        spread = (f"{r['runs']} ({r['wall_min_s']:.2f}–{r['wall_max_s']:.2f})" if r.get("runs", 1) > 1 else "1")
        lines.append(
            f"| {r['client']} | {r['n']:,} | {r['concurrency']} | {r['wall_s']:.2f} | {r['theory_s']:.2f} "
            f"| {r['wall_over_theory']:.2f}× | {r['req_per_s']:,.0f} | {r['cpu_us_per_req']:,.0f} | {r['cpu_s']:.2f} "
            f"| {r['server_cpu_s']:.2f} | {r['bound']}{status} | {100 * r['client_cpu_share']:.0f} % | {other} "
            f"| {r['peak_rss_mb']:.0f} | {r['ok']} / {r['wrong']} / {r['failed']} | {spread} |")
    return "\n".join(lines)


def limits_table(results: list[dict]) -> str:
    head = ("| bucket | rows | wall s | ideal s | wall/ideal | 429s (server) | 429 % of requests | requests sent "
            "| rows answered | lost | wrong | duplicates | client CPU s | status |")
    lines = [head, "|---|" + "---:|" * 12 + "---|"]
    for r in results:
        if "wall_s" not in r:
            lines.append(f"| {r['burst_seconds']:g} s | {r['n']:,} | {r.get('status')} |" + " |" * 11)
            continue
        lines.append(
            f"| {r['burst_seconds']:g} s | {r['n']:,} | {r['wall_s']:.1f} | {r['ideal_s']:.1f} "
            f"| {r['wall_over_ideal']:.3f}× | {r['server_429']} | {100 * r['share_429']:.2f} % "
            f"| {r['server_requests']} | {r['ok']} | {r['lost']} | {r['wrong']} | {r['server_duplicates']} "
            f"| {r['cpu_s']:.1f} | {r['status']} |")
    return "\n".join(lines)


def targets(tp: list[dict], rl: list[dict]) -> str:
    lines = []
    for r in tp:
        if r["client"] == "nbparrot" and r["concurrency"] == 256 and "wall_s" in r:
            cpu_ok = r["cpu_us_per_req"] <= 300
            wall_ok = r["wall_over_theory"] <= 1.25
            lines.append(f"- nbparrot N={r['n']:,} c256: CPU {r['cpu_us_per_req']:.0f} µs/req (target ≤ 300: "
                         f"{'met' if cpu_ok else 'MISSED'}), wall {r['wall_over_theory']:.2f}× theory "
                         f"(target ≤ 1.25×: {'met' if wall_ok else 'MISSED'}), "
                         f"{r['ok']}/{r['n']} ok")
    for r in rl:
        if "wall_s" in r:
            t_ok = r["wall_over_ideal"] <= 1.10
            q_ok = r["share_429"] <= 0.02
            lines.append(f"- limits, {r['burst_seconds']:g} s bucket: {100 * r['wall_over_ideal']:.1f} % of ideal "
                         f"(target ≤ 110 %: {'met' if t_ok else 'MISSED'}), {100 * r['share_429']:.2f} % of requests "
                         f"answered 429 (target ≤ 2 %: {'met' if q_ok else 'MISSED'}), {r['lost']} rows lost"
                         + (" [bound by concurrency, not the limit: a smoke test, not the target scenario]"
                            if r["ideal_s"] == r["concurrency_ideal_s"] else ""))
    return "\n".join(lines)


def machine() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("nbparrot", "openai", "aiohttp", "httpx2", "httpx", "pandas"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    cpu_model = ""
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "nbparrot").splitlines() if len(line) > 3]
    return {"git_head": git("rev-parse", "--short", "HEAD").strip(), "nbparrot_uncommitted_files": dirty,
            "loadavg_at_start": os.getloadavg(), "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu_model": cpu_model, "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def print_report(out: dict) -> None:
    m = out["machine"]
    print(f"\n## nbparrot benchmark ({'quick' if out.get('quick') else 'full'}): Python {m['python']}, {m['cpus']} CPUs "
          f"({m['cpu_model']}), server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}\n")
    if out["throughput"]:
        print(f"### Throughput / client overhead (server latency {TP_LATENCY_MS:.0f} ms, "
              f"theory = N × {TP_LATENCY_MS / 1000:g} s / concurrency; 'bound by' = the largest of theory, "
              "client CPU s and server CPU s)\n")
        print(throughput_table(out["throughput"]) + "\n")
    if out["limits"]:
        print("### Rate limits (rpm 3000, tpm 200000, latency 200 ms + U(0,100) + 2 ms × 32–64 tokens)\n")
        print(limits_table(out["limits"]) + "\n")
    print("### Targets\n")
    print(targets(out["throughput"], out["limits"]) + "\n")


def parent_main(ns: argparse.Namespace) -> None:
    if ns.report:
        print_report(json.loads(Path(ns.report).read_text()))
        return
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs; server and client will share a core", file=sys.stderr)
    if ns.quick:
        ns_list, concs, rl_rows = (2_000,), (256,), 600
    else:
        ns_list = tuple(ns.ns) if ns.ns else TP_NS
        concs = tuple(ns.concs) if ns.concs else TP_CONCS
        rl_rows = ns.limit_rows or RL_ROWS
    clients = ns.clients or list(DEFAULT_CLIENTS)
    cells = [(n, c, client) for n in ns_list for c in concs for client in clients]
    started = time.time()
    out: dict[str, Any] = {"machine": machine(), "quick": ns.quick, "throughput": [], "limits": []}
    profile_dir = Path(ns.profile_dir) if ns.profile_dir else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nbparrot-bench-") as tmpdir:
        tmp = Path(tmpdir)
        if ns.part in ("all", "throughput"):
            out["throughput"] = run_throughput(cells, max(1, ns.repeat), tmp, profile_dir)
        if ns.part in ("all", "limits"):
            out["limits"] = run_limits(rl_rows, RL_BURSTS, tmp)
    out["total_seconds"] = time.time() - started
    print_report(out)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps(out, indent=1))
        print(f"results written to {ns.out} ({out['total_seconds']:.0f} s in all)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subset for a sanity check")
    parser.add_argument("--out", default=str(HERE / "results.json"), help="JSON results file ('' = none)")
    parser.add_argument("--part", choices=("all", "throughput", "limits"), default="all")
    parser.add_argument("--ns", type=int, nargs="+", help="row counts of part 1 (default 5000 20000)")
    parser.add_argument("--concs", type=int, nargs="+", help="concurrencies of part 1 (default 64 256 1024)")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS,
                        help="part-1 clients (default: nbparrot sdk aiohttp; aiohttp = raw reference floor)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per part-1 cell, interleaved; tables show the fastest (default 1)")
    parser.add_argument("--limit-rows", type=int, help="rows of part 2 (default 2000)")
    parser.add_argument("--report", metavar="RESULTS_JSON", help="print the tables of an earlier run and exit")
    parser.add_argument("--profile-dir", help="write a cProfile dump of each part-1 request phase here")
    # worker flags (internal)
    parser.add_argument("--worker", choices=("throughput", "limits"), help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--base-url", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=TP_DEADLINE, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=CLIENT_CPU, help=argparse.SUPPRESS)
    parser.add_argument("--profile", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.worker:
        if not (ns.base_url or "").startswith(("http://127.0.0.1:", "http://localhost:")):
            parser.error("workers only talk to the loopback mock server")
        worker_main(ns)
    else:
        parent_main(ns)


if __name__ == "__main__":
    main()
