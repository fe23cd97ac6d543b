"""``df.llm.map``: safe templates, tidy output in the input's shape, structured results, n choices."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import textwrap

import pandas as pd
import pydantic
import pytest

import nbparrot
from nbparrot.server import expected_tag, prompt_tag


class Person(pydantic.BaseModel):
    name: str
    age: int


class QA(pydantic.BaseModel):
    question: str
    answer: str


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def opts(server):
    return {"base_url": server.base_url, "api_key": "sk-accessor-test", "backoff": 0.01}


def test_series_aligned_to_duplicate_and_non_integer_labels(server, opts):
    df = pd.DataFrame({"text": ["a", "b", "c", "d"]}, index=pd.Index(["x", "y", "x", dt.date(2024, 1, 1)], dtype=object))
    result = df.llm.map("Say {text}", name="said", **opts).result()
    assert result.name == "said" and result.index.equals(df.index)
    for label_pos, text in enumerate("abcd"):
        assert result.iloc[label_pos].startswith(f"[{expected_tag(user(f'Say {text}'))}]")


def test_non_string_values_are_rendered_as_text(server, opts):
    df = pd.DataFrame({"n": [1, 2], "x": [1.5, float("inf")], "when": pd.to_datetime(["2024-05-01", "2024-05-02"]),
                       "flag": [True, False]})
    run = df.llm.map("{n}|{x}|{when}|{flag}", meta=True, **opts)
    assert run.result()["prompt"].tolist() == ["1|1.5|2024-05-01 00:00:00|True", "2|inf|2024-05-02 00:00:00|False"]


def test_template_safety(server, opts):
    df = pd.DataFrame({"x": ["{x}", "{x.__class__} and {{y}}"]})
    run = df.llm.map("value: {x} {{literal}}", meta=True, **opts)
    assert run.result()["prompt"].tolist() == ["value: {x} {literal}", "value: {x.__class__} and {{y}} {literal}"]
    for bad, why in [("{x.__class__}", "attribute and index access"), ("{x[0]}", "attribute and index access"),
                     ("{x!r}", "format spec or conversion"), ("{}", "empty field"), ("{x", "literal braces")]:
        with pytest.raises(nbparrot.TemplateError, match=why):
            df.llm.map(bad, **opts)
    with pytest.raises(nbparrot.TemplateError, match=r"\{y\}.*columns: x"):
        df.llm.map("{y}", **opts)
    assert server.stats()["requests"] == 2


def test_empty_frame_sends_nothing(server, opts):
    df = pd.DataFrame({"text": pd.Series([], dtype=str)})
    result = df.llm.map("Say {text}", **opts).result()
    assert len(result) == 0 and result.name == "answer"
    assert server.stats()["requests"] == 0


def test_missing_values_are_skipped_and_marked_by_default(server, opts):
    df = pd.DataFrame({"text": ["a", None, float("nan"), "d"]}, index=list("pqrs"))
    run = df.llm.map("Say {text}", **opts)
    assert run.result().isna().tolist() == [False, True, True, False]
    assert run.errors["status"].to_dict() == {"q": "skipped", "r": "skipped"}
    assert "missing value in 'text'" in run.errors.loc["q", "error"]
    assert server.stats()["requests"] == 2
    assert df.llm.map("Say {text}", on_missing="empty", **opts).result().notna().all()
    with pytest.raises(nbparrot.TemplateError, match="2 row\\(s\\) have missing values.*'q', 'r'"):
        df.llm.map("Say {text}", on_missing="error", **opts)


def test_system_prompt_and_few_shot_messages(server, opts):
    df = pd.DataFrame({"word": ["cat"]})
    messages = [{"role": "user", "content": "Plural of dog?"}, {"role": "assistant", "content": "dogs"},
                {"role": "user", "content": "Plural of {word}?"}]
    answer = df.llm.map(messages, system="You answer in one word about {word}s.", **opts).result().iloc[0]
    sent = [{"role": "system", "content": "You answer in one word about cats."}, *messages[:2],
            {"role": "user", "content": "Plural of cat?"}]
    assert answer.startswith(f"[{expected_tag(sent)}]")


@pytest.mark.parametrize("spec", [Person, {"name": str, "age": int}], ids=["pydantic", "mapping"])
def test_schema_fields_become_columns(server, opts, spec):
    df = pd.DataFrame({"text": ["Ann is 31", "Bob is 42"]}, index=[10, 20])
    result = df.llm.map("Extract the person: {text}", schema=spec, **opts).result()
    assert list(result.columns) == ["name", "age"] and result.index.equals(df.index)
    assert result["age"].map(type).eq(int).all()
    assert result.loc[10, "name"].endswith(expected_tag(user("Extract the person: Ann is 31")))


def test_a_one_field_schema_gives_that_fields_values_typed_and_named(server, opts):
    df = pd.DataFrame({"text": ["great <<yes>>", "awful <<no>>", "broken <<not-json>>"]}, index=["a", "b", "c"])
    run = df.llm.map("Is this positive? {text}", schema={"positive": bool}, max_reasks=0, **opts)
    result = run.partial()  # the <<not-json>> row fails: NA, and the dtype stays boolean
    assert result.name == "positive" and result.dtype == "boolean" and result.index.equals(df.index)
    assert result.iloc[:2].tolist() == [True, False] and result.isna().tolist() == [False, False, True]
    counts = df.iloc[:2].llm.map("How many words? {text}", schema={"words": int}, **opts).result()
    assert counts.name == "words" and counts.dtype == "Int64"
    records = nbparrot.map([{"text": "great <<yes>>"}], "{text}", schema={"positive": bool}, **opts).result()
    assert records == [{"text": "great <<yes>>", "positive": True}]
    filled = df.iloc[:2].copy()
    nbparrot.map(filled, "{text}", schema={"positive": bool}, into="positive", **opts)
    assert filled["positive"].tolist() == [True, False]  # into= gets the values, not {'positive': ...} dicts


def test_schema_fields_are_columns_in_nullable_dtypes(server, opts):
    df = pd.DataFrame({"text": ["Ann is 31", "bad <<not-json>>"]})
    result = df.llm.map("Extract: {text}", schema=Person, max_reasks=0, **opts).partial()
    assert result.dtypes["age"] == "Int64" and result["age"].isna().tolist() == [False, True]


def test_schema_falls_back_to_json_object_where_json_schema_is_refused(make_server):
    server = make_server(json_schema=False)
    df = pd.DataFrame({"text": ["Ann is 31", "Bob is 42", "Cy is 5"]})
    run = df.llm.map("Extract: {text}", schema={"tag": str, "echo": str}, base_url=server.base_url, api_key="sk-x")
    result = run.result()
    assert result["tag"].notna().all() and run.engine.params["response_format"] == {"type": "json_object"}
    assert server.stats()["status"]["400"] == 1  # learned once, on the probe request


def test_non_json_answers_are_reasked_then_failed_with_the_raw_text_kept(server, opts):
    df = pd.DataFrame({"text": ["fine", "bad once <<not-json-once>>", "always bad <<not-json>>"]})
    run = df.llm.map("Extract: {text}", schema=Person, max_reasks=2, **opts)
    result = run.result()
    assert result["name"].notna().tolist() == [True, True, False]
    assert [o.attempts for o in run.outcomes] == [1, 2, 3]
    errors = run.errors
    assert list(errors.index) == [2] and "no answer matching the schema after 3 tries" in errors.loc[2, "error"]
    assert errors.loc[2, "raw"].startswith("[")  # the non-JSON text, kept
    assert run.progress.completion_tokens == sum(o.completion_tokens for o in run.outcomes) > 0


def test_n_choices_explode_and_dedupe(server, opts):
    df = pd.DataFrame({"text": ["a", "b"]}, index=["r1", "r2"])
    lists = df.llm.map("Say {text}", n=3, **opts).result()
    assert lists.map(len).tolist() == [3, 3]
    assert [c[1:].split("]")[0] for c in lists["r1"]] == [expected_tag(user("Say a"), k) for k in range(3)]
    long = df.llm.map("Say {text}", n=3, explode=True, **opts).result()
    assert list(long.columns) == ["text", "choice", "answer"] and long.index.tolist() == ["r1"] * 3 + ["r2"] * 3
    assert long["choice"].tolist() == [0, 1, 2, 0, 1, 2]
    # at temperature 0 the server (as real ones often do) repeats itself: dedupe keeps one of each
    same = df.llm.map("Say {text}", n=3, temperature=0, dedupe=True, **opts).result()
    assert same.map(len).tolist() == [1, 1]


def test_json_list_answers_explode_into_rows_that_keep_the_input_columns(server, opts):
    df = pd.DataFrame({"doc": ["A text about owls.", "A text about bees."], "source": ["wiki", "blog"]})
    qa = df.llm.map("Write question/answer pairs about: {doc}", schema=list[QA], explode=True, **opts).result()
    assert list(qa.columns) == ["doc", "source", "item", "question", "answer"]
    assert len(qa) > len(df) and set(qa["source"]) == {"wiki", "blog"}
    assert qa.groupby(level=0)["item"].apply(list).map(lambda items: items == list(range(len(items)))).all()


def test_several_templates_give_one_row_per_row_and_template(server, opts):
    df = pd.DataFrame({"food": ["pizza", "kale"]})
    result = df.llm.map(["I like {food}", "I hate {food}"], **opts).result()
    assert result["template"].tolist() == ["I like {food}", "I hate {food}"] * 2
    assert result["food"].tolist() == ["pizza", "pizza", "kale", "kale"]
    assert result["answer"].iloc[1].startswith(f"[{expected_tag(user('I hate pizza'))}]")


def test_meta_columns(server, opts):
    df = pd.DataFrame({"text": ["a"]})
    result = df.llm.map("Say {text}", meta=True, temperature=0.5, **opts).result()
    row = result.iloc[0]
    assert row["prompt"] == "Say a" and row["template"] == "Say {text}" and row["model"] == "gpt-4o-mini"
    assert json.loads(row["params"])["temperature"] == 0.5 and row["finish_reason"] == "stop"
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0 and row["cost"] > 0
    assert row["attempts"] == 1 and not row["cached"] and row["error"] is None and row["latency"] > 0


def test_records_keep_their_shape_with_schema_fields_added(server, opts):
    records = [{"id": 1, "text": "Ann is 31"}, {"id": 2, "text": "Bob is 42"}]
    out = nbparrot.map(records, "Extract: {text}", schema=Person, **opts).result()
    assert [sorted(r) for r in out] == [["age", "id", "name", "text"]] * 2
    assert records[0] == {"id": 1, "text": "Ann is 31"}  # the input dicts are not modified


def test_into_fills_the_column_as_rows_land_and_keeps_them_on_cancel(make_server):
    server = make_server(latency_ms=30)
    df = pd.DataFrame({"text": [f"t{i}" for i in range(300)]})

    async def scenario():
        run = df.llm.map("Say {text}", into="said", base_url=server.base_url, api_key="sk-x", concurrency=8)
        assert df["said"].isna().all()
        while run.progress.done < 30:
            await asyncio.sleep(0.01)
        run.cancel()
        await asyncio.wait({run._task})
        return run

    run = asyncio.run(scenario())
    assert df["said"].notna().sum() == run.progress.done >= 30
    for i in df.index[df["said"].notna()]:
        assert df.loc[i, "said"].startswith(f"[{expected_tag(user(f'Say t{i}'))}]")


def test_ten_thousand_rows(make_server):
    server = make_server()
    df = pd.DataFrame({"text": [f"row {i}" for i in range(10_000)]})
    result = df.llm.map("Say {text}", base_url=server.base_url, api_key="sk-x", concurrency=256).result()
    assert result.notna().all()
    tags = result.str.slice(1, 13)
    assert (tags == [prompt_tag(user(f"Say row {i}")) for i in range(10_000)]).all()


def test_df_parrot_when_another_package_owns_df_llm():
    code = textwrap.dedent("""
        import warnings, pandas as pd
        @pd.api.extensions.register_dataframe_accessor("llm")
        class Theirs:
            def __init__(self, df): pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import nbparrot
        print(pd.DataFrame.llm is Theirs, pd.DataFrame.parrot.__name__, [str(w.message) for w in caught])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True LLMAccessor") and "available as df.parrot" in out.stdout


def test_a_list_of_one_template_is_just_that_template(server, opts):
    result = pd.DataFrame({"food": ["kale"]}).llm.map(["I like {food}"], **opts).result()
    assert result.iloc[0].startswith(f"[{expected_tag(user('I like kale'))}]")


def test_into_on_a_rerun_keeps_cached_answers_and_takes_lists(server, opts):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(6)]})
    df.iloc[:3].llm.map("Say {text}", **opts).result()  # half the rows answered before
    df.llm.map("Say {text}", into="said", **opts).result()
    assert df["said"].notna().all() and server.stats()["requests"] == 6
    df.llm.map("Say {text}", into="many", n=2, **opts).result()
    assert df["many"].map(len).tolist() == [2] * 6
    before = df["said"].copy()
    with pytest.raises(nbparrot.ConfigError, match="confirm=True"):
        df.llm.map("Other {text}", into="said", confirm_over=1e-9, **opts)
    assert df["said"].equals(before)  # a refused run leaves the column alone
