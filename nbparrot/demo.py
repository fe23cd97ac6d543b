"""``python -m nbparrot demo``: a whole batch on the bundled server, nothing spent.

Starts the bundled OpenAI-compatible server on 127.0.0.1 (with latency, a rate limit and a
few injected faults, as a real endpoint has), maps a template over ~200 sample reviews with
a text progress line, and prints the result table, tokens and cost.
"""

from __future__ import annotations

import sys

__all__ = ["sample_reviews", "main"]

_PRODUCTS = ["kettle", "headphones", "backpack", "desk lamp", "running shoes", "coffee grinder", "phone case",
             "blender", "keyboard", "tent"]
_OPINIONS = ["works exactly as described and arrived early", "broke after two weeks of light use",
             "is fine for the price but feels flimsy", "is the best purchase I made this year",
             "was noisy, and support never answered my emails", "does the job; nothing more, nothing less",
             "looks great but the instructions were useless", "exceeded my expectations in every way"]


def sample_reviews(n: int = 200):
    """A deterministic DataFrame of ``n`` short product reviews."""
    import pandas as pd

    rows = [{"product": _PRODUCTS[i % len(_PRODUCTS)],
             "review": f"The {_PRODUCTS[i % len(_PRODUCTS)]} {_OPINIONS[(i * 3) % len(_OPINIONS)]} (order {1000 + i})."}
            for i in range(n)]
    return pd.DataFrame(rows, index=pd.RangeIndex(n, name="review_id"))


def main(rows: int = 200) -> int:
    import pandas as pd

    import nbparrot
    from nbparrot.server import ServerProcess

    print("nbparrot demo: starting the bundled OpenAI-compatible server on 127.0.0.1 "
          "(50-150 ms latency, 3,000 RPM / 200,000 TPM, 2% server errors)", flush=True)
    with ServerProcess(latency_ms=50, jitter_ms=100, rpm=3000, tpm=200_000, p500=0.02,
                       completion_tokens=8, completion_tokens_max=24, seed=7, api_key="sk-demo-key") as server:
        df = sample_reviews(rows)
        print(f"mapping a template over {len(df)} rows of sample reviews ...", flush=True)
        run = nbparrot.map(df, "Classify the sentiment of this {product} review as positive, negative or mixed: {review}",
                           model="gpt-4o-mini", base_url=server.base_url, api_key="sk-demo-key",
                           max_tokens=32, backoff=0.2, cache="off")
        df["answer"] = run.result()
        stats = server.stats()
    with pd.option_context("display.max_colwidth", 60, "display.width", 160):
        print()
        print(df.head(10).to_string())
    usage = run.usage["gpt-4o-mini"]
    print()
    print(f"rows answered: {run.progress.done}/{len(df)}   failed: {run.progress.failed}   "
          f"requests sent: {stats['requests']} (retries after injected 500s: {stats['requests'] - len(df)})")
    print(f"tokens: {usage['prompt_tokens']:,} prompt + {usage['completion_tokens']:,} completion   "
          f"cost at gpt-4o-mini list prices: ${run.cost:.4f}")
    if len(run.errors):
        print(run.errors.to_string())
    return 0 if run.status == "finished" and run.progress.done == len(df) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
