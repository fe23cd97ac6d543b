"""Scoring prompt variants against a labelled column (``nbparrot.compare``, ``%%llm --expect``):
per-variant accuracy checked against the bundled server's documented decision rules."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbparrot
from nbparrot.errors import ConfigError, TemplateError
from nbparrot.operators.scoring import JUDGE, scores_html
from nbparrot.server import expected_decision, expected_label

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import KernelHarness, kernel_python, wait_until  # noqa: E402

KEY = "sk-scoring-test-0123456789"
LABELS = ["billing", "shipping", "returns", "other"]
VARIANTS = ["{text}", "A question about shipping: {text}"]


def tickets(n: int) -> pd.DataFrame:
    texts = [f"my billing is wrong, case {i}" if i % 3 == 0 else f"where is my parcel, case {i}" for i in range(n)]
    labels = ["billing" if i % 3 == 0 else "shipping" for i in range(n)]
    return pd.DataFrame({"text": texts, "label": labels}, index=[f"t{i}" for i in range(n)])


def opts(server) -> dict:
    return {"base_url": server.base_url, "api_key": KEY, "model": "mock", "progress": False}


def accuracy(df: pd.DataFrame, template: str) -> float:
    """The share of rows whose label, by the server's rule on the rendered prompt, is the expected one."""
    return float(np.mean([expected_label(template.format(text=t), LABELS) == e for t, e in zip(df.text, df.label)]))


def test_classify_variants_scored_by_exact_match(make_server):
    server = make_server()
    df = tickets(30)
    run = nbparrot.compare(df, VARIANTS, expect="label", task="classify", labels=LABELS, **opts(server))
    rows = run.result()
    scores = run.scores
    assert scores["accuracy"].tolist() == pytest.approx([accuracy(df, v) for v in VARIANTS])
    assert scores["accuracy"].iloc[0] < scores["accuracy"].iloc[1]  # the two variants really differ
    assert scores["scored"].tolist() == [30, 30] and scores["answered"].tolist() == [30, 30]
    assert (scores["mean_latency"] > 0).all() and scores["template"].tolist() == VARIANTS
    # the rows where the variants disagree come first
    flags = rows["disagree"].tolist()
    assert flags == sorted(flags, reverse=True) and 0 < sum(flags) < 30
    assert set(rows.index) == set(df.index)
    html = scores_html(run)
    assert "nbparrot-scores" in html and html.count("nbparrot-disagree") == sum(flags)


def test_filter_variants_with_yes_no_labels_and_free_text_with_a_judge(make_server):
    server = make_server()
    df = pd.DataFrame({"text": [f"row {i} <<yes>>" if i % 2 else f"row {i}" for i in range(20)],
                       "keep": ["yes" if i % 2 else "no" for i in range(20)]})
    run = nbparrot.compare(df, ["{text}", "Really? {text}"], expect="keep", task="filter", **opts(server))
    run.result()
    truth = [[expected_decision(v.format(text=t)) == (k == "yes") for t, k in zip(df.text, df.keep)]
             for v in ("{text}", "Really? {text}")]
    assert run.scores["correct"].tolist() == [sum(t) for t in truth]
    # free text: the judge (a yes/no decision on the same runtime) gives the verdicts
    free = nbparrot.compare(df, ["Say {text}", "Shout {text}"], expect="keep", sample=8, **opts(server))
    rows = free.result()
    assert len(rows) == 8 and free.usage["mock"]["requests"] == 16 + 16  # the answers, then one judge call each
    for v in (1, 2):
        verdicts = [expected_decision(JUDGE.format(answer=a, expected=e, prompt=""))
                    for a, e in zip(rows[f"answer {v}"], rows["expected"])]
        assert rows[f"right {v}"].tolist() == verdicts
        assert free.scores.loc[v, "correct"] == sum(verdicts)
    requests = server.stats()["requests"]
    again = nbparrot.compare(df, ["Say {text}", "Shout {text}"], expect="keep", sample=8, **opts(server))
    assert again.result().equals(rows) and again.estimate.requests == 0  # the judge planned through the cache too
    assert server.stats()["requests"] == requests  # a rerun, judge included, comes from the cache


@pytest.fixture(scope="module")
def idle_server():
    """One server for the bad-input cases: none of them may send anything, so its count stays 0."""
    from nbparrot.server import ServerProcess

    with ServerProcess() as server:
        yield server


@pytest.mark.parametrize("kwargs, words", [
    ({"expect": "nope"}, "no such column"),
    ({"expect": "label", "task": "filter"}, "not true/false"),
    ({"expect": "label", "task": "classify", "labels": ["a", "b"]}, "not one of the labels"),
    ({"expect": "label", "task": "classify"}, "needs labels"),
    ({"expect": "label", "judge": "Is {answer} like {nothing}?"}, "nothing"),
    ({"expect": "label", "sample": 0}, "sample"),
])
def test_bad_scoring_arguments_fail_before_any_request(idle_server, kwargs, words):
    server = idle_server
    with pytest.raises((ConfigError, TemplateError), match=words):
        nbparrot.compare(tickets(6), VARIANTS, **kwargs, **opts(server))
    assert server.stats()["requests"] == 0


@pytest.fixture
def kernel(tmp_path, make_server):
    server = make_server(latency_ms=5)
    env = {"NBPARROT_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": KEY}
    with KernelHarness(python=kernel_python(None), cwd=str(tmp_path), env=env) as k:
        k.execute(f"%load_ext nbparrot\n%config NbparrotMagics.base_url = {server.base_url!r}", check=True)
        yield k


def test_expect_in_a_kernel_gives_per_variant_accuracy(kernel):
    df = tickets(40)
    kernel.execute(f"import pandas as pd\ndf = pd.DataFrame({df.to_dict('list')!r}, index={df.index.tolist()!r})",
                   check=True)
    cell = kernel.execute(f"%%llm --over df --sample 15 --expect label --classify {','.join(LABELS)} -o scored\n"
                          f"{VARIANTS[0]}\n---\n{VARIANTS[1]}", check=True)

    def table():
        for _, m in kernel.iopub_messages():
            if m["msg_type"] == "update_display_data" and "nbparrot-scores" in m["content"]["data"].get("text/html", ""):
                return m["content"]["data"]["text/html"]
        return None

    html = wait_until(table, timeout=30, message="no scores table")
    assert cell.status == "ok" and "accuracy" in html
    sampled = kernel.eval("scored.prepared.index.tolist()")
    assert len(sampled) == 15
    expected = [accuracy(df.loc[sampled], v) for v in VARIANTS]
    assert kernel.eval("scored.scores['accuracy'].tolist()") == pytest.approx(expected)
    assert f"{expected[1]:.0%}" in html


def test_scores_cost_counts_only_answers_not_from_the_cache(make_server):
    """The scores charged cached answers at list price while run.cost said they cost nothing."""
    server = make_server()
    df, priced = tickets(12), {**opts(server), "model": "gpt-4o-mini"}
    first = nbparrot.compare(df, VARIANTS, expect="label", task="classify", labels=LABELS, **priced)
    scores = first.scores
    assert first.cost > 0 and scores["cost"].sum() == pytest.approx(first.cost)
    again = nbparrot.compare(df, VARIANTS, expect="label", task="classify", labels=LABELS, **priced)
    assert again.cost == 0 and again.scores["cost"].tolist() == [0, 0]
    assert scores["cached"].tolist() == [0, 0] and again.scores["cached"].tolist() == [12, 12]
    assert scores_html(again).count("<td>cached</td>") == 2
