"""Cascades (``cascade=(cheap, strong)`` on ``filter`` / ``classify``) against the bundled server's
weak/strong pair: ``mock-weak`` errs on ``<<hard>>`` rows with low confidence, ``mock-strong`` never
(see nbparrot.server.decisions). The truth is the server's rule for the strong model."""

from __future__ import annotations

import asyncio
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import nbparrot
from nbparrot.errors import BudgetExceededError, ConfigError, LogprobsUnavailableError
from nbparrot.operators.cascade import learn_band, wilson_upper
from nbparrot.server import HARD_MARKER, STRONG_MODEL, WEAK_MODEL, expected_decision, expected_label

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import KernelHarness, kernel_python, wait_until  # noqa: E402

KEY = "sk-cascade-test-0123456789"
PAIR = (WEAK_MODEL, STRONG_MODEL)
LABELS = ["billing", "shipping", "returns", "other"]


@pytest.fixture(autouse=True)
def _prices():
    nbparrot.set_price(WEAK_MODEL, input=0.10, output=0.40)
    nbparrot.set_price(STRONG_MODEL, input=2.00, output=8.00)


def rows(n: int, hard_every: int = 4) -> pd.DataFrame:
    """Review texts, every ``hard_every``-th marked hard (the weak model errs there)."""
    return pd.DataFrame({"text": [f"review number {i}" + (f" {HARD_MARKER}" if i % hard_every == 0 else "")
                                  for i in range(n)]}, index=[f"r{i}" for i in range(n)])


def opts(server, **more) -> dict:
    return {"base_url": server.base_url, "api_key": KEY, "progress": False, **more}


def strong_requests(server) -> int:
    return server.stats()["models"].get(STRONG_MODEL, 0)


def test_a_filter_cascade_meets_its_target_with_fewer_strong_requests(make_server):
    server = make_server()
    df = rows(400)
    run = nbparrot.filter(df, "{text}", mask=True, cascade=PAIR, target=0.9, **opts(server))
    mask = run.result()
    truth = [expected_decision(t, STRONG_MODEL) for t in df.text]
    weak_alone = np.mean([expected_decision(t, WEAK_MODEL) == s for t, s in zip(df.text, truth)])
    agreement = np.mean([bool(m) == s for m, s in zip(mask, truth)])
    assert weak_alone < 0.9 <= agreement  # the cheap model alone misses the target; the cascade meets it
    report = run.cascade
    assert report["stage"] == "done" and report["sample"] == 100
    assert report["rows"][WEAK_MODEL] + report["rows"][STRONG_MODEL] == 400
    stats = server.stats()["models"]
    assert stats[WEAK_MODEL] == 400 and stats[STRONG_MODEL] == report["rows"][STRONG_MODEL] < 400
    assert run.usage[STRONG_MODEL]["requests"] == stats[STRONG_MODEL]
    assert report["agreement_bound"] >= 0.9 and report["cost"] < report["strong_only_cost"]
    assert set(report["thresholds"]) == {True, False}
    # every row kept from the weak model is one it was confident about, at or above its value's threshold
    assert "cascade:" in run.summary() and "strong-only" in run.summary()


def test_a_classify_cascade_meets_its_target(make_server):
    server = make_server()
    df = rows(300, hard_every=3)
    run = df.llm.classify("{text}", LABELS, cascade=PAIR, target=0.85, cascade_sample=90, **opts(server))
    labels = run.result()
    truth = [expected_label(t, LABELS, STRONG_MODEL) for t in df.text]
    assert np.mean([a == b for a, b in zip(labels, truth)]) >= 0.85
    assert run.cascade["sample"] == 90 and strong_requests(server) < 300
    assert labels.dtype == "category" and list(labels.cat.categories) == LABELS


def test_a_rerun_comes_from_the_cache_and_sends_nothing(make_server):
    server = make_server()
    df = rows(200)
    first = nbparrot.filter(df, "{text}", cascade=PAIR, **opts(server))
    kept = first.result()
    sent = server.stats()["requests"]
    again = nbparrot.filter(df, "{text}", cascade=PAIR, meta=True, **opts(server))
    assert again.estimate.requests == 0  # every pass found whole in the cache: planned through
    assert again.result().index.equals(kept.index)
    assert server.stats()["requests"] == sent
    assert again.cascade["rows"] == first.cascade["rows"] and again.cost == 0
    models = again.result()["model"]  # meta=True: the model that decided each row
    assert set(models) <= set(PAIR) and list(models) == [first.model_of(df.index.get_loc(i)) for i in kept.index]
    assert [p.label for p in again.passes] == [p.label for p in first.passes]  # the same passes, from the cache
    assert [p.label.split(":")[0] for p in first.passes][:2] == ["cascade 1/3", "cascade 2/3"]


def test_cancel_mid_cascade_keeps_the_finished_rows_and_a_rerun_sends_only_the_rest(make_server):
    server = make_server(latency_ms=40)
    df = rows(300)

    async def main():
        run = nbparrot.filter(df, "{text}", mask=True, cascade=PAIR, concurrency=4, **opts(server))
        for _ in range(3000):  # bounded: until the strong model works on the unsure rows
            if run.cascade["stage"] == "strong model on the unsure rows" and run.progress.done > 400:
                break
            await asyncio.sleep(0.01)
        assert run.cascade["stage"] == "strong model on the unsure rows"
        run.cancel()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run, await run

    run, mask = asyncio.run(main())
    assert run.status == "cancelled"
    report = run.cascade
    decided = mask.notna()
    errors = run.errors
    assert set(errors["status"]) == {"cancelled"} and len(errors) == (~decided).sum() > 0
    # the sample and the rows kept from the weak model all have their decision, the unsure ones partly
    assert report["rows"][WEAK_MODEL] + report["sample"] < decided.sum() < 300
    truth = [expected_decision(t, STRONG_MODEL) for t in df.text]
    strong_rows = [k for k in range(300) if run.model_of(k) == STRONG_MODEL and decided.iloc[k]]
    assert all(bool(mask.iloc[k]) == truth[k] for k in strong_rows)
    before = strong_requests(server)
    again = nbparrot.filter(df, "{text}", mask=True, cascade=PAIR, **opts(server))
    assert again.result().notna().all()
    assert server.stats()["models"][WEAK_MODEL] == 300  # the cheap pass and the sample came from the cache
    assert strong_requests(server) - before == (~decided).sum()


def test_an_endpoint_without_logprobs_stops_after_one_request(make_server):
    server = make_server(logprobs=False)
    with pytest.raises(LogprobsUnavailableError, match="without logprobs") as stopped:
        nbparrot.filter(rows(50), "{text}", cascade=PAIR, **opts(server))  # a script raises the run's error
    run = stopped.value.run
    assert run.status == "failed" and server.stats()["requests"] == 1  # the first request went alone
    assert set(run.errors["status"]) == {"cancelled"} and len(run.errors) == 50


@pytest.fixture(scope="module")
def idle_server():
    """One server for the bad-input cases: none of them may send anything, so its count stays 0."""
    from nbparrot.server import ServerProcess

    with ServerProcess() as server:
        yield server


@pytest.mark.parametrize("kwargs, words", [
    ({"cascade": PAIR, "target": 0}, "target"),
    ({"cascade": PAIR, "target": 1.0}, "target"),
    ({"cascade": PAIR, "target": "high"}, "target"),
    ({"cascade": (WEAK_MODEL, WEAK_MODEL)}, "twice"),
    ({"cascade": WEAK_MODEL}, "two model names"),
    ({"cascade": (WEAK_MODEL, STRONG_MODEL, "mock")}, "two model names"),
    ({"target": 0.9}, "need cascade"),
    ({"cascade": ("gpt-5-nano", "gpt-4.1")}, "no logprobs"),
    ({"cascade": PAIR, "model": "mock"}, "model="),
    ({"cascade": PAIR, "mode": "batch"}, "mode='live'"),
    ({"cascade": PAIR, "cascade_sample": 0}, "cascade_sample"),
])
def test_bad_cascade_arguments_fail_before_any_request(idle_server, kwargs, words):
    server = idle_server
    with pytest.raises(ConfigError, match=words):
        nbparrot.filter(rows(10), "{text}", **opts(server, **kwargs))
    with pytest.raises(ConfigError, match="multi=True"):
        nbparrot.classify(rows(10), "{text}", LABELS, multi=True, **opts(server, cascade=PAIR))
    assert server.stats()["requests"] == 0


def test_learn_band_keeps_the_most_rows_within_the_bound():
    # group 0: confident and right; group 1: unsure rows the strong model disagrees with
    groups = np.array([0] * 80 + [1] * 20)
    confidence = np.concatenate([np.linspace(0.99, 0.9, 80), np.linspace(0.6, 0.5, 20)])
    disagree = np.array([0] * 80 + [1] * 20)
    thresholds, errors = learn_band(groups, confidence, disagree, target=0.9, outside_share=1.0)
    assert errors <= 20 and wilson_upper(errors, 100) <= 0.1 < wilson_upper(errors + 1, 100)
    assert thresholds[0] == pytest.approx(0.9)  # every right row kept
    assert thresholds[1] == pytest.approx(confidence[80 + errors - 1])  # the most confident wrong ones let through
    nothing, none = learn_band(groups, confidence, disagree, target=0.999, outside_share=1.0)
    assert nothing == {0: None, 1: None} and none == 0  # no band is good enough: the strong model decides all


def test_max_cost_and_confirm_over_span_the_stages(make_server):
    server = make_server()
    df = rows(300)
    with pytest.raises(ConfigError, match="confirm_over") as asked:
        nbparrot.filter(df, "{text}", cascade=PAIR, confirm_over=0.001, **opts(server))
    assert "on the sample" in str(asked.value) and server.stats()["requests"] == 0  # the whole cascade's estimate
    with pytest.raises(BudgetExceededError) as stopped:
        nbparrot.filter(df, "{text}", mask=True, cascade=PAIR, max_cost=0.06, **opts(server))
    run = stopped.value.run
    assert run.status == "stopped" and run.cost <= 0.06
    assert server.stats()["models"][WEAK_MODEL] == 300 and 0 < strong_requests(server) < 100  # stopped in the sample
    # only the sample rows the strong model answered are decided: without the band no cheap answer is kept
    assert run.cascade["stage"] == "stopped" and run.partial().notna().sum() == strong_requests(server)
    assert set(run.errors["status"]) == {"cancelled"} and "max_cost" in run.errors["error"].iloc[0]


def test_in_a_kernel_the_cascade_returns_at_once_and_the_panel_cancel_spans_its_stages(tmp_path, make_server):
    server = make_server(latency_ms=40)
    env = {"NBPARROT_CACHE_DIR": str(tmp_path / "cache"), "OPENAI_API_KEY": KEY}
    with KernelHarness(python=kernel_python(None), cwd=str(tmp_path), env=env) as kernel:
        started = kernel.execute(
            "import nbparrot, pandas as pd\n"
            "nbparrot.set_price('mock-weak', input=0.1, output=0.4); nbparrot.set_price('mock-strong', input=2, output=8)\n"
            f"df = pd.DataFrame({{'text': {rows(300).text.tolist()!r}}})\n"
            f"run = nbparrot.filter(df, '{{text}}', mask=True, cascade=('mock-weak', 'mock-strong'), concurrency=4,"
            f" base_url={server.base_url!r})\n"
            "print(run.done())", check=True)
        assert started.stdout == "False\n"  # the cell returned while the cascade goes on
        wait_until(lambda: kernel.eval("run.cascade['stage']") == "strong model on the unsure rows"
                   and kernel.eval("run.progress.done") > 400, timeout=60, message="the strong pass never started")
        kernel.click(kernel.wait_for_widget("Button", description="Cancel"))
        report = json.loads(kernel.execute(
            "import asyncio, json\nawait asyncio.wait({run._task})\n"
            "print(json.dumps({'status': run.status, 'decided': int(run.partial().notna().sum()),"
            " 'cascade': {k: run.cascade[k] for k in ('rows', 'sample', 'stage')}, 'summary': run.summary()}))",
            check=True, timeout=30).stdout)
    assert report["status"] == "cancelled" and report["cascade"]["stage"] == "stopped"
    rows_by = report["cascade"]["rows"]
    assert report["decided"] == rows_by[WEAK_MODEL] + rows_by[STRONG_MODEL] < 300
    assert rows_by[STRONG_MODEL] > report["cascade"]["sample"]  # some unsure rows were decided before the Cancel
    assert f"{report['decided']}/300 answered" in report["summary"] and "cascade:" in report["summary"]


def test_the_strong_models_passes_are_estimated_at_the_endpoints_price():
    """The sample and unsure passes (not planned yet) were estimated by the strong model's name alone, which
    a gateway's names ("openai/gpt-4o") do not have. A loopback URL is priced by the name, so this plans against
    the gateway's URL: confirm_over refuses the run in a script after planning, before any request is sent."""
    with pytest.raises(ConfigError, match="above confirm_over") as refused:
        rows(20).llm.filter("{text} is good", cascade=("openai/gpt-4.1-nano", "openai/gpt-4o"), progress=False,
                            base_url="https://openrouter.ai/api/v1", api_key=KEY, cache="off", confirm_over=0.0)
    assert "openai/gpt-4o on the sample: ≤" in str(refused.value) and "cost unknown" not in str(refused.value)
