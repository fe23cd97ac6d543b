"""What the panel says and how it looks, without a browser: retries in plain words, rates a user
can hold against the limit, an ETA only when it means something, one dollar format, theme colours.

Times are synthetic (fed into ``Pace``), so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket

import aiohttp
import pytest

import nbparrot
from nbparrot.comparison import comparison_html
from nbparrot.engine.progress import Progress
from nbparrot.engine.words import _describe, cause, retries_text, status_cause
from nbparrot.pace import ETA_MIN_ROWS, ETA_MIN_SECONDS, Pace, format_eta
from nbparrot.panel_html import COUNTS, faults_html, stats_html, summary_html, title_html
from nbparrot.panel_state import snapshot
from nbparrot.pricing import format_usd

KEY = "sk-panel-words-test-0123456789"


# ---- words ---------------------------------------------------------------------------------------


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("api.example.com", 443, True, None, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


@pytest.mark.parametrize("exc, expected", [
    (aiohttp.ClientPayloadError("Response payload is not completed: <TransferEncodingError: 400>"), "answer cut off"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "connection reset"),
    (aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"), "connection reset"),
    (aiohttp.ServerDisconnectedError(), "disconnected"),
    (asyncio.TimeoutError(), "timeout"),
    (_connector_error(ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")), "connection refused"),
    (_connector_error(socket.gaierror(-2, "Name or service not known")), "host not found"),
    (ValueError("something odd"), "ValueError"),
])
def test_transport_errors_in_plain_words(exc, expected):
    assert cause(exc) == expected
    described = _describe(exc)
    if expected != "ValueError":  # known faults: a sentence, never the library's message
        assert "payload is not completed" not in described and "Connect call failed" not in described
        assert type(exc).__name__ not in described and " " in described
    assert described == _describe(exc)  # stable, so rows can be grouped by reason


def test_statuses_and_retry_counts_in_words():
    assert status_cause(500) == "500 server error" and status_cause(503) == "503 unavailable"
    assert status_cause(599) == "599 server error" and status_cause(409) == "409 conflict"
    progress = Progress(3)
    for name in ("500 server error", "connection reset", "500 server error"):
        progress.count_retry(name, f"detail of {name}")
    assert progress.retried == {"500 server error": 2, "connection reset": 1}
    assert progress.last_error is None and progress.last_retry == "detail of 500 server error"
    assert retries_text(progress.retried) == "3 retried: 2× 500 server error, 1× connection reset"
    assert retries_text({}) == ""


# ---- rate and ETA ----------------------------------------------------------------------------------


def test_a_start_burst_is_counted_not_stretched_to_a_minute():
    pace = Pace()
    reading = pace.update(100.3, 100.0, requests=128, tokens=9_000, rows=0, remaining=300)
    assert not reading.full and reading.requests == 128 and reading.window == pytest.approx(0.3)
    assert reading.eta is None  # nothing settled: no ETA


def test_requests_per_minute_over_the_last_minute():
    pace, started = Pace(), 0.0
    reading = None
    for tick in range(1, 901):  # 90 s at 10 refreshes a second, 10 requests a second
        t = tick / 10
        reading = pace.update(t, started, requests=int(t * 10), tokens=int(t * 500), rows=int(t * 10), remaining=10_000)
    assert reading.full and 60 <= reading.window <= 61.5
    assert reading.per_minute(reading.requests) == pytest.approx(600, rel=0.03)
    assert reading.per_minute(reading.tokens) == pytest.approx(30_000, rel=0.03)
    # the rate halves: after a further minute the window shows only the new pace
    for tick in range(901, 1501):
        t = tick / 10
        reading = pace.update(t, started, requests=900 + int((t - 90) * 5), tokens=0, rows=0, remaining=1)
    assert reading.per_minute(reading.requests) == pytest.approx(300, rel=0.03)


def test_eta_waits_for_enough_time_and_rows_then_moves_smoothly():
    pace = Pace()
    total, rate = 3_000, 5.0  # rows per second, steady
    etas = []
    for tick in range(1, 1201):
        t = tick / 10
        rows = int(t * rate)
        reading = pace.update(t, 0.0, requests=rows, tokens=0, rows=rows, remaining=total - rows)
        if t < ETA_MIN_SECONDS or rows < ETA_MIN_ROWS:
            assert reading.eta is None, t
        etas.append((t, reading.eta))
    shown = [(t, eta) for t, eta in etas if eta is not None]
    assert shown and shown[0][0] >= ETA_MIN_SECONDS
    truth = lambda t: (total - t * rate) / rate  # noqa: E731
    assert shown[-1][1] == pytest.approx(truth(shown[-1][0]), rel=0.05)
    steps = [b[1] - a[1] for a, b in zip(shown, shown[1:])]
    assert max(abs(s) for s in steps) < 1.0  # 0.1 s apart: it counts down, it does not jump


def test_eta_does_not_follow_a_burst():
    pace = Pace()
    rows = 0
    for tick in range(1, 301):  # 30 s at 2 rows a second
        rows = tick // 5
        eta = pace.update(tick / 10 + 0.0, 0.0, rows, 0, rows, 1_000 - rows).eta
    before = eta
    rows += 100  # a hundred cached-looking answers land at once
    after = pace.update(30.1, 0.0, rows, 0, rows, 1_000 - rows).eta
    assert after > before / 2, (before, after)  # one refresh moves it only a little of the way


def test_eta_and_dollars_formats():
    assert [format_eta(s) for s in (3, 41, 59, 61, 3_599, 3_720)] == ["~5s", "~45s", "~1m", "~2m", "~1h00m",
                                                                      "~1h02m"]
    assert [format_usd(x) for x in (None, 0, 0.5, 1.35, 1234.567, 0.0123456, 0.000456, 0.0000001)] == [
        "cost unknown", "$0.00", "$0.50", "$1.35", "$1,234.57", "$0.0123", "$0.000456", "<$0.000001"]


# ---- the panel's HTML ------------------------------------------------------------------------------


def _snapshot_like(**over):
    base = {"total": 300, "settled": 0, "queued": 300, "in_flight": 0, "retrying": 0, "done": 0, "failed": 0,
            "cancelled": 0, "skipped": 0, "rate_limited": 0, "tokens": 0, "cost": 0.0, "projected": None,
            "cached": 0, "elapsed": 0.0, "eta": None, "oldest": None, "pace": None, "rpm_limit": 600,
            "tpm_limit": None, "last_error": None, "retried": {}, "last_retry": None, "note": None,
            "status": "running"}
    return {**base, **over}


def test_the_counts_line_holds_still():
    labels = lambda h: re.findall(r"</b> ([a-z ]+)", h.split("nbparrot-counts'>")[1].split("</span>")[0])  # noqa: E731
    empty = stats_html(_snapshot_like())
    busy = stats_html(_snapshot_like(queued=0, in_flight=12, retrying=3, done=280, failed=5, cached=9))
    assert [x.strip(" ·") for x in labels(empty)] == [c.replace("_", " ") for c in COUNTS] == \
           [x.strip(" ·") for x in labels(busy)]
    assert "min-width:3ch" in empty and "tabular-nums" in empty  # room for "300" from the start


def test_retries_are_neutral_and_failures_use_the_theme_error_colour():
    retried = faults_html(_snapshot_like(retried={"500 server error": 2, "connection reset": 1}, last_retry="500 x"))
    assert "3 retried: 2× 500 server error, 1× connection reset" in retried
    assert "--jp-error-color1" not in retried and "--jp-ui-font-color2" in retried
    failed = faults_html(_snapshot_like(failed=2, last_error="timed out waiting for the answer"))
    assert "--jp-error-color1" in failed and "2 failed" in failed
    assert "#b00" not in retried + failed


def test_a_run_with_retried_faults_that_all_answered_shows_no_error(make_server):
    server = make_server(p500=0.15, p503=0.05, seed=3)
    run = nbparrot.map([{"t": f"row {i}"} for i in range(80)], "Say {t}", base_url=server.base_url,
                       api_key=KEY, cache="off", progress=False, concurrency=8)
    assert run.progress.done == 80 and run.progress.failed == 0
    retried = run.progress.retried
    assert retried and set(retried) <= {"500 server error", "503 unavailable"}, retried
    assert run.progress.last_error is None
    html = summary_html(run)
    assert f"{sum(retried.values())} retried:" in html and "--jp-error-color1" not in html
    assert "nbparrot-preview" in html and "nbparrot-preview" not in summary_html(run, preview=False)
    s = snapshot(run)
    assert s["retried"] == retried and faults_html(s).count("nbparrot-retries") == 1
    title = title_html(run)
    host = server.base_url.split("//")[1].split("/")[0]
    assert f"· {host}</div>" in title and "Say {t}" in title.split("title='")[1].split("'")[0]
    assert "white-space:nowrap" in title


def test_comparison_shows_cached_answers_as_cached_with_one_dollar_format(make_server):
    server = make_server(completion_tokens=20)
    variants = ["Say {t}", "Shout {t}!"]
    rows = [{"t": "a"}, {"t": "b"}]
    first = nbparrot.map(rows, variants, base_url=server.base_url, api_key=KEY, progress=False)
    html = comparison_html(first, variants)
    assert "cached" not in html and "mean latency" in html
    dollars = re.findall(r"\$[0-9.,]+", html)
    assert len(dollars) == 2 and all(d == format_usd(float(d[1:])) for d in dollars), dollars
    again = nbparrot.map(rows, variants, base_url=server.base_url, api_key=KEY, progress=False)
    html = comparison_html(again, variants)
    assert html.count("· cached") == 4 and html.count("cached · ") == 2 and "no cost" in html
    assert "$" not in html and "mean latency –" not in html
