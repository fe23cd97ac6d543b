"""``python -m nbparrot demo``: a whole batch on the bundled server, nothing spent.

Starts the bundled OpenAI-compatible server on 127.0.0.1 (with latency, a rate limit and a
few injected faults, as a real endpoint has), maps a template over ~200 sample reviews with
a text progress line, and prints the template, the result table (80 columns wide), tokens and
cost, saying that the bundled server's answers are placeholder text.
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


TEMPLATE = "Classify the sentiment of this {product} review as positive, negative or mixed: {review}"
WIDTH = 80  # every line the demo prints fits a plain terminal


def main(rows: int = 200) -> int:
    import textwrap

    import nbparrot
    from nbparrot.server import ServerProcess

    def say(text: str, indent: str = "") -> None:
        print(textwrap.fill(text, WIDTH, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False),
              flush=True)

    say("nbparrot demo: starting the bundled OpenAI-compatible server on 127.0.0.1 (50-150 ms latency, "
        "3,000 RPM / 200,000 TPM, 2% server errors); nothing leaves this machine.")
    with ServerProcess(latency_ms=50, jitter_ms=100, rpm=3000, tpm=200_000, p500=0.02,
                       completion_tokens=8, completion_tokens_max=24, seed=7, api_key="sk-demo-key") as server:
        df = sample_reviews(rows)
        say(f"mapping this template over {len(df)} rows of sample reviews:")
        say(TEMPLATE, indent="    ")
        run = nbparrot.map(df, TEMPLATE, model="gpt-4o-mini", base_url=server.base_url, api_key="sk-demo-key",
                           max_tokens=32, backoff=0.2, cache="off")
        df["answer"] = run.result()
        stats = server.stats()
    print()
    say("The answers are placeholder text, not a model's: the bundled server answers with a tag of the "
        "prompt ([hash#choice]), the prompt's start and lorem ipsum, so each answer can be checked against "
        "its row. Pass base_url= (and api_key=) of a real endpoint for real answers.")
    print()
    print(_table(df.head(10), {"review": 30, "answer": 36}))
    usage = run.usage["gpt-4o-mini"]
    print()
    print(f"rows answered: {run.progress.done}/{len(df)}   failed: {run.progress.failed}")
    print(f"requests sent: {stats['requests']} (retries after injected 500s: {stats['requests'] - len(df)})")
    print(f"tokens: {usage['prompt_tokens']:,} prompt + {usage['completion_tokens']:,} completion")
    print(f"cost at gpt-4o-mini list prices: ${run.cost:.4f}")
    if len(run.errors):
        print(_table(run.errors[["status", "error"]], {"error": 56}))
    return 0 if run.status == "finished" and run.progress.done == len(df) else 1


def _table(frame, widths: dict[str, int]) -> str:
    """``frame``'s ``widths`` columns as text, each cell cut to its width (an ellipsis where cut)."""
    def cut(width: int):
        return lambda value: (str(value) if len(str(value)) <= width else str(value)[: width - 1] + "…").ljust(width)

    shown = frame[[c for c in frame.columns if c in widths]]
    return shown.to_string(formatters={c: cut(w) for c, w in widths.items() if c in shown.columns},
                           justify="left")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
