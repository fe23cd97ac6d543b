"""The pacer's arithmetic: Go-style durations, retry hints, learned limits and the budget."""

from __future__ import annotations

import pytest

from nbparrot.ratelimit import Pacer, parse_duration, retry_after_seconds
from nbparrot.server import format_duration


@pytest.mark.parametrize("text, seconds", [
    ("12ms", 0.012), ("500ms", 0.5), ("0.5s", 0.5), ("1.5s", 1.5), ("1s", 1.0), ("6m0s", 360.0),
    ("1m30s", 90.0), ("2h", 7200.0), ("1h2m3.5s", 3723.5), ("250us", 0.00025), ("7", 7.0), ("0.25", 0.25),
])
def test_reset_durations_parse_exactly(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "12 ms", "1m 30s", "ms", "-3s", "1.5.2s"])
def test_unreadable_durations_are_none(text):
    assert parse_duration(text) is None


@pytest.mark.parametrize("seconds", [0.012, 0.5, 1.5, 59.9, 90.0, 360.0, 7322.0])
def test_the_servers_formatting_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.001)


def test_retry_after_prefers_milliseconds_then_seconds_then_the_message():
    assert retry_after_seconds({"retry-after-ms": "90", "retry-after": "1"}) == pytest.approx(0.09)
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({}, "Rate limit reached ... Please try again in 345ms. Visit ...") == pytest.approx(0.345)
    assert retry_after_seconds({}, "Please try again in 1.5s.") == 1.5
    assert retry_after_seconds({}, "no hint") is None


def headers(limit_r, remaining_r, reset_r, limit_t, remaining_t, reset_t):
    return {"x-ratelimit-limit-requests": str(limit_r), "x-ratelimit-remaining-requests": str(remaining_r),
            "x-ratelimit-reset-requests": reset_r, "x-ratelimit-limit-tokens": str(limit_t),
            "x-ratelimit-remaining-tokens": str(remaining_t), "x-ratelimit-reset-tokens": reset_t}


def test_limits_and_window_are_learned_from_the_headers():
    pacer = Pacer()
    assert pacer.delay(10_000, 0.0) == 0.0  # nothing known: nothing paced
    mark = pacer.take(100, 0.0)
    # 60,000 TPM = 1,000 tokens/s; 900 left and full again in 100ms: a one-second window of 1,000 tokens
    pacer.observe(headers(600, 9, "100ms", 60_000, 900, "100ms"), mark, 0.0)
    assert pacer.limits() == {"rpm": 600, "tpm": 60_000}
    assert pacer.tokens.capacity == pytest.approx(1_000)
    assert pacer.delay(900, 0.0) == 0.0
    assert pacer.delay(1_000, 0.0) == pytest.approx(0.1)  # exactly the deficit over the refill rate


def test_requests_sent_after_an_answer_are_carried_forward():
    pacer = Pacer()
    first = pacer.take(100, 0.0)
    for _ in range(5):
        pacer.take(100, 0.0)  # five more go out before the first answer comes back
    pacer.observe(headers(600, 599, "100ms", 600_000, 10_000, "59s"), first, 0.0)
    # the server saw only the first: 10,000 left then, minus the 500 sent since
    assert pacer.tokens.level == pytest.approx(9_500)


def test_a_429_pauses_everyone_and_never_shortens_a_pause():
    pacer = Pacer(rpm=6_000, tpm=1_000_000)
    pacer.backoff(2.0, 10.0)
    pacer.backoff(0.5, 10.0)
    assert pacer.delay(1, 10.0) == pytest.approx(2.0)
    assert pacer.delay(1, 12.0) == 0.0


def test_given_limits_win_over_headers_and_oversized_requests_still_go():
    pacer = Pacer(rpm=60, tpm=6_000)
    pacer.observe(headers(1, 0, "1m", 10, 0, "1m"), pacer.take(1, 0.0), 0.0)
    assert pacer.limits() == {"rpm": 60, "tpm": 6_000}
    assert pacer.too_large(6_001) and not pacer.too_large(6_000)
    learned = Pacer()
    learned.observe(headers(600, 10, "1s", 60_000, 100, "900ms"), (0.0, 0.0, 0.0), 0.0)  # capacity 1,000
    assert learned.delay(2_000, 0.0) == pytest.approx(0.9)  # waits for a full bucket, not for ever
