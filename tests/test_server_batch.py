"""Tests of the mock server's Files and Batch APIs, through the openai SDK over 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

import nbparrot.server as server_module
from nbparrot.server import ServerConfig, ServerProcess, build_app, expected_tag, prompt_tokens

KEY = "sk-batch-test-key-0123456789"
STATUS_ORDER = ("validating", "in_progress", "finalizing", "completed")


def line(custom_id: str, content: str, model: str = "mock", **body: Any) -> dict:
    """One batch input line: a chat completion request with a single user message."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": messages, **body}}


def jsonl(lines: list[Any]) -> bytes:
    """Lines as a JSONL file."""
    return "".join(json.dumps(item) + "\n" for item in lines).encode()


def make_client(srv: ServerProcess, key: str = KEY) -> OpenAI:
    """An SDK client for ``srv`` that never retries and ignores proxy settings."""
    return OpenAI(base_url=srv.base_url, api_key=key, max_retries=0, http_client=httpx.Client(trust_env=False))


def upload(client: OpenAI, data: bytes, name: str = "batch.jsonl") -> Any:
    """Upload ``data`` with purpose "batch"."""
    return client.files.create(file=(name, data), purpose="batch")


def start(client: OpenAI, lines: list[Any], **extra: Any) -> Any:
    """Upload ``lines`` and create a batch from them."""
    file = upload(client, jsonl(lines))
    return client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 **extra)


def wait(client: OpenAI, batch_id: str, until: tuple[str, ...], seen: list[str] | None = None,
         timeout: float = 15.0) -> Any:
    """Poll the batch until its status is in ``until`` (bounded); record each new status in ``seen``."""
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if seen is not None and (not seen or seen[-1] != batch.status):
            seen.append(batch.status)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        time.sleep(0.02)


def read_jsonl(client: OpenAI, file_id: str) -> list[dict]:
    """Download a file and parse its lines."""
    return [json.loads(text) for text in client.files.content(file_id).text.splitlines()]


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    """One server for the module: batches take 1 s, and a key is required."""
    with ServerProcess(batch_seconds=1, api_key=KEY) as process:
        yield process


@pytest.fixture(scope="module")
def client(srv: ServerProcess) -> Iterator[OpenAI]:
    """An SDK client of ``srv``."""
    with make_client(srv) as sdk:
        yield sdk


def test_batch_round_trip(srv: ServerProcess, client: OpenAI) -> None:
    lines = [line(f"row-{k}", f"Describe row {k}") for k in range(25)]
    lines.append(line("json", "Row as JSON", response_format={"type": "json_object"}))
    lines.append(line("two", "Two answers", n=2))
    lines.append(line("fail", "This one fails <<batch-fail>>"))
    lines.append(line("unknown-model", "Which model?", model="gpt-9"))
    lines.append(line("too-long", "Huge completion", max_tokens=10 ** 6))
    assert len(lines) == 30
    by_id = {item["custom_id"]: item for item in lines}

    batch = start(client, lines, metadata={"run": "round-trip"})
    assert batch.id.startswith("batch_") and batch.object == "batch" and batch.status == "validating"
    assert batch.endpoint == "/v1/chat/completions" and batch.completion_window == "24h"
    assert batch.metadata == {"run": "round-trip"} and batch.model == "mock"
    assert batch.output_file_id is None and batch.errors is None and batch.expires_at == batch.created_at + 86400
    seen: list[str] = []
    done = wait(client, batch.id, ("completed", "failed"), seen)
    assert done.status == "completed", done.errors
    assert "in_progress" in seen and seen == sorted(seen, key=STATUS_ORDER.index)
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (30, 27, 3)
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.failed_at is done.cancelled_at is done.cancelling_at is done.expired_at is None

    output = read_jsonl(client, done.output_file_id)
    assert sorted(o["custom_id"] for o in output) == sorted(k for k in by_id if k not in
                                                            ("fail", "unknown-model", "too-long"))
    assert [o["custom_id"] for o in output] != [item["custom_id"] for item in lines[:27]]  # shuffled: map by custom_id
    input_tokens = output_tokens = 0
    for out in output:
        assert out["id"].startswith("batch_req_") and out["error"] is None
        response = out["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == "mock"
        messages = by_id[out["custom_id"]]["body"]["messages"]
        assert body["usage"]["prompt_tokens"] == prompt_tokens(messages)
        input_tokens += body["usage"]["prompt_tokens"]
        output_tokens += body["usage"]["completion_tokens"]
        for i, choice in enumerate(body["choices"]):
            content = choice["message"]["content"]
            if out["custom_id"] == "json":
                assert json.loads(content)["tag"] == expected_tag(messages, i)
            else:
                assert content.startswith(f"[{expected_tag(messages, i)}] ")
        assert len(body["choices"]) == (2 if out["custom_id"] == "two" else 1)
    assert done.usage.input_tokens == input_tokens and done.usage.output_tokens == output_tokens

    errors = {e["custom_id"]: e for e in read_jsonl(client, done.error_file_id)}
    assert errors.keys() == {"fail", "unknown-model", "too-long"}
    assert errors["fail"]["response"]["status_code"] == 500
    assert errors["fail"]["response"]["body"]["error"]["type"] == "server_error"
    assert errors["unknown-model"]["response"]["status_code"] == 404
    assert errors["unknown-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["too-long"]["response"]["status_code"] == 400
    assert errors["too-long"]["response"]["body"]["error"]["code"] == "context_length_exceeded"
    assert all(e["error"] is None and e["id"].startswith("batch_req_") for e in errors.values())

    # the same answer as the chat endpoint, apart from ids and timestamps
    answer = next(o for o in output if o["custom_id"] == "two")["response"]["body"]
    direct = client.chat.completions.create(**by_id["two"]["body"]).model_dump()
    assert [c["message"]["content"] for c in direct["choices"]] == [c["message"]["content"] for c in answer["choices"]]
    assert direct["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]

    meta = client.files.retrieve(done.output_file_id)
    assert meta.purpose == "batch_output" and meta.filename == f"{batch.id}_output.jsonl"
    assert meta.bytes == len(client.files.content(done.output_file_id).content)
    assert client.batches.retrieve(batch.id).output_file_id == done.output_file_id  # written once
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)


def test_cancel_mid_way(make_server: Any) -> None:
    srv = make_server(batch_seconds=3, api_key=KEY)
    with make_client(srv) as client:
        lines = [line(f"r{k}", f"cancel me {k}") for k in range(30)]
        batch = start(client, lines)
        deadline = time.monotonic() + 15
        while batch.request_counts is None or batch.request_counts.completed == 0:
            assert batch.status in ("validating", "in_progress") and time.monotonic() < deadline
            time.sleep(0.02)
            batch = client.batches.retrieve(batch.id)
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        assert client.batches.cancel(batch.id).status == "cancelling"  # asking twice is harmless
        done = wait(client, batch.id, ("cancelled",))
        assert done.cancelled_at is not None and done.completed_at is None
        completed = done.request_counts.completed
        assert done.request_counts.total == 30 and done.request_counts.failed == 0
        assert 0 < completed < 30
        output = read_jsonl(client, done.output_file_id)
        assert len(output) == completed and done.error_file_id is None
        assert len({o["custom_id"] for o in output}) == completed
        inputs = {item["custom_id"]: item["body"]["messages"] for item in lines}
        for out in output:
            content = out["response"]["body"]["choices"][0]["message"]["content"]
            assert content.startswith(f"[{expected_tag(inputs[out['custom_id']])}] ")
        assert client.batches.retrieve(batch.id).request_counts.completed == completed  # frozen
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch.id)


def test_invalid_lines_fail_the_batch(client: OpenAI) -> None:
    good = line("a", "fine")
    data = b"\n".join([
        json.dumps(good).encode(),
        b"{not json",
        b"[1, 2]",
        json.dumps({k: v for k, v in good.items() if k != "custom_id"}).encode(),
        json.dumps(good).encode(),  # duplicate custom_id
        json.dumps({**good, "custom_id": "m", "method": "GET"}).encode(),
        json.dumps({**good, "custom_id": "u", "url": "/v1/embeddings"}).encode(),
        json.dumps({**good, "custom_id": "b", "body": "text"}).encode(),
    ]) + b"\n"
    file = upload(client, data)
    assert file.status == "processed"  # the upload itself is fine
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait(client, batch.id, ("failed", "completed"))
    assert done.status == "failed" and done.failed_at is not None and done.in_progress_at is None
    assert done.output_file_id is None and done.error_file_id is None
    assert (done.request_counts.total, done.request_counts.completed) == (0, 0)
    assert [(e.line, e.code) for e in done.errors.data] == [
        (2, "invalid_json_line"), (3, "invalid_request"), (4, "missing_required_parameter"),
        (5, "duplicate_custom_id"), (6, "invalid_value"), (7, "url_mismatch"), (8, "invalid_value")]
    assert [e.param for e in done.errors.data[2:5]] == ["custom_id", "custom_id", "method"]

    empty = client.batches.create(input_file_id=upload(client, b"").id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert wait(client, empty.id, ("failed",)).errors.data[0].code == "empty_file"


def test_too_many_lines_fail_the_batch(client: OpenAI) -> None:
    row = json.dumps(line("r", "x"))
    data = "".join(row.replace('"r"', f'"r{k}"', 1) + "\n" for k in range(50_001)).encode()
    batch = client.batches.create(input_file_id=upload(client, data).id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait(client, batch.id, ("failed", "completed"))
    assert done.status == "failed"
    [error] = done.errors.data
    assert error.code == "too_many_tasks" and "50,001" in error.message and "50,000" in error.message


def test_input_file_byte_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import FormData
    from aiohttp.test_utils import TestClient, TestServer

    monkeypatch.setattr(server_module, "BATCH_MAX_BYTES", 1000)

    async def go() -> dict:
        async with TestClient(TestServer(build_app(ServerConfig(batch_seconds=0)))) as http:
            form = FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", jsonl([line(f"r{k}", "x" * 50) for k in range(10)]), filename="big.jsonl")
            file = await (await http.post("/v1/files", data=form)).json()
            assert file["bytes"] > 1000
            resp = await http.post("/v1/batches", json={"input_file_id": file["id"], "completion_window": "24h",
                                                        "endpoint": "/v1/chat/completions"})
            return await resp.json()

    batch = asyncio.run(go())
    assert batch["status"] == "failed"  # batch_seconds=0: decided at once
    assert batch["errors"]["data"][0]["code"] == "file_too_large" and "1,000" in batch["errors"]["data"][0]["message"]


def test_timeline_is_a_function_of_time() -> None:
    file = server_module._StoredFile("file-x", "in.jsonl", "batch", jsonl([line(f"r{k}", "x") for k in range(30)]), 0)
    batch = server_module._Batch("batch_x", file, None)
    assert batch.state(0.05, 1.0) == ("validating", 0)
    assert batch.state(0.1, 1.0) == ("in_progress", 0)
    assert batch.state(0.5, 1.0) == ("in_progress", 15)  # 0.4 of the 0.8 s in progress
    assert batch.state(0.89, 1.0)[1] == 29
    assert batch.state(0.95, 1.0) == ("finalizing", 30)
    assert batch.state(1.0, 1.0) == ("completed", 30)
    assert batch.state(0.0, 0.0) == ("completed", 30)
    batch.cancel_at, batch.cancel_done = 0.5, 15
    assert batch.state(0.55, 1.0) == ("cancelling", 15)
    assert batch.state(0.6, 1.0) == ("cancelled", 15)


def test_request_errors(srv: ServerProcess, client: OpenAI) -> None:
    file = upload(client, jsonl([line("a", "x")]))
    for bad in ({"endpoint": "/v1/embeddings"}, {"endpoint": "/v1/chat/completions", "completion_window": "48h"},
                {"input_file_id": "file-nope"}):
        args = {"input_file_id": file.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **bad}
        with pytest.raises(openai.BadRequestError) as info:
            client.batches.create(**args)
        assert info.value.body["param"] in bad  # the SDK's body is the "error" object
    other = client.files.create(file=("notes.txt", b"hello"), purpose="user_data")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=other.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("a.jsonl", b"{}"), purpose="nope")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")

    assert client.files.retrieve(other.id).model_dump() == other.model_dump()
    assert (other.object, other.bytes, other.filename, other.status) == ("file", 5, "notes.txt", "processed")
    assert other.id.startswith("file-")
    assert client.files.content(other.id).content == b"hello"
    assert client.files.delete(other.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(other.id)

    with make_client(srv, "sk-wrong-key-0000000000") as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.files.create(file=("a.jsonl", b"{}"), purpose="batch")
        with pytest.raises(openai.AuthenticationError):
            wrong.batches.list()
    with httpx.Client(trust_env=False) as http:
        assert http.get(srv.base_url + "/batches").status_code == 401  # no key at all
        assert http.get(srv.base_url + f"/files/{file.id}").status_code == 401


def test_list_batches_newest_first(client: OpenAI) -> None:
    first = start(client, [line("a", "list 1")])
    second = start(client, [line("a", "list 2")])
    page = client.batches.list()
    assert page.has_more is False
    ids = [b.id for b in page.data]
    assert ids.index(second.id) < ids.index(first.id)
    assert ids == [b.id for b in client.batches.list(limit=1)]  # the SDK follows has_more / after
    assert client.batches.list(limit=1).has_more is True


def test_stats_counters_and_reset(srv: ServerProcess, client: OpenAI) -> None:
    srv.reset()
    batch = start(client, [line(f"s{k}", f"stats {k}") for k in range(7)])
    stats = srv.stats()
    assert (stats["files_uploaded"], stats["batches_created"], stats["batch_lines"]) == (1, 1, 7)
    assert stats["requests"] == 0 and stats["received"] == {}  # batch lines are not chat requests
    assert stats["config"]["batch_seconds"] == 1.0
    srv.reset()
    stats = srv.stats()
    assert (stats["files_uploaded"], stats["batches_created"], stats["batch_lines"]) == (0, 0, 0)
    done = wait(client, batch.id, ("completed",))  # a reset keeps files and batches
    assert done.request_counts.completed == 7 and len(read_jsonl(client, done.output_file_id)) == 7
