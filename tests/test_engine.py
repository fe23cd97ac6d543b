"""The batch engine against the bundled server on 127.0.0.1: faults, limits, fatal errors, cancel."""

from __future__ import annotations

import asyncio

import pandas as pd
import pytest

import nbparrot
from nbparrot.engine import CANCELLED, FAILED, OK
from nbparrot.server import expected_tag, prompt_tag

KEY = "sk-test-0123456789abcdef"


def frame(n: int, text: str = "row {i} of the test frame") -> pd.DataFrame:
    return pd.DataFrame({"text": [text.format(i=i) for i in range(n)]}, index=[f"id{i}" for i in range(n)])


def own_tag(i: int, template: str = "Say: {text}", text: str = "row {i} of the test frame") -> str:
    return expected_tag([{"role": "user", "content": template.format(text=text.format(i=i))}])


def assert_rows_answered_by_their_own_prompt(run: nbparrot.Run, n: int) -> None:
    result = run.partial()
    for i, outcome in enumerate(run.outcomes):
        if outcome.status == OK:
            assert result[f"id{i}"].startswith(f"[{own_tag(i)}]"), (i, result[f"id{i}"])


def test_every_row_gets_its_own_answer_in_input_order(make_server):
    server = make_server(latency_ms=5, jitter_ms=20)
    df = frame(300)
    run = nbparrot.map(df, "Say: {text}", base_url=server.base_url, api_key=KEY, concurrency=32)
    result = run.result()
    assert list(result.index) == list(df.index) and result.name == "answer"
    assert run.status == "finished" and run.progress.done == 300
    assert_rows_answered_by_their_own_prompt(run, 300)
    stats = server.stats()
    assert stats["requests"] == 300
    assert all(count == 1 for count in stats["received"].values()) and len(stats["received"]) == 300


def test_fault_mix_loses_and_duplicates_nothing(make_server):
    """10 % 5xx, 1 % connection resets and 1 % stalls: every row answered correctly or failed with a reason."""
    server = make_server(latency_ms=2, p500=0.04, p502=0.03, p503=0.03, p_reset=0.01, pstall=0.01,
                         stall_seconds=30, seed=3)
    n = 600
    run = nbparrot.map(frame(n), "Say: {text}", base_url=server.base_url, api_key=KEY, concurrency=48,
                       timeout=1.0, backoff=0.01, max_retries=6)
    run.partial()
    statuses = [o.status for o in run.outcomes]
    assert statuses.count(OK) + statuses.count(FAILED) == n, "a row was lost or left pending"
    for outcome in run.outcomes:
        if outcome.status == FAILED:
            assert outcome.error and outcome.attempts >= 1
    assert_rows_answered_by_their_own_prompt(run, n)
    stats = server.stats()
    assert stats["faults"]["500"] + stats["faults"]["502"] + stats["faults"]["503"] > 0
    assert stats["faults"]["reset"] > 0 and stats["faults"]["stall"] > 0
    # with 7 attempts a row fails only with probability ~1e-7: all rows should be answered
    assert statuses.count(OK) == n
    assert sum(o.attempts for o in run.outcomes) == stats["requests"]


def test_rate_limits_are_kept_with_few_429s(make_server):
    """A short (1 s) burst window: the pacer learns it from the headers and keeps 429s rare."""
    server = make_server(latency_ms=20, rpm=12_000, tpm=120_000, burst_seconds=1, completion_tokens=8)
    n = 240
    run = nbparrot.map(frame(n), "Say: {text}", base_url=server.base_url, api_key=KEY, concurrency=64,
                       max_tokens=16, backoff=0.05)
    result = run.result()
    assert result.notna().all()
    stats = server.stats()
    assert run.progress.done == n
    assert stats["rate_limited"] <= 0.02 * stats["requests"], stats
    assert run.engine.pacer.limits() == {"rpm": 12_000, "tpm": 120_000}


def test_rate_limits_without_retry_after_still_finish(make_server):
    server = make_server(latency_ms=5, rpm=6_000, tpm=60_000, burst_seconds=1, retry_after=False)
    run = nbparrot.map(frame(60), "Say: {text}", base_url=server.base_url, api_key=KEY, concurrency=16,
                       max_tokens=16, backoff=0.05)
    assert run.result().notna().all()


def test_wrong_key_stops_after_one_request_without_showing_the_key(make_server):
    server = make_server(api_key="sk-the-right-key-0000")
    wrong = "sk-wrong-key-abcdefghijklmnop"
    with pytest.raises(nbparrot.AuthenticationError) as info:  # in a script, map raises the run's error
        nbparrot.map(frame(500), "Say: {text}", base_url=server.base_url, api_key=wrong)
    run = info.value.run
    assert run.status == "failed"
    assert wrong not in str(info.value) and "401" in str(info.value)
    assert server.stats()["requests"] == 1
    # the row that was sent failed with the 401; the others were never sent
    assert run.progress.failed == 1 and run.progress.cancelled == 499 and wrong not in run.errors.to_string()
    errors = run.errors
    assert errors["status"].iloc[0] == "failed" and errors["attempts"].iloc[0] == 1
    assert "401" in errors["error"].iloc[0] and set(errors["status"].iloc[1:]) == {"cancelled"}
    assert set(errors["attempts"].iloc[1:]) == {0} and errors["error"].iloc[1].startswith("not sent")


@pytest.mark.parametrize("setup, error", [
    ({"model": "no-such-model"}, nbparrot.ModelNotFoundError),
    ({"pquota": 1.0}, nbparrot.QuotaExceededError),
])
def test_fatal_errors_cost_one_request(make_server, setup, error):
    server = make_server(**{k: v for k, v in setup.items() if k != "model"})
    with pytest.raises(error):
        nbparrot.map(frame(50), "Say: {text}", base_url=server.base_url, api_key=KEY,
                     model=setup.get("model", "gpt-4o-mini"))
    assert server.stats()["requests"] == 1


def test_unreachable_endpoint_is_one_clear_error():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(nbparrot.EndpointUnreachableError, match="could not reach"):
        nbparrot.map(frame(20), "Say: {text}", base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                     max_retries=1, backoff=0.01)


def test_prompt_over_the_context_window_fails_only_its_row(make_server):
    server = make_server(context_window=400)
    df = frame(10)
    df.loc["id3", "text"] = "very long " * 400
    run = nbparrot.map(df, "Say: {text}", base_url=server.base_url, api_key=KEY, max_tokens=16)
    result = run.result()
    assert result.isna().tolist() == [i == 3 for i in range(10)]
    errors = run.errors
    assert list(errors.index) == ["id3"] and "context_length_exceeded" in errors.loc["id3", "error"]


def test_unknown_column_sends_nothing(make_server):
    server = make_server()
    with pytest.raises(nbparrot.TemplateError, match=r"\{txt\}.*columns: text"):
        nbparrot.map(frame(5), "Say: {txt}", base_url=server.base_url, api_key=KEY)
    assert server.stats()["requests"] == 0


def test_n_choices_and_missing_values(make_server):
    server = make_server()
    records = [{"text": "a"}, {"text": None}, {"text": "c"}]
    run = nbparrot.map(records, "Say: {text}", base_url=server.base_url, api_key=KEY, n=3)
    out = run.result()
    assert [r["text"] for r in out] == ["a", None, "c"]
    assert out[1]["answer"] is None and run.errors.loc[1, "status"] == "skipped"
    msgs = [{"role": "user", "content": "Say: a"}]
    assert [a[1:len(expected_tag(msgs, k)) + 1] for k, a in enumerate(out[0]["answer"])] == \
        [expected_tag(msgs, k) for k in range(3)]
    assert server.stats()["requests"] == 2


def test_cancel_mid_run_keeps_finished_rows_and_leaves_no_task(make_server):
    server = make_server(latency_ms=40, jitter_ms=40)

    async def scenario():
        run = nbparrot.map(frame(400), "Say: {text}", base_url=server.base_url, api_key=KEY, concurrency=8)
        assert not run.done()  # inside a running loop the call returns at once
        with pytest.raises(nbparrot.RunNotFinishedError, match="await"):
            run.result()
        while run.progress.done < 20:
            await asyncio.sleep(0.01)
        run.cancel()
        run.cancel()  # idempotent
        with pytest.warns(UserWarning, match="cancelled"):
            result = await run
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return run, result, others

    run, result, others = asyncio.run(scenario())
    assert others == []
    assert run.status == "cancelled"
    assert run.progress.last_error is None, "cancelling must not look like connection errors"
    statuses = [o.status for o in run.outcomes]
    assert statuses.count(OK) == run.progress.done >= 20
    assert statuses.count(OK) + statuses.count(CANCELLED) == 400
    assert result.notna().sum() == run.progress.done
    assert_rows_answered_by_their_own_prompt(run, 400)
    received = server.stats()["received"]
    for i, outcome in enumerate(run.outcomes):
        if outcome.status == OK:
            assert received[prompt_tag([{"role": "user", "content": f"Say: row {i} of the test frame"}])] == 1


def test_assigning_an_unfinished_run_to_a_column_is_refused(make_server):
    server = make_server(latency_ms=50)

    async def scenario():
        df = frame(20)
        run = nbparrot.map(df, "Say: {text}", base_url=server.base_url, api_key=KEY)
        with pytest.raises(nbparrot.RunNotFinishedError, match="await"):
            df["answer"] = run
        assert "answer" not in df.columns
        await run
        df["answer"] = run  # once finished, it works, aligned to the rows
        return df

    df = asyncio.run(scenario())
    assert df["answer"].str.startswith("[").all()
    assert df.loc["id7", "answer"].startswith(f"[{own_tag(7)}]")


def test_numeric_error_codes_fail_their_row_and_never_hang_the_run(make_server):
    server = make_server()
    df = frame(6)
    df.loc["id4", "text"] = "refuse me <<numeric-code>>"
    run = nbparrot.map(df, "Say: {text}", base_url=server.base_url, api_key=KEY)
    result = run.result()
    assert result.isna().tolist() == [i == 4 for i in range(6)]
    assert run.errors.loc["id4", "error"].startswith("400 400: This request was rejected")


def test_a_request_larger_than_the_learned_window_still_goes(make_server):
    """A 1 s window of 1,000 tokens and a row of ~1,300: it must not wait for ever at the head of the queue."""
    server = make_server(tpm=60_000, burst_seconds=1)
    df = frame(10)
    df.loc["id5", "text"] = "long " * 1000
    run = nbparrot.map(df, "Say: {text}", base_url=server.base_url, api_key=KEY, max_tokens=16, backoff=0.05,
                       timeout=5)
    run.partial()
    statuses = [o.status for o in run.outcomes]
    assert statuses.count(OK) >= 9 and statuses.count(OK) + statuses.count(FAILED) == 10
    if statuses[5] == FAILED:  # the server's own verdict, not a hang
        assert "too large" in run.outcomes[5].error
