"""Benchmark: a 2,000-row cascade filter on the bundled server's weak/strong pair (loopback only).

    .venv/bin/python bench/cascade.py                     # ~1 min on 2 shared cores
    .venv/bin/python bench/cascade.py --rows 2000 --out bench/cascade.json

``mock-weak`` follows the server's decision rule with confidence 0.90-0.99, except on rows whose
text carries ``<<hard>>``: there it gives the opposite answer with confidence 0.50-0.60;
``mock-strong`` always follows the rule (nbparrot/server/decisions.py). A share of the rows
(``--hard``) is marked hard. The truth is the strong model's answer, from the server's rule
(``expected_decision(text, "mock-strong")``), so agreement with strong-only is exact, not sampled.

Per case: ``nbparrot.filter(df, "{text}", cascade=("mock-weak", "mock-strong"), target=T)`` in a
script (runs to completion), server latency 20 ms, default concurrency, prices set to
gpt-4.1-nano's for mock-weak and gpt-4.1's for mock-strong (USD per 1M tokens: 0.10 / 0.40 and
2.00 / 8.00). Reported: requests per model (counted by the server), strong requests as a share
of the rows (the sample included), agreement with the strong model alone (exact) and the
cascade's own estimate and bound, cost against strong-only (list price of every answer), wall
time; then the same call again (answers from the cache: requests sent). The strong model alone
and the weak model alone are not run: their agreement is the rule's, and strong-only's cost is
the cascade's strong cost per row times the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pandas as pd  # noqa: E402

import nbparrot  # noqa: E402
from nbparrot.server import HARD_MARKER, STRONG_MODEL, WEAK_MODEL, ServerProcess, expected_decision  # noqa: E402

KEY = "sk-bench-cascade"


def frame(rows: int, hard: float) -> pd.DataFrame:
    """Support-ticket-like texts; ``hard`` of them (spread evenly) carry the marker."""
    texts = [f"ticket {i}: the customer writes about order {i * 7919 % 10007}"
             + (f" {HARD_MARKER}" if (i * 37) % 100 < hard * 100 else "") for i in range(rows)]
    return pd.DataFrame({"text": texts})


def case(server: ServerProcess, rows: int, hard: float, target: float) -> dict:
    df = frame(rows, hard)
    opts = {"base_url": server.base_url, "api_key": KEY, "progress": False, "cascade": (WEAK_MODEL, STRONG_MODEL),
            "target": target, "mask": True}
    before = dict(server.stats()["models"])
    started = time.perf_counter()
    run = nbparrot.filter(df, "{text}", **opts)
    mask = run.result()
    wall = time.perf_counter() - started
    after = server.stats()["models"]
    sent = {m: after.get(m, 0) - before.get(m, 0) for m in (WEAK_MODEL, STRONG_MODEL)}
    truth = [expected_decision(t, STRONG_MODEL) for t in df.text]
    weak = [expected_decision(t, WEAK_MODEL) for t in df.text]
    report = run.cascade
    started = time.perf_counter()
    again = nbparrot.filter(df, "{text}", **opts)
    again.result()
    rerun_wall = time.perf_counter() - started
    rerun = sum(server.stats()["models"].values()) - sum(after.values())
    return {
        "rows": rows, "hard_share": hard, "target": target, "sample": report["sample"],
        "requests": sent, "strong_share_of_rows": sent[STRONG_MODEL] / rows,
        "agreement": sum(bool(m) == t for m, t in zip(mask, truth)) / rows,
        "weak_alone_agreement": sum(w == t for w, t in zip(weak, truth)) / rows,
        "estimated_agreement": report["agreement"], "agreement_bound": report["agreement_bound"],
        "thresholds": {str(k): v for k, v in report["thresholds"].items()},
        "cost": report["cost"], "strong_only_cost": report["strong_only_cost"], "cost_ratio": report["cost_ratio"],
        "wall_s": wall, "rerun_requests": rerun, "rerun_wall_s": rerun_wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=HERE / "cascade.json")
    args = parser.parse_args()
    nbparrot.set_price(WEAK_MODEL, input=0.10, output=0.40)
    nbparrot.set_price(STRONG_MODEL, input=2.00, output=8.00)
    cases = [(0.2, 0.9), (0.3, 0.9), (0.2, 0.95), (0.1, 0.9)]
    results = []
    with tempfile.TemporaryDirectory() as cache, ServerProcess(latency_ms=20) as server:
        for number, (hard, target) in enumerate(cases):
            os.environ["NBPARROT_CACHE_DIR"] = f"{cache}/{number}"  # a fresh cache: the first call sends everything
            result = case(server, args.rows, hard, target)
            results.append(result)
            print(f"hard {hard:.0%} target {target:.0%}: requests {result['requests']}, strong = "
                  f"{result['strong_share_of_rows']:.1%} of rows, agreement {result['agreement']:.3f} "
                  f"(weak alone {result['weak_alone_agreement']:.3f}; est. {result['estimated_agreement']:.3f}, "
                  f"bound {result['agreement_bound']:.3f}), cost {result['cost_ratio']:.1%} of strong-only, "
                  f"{result['wall_s']:.1f}s; rerun {result['rerun_requests']} requests, {result['rerun_wall_s']:.2f}s",
                  flush=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                    "date": time.strftime("%Y-%m-%d"), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
