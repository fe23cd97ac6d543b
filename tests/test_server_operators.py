"""What the table operators (filter, classify, embed, search, sim_join, cascades) need from the mock server.

Decisions (booleans and enum labels of structured answers) follow documented rules that the tests
reproduce with ``expected_decision`` / ``expected_label`` / ``expected_labels``; logprobs carry a
documented confidence; ``mock-weak`` errs on ``<<hard>>`` rows; ``/v1/embeddings`` returns hashed
bag-of-words vectors (``expected_embedding``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, Literal

import aiohttp
import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from pydantic import BaseModel

from nbparrot.server import (
    CONFIDENCE_RANGE,
    EMBEDDING_DIMENSIONS,
    ServerConfig,
    ServerProcess,
    expected_confidence,
    expected_decision,
    expected_embedding,
    expected_label,
    expected_labels,
    expected_tag,
)
from nbparrot.structured import Schema

LABELS = ["positive", "negative", "neutral"]
TAGS = ["billing", "shipping", "quality"]
SCHEMA = {
    "type": "object",
    "properties": {
        "keep": {"type": "boolean"},
        "label": {"type": "string", "enum": LABELS},
        "tags": {"type": "array", "items": {"type": "string", "enum": TAGS}},
        "reason": {"type": "string"},
    },
    "required": ["keep", "label", "tags", "reason"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "Verdict", "schema": SCHEMA, "strict": True}}
ROWS = [f"review {k}: the parcel came late" for k in range(12)] + [
    "Positive, really! <<yes>>", "NEGATIVE feelings <<no>>", "neutral-ish, billing and Quality issues",
    "negatives only (no label word)", "both <<yes>> and <<no>>", "shipping SHIPPING shipping",
]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    """One server for the read-only tests of this module."""
    with ServerProcess() as server:
        yield server


def post(server: ServerProcess, body: Any, path: str = "/chat/completions") -> tuple[int, Any, dict[str, str]]:
    """POST JSON with urllib: (status, parsed body, lower-cased headers), errors included."""
    request = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), {k.lower(): v for k, v in exc.headers.items()}


async def _apost_many(url: str, bodies: list[dict]) -> list[tuple[int, Any]]:
    """POST several JSON bodies concurrently with aiohttp."""
    async with aiohttp.ClientSession(trust_env=False) as session:
        async def one(body: dict) -> tuple[int, Any]:
            async with session.post(url, json=body) as resp:
                return resp.status, await resp.json(content_type=None)
        return list(await asyncio.gather(*(one(b) for b in bodies)))


def apost_many(server: ServerProcess, bodies: list[dict], path: str = "/chat/completions") -> list[tuple[int, Any]]:
    """POST several bodies concurrently (aiohttp) and return (status, body) in order."""
    return asyncio.run(_apost_many(server.base_url + path, bodies))


def sdk(server: ServerProcess) -> OpenAI:
    """An openai client of ``server`` (no proxies, no retries)."""
    return OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, http_client=httpx.Client(trust_env=False))


def user(text: str) -> list[dict]:
    """One user message."""
    return [{"role": "user", "content": text}]


def cosine(a: list[float], b: list[float]) -> float:
    """Cosine similarity."""
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ----------------------------------------------------------------------------- the rules themselves


def test_decision_rules() -> None:
    assert expected_decision("anything <<yes>>") is True and expected_decision("anything <<no>>") is False
    assert expected_decision("<<no>> then <<yes>>") is True  # <<yes>> wins
    hashed = [expected_decision(f"row {k}") for k in range(200)]
    assert 70 < sum(hashed) < 130  # the hash splits rows about evenly
    assert expected_decision(user("row 3")) == expected_decision("row 3")
    # the last user message decides; system prompts and earlier turns do not
    convo = [{"role": "system", "content": "Judge: <<no>>"}, {"role": "user", "content": "first <<no>>"},
             {"role": "assistant", "content": "?"}, {"role": "user", "content": "second <<yes>>"}]
    assert expected_decision(convo) is True

    assert expected_label("I feel POSITIVE today", LABELS) == "positive"
    assert expected_label("negative? no: neutral", LABELS) == "negative"  # the first label in the schema's order
    assert expected_label("neutral, then negative", LABELS) == "negative"
    assert expected_label("negatives only", LABELS) in LABELS  # a whole word only: hash-picked
    picked = {expected_label(f"row {k}", LABELS) for k in range(60)}
    assert picked == set(LABELS)
    assert expected_labels("billing and QUALITY", TAGS) == ["billing", "quality"]
    assert expected_labels("nothing here", TAGS) == [expected_label("nothing here", TAGS)]

    for k in range(50):
        p = expected_confidence(f"row {k}")
        assert CONFIDENCE_RANGE[0] <= p <= CONFIDENCE_RANGE[1]
        assert 0.9 <= expected_confidence(f"row {k}", "mock-weak") <= 0.99
        assert 0.5 <= expected_confidence(f"row {k} <<hard>>", "mock-weak") <= 0.6
        hard = f"row {k} <<hard>>"
        assert expected_decision(hard, "mock-weak") != expected_decision(hard, "mock-strong")
        assert expected_label(hard, LABELS, "mock-weak") != expected_label(hard, LABELS)
        assert expected_labels(hard, TAGS, "mock-weak") != expected_labels(hard, TAGS)
        assert expected_decision(f"row {k}", "mock-weak") == expected_decision(f"row {k}")


# ----------------------------------------------------------------------------- decisions in answers


def test_json_schema_answers_follow_the_rules(srv: ServerProcess) -> None:
    bodies = [{"model": "mock", "messages": [{"role": "system", "content": "Classify: positive, negative, neutral."},
                                             {"role": "user", "content": row}],
               "response_format": FORMAT, "n": 2} for row in ROWS]
    for row, (status, data) in zip(ROWS, apost_many(srv, bodies)):
        assert status == 200
        for choice in data["choices"]:  # every choice decides the same
            answer = json.loads(choice["message"]["content"])
            assert answer["keep"] is expected_decision(row)
            assert answer["label"] == expected_label(row, LABELS)
            assert answer["tags"] == expected_labels(row, TAGS)
            assert expected_tag(bodies[0]["messages"][:1] + user(row), choice["index"]) in answer["reason"]


def test_json_object_fallback_with_the_schema_in_words(srv: ServerProcess) -> None:
    instruction = Schema({"keep": bool, "label": Literal["positive", "negative", "neutral"],
                          "tags": list[Literal["billing", "shipping", "quality"]]}).instruction()
    for row in ROWS[10:]:
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": row}]
        status, data, _ = post(srv, {"model": "mock", "messages": messages, "response_format": {"type": "json_object"}})
        answer = json.loads(data["choices"][0]["message"]["content"])
        assert status == 200 and set(answer) == {"keep", "label", "tags"}
        assert answer["keep"] is expected_decision(messages)
        assert answer["label"] == expected_label(messages, LABELS)
        assert answer["tags"] == expected_labels(messages, TAGS)
    # without a schema in words json_object keeps its {"tag", "echo", ...} answer
    status, data, _ = post(srv, {"model": "mock", "messages": user("plain"), "response_format": {"type": "json_object"}})
    assert json.loads(data["choices"][0]["message"]["content"])["tag"] == expected_tag(user("plain"))


def test_fallback_through_the_accessor_decides_every_row(make_server: Any) -> None:
    import pandas as pd

    import nbparrot  # noqa: F401 - registers df.llm

    server = make_server(json_schema=False)
    df = pd.DataFrame({"text": ROWS[10:]})
    result = df.llm.map("{text}", schema={"keep": bool, "label": Literal["positive", "negative", "neutral"]},
                        base_url=server.base_url, api_key="sk-x").result()
    assert result["keep"].tolist() == [expected_decision(t) for t in ROWS[10:]]
    assert result["label"].tolist() == [expected_label(t, LABELS) for t in ROWS[10:]]


def test_pydantic_models_through_the_sdk(srv: ServerProcess) -> None:
    class Verdict(BaseModel):
        relevant: bool
        sentiment: Literal["positive", "negative", "neutral"]
        topics: list[Literal["billing", "shipping", "quality"]]

    client = sdk(srv)
    for row in ROWS[12:]:
        parsed = client.chat.completions.parse(model="mock-strong", messages=user(row), response_format=Verdict)
        verdict = parsed.choices[0].message.parsed
        assert verdict.relevant is expected_decision(row)
        assert verdict.sentiment == expected_label(row, LABELS)
        assert verdict.topics == expected_labels(row, TAGS)
    client.close()


# ----------------------------------------------------------------------------- logprobs


def _check_entries(entries: list[dict], content: str, top: int) -> None:
    """OpenAI's shape: token, logprob, bytes, top_logprobs; the tokens make the content."""
    assert "".join(e["token"] for e in entries) == content
    for entry in entries:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == top
        assert all(set(t) == {"token", "logprob", "bytes"} for t in entry["top_logprobs"])
        if top:
            assert entry["top_logprobs"][0]["token"] == entry["token"]
            logprobs = [t["logprob"] for t in entry["top_logprobs"]]
            assert logprobs == sorted(logprobs, reverse=True) and sum(map(math.exp, logprobs)) <= 1 + 1e-9


def test_logprobs_shape_and_decision_tokens(srv: ServerProcess) -> None:
    for row in ROWS[12:]:
        status, data, _ = post(srv, {"model": "mock", "messages": user(row), "response_format": FORMAT,
                                     "logprobs": True, "top_logprobs": 5})
        choice = data["choices"][0]
        content = choice["message"]["content"]
        entries = choice["logprobs"]["content"]
        assert status == 200 and choice["logprobs"]["refusal"] is None
        _check_entries(entries, content, 5)
        p = expected_confidence(row)
        decided = [e for e in entries if abs(math.exp(e["logprob"]) - p) < 1e-9]
        answer = json.loads(content)
        assert [e["token"] for e in decided] == [json.dumps(answer["keep"]), answer["label"], *answer["tags"]]
        keep = decided[0]["top_logprobs"]
        assert keep[1]["token"] == json.dumps(not answer["keep"]) and math.isclose(math.exp(keep[1]["logprob"]), 1 - p, rel_tol=1e-5)
        label = decided[1]["top_logprobs"]
        assert {t["token"] for t in label[1:3]} == set(LABELS) - {answer["label"]}
        assert all(math.isclose(math.exp(t["logprob"]), (1 - p) / 2, rel_tol=1e-5) for t in label[1:3])
        assert all(e["logprob"] > -1e-4 for e in entries if e not in decided)

    # text answers: the tokens make the content, every logprob about 0; top_logprobs 0 gives empty lists
    status, data, _ = post(srv, {"model": "mock", "messages": user("free text"), "logprobs": True})
    choice = data["choices"][0]
    _check_entries(choice["logprobs"]["content"], choice["message"]["content"], 0)
    assert choice["logprobs"]["content"][1]["token"] == expected_tag(user("free text")).split("#")[0]
    assert post(srv, {"model": "mock", "messages": user("x")})[1]["choices"][0]["logprobs"] is None
    status, data, _ = post(srv, {"model": "mock", "messages": user("x"), "top_logprobs": 2})
    assert status == 400 and data["error"]["param"] == "top_logprobs"
    assert post(srv, {"model": "mock", "messages": user("x"), "logprobs": True, "top_logprobs": 21})[0] == 400
    assert post(srv, {"model": "mock", "messages": user("x"), "logprobs": "yes"})[0] == 400


def test_logprobs_through_the_sdk_and_streams(srv: ServerProcess) -> None:
    client = sdk(srv)
    row = "the parcel was neutral <<hard>>"
    schema_format = {"type": "json_schema", "json_schema": {"name": "C", "schema": {
        "type": "object", "properties": {"label": {"type": "string", "enum": LABELS}}, "required": ["label"]}}}
    resp = client.chat.completions.create(model="mock-weak", messages=user(row), response_format=schema_format,
                                          logprobs=True, top_logprobs=3)
    choice = resp.choices[0]
    label = json.loads(choice.message.content)["label"]
    assert label == expected_label(row, LABELS, "mock-weak") != expected_label(row, LABELS) == "neutral"
    token = next(t for t in choice.logprobs.content if t.token == label)
    assert math.isclose(math.exp(token.logprob), expected_confidence(row, "mock-weak")) and 0.5 <= math.exp(token.logprob) <= 0.6
    assert {t.token for t in token.top_logprobs} == set(LABELS)

    full = [e.model_dump() for e in choice.logprobs.content]
    stream = client.chat.completions.create(model="mock-weak", messages=user(row), response_format=schema_format,
                                            logprobs=True, top_logprobs=3, stream=True)
    text, streamed = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs is not None and c.logprobs.content:
                streamed += [e.model_dump() for e in c.logprobs.content]
    assert text == choice.message.content and streamed == full
    client.close()


def test_a_server_without_logprobs_answers_null(make_server: Any) -> None:
    server = make_server(logprobs=False)
    status, data, _ = post(server, {"model": "mock", "messages": user("x <<yes>>"), "response_format": FORMAT,
                                    "logprobs": True, "top_logprobs": 5})
    assert status == 200 and data["choices"][0]["logprobs"] is None
    assert json.loads(data["choices"][0]["message"]["content"])["keep"] is True


# ----------------------------------------------------------------------------- weak and strong models


def test_weak_model_errs_on_hard_rows_with_low_confidence(srv: ServerProcess) -> None:
    rows = [f"item {k}" + (" <<hard>>" if k % 3 == 0 else "") for k in range(18)]
    bool_format = {"type": "json_schema", "json_schema": {"name": "F", "schema": {
        "type": "object", "properties": {"keep": {"type": "boolean"}}, "required": ["keep"]}}}
    for model in ("mock-weak", "mock-strong", "gpt-4o-mini"):
        bodies = [{"model": model, "messages": user(r), "response_format": bool_format, "logprobs": True}
                  for r in rows]
        before = srv.stats()["models"].get(model, 0)
        answers = apost_many(srv, bodies)
        assert srv.stats()["models"][model] - before == len(rows)  # /stats counts answers per model
        for row, (status, data) in zip(rows, answers):
            choice = data["choices"][0]
            keep = json.loads(choice["message"]["content"])["keep"]
            p = math.exp(next(e for e in choice["logprobs"]["content"] if e["token"] in ("true", "false"))["logprob"])
            assert status == 200 and keep is expected_decision(row, model) and math.isclose(p, expected_confidence(row, model))
            hard = "<<hard>>" in row
            if model == "mock-weak":
                assert (keep is not expected_decision(row)) == hard
                assert 0.5 <= p <= 0.6 if hard else p >= 0.9
            else:
                assert keep is expected_decision(row) and 0.55 <= p <= 0.99


# ----------------------------------------------------------------------------- embeddings


def test_embeddings_shapes_dimensions_and_usage(srv: ServerProcess) -> None:
    texts = ["the cat sat on the mat", "stocks fell sharply"]
    for model, dims in EMBEDDING_DIMENSIONS.items():
        status, data, headers = post(srv, {"model": model, "input": texts}, "/embeddings")
        assert status == 200 and data["object"] == "list" and data["model"] == model
        assert [d["index"] for d in data["data"]] == [0, 1] and all(d["object"] == "embedding" for d in data["data"])
        for text, item in zip(texts, data["data"]):
            vector = item["embedding"]
            assert len(vector) == dims and math.isclose(sum(x * x for x in vector), 1.0, rel_tol=1e-5)
            assert vector == expected_embedding(text, model)
        assert data["usage"] == {"prompt_tokens": 6 + 5, "total_tokens": 11}  # ceil(22 / 4) + ceil(19 / 4)
        assert headers["x-request-id"].startswith("req_")

    full = expected_embedding("short vectors", "text-embedding-3-large")
    status, data, _ = post(srv, {"model": "text-embedding-3-large", "input": "short vectors", "dimensions": 256},
                           "/embeddings")
    short = data["data"][0]["embedding"]
    norm = math.sqrt(sum(x * x for x in full[:256]))
    assert len(short) == 256 and all(math.isclose(a, b / norm, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(short, full))
    assert short == expected_embedding("short vectors", "text-embedding-3-large", 256)

    status, data, _ = post(srv, {"model": "mock-embed", "input": [[1, 2, 3], [4, 5]]}, "/embeddings")
    assert status == 200 and data["usage"]["prompt_tokens"] == 5
    assert data["data"][1]["embedding"] == expected_embedding([4, 5])
    request = urllib.request.Request(srv.root_url + "/embeddings", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"model": "mock-embed", "input": [7, 8, 9]}).encode())
    with _OPENER.open(request, timeout=30) as resp:  # the route without /v1 too
        assert resp.status == 200 and len(json.loads(resp.read())["data"]) == 1


def test_embeddings_base64_and_the_sdk(srv: ServerProcess) -> None:
    status, data, _ = post(srv, {"model": "mock-embed", "input": "round trip", "encoding_format": "base64"},
                           "/embeddings")
    raw = base64.b64decode(data["data"][0]["embedding"])
    assert status == 200 and len(raw) == 64 * 4
    assert list(struct.unpack("<64f", raw)) == expected_embedding("round trip")

    client = sdk(srv)
    resp = client.embeddings.create(model="text-embedding-3-small", input=["a b c", "d e f"], dimensions=32)
    assert [len(d.embedding) for d in resp.data] == [32, 32] and resp.usage.total_tokens == 4
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(resp.data[0].embedding,
                                                                expected_embedding("a b c", "text-embedding-3-small", 32)))
    floats = client.embeddings.create(model="mock-embed", input="round trip", encoding_format="float")
    assert floats.data[0].embedding == expected_embedding("round trip")
    with pytest.raises(BadRequestError, match="does not support specifying dimensions"):
        client.embeddings.create(model="text-embedding-ada-002", input="x", dimensions=8)
    with pytest.raises(NotFoundError, match="not a chat model"):
        client.chat.completions.create(model="text-embedding-3-small", messages=user("hi"))
    with pytest.raises(BadRequestError, match="not an embedding model"):
        client.embeddings.create(model="gpt-4o-mini", input="hi")
    with pytest.raises(NotFoundError, match="does not exist"):
        client.embeddings.create(model="text-embedding-9", input="hi")
    client.close()


def test_texts_sharing_words_are_close(srv: ServerProcess) -> None:
    query = "late delivery of the parcel"
    docs = ["late delivery of the parcel today", "the parcel was late", "delivery of furniture and chairs",
            "great taste and fresh coffee"]  # 5, 3, 2 and 0 words shared
    for model in ("mock-embed", "text-embedding-3-small"):
        status, data, _ = post(srv, {"model": model, "input": [query, *docs]}, "/embeddings")
        vectors = [d["embedding"] for d in data["data"]]
        scores = [cosine(vectors[0], v) for v in vectors[1:]]
        assert status == 200 and scores[0] > scores[1] > scores[2] > scores[3]
        assert scores[0] > 0.6 and abs(scores[3]) < 0.3
    assert cosine(expected_embedding("Same WORDS, other order!"), expected_embedding("other order same words")) > 0.999


def test_embeddings_refusals(srv: ServerProcess) -> None:
    def error(body: dict) -> tuple[int, dict]:
        status, data, _ = post(srv, body, "/embeddings")
        return status, data["error"]

    status, err = error({"model": "mock-embed", "input": ["x"] * 2049})
    assert status == 400 and "'$.input' is invalid" in err["message"]
    assert error({"model": "mock-embed", "input": ""})[0] == 400
    assert error({"model": "mock-embed", "input": ["ok", ""]})[0] == 400
    assert error({"model": "mock-embed", "input": [1, "a"]})[0] == 400
    assert error({"model": "mock-embed"})[1]["param"] == "input"
    status, err = error({"model": "mock-embed", "input": "x" * (8192 * 4 + 1)})
    assert status == 400 and "maximum context length is 8192 tokens" in err["message"] and "8193" in err["message"]
    assert post(srv, {"model": "mock-embed", "input": "x" * (8192 * 4)}, "/embeddings")[0] == 200
    status, err = error({"model": "mock-embed", "input": ["y" * (8192 * 4)] * 37})  # 303,104 tokens
    assert status == 400 and err["code"] == "max_tokens_per_request" and "Requested 303104 tokens" in err["message"]
    status, err = error({"model": "text-embedding-3-small", "input": "x", "dimensions": 1537})
    assert status == 400 and err["param"] == "dimensions"
    assert error({"model": "mock-embed", "input": "x", "encoding_format": "int8"})[1]["param"] == "encoding_format"
    assert error({"model": "mock", "input": "x"})[1]["param"] == "model"
    assert error({"model": "nope", "input": "x"})[0] == 404
    assert {"mock-weak", "mock-strong", *EMBEDDING_DIMENSIONS} <= set(ServerConfig().models)


def test_embeddings_share_limits_faults_and_stats(make_server: Any) -> None:
    server = make_server(rpm=3, tpm=1000, burst_seconds=1)  # buckets hold 1 request... and 16 tokens
    status, err, _ = post(server, {"model": "mock-embed", "input": "x" * 100}, "/embeddings")  # 25 tokens > 16
    assert status == 429 and "Request too large" in err["error"]["message"]
    status, data, headers = post(server, {"model": "mock-embed", "input": ["abcd", "efgh"]}, "/embeddings")
    assert status == 200 and headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(headers["x-ratelimit-remaining-tokens"]) == 16 - 2
    status, err, headers = post(server, {"model": "mock-embed", "input": "abcd"}, "/embeddings")
    assert status == 429 and err["error"]["code"] == "rate_limit_exceeded" and "retry-after-ms" in headers
    stats = server.stats()
    assert stats["embedding_requests"] == 3 and stats["embedded_inputs"] == 4 and stats["embedding_tokens"] == 2
    assert stats["rate_limited"] == 2 and stats["prompt_tokens"] == 0

    faulty = make_server(p500=1.0)
    status, err, _ = post(faulty, {"model": "mock-embed", "input": ["a", "b", "c"]}, "/embeddings")
    assert status == 500 and err["error"]["type"] == "server_error"
    assert faulty.stats()["embedded_inputs"] == 3 and faulty.stats()["faults"]["500"] == 1
