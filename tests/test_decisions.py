"""``filter`` and ``classify`` against the bundled server: every row's decision checked against
the server's documented rule, in a script and on a real kernel's loop."""

from __future__ import annotations

import enum
import inspect
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

import nbparrot
from nbparrot.server import NOT_JSON_MARKER, expected_confidence, expected_decision, expected_label, expected_labels

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import KernelHarness, wait_until  # noqa: E402

KEY = "sk-test-0123456789abcdef"
LABELS = ["billing", "shipping", "returns", "other"]


def reviews(n: int) -> pd.DataFrame:
    words = ["my billing is off", "shipping took weeks", "how do returns work", "hello", "nice <<yes>>",
             "bad <<no>>", "just a row"]
    return pd.DataFrame({"text": [f"{words[i % len(words)]} (#{i})" for i in range(n)]},
                        index=[f"r{i}" for i in range(n)])


def opts(server) -> dict:
    return {"base_url": server.base_url, "api_key": KEY, "model": "mock", "progress": False}


def test_filter_keeps_exactly_the_rows_the_rule_says_true(make_server):
    server = make_server(latency_ms=1)
    df = reviews(60)
    kept = df.llm.filter("{text}", **opts(server)).result()
    truth = [expected_decision(t) for t in df.text]
    assert kept.index.tolist() == [label for label, keep in zip(df.index, truth) if keep]
    assert list(kept.columns) == ["text"] and 0 < len(kept) < 60
    mask = nbparrot.filter(df, "{text}", mask=True, **opts(server)).result()
    assert mask.dtype == "boolean" and mask.tolist() == truth and mask.index.equals(df.index)
    assert server.stats()["requests"] == 60  # the mask run came from the cache


def test_filter_on_records_and_with_meta(make_server):
    server = make_server()
    records = [{"text": t} for t in reviews(10).text]
    kept = nbparrot.filter(records, "{text}", **opts(server)).result()
    assert kept == [r for r in records if expected_decision(r["text"])]
    frame = reviews(10).llm.filter("{text}", meta=True, **opts(server)).result()
    assert {"prompt", "cost", "attempts", "cached"} <= set(frame.columns) and frame["cached"].all()


def test_a_row_without_a_clear_answer_is_re_asked_then_failed_never_guessed(make_server):
    server = make_server()
    df = reviews(8)
    df.loc["r2", "text"] = f"unclear {NOT_JSON_MARKER}"
    run = df.llm.filter("{text}", max_reasks=1, **opts(server))
    kept = run.result()
    assert "r2" not in kept.index
    assert run.errors.loc["r2", "status"] == "failed" and "JSON" in run.errors.loc["r2", "error"]
    assert run.errors.loc["r2", "attempts"] == 2
    mask = df.llm.filter("{text}", mask=True, max_reasks=1, **opts(server)).result()
    assert pd.isna(mask["r2"]) and mask.drop("r2").notna().all()


def test_classify_gives_a_categorical_of_exactly_the_labels(make_server):
    server = make_server(latency_ms=1)
    df = reviews(40)
    labels = df.llm.classify("{text}", LABELS, **opts(server)).result()
    assert isinstance(labels.dtype, pd.CategoricalDtype) and list(labels.cat.categories) == LABELS
    assert labels.tolist() == [expected_label(t, LABELS) for t in df.text]
    assert labels.name == "label" and labels.index.equals(df.index)


def test_classify_with_descriptions_an_enum_multi_and_confidence(make_server):
    server = make_server()
    df = reviews(14)
    described = {"billing": "charges and invoices", "shipping": "delivery", "returns": "sending back", "other": "anything else"}
    assert df.llm.classify("{text}", described, **opts(server)).result().tolist() == [
        expected_label(t, LABELS) for t in df.text]

    Topic = enum.Enum("Topic", {name.upper(): name for name in LABELS})
    assert df.llm.classify("{text}", Topic, **opts(server)).result().tolist() == [
        expected_label(t, LABELS) for t in df.text]

    many = df.llm.classify("{text}", LABELS, multi=True, **opts(server)).result()
    assert many.tolist() == [expected_labels(t, LABELS) for t in df.text]

    scored = df.llm.classify("{text}", LABELS, confidence=True, **opts(server)).result()
    assert list(scored.columns) == ["label", "confidence"]
    for text, confidence in zip(df.text, scored["confidence"]):
        assert confidence == pytest.approx(expected_confidence(text), abs=1e-3)
    requests = server.stats()["requests"]
    again = df.llm.classify("{text}", LABELS, confidence=True, **opts(server)).result()  # from the cache
    assert server.stats()["requests"] == requests and again["confidence"].tolist() == scored["confidence"].tolist()


def test_confidence_is_none_where_the_endpoint_sends_no_logprobs(make_server):
    server = make_server(logprobs=False)
    run = reviews(5).llm.classify("{text}", LABELS, confidence=True, **opts(server))
    result = run.result()
    assert result["label"].notna().all() and result["confidence"].isna().all()
    assert "no logprobs" in run.progress.note


@pytest.mark.parametrize("labels, problem", [
    ([], "empty"), (["a", "a"], "duplicate"), (["a", 3], "non-empty strings"), ("abc", "list of strings"),
    ({"a": 1}, "description"),
])
def test_bad_labels_are_refused_before_any_request(make_server, labels, problem):
    server = make_server()
    with pytest.raises(nbparrot.ConfigError, match=problem):
        reviews(3).llm.classify("{text}", labels, **opts(server))
    assert server.stats()["requests"] == 0


def test_unknown_fields_and_options_are_refused_before_any_request(make_server):
    server = make_server()
    with pytest.raises(nbparrot.TemplateError, match="nope"):
        reviews(3).llm.filter("{nope} is true", **opts(server))
    with pytest.raises(nbparrot.ConfigError, match="unknown option"):
        reviews(3).llm.filter("{text}", schema=dict, **opts(server))
    with pytest.raises(nbparrot.ConfigError, match="multi"):
        reviews(3).llm.classify("{text}", LABELS, multi=True, confidence=True, **opts(server))
    assert server.stats()["requests"] == 0


def test_help_documents_every_argument():
    for func in (nbparrot.filter, nbparrot.classify, pd.DataFrame.llm.filter, pd.DataFrame.llm.classify):
        doc = inspect.getdoc(func)
        for name in inspect.signature(func).parameters:
            if name not in ("self", "data"):
                assert name in doc, (func, name)


def test_filter_and_classify_on_a_kernel_loop_return_at_once_cancel_and_await(make_server, tmp_path):
    server = make_server(latency_ms=100)
    with KernelHarness(cwd=str(tmp_path), env={"NBPARROT_CACHE_DIR": str(tmp_path / "cache")}) as kernel:
        setup = (
            "import nbparrot, pandas as pd\n"
            "df = pd.DataFrame({'text': [f'row {i} <<yes>>' if i % 2 else f'row {i}' for i in range(300)]})\n"
            f"kw = dict(base_url={server.base_url!r}, api_key={KEY!r}, model='mock', concurrency=4)\n"
            "run = df.llm.filter('{text}', **kw)\n"
            "print(run.done())"
        )
        assert kernel.execute(setup, check=True).stdout == "False\n"
        wait_until(lambda: json.loads(kernel.execute("print(run.progress.done)", check=True).stdout) >= 5,
                   timeout=30, message="the filter made no progress")
        report = kernel.execute(
            "import json, warnings\nrun.cancel()\nwarnings.simplefilter('ignore')\n"
            "try:\n    kept = await run\nexcept Exception as exc:\n    kept = None\n"
            "print(json.dumps({'status': run.status, 'done': run.progress.done, 'kept': len(kept),"
            " 'cancelled': run.progress.cancelled}))", check=True, timeout=60).stdout
        state = json.loads(report)
        assert state["status"] == "cancelled" and 0 < state["done"] < 300
        assert state["done"] + state["cancelled"] == 300 and 0 < state["kept"] <= state["done"]
        classify = kernel.execute(
            "small = df.head(20)\nrun2 = small.llm.classify('{text}', ['yes', 'row'], **kw)\nprint(run2.done())\n",
            check=True).stdout
        assert classify == "False\n"
        result = kernel.execute("labels = await run2\nprint(labels.dtype, labels.notna().sum())", check=True,
                                timeout=60).stdout
        assert result == "category 20\n"
