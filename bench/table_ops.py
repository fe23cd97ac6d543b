"""Requests and tokens of the table operators (``topk``, ``join``, ``agg``) on the bundled server, and
LOTUS's ``sem_topk`` / ``sem_join`` on the same data and the same server when a LOTUS venv is given.

    .venv/bin/python bench/table_ops.py                                  # nbparrot only (~1 min)
    .venv/bin/python bench/table_ops.py --lotus build/lotus-venv/bin/python --out bench/table_ops.json

The server (``ServerProcess``, latency 20 ms) decides by the markers of ``nbparrot/server/table.py``:
each item carries ``<<score:N>>`` (its true merit; a 0-100 score request gets ``N // 10``, a
comparison of two items the one with the higher N) and each join row ``<<key:K>>`` (a pair is
true when both rows carry the same key). So every figure comes with a check against the truth.

- **topk**: 200 rows, K = 5, merits a random sample of 0..999 (seed 0): requests, prompt and
  completion tokens (the server's counts), passes, and whether the result is the true top 5.
- **join**: 40 x 30 rows with 25 true pairs: every pair (1,200 requests), and ``candidates=3``
  (``mock-embed`` embeddings first, then 120 pairs): requests, tokens, pairs found of the 25.
- **agg**: 10,000 rows in 3 groups (~90 characters a row), context 128,000 / 16,385 / 4,096 tokens
  (``context_tokens=``), ``max_tokens`` 256: requests per level (no markers: 16-token answers).

Each run uses a fresh cache directory (nothing comes from the cache). ``--lotus PY`` runs
``bench/lotus_side.py`` with that interpreter (a separate venv with ``lotus-ai``; never the
project's) against the same server, data and truth.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

KEY = "sk-bench-table-ops"
TOPICS = ["apple banana cherry", "river mountain lake", "piano violin drum", "python rust golang", "soccer tennis golf"]


def topk_data(n: int = 200, seed: int = 0) -> tuple[list[str], list[int]]:
    merits = random.Random(seed).sample(range(1000), n)
    return [f"abstract {i}: a study of {TOPICS[i % 5]} <<score:{m}>>" for i, m in enumerate(merits)], merits


def join_data(n: int = 40, m: int = 30, true: int = 25) -> tuple[list[str], list[str], set]:
    left = [f"<<key:k{i}>> {TOPICS[i % 5]} note {i}" for i in range(n)]
    keys = [f"k{(j * 3) % n}" if j < true else f"x{j}" for j in range(m)]
    right = [f"<<key:{k}>> {TOPICS[int(k[1:]) % 5] if k[0] == 'k' else TOPICS[j % 5]} card {j}"
             for j, k in enumerate(keys)]
    pairs = {(i, j) for i in range(n) for j, k in enumerate(keys) if k == f"k{i}"}
    return left, right, pairs


def delta(server: Any, before: dict) -> dict:
    now = server.stats()
    return {"requests": now["requests"] - before["requests"] - (now["embedding_requests"] - before["embedding_requests"]),
            "embedding_requests": now["embedding_requests"] - before["embedding_requests"],
            "prompt_tokens": now["prompt_tokens"] - before["prompt_tokens"],
            "completion_tokens": now["completion_tokens"] - before["completion_tokens"],
            "embedding_tokens": now["embedding_tokens"] - before["embedding_tokens"]}


def nbparrot_side(server: Any) -> dict:
    import pandas as pd

    import nbparrot  # noqa: F401 - registers df.llm

    out: dict = {}
    base = {"base_url": server.base_url, "api_key": KEY, "model": "mock", "progress": False}

    def fresh() -> dict:
        return {**base, "cache_dir": tempfile.mkdtemp(prefix="nbp-bench-")}

    texts, merits = topk_data()
    df = pd.DataFrame({"text": texts})
    before, started = server.stats(), time.perf_counter()
    run = df.llm.topk("the most exciting {text}", 5, **fresh())
    top = run.result()
    truth = sorted(range(len(merits)), key=lambda i: -merits[i])[:5]
    out["topk"] = {**delta(server, before), "seconds": round(time.perf_counter() - started, 2),
                   "passes": [(p.label, p.progress.requests) for p in run.passes],
                   "estimate": str(run.estimate), "correct": top.index.tolist() == truth}

    left, right, pairs = join_data()
    lf, rf = pd.DataFrame({"text": left}), pd.DataFrame({"text": right})
    for name, extra in (("join_all", {}), ("join_candidates_3", {"candidates": 3, "embed_model": "mock-embed"})):
        before, started = server.stats(), time.perf_counter()
        run = lf.llm.join(rf, "{left.text} is about the same thing as {right.text}", **extra, **fresh())
        got = run.result()
        found = {(int(a.split("note ")[1]), int(b.split("card ")[1])) for a, b in zip(got.text_left, got.text_right)}
        out[name] = {**delta(server, before), "seconds": round(time.perf_counter() - started, 2),
                     "estimate": str(run.estimate), "true_pairs": len(pairs), "found": len(found & pairs),
                     "false": len(found - pairs)}

    rows = 10_000
    frame = pd.DataFrame({"group": [f"g{i % 3}" for i in range(rows)],
                          "review": [f"review {i}: the {TOPICS[i % 5]} was fine, would buy again, shipping ok"
                                     for i in range(rows)]})
    for context in (128_000, 16_385, 4_096):
        before, started = server.stats(), time.perf_counter()
        run = frame.llm.agg("What do these {review}s praise most?", by="group", context_tokens=context, **fresh())
        run.result()
        out[f"agg_10k_3groups_ctx{context}"] = {
            **delta(server, before), "seconds": round(time.perf_counter() - started, 2),
            "levels": [(p.label, p.progress.requests) for p in run.passes], "estimate": str(run.estimate)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lotus", help="python of a venv with lotus-ai (runs bench/lotus_side.py)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    from nbparrot.server import ServerProcess

    figures: dict = {}
    with ServerProcess(latency_ms=20) as server:
        figures["nbparrot"] = nbparrot_side(server)
        if args.lotus:
            before = server.stats()
            env = {**os.environ, "BENCH_BASE_URL": server.base_url, "BENCH_KEY": KEY}
            done = subprocess.run([args.lotus, str(HERE / "lotus_side.py")], env=env, capture_output=True, text=True,
                                  timeout=1200)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
            lotus = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-500:]}
            lotus["server_total"] = delta(server, before)
            figures["lotus"] = lotus
    print(json.dumps(figures, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
