"""LOTUS's ``sem_topk`` and ``sem_join`` on bench/table_ops.py's data, against the same bundled server.

Run by ``bench/table_ops.py --lotus PY`` with the interpreter of a separate venv holding
``lotus-ai`` (never the project's venv): ``BENCH_BASE_URL`` and ``BENCH_KEY`` name the server. LOTUS
talks to it through litellm as an OpenAI-compatible endpoint (model ``openai/mock``, embeddings
``openai/mock-embed`` via ``LiteLLMRM`` and a FAISS index). The server answers LOTUS's plain-text
prompts by the same markers (``Document N`` for a comparison, ``True`` / ``False`` for a pair; see
nbparrot/server/table.py), so each figure is checked against the same truth. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from table_ops import join_data, topk_data  # noqa: E402  (data only: no nbparrot import)

BASE, KEY = os.environ["BENCH_BASE_URL"], os.environ["BENCH_KEY"]
os.environ.setdefault("OPENAI_API_KEY", KEY)
os.environ.setdefault("OPENAI_API_BASE", BASE)
os.environ.setdefault("OPENAI_BASE_URL", BASE)


def stats() -> dict:
    with urllib.request.urlopen(BASE + "/stats", timeout=30) as answer:
        return json.loads(answer.read())


def measured(before: dict, started: float) -> dict:
    now = stats()
    embed = now["embedding_requests"] - before["embedding_requests"]
    return {"requests": now["requests"] - before["requests"] - embed, "embedding_requests": embed,
            "prompt_tokens": now["prompt_tokens"] - before["prompt_tokens"],
            "completion_tokens": now["completion_tokens"] - before["completion_tokens"],
            "seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    import pandas as pd

    import lotus
    from lotus.models import LM, LiteLLMRM
    from lotus.vector_store import FaissVS

    lm = LM(model="openai/mock", api_base=BASE, api_key=KEY, max_batch_size=64)
    rm = LiteLLMRM(model="openai/mock-embed")
    lotus.settings.configure(lm=lm, rm=rm, vs=FaissVS(), enable_cache=False)
    out: dict = {"lotus_version": getattr(lotus, "__version__", "1.2.4")}

    texts, merits = topk_data()
    df = pd.DataFrame({"text": texts})
    truth = sorted(range(len(merits)), key=lambda i: -merits[i])[:5]
    for method in ("quick", "heap"):  # quickselect's pivots are random: three runs give a range
        runs = []
        for _ in range(3 if method == "quick" else 1):
            before, started = stats(), time.perf_counter()
            top = df.sem_topk("Which {text} is most exciting?", K=5, method=method)
            ranked = [int(t.split(":")[0].split()[1]) for t in top.text]  # "abstract N: ..." (LOTUS resets the index)
            runs.append({**measured(before, started), "correct": ranked == truth})
        out[f"sem_topk_{method}"] = runs

    left, right, pairs = join_data()
    lf, rf = pd.DataFrame({"text": left}), pd.DataFrame({"text": right})

    def found(joined: pd.DataFrame, left_col: str, right_col: str) -> set:
        return {(int(a.split("note ")[1]), int(b.split("card ")[1]))
                for a, b in zip(joined[left_col], joined[right_col])}

    before, started = stats(), time.perf_counter()
    joined = lf.sem_join(rf, "{text:left} is about the same thing as {text:right}")
    got = found(joined, *_pair_columns(joined))
    out["sem_join_nested"] = {**measured(before, started), "true_pairs": len(pairs), "found": len(got & pairs),
                              "false": len(got - pairs)}

    before, started = stats(), time.perf_counter()
    index_dir = tempfile.mkdtemp(prefix="lotus-idx-")
    right_indexed = pd.DataFrame({"card": right}).sem_index("card", index_dir)
    near = pd.DataFrame({"note": left}).sem_sim_join(right_indexed, left_on="note", right_on="card", K=3)
    kept = near.sem_filter("{note} is about the same thing as {card}")
    got = found(kept, "note", "card")
    out["sim_join_k3_then_filter"] = {**measured(before, started), "true_pairs": len(pairs),
                                      "found": len(got & pairs), "false": len(got - pairs)}
    print(json.dumps(out))


def _pair_columns(joined) -> tuple[str, str]:
    """The left and right text columns of a sem_join result (LOTUS suffixes the clashing name)."""
    columns = [c for c in joined.columns if str(c).startswith("text")]
    return columns[0], columns[1]


if __name__ == "__main__":
    main()
