"""embed / search / sim_join against the bundled server's /v1/embeddings (model mock-embed, 64 dims)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbparrot
from nbparrot.errors import BudgetExceededError, ConfigError, FatalError, TemplateError
from nbparrot.operators import embeddings as E
from nbparrot.operators.similarity import as_matrix
from nbparrot.pricing import PRICES
from nbparrot.run import session_usage
from nbparrot.server import expected_embedding

KEY = "sk-embed-test-0123456789"
MODEL = "mock-embed"


def opts(server, **more):
    return {"model": MODEL, "base_url": server.base_url, "api_key": KEY, "progress": False, **more}


def inputs(server) -> int:
    return server.stats()["embedded_inputs"]


def requests(server) -> int:
    return server.stats()["embedding_requests"]


def truth(texts, model=MODEL) -> np.ndarray:
    return np.array([expected_embedding(t, model) for t in texts], dtype=np.float32)


def words(i: int) -> str:
    topics = ("refund", "shipping", "invoice", "password", "delivery", "discount", "warranty")
    return f"customer {i} asks about {topics[i % 7]} and {topics[(i * 3) % 7]} number {i % 50}"


@pytest.fixture(autouse=True)
def _fresh_memo():
    E.clear_memo()
    yield
    E.clear_memo()


def test_vectors_are_the_servers_packed_by_2048_and_counted_in_session_usage(make_server):
    server = make_server()
    n = 5000
    df = pd.DataFrame({"text": [words(i) + f" #{i}" for i in range(n)]}, index=pd.RangeIndex(n) * 7 + 3)
    before = session_usage().get(MODEL, {}).get("prompt_tokens", 0)
    run = E.embed(df, "text", **opts(server))
    result = run.result()
    assert run.status == "finished" and run.progress.done == n
    assert isinstance(result, pd.Series) and result.name == "embedding" and result.index.equals(df.index)
    assert result.iloc[0].dtype == np.float32 and result.iloc[0].shape == (64,)
    np.testing.assert_allclose(as_matrix(result), truth(df["text"]), atol=1e-6)
    assert run.matrix().shape == (n, 64) and np.array_equal(run.matrix(), as_matrix(result))
    assert requests(server) == math.ceil(n / 2048) == run.progress.requests
    assert inputs(server) == n
    tokens = server.stats()["embedding_tokens"]
    assert run.progress.prompt_tokens == tokens
    assert session_usage()[MODEL]["prompt_tokens"] - before == tokens


def test_identical_texts_are_sent_once_and_every_row_gets_the_vector(make_server):
    server = make_server()
    texts = [f"text number {i % 37}" for i in range(1000)]
    run = E.embed(pd.DataFrame({"text": texts}), "text", **opts(server))
    result = run.result()
    assert inputs(server) == 37 and requests(server) == 1
    assert result.notna().all() and run.progress.done == 1000
    np.testing.assert_allclose(as_matrix(result), truth(texts), atol=1e-6)


def test_a_rerun_is_all_cached_and_a_template_is_its_own_text(make_server):
    server = make_server()
    df = pd.DataFrame({"title": [f"title {i}" for i in range(300)], "body": [words(i) for i in range(300)]})
    first = E.embed(df, "{title}: {body}", **opts(server)).result()
    sent = requests(server)
    again = E.embed(df, "{title}: {body}", **opts(server))
    assert requests(server) == sent and again.progress.cached == 300 and again.progress.requests == 0
    np.testing.assert_array_equal(as_matrix(again.result()), as_matrix(first))
    np.testing.assert_allclose(as_matrix(first), truth([f"{t}: {b}" for t, b in zip(df.title, df.body)]), atol=1e-6)
    # the same texts from another frame (a column holding them) are found in the cache too
    other = pd.DataFrame({"joined": [f"{t}: {b}" for t, b in zip(df.title, df.body)]})
    assert E.embed(other, "joined", **opts(server)).progress.requests == 0 and requests(server) == sent


def test_max_cost_stops_the_run_and_a_rerun_sends_only_the_rest(make_server, monkeypatch):
    server = make_server()
    monkeypatch.setitem(PRICES, MODEL, nbparrot.pricing.Price(1.0, 1.0, 0.0))  # $1 per 1M tokens
    n = 400
    df = pd.DataFrame({"text": [(words(i) + " ") * 40 for i in range(n)]})  # ~550 tokens a row
    total_tokens = sum((len(t) + 3) // 4 for t in df["text"])
    budget = total_tokens / 1e6 / 3  # a third of the whole
    with pytest.raises(BudgetExceededError) as info:  # in a script, the call raises it
        E.embed(df, "text", per_request=50, max_cost=budget, **opts(server))
    run = info.value.run
    assert run.status == "stopped" and isinstance(run.error, BudgetExceededError)
    with pytest.raises(BudgetExceededError):
        run.result()
    done = run.progress.done
    assert 0 < done < n and run.cost <= budget
    assert run.partial().notna().sum() == done
    assert set(run.errors["status"]) == {"cancelled"} and "max_cost" in run.errors["error"].iloc[0]
    sent = inputs(server)
    assert sent == done  # nothing went out that was not paid for and kept
    rest = E.embed(df, "text", **opts(server))
    assert rest.result().notna().all() and inputs(server) - sent == n - done
    assert rest.progress.cached == done


def test_missing_values_are_skipped_and_marked(make_server):
    server = make_server()
    df = pd.DataFrame({"text": ["a first text", None, float("nan"), "a fourth text", pd.NA]})
    run = E.embed(df, "text", **opts(server))
    result = run.result()
    assert result.isna().tolist() == [False, True, True, False, True]
    assert run.progress.skipped == 3 and inputs(server) == 2
    assert list(run.errors["status"]) == ["skipped"] * 3 and "missing value in 'text'" in run.errors["error"].iloc[0]
    assert np.isnan(run.matrix()[1]).all() and not np.isnan(run.matrix()[0]).any()


def test_an_overlong_or_empty_text_fails_its_row_only_before_any_request(make_server):
    server = make_server()
    texts = ["short one", "x " * 20000, "", "short two"]
    run = E.embed(pd.DataFrame({"text": texts}), "text", **opts(server))
    result = run.result()
    assert result.notna().tolist() == [True, False, False, True]
    errors = run.errors
    assert list(errors["status"]) == ["failed", "failed"] and list(errors["attempts"]) == [0, 0]
    assert "over the 8,192-token limit" in errors["error"].iloc[0] and "empty text" in errors["error"].iloc[1]
    assert inputs(server) == 2 and requests(server) == 1


def test_a_text_the_endpoint_counts_as_too_long_fails_alone_after_halving(make_server):
    """The server counts twice our estimate: a pack over its 300k tokens and a row over 8,192 are refused."""
    server = make_server(usage_scale=2.0)
    texts = [words(i) * 30 for i in range(400)]  # ~440 tokens each by our estimate
    texts[123] = "y" * 20_000  # 5,000 tokens for us, 10,000 for the server
    run = E.embed(pd.DataFrame({"text": texts}), "text", **opts(server))
    result = run.result()
    assert result.notna().sum() == 399 and result.isna().tolist().index(True) == 123
    assert "maximum context length" in run.errors["error"].iloc[0]
    assert server.stats()["status"]["400"] >= 2  # the pack and then halves of it were refused, down to the row
    np.testing.assert_allclose(as_matrix(result.drop(index=123)), truth(texts[:123] + texts[124:]), atol=1e-6)


def test_a_chat_model_is_one_clear_error_after_one_request(make_server):
    server = make_server()
    with pytest.raises(FatalError, match="embedding model") as info:
        E.embed(pd.DataFrame({"text": [f"t {i}" for i in range(5000)]}), "text", **opts(server, model="gpt-4o-mini"))
    run = info.value.run
    assert run.status == "failed" and requests(server) == 1
    message = str(run.error)
    assert "\n" not in message and "not an embedding model" in message and "/v1/embeddings" in message
    with pytest.raises(FatalError, match="embedding model"):
        run.result()


def test_an_embedding_model_given_to_map_is_one_error_after_one_request(make_server):
    server = make_server()
    with pytest.raises(FatalError) as info:
        nbparrot.map([{"t": f"row {i}"} for i in range(50)], "Say {t}", **opts(server))
    run = info.value.run
    assert run.status == "failed" and server.stats()["requests"] == 1
    assert "not a chat model" in str(run.error) and "\n" not in str(run.error)


def test_bad_arguments_fail_before_any_request(make_server):
    server = make_server()
    df = pd.DataFrame({"text": ["a", "b"], "other": [1, 2]})
    with pytest.raises(TemplateError, match="text_typo"):
        E.embed(df, "text_typo", **opts(server))
    with pytest.raises(TemplateError, match="nope"):
        E.embed(df, "{nope}", **opts(server))
    with pytest.raises(TemplateError):
        E.search(df, "q", on="missing", **opts(server))
    with pytest.raises(ConfigError, match="k must"):
        E.search(df, "q", on="text", k=0, **opts(server))
    with pytest.raises(ConfigError, match="query"):
        E.search(df, 42, on="text", **opts(server))
    with pytest.raises(ConfigError, match="query"):
        E.search(df, "", on="text", **opts(server))
    with pytest.raises(ConfigError, match="threshold"):
        E.search(df, "q", on="text", threshold=1.5, **opts(server))
    with pytest.raises(ConfigError, match="threshold"):
        E.sim_join(df, df, on="text", threshold=-2, **opts(server))
    with pytest.raises(ConfigError, match="k must"):
        E.sim_join(df, df, on="text", k=True, **opts(server))
    with pytest.raises(ConfigError, match="left_on"):
        E.sim_join(df, df, **opts(server))
    with pytest.raises(ConfigError, match="Batch API"):
        E.embed(df, "text", mode="batch", **opts(server))
    with pytest.raises(ConfigError, match="unknown option"):
        E.embed(df, "text", temperature=0.5, **opts(server))
    with pytest.raises(ConfigError, match="dimensions"):
        E.embed(df, "text", dimensions=0, **opts(server))
    with pytest.raises(ConfigError, match="meta"):
        E.sim_join(df, df, on="text", meta=True, **opts(server))
    assert server.stats()["requests"] == 0


def test_text_key_is_the_caches_request_key():
    from nbparrot.cache import request_key

    for params in ({"model": MODEL}, {"model": "text-embedding-3-small", "dimensions": 256}):
        key = E.text_key("http://127.0.0.1:1/v1/", params)
        for text in ["plain", 'quote " back \\ slash', "ünïcode 日本", "tab\tnew\nline", "\u2028", "\ud800 lone"]:
            assert key(text).hex() == request_key("http://127.0.0.1:1/v1", {**params, "input": text})


def test_meta_records_and_odd_column_names(make_server):
    server = make_server()
    df = pd.DataFrame({"review text": ["good stuff", "bad stuff", None]})
    frame = E.embed(df, "review text", meta=True, **opts(server)).result()
    assert list(frame.columns[:2]) == ["embedding", "prompt"] and frame["prompt"].tolist()[:2] == ["good stuff", "bad stuff"]
    assert frame["prompt_tokens"].sum() == server.stats()["embedding_tokens"] and frame["cached"].tolist() == [False] * 3
    records = [{"id": 1, "text": "good stuff"}, {"id": 2, "text": "other stuff"}]
    out = E.embed(records, "text", **opts(server)).result()
    assert [r["id"] for r in out] == [1, 2] and out[0]["embedding"].shape == (64,)
    assert inputs(server) == 3  # "good stuff" came from the cache the second time


def test_search_returns_the_true_top_k_and_a_second_query_sends_one_input(make_server):
    server = make_server()
    n = 3000
    df = pd.DataFrame({"text": [words(i) for i in range(n)], "n": range(n)}, index=pd.RangeIndex(n) * 2)
    matrix = truth(df["text"])
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)

    def expected(query: str, k: int) -> tuple[list, np.ndarray]:
        q = np.array(expected_embedding(query, MODEL), dtype=np.float32)
        scores = unit @ (q / np.linalg.norm(q))
        order = np.argsort(-scores, kind="stable")[:k]
        return list(df.index[order]), scores[order]

    top = E.search(df, "refund for customer 17", on="text", k=5, **opts(server)).result()
    labels, scores = expected("refund for customer 17", 5)
    assert list(top.columns) == ["text", "n", "similarity"] and len(top) == 5
    np.testing.assert_allclose(top["similarity"].to_numpy(), scores, atol=1e-5)
    assert set(top.index) == set(labels) or np.allclose(sorted(top["similarity"]), sorted(scores), atol=1e-5)
    assert top["similarity"].is_monotonic_decreasing
    sent = inputs(server)
    assert sent == len(set(df["text"])) + 1

    second = E.search(df, "password reset", on="text", k=3, **opts(server))  # in memory: only the query
    np.testing.assert_allclose(second.result()["similarity"].to_numpy(), expected("password reset", 3)[1], atol=1e-5)
    assert inputs(server) - sent == 1 and second.progress.total == 1

    E.clear_memo()  # a new session: the frame's vectors come from the cache, 0 requests for them
    third = E.search(df, "warranty delivery", on="text", k=4, threshold=0.2, **opts(server))
    got = third.result()
    assert inputs(server) - sent == 2 and third.progress.cached == n and third.progress.requests == 1
    want = expected("warranty delivery", 4)[1]
    np.testing.assert_allclose(got["similarity"].to_numpy(), want[want >= 0.2], atol=1e-5)

    df.loc[df.index[0], "text"] = "a brand new text"  # the frame changed: the memory is not used for it
    fourth = E.search(df, "password reset", on="text", k=1, **opts(server)).result()
    assert fourth.index[0] == expected("password reset", 1)[0][0] or len(fourth) == 1
    assert inputs(server) - sent == 3  # the new row only (the query is cached)


def test_search_threshold_can_leave_nothing_and_k_larger_than_the_frame(make_server):
    server = make_server()
    df = pd.DataFrame({"text": ["apples and pears", "pears and plums", "engines"]})
    assert len(E.search(df, "pears", on="text", k=10, **opts(server)).result()) == 3
    assert E.search(df, "pears", on="text", k=10, threshold=0.99, **opts(server)).result().empty


def _brute_join(left, right, k, threshold):
    a, b = truth(left), truth(right)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    sims = a @ b.T
    pairs = []
    for i in range(len(left)):
        order = np.argsort(-sims[i], kind="stable")[:k]
        pairs += [(i, int(j), float(sims[i, j])) for j in order if threshold is None or sims[i, j] >= threshold]
    return pairs


@pytest.mark.parametrize("k, threshold", [(1, None), (3, 0.3)])
def test_sim_join_equals_a_brute_force_numpy_join(make_server, k, threshold):
    server = make_server()
    left = pd.DataFrame({"text": [words(i) for i in range(0, 120, 3)], "id": range(40)})
    right = pd.DataFrame({"name": [words(i * 7 + 1) for i in range(60)], "id": range(100, 160)})
    joined = E.sim_join(left, right, left_on="text", right_on="name", k=k, threshold=threshold, **opts(server)).result()
    assert list(joined.columns) == ["text", "id_left", "name", "id_right", "similarity"]
    assert joined.index.equals(pd.RangeIndex(len(joined)))
    want = _brute_join(list(left["text"]), list(right["name"]), k, threshold)
    assert len(joined) == len(want)
    assert joined["id_left"].tolist() == [left["id"][i] for i, _, _ in want]  # left rows in order
    np.testing.assert_allclose(joined["similarity"].to_numpy(), [s for _, _, s in want], atol=1e-5)
    for (_, j, s), got_id, got_s in zip(want, joined["id_right"], joined["similarity"]):
        assert got_id == right["id"][j] or abs(got_s - s) < 1e-5  # ties may pick either
    for _, group in joined.groupby("id_left", sort=False):
        assert group["similarity"].is_monotonic_decreasing
    if threshold is not None:
        assert (joined["similarity"] >= threshold).all()


def test_sim_join_sends_each_text_once_and_takes_suffixes(make_server):
    server = make_server()
    df = pd.DataFrame({"text": [words(i) for i in range(50)], "similarity": range(50)})
    joined = E.sim_join(df, df, on="text", k=2, suffixes=("_a", "_b"), **opts(server)).result()
    assert inputs(server) == 50
    assert list(joined.columns) == ["text_a", "similarity_a", "text_b", "similarity_b", "similarity"]
    first = joined.groupby("similarity_a").head(1)
    np.testing.assert_allclose(first["similarity"], 1.0, atol=1e-5)  # each row's best match is itself


KERNEL_CODE = """
import asyncio, json
import pandas as pd
from nbparrot.operators import embeddings as E
df = pd.DataFrame({{'text': [f'kernel row {{i}} text' for i in range({rows})]}})
run = E.embed(df, 'text', model='mock-embed', base_url={url!r}, api_key='sk-kernel-embed-000000', per_request=200,
              concurrency=2)
print(run.done())
"""


def test_in_a_kernel_the_cell_returns_at_once_cancel_keeps_rows_and_await_gives_the_rest(make_server, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import KernelHarness, wait_until

    server = make_server(latency_ms=150)
    rows = 20_000  # 100 packs, 2 at a time: ~8 s
    with KernelHarness(cwd=str(tmp_path), env={"NBPARROT_CACHE_DIR": str(tmp_path / "cache")}) as kernel:
        assert kernel.execute(KERNEL_CODE.format(rows=rows, url=server.base_url), check=True).stdout == "False\n"
        kernel.wait_for_widget("FloatProgress")
        wait_until(lambda: kernel.eval("run.progress.done") >= 600, timeout=30, message="no vectors landed")
        kernel.execute("run.cancel()", check=True)
        report = json.loads(kernel.execute(
            "await asyncio.wait({run._task})\n"
            "part = run.partial()\n"
            "ok = [o.status for o in run.outcomes]\n"
            "print(json.dumps({'status': run.status, 'done': run.progress.done, 'cancelled': ok.count('cancelled'),"
            " 'have': int(part.notna().sum()), 'shape': list(part.dropna().iloc[0].shape)}))",
            check=True, timeout=30).stdout)
        assert report["status"] == "cancelled" and 0 < report["done"] < rows
        assert report["have"] == report["done"] and report["done"] + report["cancelled"] == rows
        assert report["shape"] == [64]
        sent = inputs(server)
        assert sent >= report["done"]
        kernel.execute("again = E.embed(df, 'text', model='mock-embed', base_url=" + repr(server.base_url)
                       + ", api_key='sk-kernel-embed-000000', concurrency=8)", check=True)
        out = kernel.execute("res = await again\nprint(int(res.notna().sum()), again.progress.cached, again.status)",
                             check=True, timeout=60).stdout.split()
        assert out == [str(rows), str(report["done"]), "finished"]
        assert inputs(server) - sent == rows - report["done"]  # the rerun sent only the rest


def test_dask_embed_partition_wise_when_the_accessor_has_it(make_server):
    """``ddf.llm.embed`` (added to nbparrot/dask.py with docs/embed-lead-additions.patch): a lazy object
    Series, one run per partition, the same vectors; skipped until the accessor has the method."""
    dd = pytest.importorskip("dask.dataframe")
    import nbparrot.dask as nd

    if not hasattr(nd.DaskLLMAccessor, "embed"):
        pytest.skip("ddf.llm.embed is not in nbparrot/dask.py yet")
    server = make_server()
    df = pd.DataFrame({"text": [f"dask row {i} text" for i in range(3000)] + [None]}, index=pd.RangeIndex(3001) * 3)
    lazy = dd.from_pandas(df, npartitions=6).llm.embed("text", model=MODEL, base_url=server.base_url, api_key=KEY)
    assert lazy.dtype == object and requests(server) == 0
    out = lazy.compute(scheduler="threads")
    assert out.index.equals(df.index) and out.notna().sum() == 3000 and requests(server) == 6
    np.testing.assert_allclose(as_matrix(out.dropna()), truth(df["text"].dropna()), atol=1e-6)
