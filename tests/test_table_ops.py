"""``agg``, ``topk`` and ``join`` against the bundled server, whose markers give each a truth to check
(nbparrot/server/table.py): rows seen per request, exact merits behind coarse scores, shared keys.
In a script and on a real kernel's loop (panel, Cancel, resume, a cached rerun that sends nothing)."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

import nbparrot
from nbparrot.run import session_usage
from nbparrot.server import expected_choice, expected_match, expected_score, expected_seen

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import KernelHarness, wait_until  # noqa: E402

KEY = "sk-test-0123456789abcdef"
TOPICS = ["apple banana cherry", "river mountain lake", "piano violin drum", "python rust golang", "soccer tennis golf"]


def opts(server, **more) -> dict:
    return {"base_url": server.base_url, "api_key": KEY, "model": "mock", "progress": False, **more}


def reviews(n: int, groups: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"shop": [f"s{i % groups}" for i in range(n)],
                         "text": [f"<<row:r{i}>> review {i} of shop s{i % groups}, some words to read" for i in range(n)]},
                        index=[f"i{i}" for i in range(n)])


def merits_frame(merits: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"text": [f"item {i} <<score:{m}>>" for i, m in enumerate(merits)]},
                        index=[f"r{i}" for i in range(len(merits))])


def tables(n: int = 40, m: int = 30) -> tuple[pd.DataFrame, pd.DataFrame, set]:
    left = pd.DataFrame({"note": [f"<<key:k{i}>> {TOPICS[i % 5]} note {i}" for i in range(n)]})
    keys = [(j * 7) % 50 for j in range(m)]
    right = pd.DataFrame({"card": [f"<<key:k{k}>> {TOPICS[k % 5]} card {j}" for j, k in enumerate(keys)],
                          "n": range(m)})
    truth = {(i, j) for i in range(n) for j in range(m) if keys[j] == i}
    return left, right, truth


def requests(server) -> int:
    return server.stats()["requests"]


def embedded(server) -> int:
    return server.stats()["embedding_requests"]


# ---- the server's rules ------------------------------------------------------------------------


def test_the_servers_table_rules():
    assert expected_score("a <<score:734>> b") == 73 and expected_score("<<score:5>> <<score:9>>") is None
    assert expected_score("x <<score:2000>>", 0, 100) == 100 and expected_score("no marker") is None
    assert expected_choice("A: <<score:10>>\n\nB: <<score:20>>", ["A", "B"]) == "B"
    assert expected_choice("A: <<score:20>>\n\nB: <<score:20>>", ["A", "B"]) == "A"
    assert expected_match("<<key:a>> x <<key:a>>") is True and expected_match("<<key:a>> <<key:b>>") is False
    assert expected_match("plain") is None and expected_seen("<<seen:r1,r2>>") == ["r1", "r2"]
    from nbparrot.server.table import text_answer

    assert text_answer("Q\nDocument 1:\nx <<score:3>>\nDocument 2:\ny <<score:30>>") == "Document 2"
    assert text_answer("<<key:a>> and <<key:a>>") == "True" and text_answer("<<key:a>> <<key:b>>") == "False"
    assert text_answer("<<row:r1>> <<seen:r2,r3>>") == "<<seen:r1,r2,r3>>" and text_answer("plain") is None


# ---- agg -----------------------------------------------------------------------------------------


def test_agg_folds_each_group_and_every_row_is_in_exactly_one_first_level_request(make_server):
    server = make_server(latency_ms=1)
    df = reviews(300)
    run = df.llm.agg("What do these {text}s say?", by="shop", context_tokens=1200, max_tokens=300, **opts(server))
    estimate = str(run.estimate)
    assert "level 1:" in estimate and "level 2: ≤" in estimate  # levels and requests, known before anything was sent
    answers = run.result()
    assert answers.index.tolist() == ["s0", "s1", "s2"] and answers.name == "answer"
    seen = server.stats()["rows_seen"]  # the server's own log: the row IDs of each first-level request
    ids = [i for request in seen for i in request]
    assert Counter(ids) == Counter(f"r{i}" for i in range(300))  # every row in exactly one first-level request
    shop_of = dict(zip((f"r{i}" for i in range(300)), df.shop))
    assert all(len({shop_of[i] for i in request}) == 1 for request in seen)  # no request mixes groups
    assert len(seen) > 3 and len(run.passes) >= 2  # the groups did not fit: folded over levels
    for shop, answer in answers.items():  # the final answer covers exactly its group's rows
        assert sorted(expected_seen(answer)) == sorted(i for i in shop_of if shop_of[i] == shop)
    sent = requests(server)
    assert sent == run.progress.requests <= run.estimate.requests  # the estimate is an upper bound
    again = df.llm.agg("What do these {text}s say?", by="shop", context_tokens=1200, max_tokens=300, **opts(server))
    assert again.estimate.requests == 0 and again.result().equals(answers)
    assert requests(server) == sent  # the rerun came from the cache, level by level


def test_agg_without_by_gives_one_answer_and_small_groups_take_one_request(make_server):
    server = make_server()
    df = reviews(12)
    answer = nbparrot.agg(df, "Summarize the {text}", context_tokens=8000, **opts(server)).result()
    assert isinstance(answer, str) and sorted(expected_seen(answer)) == sorted(f"r{i}" for i in range(12))
    assert requests(server) == 1
    records = df.to_dict("records")
    by_two = nbparrot.agg(records, "Summarize the {text}", by=["shop"], context_tokens=8000, **opts(server)).result()
    assert by_two.index.tolist() == ["s0", "s1", "s2"] and requests(server) == 4


def test_agg_re_splits_a_request_refused_for_its_length(make_server):
    server = make_server(context_window=1200)  # the server's window is smaller than the client believes
    df = reviews(300)
    run = df.llm.agg("What do these {text}s say?", by="shop", context_tokens=2000, max_tokens=300, **opts(server))
    answers = run.result()
    assert server.stats()["status"].get("400", 0) > 0  # some requests were refused for their length ...
    assert run.errors.empty and run.status == "finished"  # ... and split, not failed
    ids = [i for request in server.stats()["rows_seen"] for i in request]
    assert Counter(ids) == Counter(f"r{i}" for i in range(300))
    for shop, answer in answers.items():
        assert len(expected_seen(answer)) == 100


# ---- topk ----------------------------------------------------------------------------------------


def test_topk_returns_the_true_top_k_best_first_in_about_n_requests(make_server):
    server = make_server(latency_ms=1)
    merits = random.Random(7).sample(range(1000), 200)
    df = merits_frame(merits)
    counted = session_usage().get("mock", {}).get("requests", 0)
    run = df.llm.topk("the most exciting {text}", 5, **opts(server))
    assert "scores: 200" in str(run.estimate)
    top = run.result()
    assert session_usage()["mock"]["requests"] - counted == requests(server)  # each pass counted once
    truth = sorted(range(200), key=lambda i: -merits[i])[:5]
    assert top.index.tolist() == [f"r{i}" for i in truth] and top["rank"].tolist() == [1, 2, 3, 4, 5]
    assert top["score"].tolist() == [expected_score(t) for t in top.text]
    assert 200 <= requests(server) < 230  # a scored pass and a few comparisons, never the 19,900 pairs
    rerun = df.llm.topk("the most exciting {text}", 5, **opts(server))
    assert rerun.estimate.requests == 0 and rerun.result().equals(top) and requests(server) == run.progress.requests


def test_topk_orders_rows_tied_on_the_score_by_comparisons(make_server):
    server = make_server()
    merits = [500 + (i * 37) % 100 for i in range(60)]  # every score 50..59: ten tied rows a score
    top = nbparrot.topk(merits_frame(merits), "best {text}", 7, **opts(server)).result()
    assert top.index.tolist() == [f"r{i}" for i in sorted(range(60), key=lambda i: -merits[i])[:7]]
    passes = requests(server) - 60
    assert 0 < passes < 60  # the tied rows at the cut were ordered pairwise, a few per row


# ---- join ----------------------------------------------------------------------------------------


def test_join_returns_exactly_the_true_pairs(make_server):
    server = make_server(latency_ms=1)
    left, right, truth = tables()
    run = left.llm.join(right, "{left.note} goes with {right.card}", **opts(server))
    assert run.estimate.requests == 40 * 30 and "pairs: 1,200" in str(run.estimate)
    pairs = run.result()
    got = {(int(note.split("note ")[1]), int(n)) for note, n in zip(pairs.note, pairs.n)}
    assert got == truth and list(pairs.columns) == ["note", "card", "n"]
    assert requests(server) == 1200 and run.passes[-1].engine is run.engine.work.pairs  # planned once, sent as planned
    again = nbparrot.join(left, right, "{note} goes with {right.card}", **opts(server))  # bare {note}: left only
    assert again.estimate.requests == 0 and again.result().equals(pairs) and requests(server) == 1200


def test_join_with_candidates_asks_only_about_the_nearest_right_rows(make_server):
    server = make_server(latency_ms=1)
    left, right, truth = tables()
    run = left.llm.join(right, "{left.note} goes with {right.card}", candidates=3, embed_model="mock-embed",
                        **opts(server))
    assert "embeddings: 1" in str(run.estimate) and "pairs: ≤120" in str(run.estimate)
    pairs = run.result()
    got = {(int(note.split("note ")[1]), int(n)) for note, n in zip(pairs.note, pairs.n)}
    assert got == truth and "similarity" in pairs.columns  # each true partner shares a key word: among the 3 nearest
    assert requests(server) - embedded(server) == 40 * 3 and embedded(server) == 1
    again = left.llm.join(right, "{left.note} goes with {right.card}", candidates=3, embed_model="mock-embed",
                          **opts(server))
    assert again.estimate.requests == 0 and again.result().equals(pairs)
    assert requests(server) == 121 and embedded(server) == 1


def test_join_forwards_filter_options_and_asks_before_a_costly_run(make_server):
    server = make_server()
    left, right, truth = tables(4, 3)
    with pytest.raises(nbparrot.ConfigError, match="confirm=True"):
        left.llm.join(right, "{left.note} ~ {right.card}", **opts(server, model="gpt-4o-mini", confirm_over=0.000001))
    assert requests(server) == 0
    run = left.llm.join(right, "{left.note} ~ {right.card}", **opts(server, model="gpt-4o-mini", max_reasks=0,
                                                                     confirm_over=0.000001, confirm=True))
    assert len(run.result()) == len(truth) == 1 and requests(server) == 12
    assert run.passes[-1].label.startswith("join pairs") and run.cost > 0


def test_a_budget_spans_every_pass(make_server):
    server = make_server()
    merits = random.Random(1).sample(range(1000), 40)
    with pytest.raises(nbparrot.BudgetExceededError) as stopped:  # in a script the call raises it, with err.run
        merits_frame(merits).llm.topk("best {text}", 3, **opts(server, model="gpt-4o-mini", max_cost=0.0005,
                                                               concurrency=1))
    run = stopped.value.run
    assert run.status == "stopped" and 0 < requests(server) < 40 and run.cost <= 0.0005


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("call, problem", [
    (lambda df, o: df.llm.agg("Sum up {text}", by="nope", context_tokens=4000, **o), "by='nope'"),
    (lambda df, o: df.llm.agg("Sum up {text}", by=["shop", "nope"], context_tokens=4000, **o), "nope"),
    (lambda df, o: df.llm.agg("Sum up {text}", **o), "context window"),
    (lambda df, o: df.llm.agg("Sum up everything", context_tokens=4000, **o), "names no column"),
    (lambda df, o: df.llm.agg("Sum {text}", context_tokens=500, max_tokens=300, **o), "fewer than two answers"),
    (lambda df, o: df.llm.topk("best {text}", 0, **o), "k must be a positive integer"),
    (lambda df, o: df.llm.topk("best {text}", 11, **o), "more than the 10"),
    (lambda df, o: df.llm.topk("best {text}", 2, meta=True, **o), "meta=True"),
    (lambda df, o: df.llm.join(df, "{left.text} is long", **o), "names no right-hand column"),
    (lambda df, o: df.llm.join(df, "{left.text} ~ {right.nope}", **o), "no column 'nope'"),
    (lambda df, o: df.llm.join(df, "{text} ~ {right.text}", **o), "ambiguous"),
    (lambda df, o: df.llm.join(df, "{left.text} ~ {right.text}", candidates=0, **o), "candidates must be"),
    (lambda df, o: df.llm.join(df, "{left.text} ~ {right.text}", cascade_typo=1, **o), "unknown option"),
])
def test_bad_input_is_refused_before_any_request(quiet_server, call, problem):
    with pytest.raises((nbparrot.ConfigError, nbparrot.TemplateError), match=problem):
        call(reviews(10), opts(quiet_server))
    assert requests(quiet_server) == 0


@pytest.fixture(scope="module")
def quiet_server():
    """One server for the bad-input cases: none of them may send it anything."""
    from nbparrot.server import ServerProcess

    with ServerProcess() as server:
        yield server


def test_help_documents_every_argument():
    import inspect

    for func in (nbparrot.agg, nbparrot.topk, nbparrot.join, pd.DataFrame.llm.agg, pd.DataFrame.llm.join):
        doc = inspect.getdoc(func)
        for name in inspect.signature(func).parameters:
            if name not in ("self", "data", "left"):
                assert name in doc, (func, name)


# ---- in a kernel ---------------------------------------------------------------------------------

KERNEL_SETUP = """
import asyncio, json, warnings, random
import nbparrot, pandas as pd
warnings.simplefilter('ignore')
kw = dict(base_url={url!r}, api_key={key!r}, model='mock', concurrency=2)
df = pd.DataFrame({{'shop': [f's{{i % 2}}' for i in range(120)],
                   'text': [f'<<row:r{{i}}>> review {{i}} with words to read' for i in range(120)]}})
merits = random.Random(3).sample(range(1000), 60)
items = pd.DataFrame({{'text': [f'item {{i}} <<score:{{m}}>>' for i, m in enumerate(merits)]}})
left = pd.DataFrame({{'note': [f'<<key:k{{i}}>> note {{i}}' for i in range(8)]}})
right = pd.DataFrame({{'card': [f'<<key:k{{(j * 3) % 10}}>> card {{j}}' for j in range(8)]}})
def state(run):
    return json.dumps({{'status': run.status, 'sent': run.progress.requests, 'cancelled': run.progress.cancelled}})
"""

CALLS = {
    "agg": "df.llm.agg('What do these {text}s say?', by='shop', context_tokens=600, max_tokens=120, **kw)",
    "topk": "items.llm.topk('best {text}', 4, **kw)",
    "join": "left.llm.join(right, '{left.note} ~ {right.card}', **kw)",
}


def test_on_a_kernel_each_operator_returns_at_once_cancels_resumes_and_reruns_from_the_cache(make_server, tmp_path):
    server = make_server(latency_ms=60)
    with KernelHarness(cwd=str(tmp_path), env={"NBPARROT_CACHE_DIR": str(tmp_path / "cache")}) as kernel:
        kernel.execute(KERNEL_SETUP.format(url=server.base_url, key=KEY), check=True)
        results = {}
        for name, call in CALLS.items():
            before = requests(server)
            out = kernel.execute(f"run = {call}\nprint(run.done())", check=True).stdout
            assert out == "False\n", name  # the cell returned while the run goes on
            wait_until(lambda: kernel.eval("run.progress.done") >= 3, timeout=30, message=f"{name} made no progress")
            if name == "agg":  # the panel names the level being worked; its Cancel button stops the run
                kernel.wait_for(lambda: any("level 1 of" in str(s.get("value", ""))
                                            for s in kernel.find_widgets("HTML").values()), timeout=10)
                cancel = [cid for cid, s in kernel.find_widgets("Button", description="Cancel").items()]
                kernel.click(cancel[-1])
            else:
                kernel.execute("run.cancel()", check=True)
            report = json.loads(kernel.execute(
                "await asyncio.wait({run._task})\nprint(state(run))", check=True, timeout=30).stdout)
            assert report["status"] == "cancelled" and report["cancelled"] > 0, (name, report)
            cut = requests(server) - before
            resumed = kernel.execute(f"run = {call}\nres = await run\nprint(state(run))", check=True, timeout=60).stdout
            assert json.loads(resumed)["status"] == "finished", name
            assert kernel.eval("run.progress.cached") >= 3, name  # the resume took what landed from the cache
            assert requests(server) - before == cut + kernel.eval("run.progress.requests"), name
            results[name] = kernel.execute("print(res.to_json())", check=True).stdout
            after = requests(server)
            again = kernel.execute(f"run = {call}\nres2 = await run\nprint(res2.equals(res), run.estimate.requests)",
                                   check=True, timeout=60).stdout
            assert again == "True 0\n" and requests(server) == after, name  # the rerun sent nothing
        seen = [i for request in server.stats()["rows_seen"] for i in request]
        assert set(seen) == {f"r{i}" for i in range(120)}
        # confirm_over: the panel asks once, with the estimate of every pass, before anything is sent
        before = requests(server)
        kernel.execute("run = left.llm.join(right, '{left.note} is {right.card}', model='gpt-4o-mini', "
                       "confirm_over=1e-9, **{k: v for k, v in kw.items() if k != 'model'})", check=True)
        kernel.wait_for(lambda: kernel.eval("run.status") == "waiting", timeout=20)
        assert requests(server) == before and kernel.eval("run.estimate.requests") == 64
        assert any("may cost up to" in str(s.get("value", "")) for s in kernel.find_widgets("HTML").values())
        kernel.click(kernel.wait_for_widget("Button", description="Run"))
        assert kernel.execute("res = await run\nprint(run.status, len(res))", check=True, timeout=60).stdout.split()[0] \
            == "finished"
        assert requests(server) == before + 64
        agg = json.loads(results["agg"])
        assert sorted(expected_seen(agg["s0"])) == sorted(f"r{i}" for i in range(0, 120, 2))
        assert len(json.loads(results["topk"])["rank"]) == 4


def test_join_passes_a_cascade_through_and_meets_its_target(make_server):
    server = make_server(latency_ms=1)
    left, right, _ = tables()
    left["note"] = [t + (" <<hard>>" if i % 5 == 0 else "") for i, t in enumerate(left.note)]
    run = left.llm.join(right, "{left.note} goes with {right.card}", base_url=server.base_url, api_key=KEY, progress=False,
                        cascade=("mock-weak", "mock-strong"), target=0.9)
    pairs = run.result()
    got = {(int(note.split("note ")[1].split()[0]), int(n)) for note, n in zip(pairs.note, pairs.n)}
    # the truth is the strong model's decision on every pair, as the server's rule gives it
    strong = {(i, j) for i, note in enumerate(left.note) for j, card in enumerate(right.card)
              if expected_match(f"{note} goes with {card}")}
    agreement = 1 - len(got ^ strong) / (len(left) * len(right))
    models = server.stats()["models"]
    assert agreement >= 0.9 and models["mock-weak"] == 1200 and 0 < models["mock-strong"] < 1200


def test_a_budget_refuses_an_embedding_model_without_a_price_before_any_request(make_server):
    """Before, only the chat model was price-checked: the embedding pass then crashed on its missing price."""
    server = make_server()
    left, right, _ = tables(4, 3)
    with pytest.raises(nbparrot.ConfigError, match="price of 'nomic-embed-text' is unknown"):
        nbparrot.join(left, right, "{left.note} ~ {right.card}", candidates=1, embed_model="nomic-embed-text",
                      **opts(server, model="gpt-4o-mini", max_cost=1.0))
    assert requests(server) == 0


def test_a_pass_to_a_model_without_a_price_is_refused_under_a_budget(make_server):
    """A work whose pass uses a model it did not declare: the pass is refused, not run without a budget."""
    from nbparrot import api
    from nbparrot.options import check_options
    from nbparrot.pricing import estimate
    from nbparrot.staged import PlanEstimate, Requests, Work, launch_staged

    class Undeclared(Work):
        async def plan(self, staged):
            return PlanEstimate([("pass", estimate("gpt-4o-mini", 1, 10, 10), "")])

        async def run(self, staged):
            requests = Requests([[{"role": "user", "content": "hi"}]], [0], "hi")
            await staged.follow(staged.start(staged.engine(requests, {"model": "local-unpriced"}), requests, "pass"))

    server = make_server()
    setup = api.resolve(check_options(nbparrot.map, opts(server, model="gpt-4o-mini", max_cost=1.0)))
    with pytest.raises(nbparrot.ConfigError, match="price of 'local-unpriced' is unknown"):
        launch_staged(setup, Undeclared(), lambda run: None, "undeclared")
    assert requests(server) == 0


OPENROUTER = "https://openrouter.ai/api/v1"  # its model names ("openai/gpt-4o-mini") are priced only at its URL


def test_later_passes_are_estimated_at_the_endpoints_price():
    """The comparisons (not planned yet) were estimated by the model's name alone: "cost unknown" at a gateway.
    A loopback URL is priced by the name, so this plans against the gateway's URL: confirm_over refuses the run
    in a script after planning, before any request is sent."""
    with pytest.raises(nbparrot.ConfigError, match="above confirm_over") as refused:
        merits_frame(list(range(20))).llm.topk("best {text}", 3, base_url=OPENROUTER, api_key=KEY,
                                               model="openai/gpt-4o-mini", progress=False, cache="off", confirm_over=0.0)
    assert "comparisons: ~" in str(refused.value) and "cost unknown" not in str(refused.value)


def test_only_the_staged_run_is_listed_while_its_passes_run(make_server):
    """Each pass was listed as a run of its own (``%llm cancel <pass id>`` stopped one pass, and the run then
    ended "finished"). An asyncio program starts the runs inside its running loop and watches live_runs()."""
    server = make_server(latency_ms=20)
    left, right, _ = tables(6, 5)

    async def main() -> list:
        runs = [merits_frame(random.Random(2).sample(range(1000), 30)).llm.topk("best {text}", 3, **opts(server)),
                left.llm.join(right, "{left.note} goes with {right.card}", candidates=2, embed_model="mock-embed",
                              **opts(server))]
        seen = []
        for _ in range(3000):  # bounded: a few seconds at most
            if all(run.done() for run in runs):
                break
            seen.append(({r.id for r in nbparrot.live_runs()}, sum(len(run.passes) for run in runs)))
            await asyncio.sleep(0.005)
        for run in runs:
            await run
        return runs, seen

    runs, seen = asyncio.run(main())
    ours = {run.id for run in runs}
    passes = {p.id for run in runs for p in run.passes}
    assert all(len(run.passes) >= 2 for run in runs) and all(run.status == "finished" for run in runs)
    assert any(listed and started for listed, started in seen)  # watched while passes were in flight
    assert all(listed <= ours for listed, _ in seen) and not any(listed & passes for listed, _ in seen)
    assert not {r.id for r in nbparrot.live_runs()} & (ours | passes)
