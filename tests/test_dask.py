"""``ddf.llm.map`` on a dask DataFrame, computed on a two-process ``distributed`` cluster on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import nbparrot
import nbparrot.dask  # noqa: F401 - registers ddf.llm / ddf.parrot
from nbparrot.errors import AuthenticationError, ConfigError

KEY = "sk-test-0123456789abcdef"
ROWS, PARTITIONS = 400, 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """2 worker processes x 2 threads. Their own NBPARROT_CACHE_DIR is a decoy: the client's must win."""
    decoy = tmp_path_factory.mktemp("worker-env-cache")
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=None, env={"NBPARROT_CACHE_DIR": str(decoy)}) as local, \
            Client(local, timeout=30) as client:
        yield client, decoy


def frame(n: int = ROWS) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"row {i} of the test frame" for i in range(n)], "k": range(n)},
                        index=pd.RangeIndex(n) * 3)  # labels that are not positions


def test_same_answers_as_pandas_and_nothing_sent_before_compute(cluster, make_server):
    server = make_server(latency_ms=5, jitter_ms=5)
    df = frame()
    ddf = dd.from_pandas(df, npartitions=PARTITIONS)
    lazy = ddf.llm.map("Say: {text}", base_url=server.base_url, api_key=KEY)
    assert isinstance(lazy, dd.Series) and lazy.name == "answer" and lazy.npartitions == PARTITIONS
    assert server.stats()["requests"] == 0, "building the lazy result sent a request"

    answers = lazy.compute()
    expected = df.llm.map("Say: {text}", base_url=server.base_url, api_key=KEY, cache="off").result()
    assert answers.dtype == lazy.dtype == expected.dtype
    pd.testing.assert_series_equal(answers.sort_index(), expected.sort_index())
    assert answers.notna().all()
    assert server.stats()["requests"] == 2 * ROWS  # once from the workers, once from pandas
    assert (ddf.parrot.map("Say: {text}", base_url=server.base_url, api_key=KEY).compute().sort_index()
            == expected.sort_index()).all()  # ddf.parrot too, and from the cache: no more requests
    assert server.stats()["requests"] == 2 * ROWS


def test_filter_and_classify_partition_wise_match_pandas(cluster, make_server):
    server = make_server(latency_ms=2)
    df = pd.DataFrame({"text": [f"row {i} <<yes>>" if i % 3 else f"row {i} about billing" for i in range(60)]})
    ddf = dd.from_pandas(df, npartitions=6)
    options = {"base_url": server.base_url, "api_key": KEY, "model": "mock"}
    kept = ddf.llm.filter("{text}", **options)
    assert isinstance(kept, dd.DataFrame) and server.stats()["requests"] == 0
    expected = df.llm.filter("{text}", **options).result()
    got = kept.compute().sort_index()  # (dask keeps text as its own string dtype: compare values)
    assert got.index.tolist() == expected.index.tolist() and got["text"].tolist() == expected["text"].tolist()
    mask = ddf.llm.filter("{text}", mask=True, **options).compute().sort_index()
    assert mask.dtype == "boolean" and mask.tolist() == df.llm.filter("{text}", mask=True, **options).result().tolist()
    labels = ddf.llm.classify("{text}", ["billing", "other"], **options)
    assert isinstance(labels.dtype, pd.CategoricalDtype)
    computed = labels.compute().sort_index()
    assert list(computed.cat.categories) == ["billing", "other"]
    assert computed.tolist() == df.llm.classify("{text}", ["billing", "other"], **options).result().tolist()
    assert server.stats()["requests"] == 120  # 60 filter + 60 classify decisions; the rest came from the cache
    with pytest.raises(ConfigError, match="duplicate"):
        ddf.llm.classify("{text}", ["a", "a"], **options)


def test_total_rate_across_workers_stays_within_rpm(cluster, make_server):
    """The server allows 2400 requests a minute with a one-second window (40 at once): the four
    worker threads share rpm=2400, so it never has to refuse one."""
    server = make_server(latency_ms=5, rpm=2400, burst_seconds=1)
    n = 320
    ddf = dd.from_pandas(frame(n), npartitions=16)
    answers = ddf.llm.map("Say: {text}", base_url=server.base_url, api_key=KEY, rpm=2400,
                          concurrency=256, backoff=0.05).compute()
    stats = server.stats()
    assert answers.notna().all() and len(answers) == n
    assert stats["rate_limited"] <= 0.01 * stats["requests"], stats
    assert stats["requests"] - stats["rate_limited"] == n


def test_rerun_reads_the_cache_on_the_workers(cluster, make_server):
    client, decoy = cluster
    server = make_server(latency_ms=2)
    ddf = dd.from_pandas(frame(), npartitions=PARTITIONS)
    first = ddf.llm.map("Cache me: {text}", base_url=server.base_url, api_key=KEY).compute()
    assert server.stats()["requests"] == ROWS
    again = ddf.llm.map("Cache me: {text}", base_url=server.base_url, api_key=KEY, meta=True).compute()
    assert server.stats()["requests"] == ROWS, "the rerun sent requests"
    assert again["cached"].all() and (again["cost"] == 0).all()
    pd.testing.assert_series_equal(again["answer"].sort_index(), first.sort_index())
    # Every worker wrote into the client's cache directory, not the one in its own environment.
    client_dir = Path(os.environ["NBPARROT_CACHE_DIR"])
    assert nbparrot.api.open_cache(client_dir).info()["entries"] == ROWS
    assert not any(decoy.iterdir())


def test_schema_fields_are_columns_with_the_announced_dtypes(cluster, make_server):
    server = make_server(latency_ms=2)
    df = frame(60)
    schema = {"name": str, "age": int}
    lazy = dd.from_pandas(df, npartitions=6).llm.map("Describe: {text}", base_url=server.base_url,
                                                     api_key=KEY, schema=schema)
    assert list(lazy.columns) == ["name", "age"]
    assert lazy.dtypes["age"] == "Int64"
    result = lazy.compute()
    assert result.dtypes.to_dict() == lazy.dtypes.to_dict()
    expected = df.llm.map("Describe: {text}", base_url=server.base_url, api_key=KEY, schema=schema,
                          cache="off").result()
    assert result["name"].sort_index().tolist() == expected["name"].sort_index().tolist()
    assert result["age"].sort_index().tolist() == expected["age"].sort_index().astype("Int64").tolist()
    assert result.notna().all().all()


def test_a_one_field_schema_is_a_series_of_that_fields_dtype(cluster, make_server):
    server = make_server(latency_ms=2)
    lazy = dd.from_pandas(frame(20), npartitions=2).llm.map("Is it even? {text}", base_url=server.base_url,
                                                           api_key=KEY, schema={"even": bool})
    assert lazy.name == "even" and lazy.dtype == "boolean"
    result = lazy.compute()
    assert result.dtype == "boolean" and result.notna().all()


def test_refused_options_and_the_key_stays_out_of_the_graph(cluster, make_server):
    ddf = dd.from_pandas(frame(8), npartitions=2)
    with pytest.raises(ConfigError, match="assign the result"):
        ddf.llm.map("Say: {text}", base_url="http://127.0.0.1:9/v1", into="answer")
    with pytest.raises(ConfigError, match="max_cost"):
        ddf.llm.map("Say: {text}", base_url="http://127.0.0.1:9/v1", confirm_over=1.0)
    with pytest.raises(nbparrot.TemplateError):  # checked on the client, before any compute
        ddf.llm.map("Say: {txet}", base_url="http://127.0.0.1:9/v1")

    secret = "sk-very-secret-key-0123456789"
    lazy = ddf.llm.map("Say: {text}", base_url="http://127.0.0.1:9/v1", api_key=secret)
    graph = lazy.__dask_graph__()
    shown = [repr(dict(graph)), repr(list(graph)), repr(lazy)]
    expr = getattr(lazy, "expr", None)  # dask-expr (dask >= 2025.1 always)
    if expr is not None:
        shown += [str(expr), expr.tree_repr()]
    shown += [repr(task) for task in graph.values()]
    shown += [repr(arg) for task in graph.values() for arg in getattr(task, "args", ())]
    assert not any(secret in text or secret[3:12] in text for text in shown)


def test_a_fatal_answer_on_a_worker_raises_on_compute_without_the_key(cluster, make_server):
    server = make_server(api_key="sk-the-right-key-000000")
    wrong = "sk-the-wrong-key-1111111111"
    lazy = dd.from_pandas(frame(40), npartitions=4).llm.map("Say: {text}", base_url=server.base_url, api_key=wrong)
    with pytest.raises(AuthenticationError) as caught:
        lazy.compute()
    assert wrong not in str(caught.value)


def test_inside_a_running_loop_with_the_sync_scheduler(cluster, make_server):
    """A notebook cell (its thread runs an event loop) building and computing in that very thread."""
    server = make_server(latency_ms=2)
    df = frame(30)

    async def cell() -> pd.Series:
        lazy = dd.from_pandas(df, npartitions=3).llm.map("Say: {text}", base_url=server.base_url, api_key=KEY)
        return lazy.compute(scheduler="sync")

    answers = asyncio.run(cell())
    assert answers.notna().all() and len(answers) == 30
    assert server.stats()["requests"] == 30


def test_accessors_and_a_taken_llm_name():
    from dask.dataframe.extensions import register_dataframe_accessor

    assert dd.DataFrame.llm is nbparrot.dask.DaskLLMAccessor is dd.DataFrame.parrot

    class Other:  # another package that owns ddf.llm
        def __init__(self, frame):
            self.frame = frame

    with pytest.warns(UserWarning):  # dask's own warning: the name is overridden
        register_dataframe_accessor("llm")(Other)
    try:
        with pytest.warns(UserWarning, match="available as ddf.parrot"):
            assert nbparrot.dask.register() == ["parrot"]
        assert dd.DataFrame.llm is Other
    finally:
        with pytest.warns(UserWarning):
            register_dataframe_accessor("llm")(nbparrot.dask.DaskLLMAccessor)
    assert nbparrot.dask.register() == ["parrot", "llm"]
