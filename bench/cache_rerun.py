"""Re-running a fully cached 100,000-row frame: how long until the result is back.

Starts the bundled server, runs ``df.llm.map`` once over N rows (filling a fresh cache
directory), then again: the second run sends nothing and is timed end to end (rendering,
request keys, the bulk cache lookup, shaping the result). Prints one line per run, with the
CPU time of this process (all its threads, the cache writer's included; not the server's),
which a busy machine disturbs less than the wall time.

    .venv/bin/python bench/cache_rerun.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    os.environ["NBPARROT_CACHE_DIR"] = tempfile.mkdtemp(prefix="nbparrot-cache-bench-")
    import pandas as pd

    import nbparrot
    from nbparrot.server import ServerProcess

    df = pd.DataFrame({"text": [f"review number {i}: the kettle works as described" for i in range(args.rows)]})
    with ServerProcess() as server:
        for label in ("first run (all sent)", "rerun (all cached)"):
            server.reset()
            t0, cpu0 = time.perf_counter(), time.process_time()
            run = df.llm.map("Classify the sentiment: {text}", base_url=server.base_url, api_key="sk-bench",
                             concurrency=256, progress=False)
            result = run.result()
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            print(f"{label}: {args.rows:,} rows in {seconds:.2f} s ({cpu:.2f} s CPU in this process), "
                  f"{server.stats()['requests']:,} requests sent, "
                  f"{run.progress.cached:,} from the cache, {int(result.notna().sum()):,} answers")


if __name__ == "__main__":
    main()
