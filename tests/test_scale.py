"""Large batches: rows rendered on demand, planning in slices after map() returned, one bad value = one failed row."""

from __future__ import annotations

import asyncio
import gc

import pandas as pd
import pytest

import nbparrot
from nbparrot import api, engine
from nbparrot.outcomes import FAILED, OK, PENDING
from nbparrot.server import expected_tag

KEY = "sk-scale-test"


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no text for this one")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def own_answers(run: nbparrot.Run, texts: list, template: str = "Say {text}") -> int:
    """How many rows were answered with the tag of their own rendered prompt."""
    result = run.partial()
    return sum(isinstance(result.iloc[i], str) and result.iloc[i].startswith(f"[{expected_tag(user(template.format(text=t)))}]")
               for i, t in enumerate(texts))


@pytest.fixture
def tiny_slices(monkeypatch):
    """Planning in slices of 64 rows: many yields to the loop (and cache lookups) per run."""
    monkeypatch.setattr(engine, "PLAN_SLICE", 1e-6)


@pytest.mark.parametrize("in_loop", [False, True], ids=["script", "running-loop"])
def test_one_bad_value_fails_its_row_and_the_others_run(make_server, in_loop):
    server = make_server()
    texts: list = [f"row {i}" for i in range(1000)]
    texts[123] = "bad \ud800 value"
    texts[456] = Unprintable()
    df = pd.DataFrame({"text": pd.Series(texts, dtype=object)})

    def start():
        return df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, concurrency=64)

    if in_loop:
        async def scenario():
            run = start()
            await asyncio.wait({run._task})
            return run
        run = asyncio.run(scenario())
    else:
        run = start()
    statuses = [o.status for o in run.outcomes]
    assert [k for k, s in enumerate(statuses) if s != OK] == [123, 456]
    errors = run.errors
    assert list(errors.index) == [123, 456] and (errors["status"] == FAILED).all() and (errors["attempts"] == 0).all()
    assert "value in 'text' is not valid text (lone surrogate \\ud800" in errors.loc[123, "error"]
    assert "str() of the value in 'text' raised ValueError: no text for this one" in errors.loc[456, "error"]
    good = [t for k, t in enumerate(texts) if k not in (123, 456)]
    assert own_answers(run, texts) == 998 == len(good)
    assert server.stats()["requests"] == 998 and run.status == "finished"


def test_map_returns_while_preparing_and_every_row_is_answered(make_server, tiny_slices):
    server = make_server()
    texts = [f"row {i}" for i in range(2000)]
    df = pd.DataFrame({"text": texts})
    seen: list[str] = []

    async def scenario():
        run = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, concurrency=64, progress=False)
        seen.append(run.status)
        assert run.estimate is None and not run.engine.planned and run.done() is False
        assert "preparing" in (run.progress.note or "")
        while not run.engine.planned:
            seen.append(run.status)
            await asyncio.sleep(0)
        await asyncio.wait({run._task})
        return run

    run = asyncio.run(scenario())
    assert seen[0] == "preparing" and set(seen) == {"preparing"}
    assert run.status == "finished" and run.estimate.requests == 2000
    assert own_answers(run, texts) == 2000 and server.stats()["requests"] == 2000
    assert run.progress.note is None


class AskingView:
    """A view that can ask, as the notebook panel does."""

    def __init__(self, run, in_loop):
        self.run, self.asked = run, 0

    def started(self):
        pass

    def ask(self):
        self.asked += 1

    def finished(self):
        pass


@pytest.mark.parametrize("answer", [True, False])
def test_confirm_over_asks_after_planning_and_before_any_request(make_server, tiny_slices, monkeypatch, answer):
    monkeypatch.setattr(api, "make_view", AskingView)
    server = make_server()
    texts = [f"row {i} " + "x" * 200 for i in range(1500)]
    df = pd.DataFrame({"text": texts})

    async def scenario():
        run = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY, confirm_over=1e-6)
        assert run.status == "preparing" and run.view.asked == 0
        while run.status != "waiting":
            assert not run.done()
            await asyncio.sleep(0.001)
        assert run.view.asked == 1 and run.estimate.requests == 1500
        await asyncio.sleep(0.2)
        assert server.stats()["requests"] == 0 and run.status == "waiting"
        run.confirm(answer)
        await asyncio.wait({run._task})
        return run

    run = asyncio.run(scenario())
    if answer:
        assert run.status == "finished" and own_answers(run, texts) == 1500
        assert server.stats()["requests"] == 1500
    else:
        assert run.status == "cancelled" and run.progress.cancelled == 1500
        assert server.stats()["requests"] == 0
        assert set(run.errors["error"]) == {"not sent: the run was not confirmed"}


def test_a_cached_rerun_fills_into_while_planning(make_server, tiny_slices):
    server = make_server()
    df = pd.DataFrame({"text": [f"t{i}" for i in range(600)]})
    first = df.llm.map("Say {text}", base_url=server.base_url, api_key=KEY).result()  # a script: no loop
    server.reset()

    async def scenario():
        run = df.llm.map("Say {text}", into="said", base_url=server.base_url, api_key=KEY, progress=False)
        assert run.status == "preparing" and df["said"].isna().all()
        await asyncio.wait({run._task})
        return run

    run = asyncio.run(scenario())
    assert run.progress.cached == 600 and server.stats()["requests"] == 0
    assert df["said"].tolist() == first.tolist()


def test_a_bad_record_found_while_planning_stops_the_run_before_any_request(make_server, tiny_slices):
    server = make_server()
    records = [{"text": f"r{i}"} for i in range(3000)]
    records[2500] = {"txt": "typo"}
    with pytest.raises(nbparrot.TemplateError, match=r"\{text\} is missing from 1 record\(s\).*at 2500"):
        nbparrot.map(records, "Say {text}", base_url=server.base_url, api_key=KEY)  # a script plans it all first

    async def scenario():
        run = nbparrot.map(records, "Say {text}", base_url=server.base_url, api_key=KEY, progress=False)
        assert run.status == "preparing"
        await asyncio.wait({run._task})
        return run

    run = asyncio.run(scenario())
    assert run.status == "failed" and isinstance(run.error, nbparrot.TemplateError)
    assert run.outcomes.count_status(PENDING) == 0 and server.stats()["requests"] == 0


def test_per_row_state_gives_the_garbage_collector_nothing_to_walk(make_server):
    """A finished run keeps its outcomes, keys and costs in flat columns: no tracked object per row."""
    server = make_server()
    df = pd.DataFrame({"text": [f"row {i}" for i in range(5000)]})
    warm = df.iloc[:200].llm.map("Warm up {text}", system="Be brief.", base_url=server.base_url, api_key=KEY,
                                 progress=False)  # first-use imports and caches, outside the count
    assert warm.progress.done == 200
    api.open_cache().flush()  # answers queued for the cache's writer thread are not the run's state
    gc.collect()
    before = len(gc.get_objects())
    run = df.llm.map("Say {text}", system="Be brief.", base_url=server.base_url, api_key=KEY, concurrency=128,
                     progress=False)
    assert run.progress.done == 5000
    api.open_cache().flush()
    gc.collect()
    assert len(gc.get_objects()) - before < 1500  # 5,000 Outcome objects (or message lists) would show here
    assert not any(gc.is_tracked(chunk) for chunk in run.outcomes.content.chunks)  # dicts of int -> str
    outcome = run.outcomes[4999]
    assert outcome.status == OK and outcome.attempts == 1 and outcome.finish_reason == "stop"
    assert outcome.prompt_tokens > 0 and outcome.latency > 0 and not outcome.cached
