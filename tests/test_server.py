"""Tests of the bundled mock server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import aiohttp
import pytest

from nbparrot.server import (
    ServerConfig,
    ServerProcess,
    add_arguments,
    config_from_args,
    config_to_argv,
    expected_tag,
    format_duration,
    prompt_tag,
    prompt_tokens,
)

DURATION_RE = re.compile(r"^(\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s)$")


@dataclass
class Reply:
    """One HTTP reply: status, headers (lower-cased keys) and body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


async def _acall(url: str, payload: Any, headers: dict[str, str] | None, timeout: float, method: str) -> Reply:
    """Send one request with aiohttp and read the whole reply."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
        async with session.request(method, url, data=data, headers=headers) as resp:
            body = await resp.read()
            return Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)


def call(server: ServerProcess, payload: Any = None, *, path: str = "/chat/completions",
         headers: dict[str, str] | None = None, timeout: float = 10, method: str = "POST") -> Reply:
    """POST ``payload`` to ``server.base_url + path`` and return the reply."""
    return asyncio.run(_acall(server.base_url + path, payload, headers, timeout, method))


def chat(content: str = "hello", **extra: Any) -> dict:
    """A minimal chat completion request with one user message."""
    return {"model": "mock", "messages": [{"role": "user", "content": content}], **extra}


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.012, "12ms"), (0.09, "90ms"), (0.0004, "1ms"), (1.5, "1.5s"), (8.64, "8.64s"), (59, "59s"),
     (90, "1m30s"), (360, "6m0s"), (7200, "2h0m0s"), (3723.5, "1h2m3.5s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert DURATION_RE.match(text)


def test_tags_and_prompt_tokens() -> None:
    msgs = [{"role": "system", "content": "abc"}, {"role": "user", "content": [{"type": "text", "text": "defgh"}]}]
    assert prompt_tokens(msgs) == 2  # ceil(8 / 4)
    assert prompt_tokens([{"role": "user", "content": "x" * 9}]) == 3
    assert expected_tag(msgs, 2) == prompt_tag(msgs) + "#2"
    assert re.fullmatch(r"[0-9a-f]{12}#0", expected_tag(msgs))
    assert expected_tag(msgs) != expected_tag([{"role": "user", "content": "other"}])


def test_loopback_only() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        with pytest.raises(ValueError, match="loopback"):
            ServerConfig(host=host)
    with pytest.raises(ValueError, match="loopback"):
        ServerProcess(host="0.0.0.0")
    for host in ("127.0.0.1", "localhost", "::1"):
        ServerConfig(host=host)
    proc = subprocess.run([sys.executable, "-m", "nbparrot.server", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "loopback" in proc.stderr


def test_cli_flags_round_trip() -> None:
    config = ServerConfig(latency_ms=50, jitter_ms=5.5, rpm=3000, tpm=200_000, burst_seconds=1, p500=0.1,
                          p_reset=0.05, retry_after=False, api_key="sk-x", models=("a", "b"), max_lifetime=9.0,
                          completion_tokens_max=40, seed=7, batch_seconds=0.25)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(config_to_argv(config))) == config
    assert config_from_args(parser.parse_args([])) == ServerConfig()
    assert "--no-retry-after" in config_to_argv(config)


def test_invalid_config() -> None:
    with pytest.raises(ValueError):
        ServerConfig(p500=1.5)
    with pytest.raises(ValueError):
        ServerConfig(completion_tokens=10, completion_tokens_max=5)
    with pytest.raises(ValueError, match="batch_seconds"):
        ServerConfig(batch_seconds=-1)


# ----------------------------------------------------------------------------- answers


def test_chat_completion_shape_and_tags(server: ServerProcess) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a parrot?"}]
    reply = call(server, {"model": "gpt-4o-mini", "messages": messages, "n": 3})
    assert reply.status == 200
    data = reply.json()
    assert data["object"] == "chat.completion" and data["model"] == "gpt-4o-mini"
    assert data["id"].startswith("chatcmpl-") and data["system_fingerprint"]
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    for i, choice in enumerate(data["choices"]):
        assert choice["message"]["role"] == "assistant" and choice["message"]["refusal"] is None
        assert choice["message"]["content"].startswith("[" + expected_tag(messages, i) + "] What is a parrot?")
        assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    usage = data["usage"]
    assert usage["prompt_tokens"] == prompt_tokens(messages)
    assert usage["completion_tokens"] == 3 * 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0
    assert reply.headers["x-request-id"] and "openai-processing-ms" in reply.headers
    assert not any(k.startswith("x-ratelimit") for k in reply.headers)  # no limits configured
    again = call(server, {"model": "gpt-4o-mini", "messages": messages, "n": 3}).json()
    assert [c["message"] for c in again["choices"]] == [c["message"] for c in data["choices"]]  # deterministic


def test_completion_token_range_and_length_cap(make_server: Any) -> None:
    srv = make_server(completion_tokens=10, completion_tokens_max=60)
    seen = set()
    for k in range(12):
        usage = call(srv, chat(f"row {k}"))
        tokens = usage.json()["usage"]["completion_tokens"]
        assert 10 <= tokens <= 60
        assert call(srv, chat(f"row {k}")).json()["usage"]["completion_tokens"] == tokens  # deterministic
        seen.add(tokens)
    assert len(seen) > 1
    capped = call(srv, chat("row 0", max_tokens=5)).json()
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 5
    assert call(srv, chat("row 0", max_completion_tokens=5)).json()["usage"]["completion_tokens"] == 5


def test_json_object_and_markers(server: ServerProcess) -> None:
    fmt = {"type": "json_object"}
    data = call(server, chat("Describe row 7", response_format=fmt, n=2)).json()
    for i, choice in enumerate(data["choices"]):
        obj = json.loads(choice["message"]["content"])
        assert obj["tag"] == expected_tag(chat("Describe row 7")["messages"], i)
        assert obj["echo"] == "Describe row 7" and obj["choice"] == i
    plain = call(server, chat("Describe row 8 <<not-json>>", response_format=fmt)).json()
    with pytest.raises(ValueError):
        json.loads(plain["choices"][0]["message"]["content"])
    listed = json.loads(call(server, chat("Make questions <<list-json>>", response_format=fmt))
                        .json()["choices"][0]["message"]["content"])
    assert len(listed["items"]) == 3
    assert all(set(item) == {"question", "answer"} for item in listed["items"])


def test_json_schema_from_pydantic(server: ServerProcess) -> None:
    from pydantic import BaseModel, Field

    class Address(BaseModel):
        city: str
        zip_code: Optional[str] = None

    class Person(BaseModel):
        name: str
        age: int = Field(ge=18, le=30)
        score: float
        active: bool
        mood: Literal["happy", "sad", "meh"]
        tags: list[str]
        home: Address
        past: list[Address]
        nickname: str | None

    fmt = {"type": "json_schema", "json_schema": {"name": "Person", "schema": Person.model_json_schema(),
                                                   "strict": True}}
    names = set()
    for row in range(4):
        msgs = chat(f"person {row}")["messages"]
        content = call(server, chat(f"person {row}", response_format=fmt)).json()["choices"][0]["message"]["content"]
        person = Person.model_validate_json(content)
        assert 18 <= person.age <= 30 and len(person.tags) == 2 and len(person.past) == 2
        assert expected_tag(msgs) in person.name
        names.add(person.name)
    assert len(names) == 4

    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {
            "label": {"enum": ["a", "b", "c"]},
            "ids": {"type": "array", "items": {"type": "integer", "minimum": 5}, "minItems": 3},
            "maybe": {"type": ["number", "null"]},
            "choice": {"oneOf": [{"type": "string", "maxLength": 8}, {"type": "integer"}]},
            "when": {"type": "string", "format": "date-time"},
            "node": {"$ref": "#/definitions/Node"},
        },
        "required": ["label", "ids"],
        "definitions": {"Node": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}},
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    content = call(server, chat("any", response_format=fmt)).json()["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), schema)


def _sse_events(body: bytes) -> list[Any]:
    """Parse an SSE body into JSON payloads (and the "[DONE]" sentinel)."""
    events = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_streaming_matches_non_streaming(server: ServerProcess) -> None:
    base = chat("stream me", n=2)
    full = call(server, base).json()
    reply = call(server, {**base, "stream": True, "stream_options": {"include_usage": True}})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    events = _sse_events(reply.body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["message"]["content"] for c in full["choices"]}
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    no_usage = _sse_events(call(server, {**base, "stream": True}).body)
    assert all("usage" not in c for c in no_usage[:-1])
    assert server.stats()["streams"] == 2


# ----------------------------------------------------------------------------- request checks


def test_auth_masks_key(make_server: Any) -> None:
    srv = make_server(api_key="sk-right-key-0123456789")
    wrong = "sk-abcdefghijklmnopqrstuvwxyz"
    reply = call(srv, chat(), headers={"Authorization": f"Bearer {wrong}"})
    assert reply.status == 401
    error = reply.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
    assert "sk-" + "*" * (len(wrong) - 5) + "yz" in error["message"]
    assert wrong not in reply.body.decode() and "abcdefghijklmnopqrstuvw" not in reply.body.decode()
    assert call(srv, chat()).status == 401  # no key at all
    # auth is checked before the model
    assert call(srv, {**chat(), "model": "nope"}, headers={"Authorization": f"Bearer {wrong}"}).status == 401
    assert call(srv, chat(), headers={"Authorization": "Bearer sk-right-key-0123456789"}).status == 200
    assert call(srv, path="/models", method="GET").status == 401
    assert srv.stats()["received"] == {prompt_tag(chat()["messages"]): 1}


def test_unknown_model_and_bad_requests(server: ServerProcess) -> None:
    reply = call(server, {**chat(), "model": "gpt-9"})
    assert reply.status == 404
    assert reply.json()["error"] == {
        "message": "The model `gpt-9` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}
    assert call(server, {"model": "gpt-9"}).status == 404  # model is checked before the body
    for bad in (b"{not json", b"[]", json.dumps({"model": "mock"}), json.dumps({**chat(), "messages": []}),
                json.dumps({**chat(), "n": "two"}), json.dumps({"messages": [{"role": "user", "content": "x"}]})):
        reply = call(server, bad)
        assert reply.status == 400, bad
        assert reply.json()["error"]["type"] == "invalid_request_error"
    stats = server.stats()
    assert stats["requests"] == 8 and stats["status"] == {"404": 2, "400": 6}
    assert stats["ok"] == 0 and sum(stats["received"].values()) == 1  # only the bad "n" had valid messages


def test_context_length_exceeded(make_server: Any) -> None:
    srv = make_server(context_window=100)
    reply = call(srv, chat("x" * 500))  # 125 tokens
    assert reply.status == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith("This model's maximum context length is 100 tokens. However, your messages "
                                       "resulted in 125 tokens")
    reply = call(srv, chat("x" * 200, max_tokens=60))  # 50 + 60
    assert reply.status == 400 and "you requested 110 tokens (50 in the messages, 60 in the completion)" in \
        reply.json()["error"]["message"]
    assert call(srv, chat("x" * 200, max_tokens=50)).status == 200


def test_models_and_health(server: ServerProcess) -> None:
    data = call(server, path="/models", method="GET").json()
    assert data["object"] == "list"
    assert {m["id"] for m in data["data"]} == set(ServerConfig().models)
    assert all(m["object"] == "model" and m["owned_by"] == "nbparrot" for m in data["data"])
    assert asyncio.run(_acall(server.root_url + "/health", None, None, 5, "GET")).body == b"ok"


def test_stats_received_and_answered(make_server: Any) -> None:
    srv = make_server(p500=0.5, seed=3)
    rows = [f"row {k}" for k in range(6)]
    statuses = [call(srv, chat(r)).status for r in rows + rows[:2]]
    call(srv, {**chat("row 0"), "model": "nope"})  # rejected before counting
    stats = srv.stats()
    tags = [prompt_tag(chat(r)["messages"]) for r in rows]
    assert stats["received"] == {t: (2 if k < 2 else 1) for k, t in enumerate(tags)}
    assert sum(stats["answered"].values()) == statuses.count(200) == stats["ok"]
    assert stats["faults"]["500"] == statuses.count(500)
    assert stats["requests"] == 9 and stats["in_flight"] == 0 and stats["peak_in_flight"] >= 1
    assert stats["completion_tokens"] == 16 * stats["ok"] and stats["cpu_seconds"] > 0
    srv.reset()
    stats = srv.stats()
    assert stats["requests"] == 0 and stats["received"] == {} and stats["answered"] == {}


def test_fault_sequence_follows_seed(make_server: Any) -> None:
    srv = make_server(p500=0.3, p503=0.2, seed=11)
    statuses = [call(srv, chat(f"r{k}")).status for k in range(40)]
    rng = random.Random(11)
    expected = []
    for _ in range(40):
        draw = rng.random()
        expected.append(500 if draw < 0.3 else 503 if draw < 0.5 else 200)
    assert statuses == expected


# ----------------------------------------------------------------------------- rate limits


def test_request_rate_limit(make_server: Any) -> None:
    srv = make_server(rpm=6, burst_seconds=20)  # capacity 2 requests, refills one per 10 s
    first = call(srv, chat("a"))
    assert first.status == 200
    assert first.headers["x-ratelimit-limit-requests"] == "6"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert DURATION_RE.match(first.headers["x-ratelimit-reset-requests"])
    assert "x-ratelimit-limit-tokens" not in first.headers
    assert call(srv, chat("b")).headers["x-ratelimit-remaining-requests"] == "0"
    limited = call(srv, chat("c"))
    assert limited.status == 429
    error = limited.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert error["message"].startswith("Rate limit reached for mock in organization org-mock on requests per min "
                                       "(RPM): Limit 6, Used 2, Requested 1. Please try again in ")
    wait_ms = int(limited.headers["retry-after-ms"])
    assert 0 < wait_ms <= 10_000
    assert int(limited.headers["retry-after"]) == max(1, -(-wait_ms // 1000))
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    stats = srv.stats()
    assert stats["rate_limited"] == 1 and stats["status"] == {"200": 2, "429": 1}
    assert stats["received"][prompt_tag(chat("c")["messages"])] == 1 and stats["answered"].keys() == {
        prompt_tag(chat("a")["messages"]), prompt_tag(chat("b")["messages"])}
    srv.reset()  # refills the buckets
    assert call(srv, chat("c")).status == 200


def test_token_rate_limit_and_too_large(make_server: Any) -> None:
    srv = make_server(tpm=6000, burst_seconds=10)  # capacity 1000 tokens, refills 100 per second
    ok = call(srv, chat("x" * 40, max_tokens=590))  # costs 10 + 590
    assert ok.status == 200
    assert ok.headers["x-ratelimit-limit-tokens"] == "6000"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) in range(400, 410)
    limited = call(srv, chat("x" * 40, max_tokens=590))
    assert limited.status == 429
    error = limited.json()["error"]
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    used = re.search(r"on tokens per min \(TPM\): Limit 6000, Used (\d+),", error["message"])
    assert used and 500 <= int(used.group(1)) <= 600  # 600 charged, minus what refilled (100/s) in between
    assert "Requested 600." in error["message"]
    assert 0 < int(limited.headers["retry-after-ms"]) <= 2000
    # no max_tokens: the limiter charges 4096 per choice, more than the whole bucket
    too_large = call(srv, chat("hello"))
    assert too_large.status == 429
    error = too_large.json()["error"]
    assert error["message"].startswith("Request too large for mock in organization org-mock on tokens per min (TPM): "
                                       "Limit 6000, Requested 4098. The input or output tokens must be reduced")
    assert "retry-after" not in too_large.headers and "retry-after-ms" not in too_large.headers
    assert srv.stats()["too_large"] == 1


def test_no_retry_after(make_server: Any) -> None:
    srv = make_server(rpm=6, burst_seconds=10, retry_after=False)  # capacity 1
    assert call(srv, chat()).status == 200
    limited = call(srv, chat())
    assert limited.status == 429
    assert "retry-after" not in limited.headers and "retry-after-ms" not in limited.headers
    assert limited.headers["x-ratelimit-limit-requests"] == "6"


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    ("server", "status", "kind"),
    [({"p500": 1.0}, 500, "500"), ({"p502": 1.0}, 502, "502"), ({"p503": 1.0}, 503, "503"),
     ({"pquota": 1.0, "rpm": 600}, 429, "quota")],
    indirect=["server"],
)
def test_http_faults(server: ServerProcess, status: int, kind: str) -> None:
    reply = call(server, chat())
    assert reply.status == status
    if kind == "502":
        assert reply.headers["content-type"].startswith("text/html") and b"502 Bad Gateway" in reply.body
    else:
        error = reply.json()["error"]
        if kind == "quota":
            assert error["code"] == error["type"] == "insufficient_quota"
            assert "retry-after" not in reply.headers
            assert reply.headers["x-ratelimit-limit-requests"] == "600"
        else:
            assert error["type"] == "server_error"
    stats = server.stats()
    assert stats["faults"][kind] == 1 and stats["ok"] == 0 and stats["status"] == {str(status): 1}


@pytest.mark.parametrize("server", [{"p_reset": 1.0}], indirect=True)
def test_reset_fault_breaks_the_body(server: ServerProcess) -> None:
    async def go(payload: dict) -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.post(server.base_url + "/chat/completions", json=payload) as resp:
                status = resp.status
                with pytest.raises(aiohttp.ClientError):
                    await resp.read()
                return status

    assert asyncio.run(go(chat())) == 200
    assert asyncio.run(go(chat(stream=True))) == 200
    assert server.stats()["faults"]["reset"] == 2


@pytest.mark.parametrize("server", [{"pstall": 1.0, "stall_seconds": 1}], indirect=True)
def test_stall_fault_times_out(server: ServerProcess) -> None:
    with pytest.raises(asyncio.TimeoutError):
        call(server, chat(), timeout=0.3)
    with pytest.raises(aiohttp.ClientError):  # after stall_seconds the server drops the connection
        call(server, chat(), timeout=15)
    assert server.stats()["faults"]["stall"] == 2


# ----------------------------------------------------------------------------- the subprocess wrapper


def test_server_process_lifecycle() -> None:
    srv = ServerProcess(max_lifetime=0.5).start()
    assert srv.base_url.startswith("http://127.0.0.1:") and srv.base_url.endswith("/v1")
    assert srv.proc is not None
    assert srv.proc.wait(timeout=20) == 0  # exits on its own after max_lifetime
    srv.stop()
    srv.stop()  # idempotent
    with ServerProcess() as other:
        assert other.running and other.config.max_lifetime == 3600
    assert not other.running


# ----------------------------------------------------------------------------- SDK compatibility


def test_openai_sdk_compatibility(server: ServerProcess) -> None:
    httpx = pytest.importorskip("httpx")
    from openai import OpenAI
    from pydantic import BaseModel

    class Verdict(BaseModel):
        label: Literal["spam", "ham"]
        reason: str
        confidence: float

    client = OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0,
                    http_client=httpx.Client(trust_env=False))
    messages = [{"role": "user", "content": "Is this spam?"}]
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=messages, n=3)
    assert [c.message.content.startswith(f"[{expected_tag(messages, c.index)}]") for c in resp.choices] == [True] * 3
    assert resp.usage.prompt_tokens == prompt_tokens(messages) and resp.usage.completion_tokens == 48

    resp = client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                          response_format={"type": "json_object"})
    assert json.loads(resp.choices[0].message.content)["tag"] == expected_tag(messages)

    parsed = client.chat.completions.parse(model="gpt-4o-mini", messages=messages, response_format=Verdict)
    verdict = parsed.choices[0].message.parsed
    assert isinstance(verdict, Verdict) and expected_tag(messages) in verdict.reason

    stream = client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True,
                                            stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert text.startswith(f"[{expected_tag(messages)}]") and usage.completion_tokens == 16

    assert "gpt-4.1-nano" in {m.id for m in client.models.list()}
    client.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_server_exits_when_its_parent_dies() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    code = (f"import os, sys; sys.path.insert(0, {root!r}); from nbparrot.server import ServerProcess; "
            "srv = ServerProcess().start(); print(srv.proc.pid, flush=True); os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True
