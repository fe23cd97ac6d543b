"""What a hostile or odd endpoint does to a run: empty answers, no usage, undercounted tokens,
day-long 429 waits, silent and always-failing servers, huge answers. Each row keeps its own
outcome and the run stops with one clear error where going on is pointless."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import pandas as pd
import pytest

import nbparrot
from nbparrot.config import defaults
from nbparrot.engine import FAILED, OK
from nbparrot.errors import EndpointFailingError, EndpointUnreachableError, RateLimitWaitError
from nbparrot.panel_state import snapshot
from nbparrot.pricing import cost_of
from nbparrot.server import HUGE_ANSWER_MARKER, HUGE_JUNK_MARKER, NULL_CONTENT_MARKER, REFUSAL_MARKER

KEY = "sk-test-0123456789abcdef"


@pytest.fixture(autouse=True)
def _restore_defaults():
    saved = dataclasses.asdict(defaults)
    yield
    nbparrot.configure(**saved)


@pytest.fixture
def priced():
    """A made-up price for the mock model: $1,000 per million tokens, so budgets bite after a few rows."""
    nbparrot.set_price("mock", input=1000.0, output=1000.0)
    return "mock"


def frame(n: int, text: str = "row {i} of the frame") -> pd.DataFrame:
    return pd.DataFrame({"text": [text.format(i=i) for i in range(n)]})


def test_null_empty_and_refused_answers_are_retried_then_fail_and_are_never_cached(make_server):
    server = make_server(latency_ms=1)
    texts = [f"row {i}" for i in range(20)]
    texts[3] = f"row 3 {NULL_CONTENT_MARKER}"
    texts[11] = f"row 11 {REFUSAL_MARKER}"
    df = pd.DataFrame({"text": texts})
    run = nbparrot.map(df, "Say: {text}", base_url=server.base_url, api_key=KEY, max_retries=2, backoff=0.001)
    result = run.result()
    assert run.counts()["done"] == 18 and run.counts()["failed"] == 2
    assert result.isna().tolist() == [i in (3, 11) for i in range(20)]
    errors = run.errors
    assert "empty answer (content null" in errors.loc[3, "error"] and errors.loc[3, "attempts"] == 3
    assert "refused" in errors.loc[11, "error"] and "can't help" in errors.loc[11, "error"]
    # Nothing of theirs was cached: a rerun sends exactly those two rows again.
    before = server.stats()["requests"]
    again = nbparrot.map(df, "Say: {text}", base_url=server.base_url, api_key=KEY, max_retries=0)
    again.partial()
    assert server.stats()["requests"] - before == 2 and again.progress.cached == 18


def test_answers_without_usage_are_counted_from_estimates_and_max_cost_holds(make_server, priced):
    server = make_server(latency_ms=2, usage=False, completion_tokens=8)
    budget = 0.5
    with pytest.raises(nbparrot.BudgetExceededError) as info:
        nbparrot.map(frame(300), "Say: {text}", model=priced, base_url=server.base_url, api_key=KEY,
                     concurrency=64, max_tokens=16, max_cost=budget)
    run = info.value.run
    stats = server.stats()
    billed = cost_of(priced, stats["prompt_tokens"], stats["completion_tokens"])
    assert 0 < stats["ok"] < 300
    assert billed <= budget, (billed, stats["ok"])
    assert run.cost and run.cost >= billed * 0.9  # our own count, from estimates, is not zero
    assert run.progress.usage_estimated == run.progress.requests
    assert "estimated" in snapshot(run)["note"]


@pytest.mark.parametrize("scale", [1.5, 2.5])
def test_max_cost_holds_when_the_endpoint_counts_more_tokens_than_estimated(make_server, priced, scale):
    server = make_server(latency_ms=5, usage_scale=scale, completion_tokens=4)
    text = "a review that is long enough for the prompt to dominate the cost of its request, row {i} " * 4
    budget = 20.0
    with pytest.raises(nbparrot.BudgetExceededError) as info:
        nbparrot.map(frame(400, text), "Say: {text}", model=priced, base_url=server.base_url, api_key=KEY,
                     concurrency=64, max_tokens=4, max_cost=budget)
    run = info.value.run
    stats = server.stats()
    billed = cost_of(priced, stats["prompt_tokens"], stats["completion_tokens"])
    assert stats["ok"] > 10
    assert billed <= budget, (billed, stats["ok"])
    assert run.engine._ratio >= scale * 0.9  # learned from the first answer, before the fan-out


def test_a_429_that_asks_to_wait_a_day_stops_the_run_and_says_so(make_server):
    server = make_server(p429=1.0, retry_after_429=86400)
    with pytest.raises(RateLimitWaitError) as info:
        nbparrot.map(frame(50), "Say: {text}", base_url=server.base_url, api_key=KEY)
    run = info.value.run
    assert "24 h" in str(info.value) and "max_wait" in str(info.value)
    assert run.status == "failed" and server.stats()["requests"] == 1
    assert run.counts()["failed"] == 1 and run.counts()["cancelled"] == 49 and run.counts()["done"] == 0


@pytest.mark.filterwarnings("ignore:run .* was cancelled")
def test_a_long_pause_shows_its_reason_and_countdown(make_server):
    server = make_server(p429=1.0, retry_after_429=30)

    async def main() -> str:
        run = nbparrot.map(frame(5), "Say: {text}", base_url=server.base_url, api_key=KEY)
        deadline = time.monotonic() + 20
        while run.progress.pause is None:
            assert time.monotonic() < deadline, "no pause was shown"
            await asyncio.sleep(0.01)
        note = snapshot(run)["note"]
        run.cancel()
        try:
            await run
        except Exception:  # noqa: BLE001 - cancelled: only the note matters here
            pass
        return note

    note = asyncio.run(main())
    assert "paused" in note and "429" in note and "30 s" in note


def test_a_silent_endpoint_is_found_out_quickly(make_server):
    """A server that accepts connections and never answers: one run-level error, not 6 x 120 s of waiting."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # the kernel completes handshakes; nobody ever reads or answers
    try:
        nbparrot.configure(first_byte_timeout=0.5)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        with pytest.raises(EndpointUnreachableError) as info:
            nbparrot.map(frame(20), "Say: {text}", base_url=url, api_key=KEY)
        run = info.value.run
        assert "sent nothing" in str(info.value) and KEY not in str(info.value)
        assert run.counts()["cancelled"] == 20
    finally:
        listener.close()


def test_an_always_failing_endpoint_stops_after_a_few_rows(make_server):
    server = make_server(p502=1.0)
    with pytest.raises(EndpointFailingError) as info:
        nbparrot.map(frame(500), "Say: {text}", base_url=server.base_url, api_key=KEY, max_retries=5,
                     backoff=0.001)
    run = info.value.run
    assert "502" in str(info.value)
    assert server.stats()["requests"] == 3 * 6  # three rows, one at a time, six attempts each
    counts = run.counts()
    assert counts["failed"] == 3 and counts["cancelled"] == 497


def test_huge_answers_fail_their_row_without_being_read(make_server):
    server = make_server(huge_bytes=200_000_000)
    nbparrot.configure(max_response_bytes=1_000_000)
    texts = [f"row {i}" for i in range(12)]
    texts[2] = f"row 2 {HUGE_ANSWER_MARKER}"
    texts[7] = f"row 7 {HUGE_JUNK_MARKER}"
    run = nbparrot.map(pd.DataFrame({"text": texts}), "Say: {text}", base_url=server.base_url, api_key=KEY)
    result = run.result()
    statuses = [o.status for o in run.outcomes]
    assert statuses == [FAILED if i in (2, 7) else OK for i in range(12)]
    assert result.notna().sum() == 10
    for row in (2, 7):
        assert "max_response_bytes" in run.errors.loc[row, "error"] and run.errors.loc[row, "attempts"] == 1
    assert server.stats()["huge_bytes_sent"] < 50_000_000  # the junk was not read to its end
