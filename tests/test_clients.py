"""``client=``: real openai client objects as the source of endpoint, key and headers (requests via aiohttp)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import openai
import pandas as pd
import pytest

import nbparrot
from nbparrot.server import expected_tag

KEY = "sk-client-test-key-0123456789abcdef"
ROWS = [{"t": "a"}, {"t": "b"}, {"t": "c"}]


def answered(run) -> list[str]:
    return [row["answer"] for row in run.result()]


def test_an_openai_client_gives_url_key_organization_project_and_default_headers(make_server):
    server = make_server(api_key=KEY)
    client = openai.OpenAI(api_key=KEY, base_url=server.base_url, organization="org-nbparrot",
                           project="proj-42", default_headers={"X-Team": "blue"})
    run = nbparrot.map(ROWS, "Say {t}", client=client, cache="off", progress=False)
    assert [a.split("]")[0] for a in answered(run)] == [
        "[" + expected_tag([{"role": "user", "content": f"Say {r['t']}"}]) for r in ROWS]
    seen = server.stats()["last_request"]
    assert seen["auth"] == "bearer" and seen["path"] == "/v1/chat/completions" and seen["query"] == {}
    headers = seen["headers"]
    assert headers["x-team"] == "blue" and headers["openai-organization"] == "org-nbparrot"
    assert headers["openai-project"] == "proj-42"
    assert headers["user-agent"] == "nbparrot" and not any(h.startswith("x-stainless") for h in headers)


def test_an_async_client_works_the_same_and_df_llm_takes_it(make_server):
    server = make_server(api_key=KEY)
    client = openai.AsyncOpenAI(api_key=KEY, base_url=server.base_url, default_headers={"X-Run": "async"})
    df = pd.DataFrame({"t": ["x", "y"]})
    answers = df.llm.map("Say {t}", client=client, cache="off", progress=False).result()
    assert answers.str.contains("Say x|Say y").all()
    assert server.stats()["last_request"]["headers"]["x-run"] == "async"


@pytest.mark.parametrize("kind", [openai.AzureOpenAI, openai.AsyncAzureOpenAI])
def test_azure_clients_send_the_api_key_header_and_api_version(make_server, kind):
    server = make_server(api_key=KEY)
    deployment = kind(api_key=KEY, base_url=server.root_url + "/openai/deployments/gpt-4o-mini",
                      api_version="2024-10-21")
    run = nbparrot.map(ROWS, "Say {t}", client=deployment, cache="off", progress=False)
    assert all(a.startswith("[") for a in answered(run))
    seen = server.stats()["last_request"]
    assert seen["auth"] == "api-key" and seen["query"] == {"api-version": "2024-10-21"}
    assert seen["path"] == "/openai/deployments/gpt-4o-mini/chat/completions"
    # Made from azure_endpoint without a deployment: the model names it, as the SDK does.
    resource = kind(api_key=KEY, azure_endpoint=server.root_url, api_version="2025-01-01")
    run = nbparrot.map(ROWS[:1], "Say {t}", client=resource, model="gpt-4.1-mini", cache="off", progress=False)
    assert answered(run)[0].startswith("[")
    seen = server.stats()["last_request"]
    assert seen["path"] == "/openai/deployments/gpt-4.1-mini/chat/completions"
    assert seen["query"] == {"api-version": "2025-01-01"}


def test_azure_ad_token_provider_is_asked_once_per_run_and_sent_as_bearer(make_server):
    server = make_server(api_key="aad-token-0123456789")
    calls = []

    def token() -> str:
        calls.append(1)
        return "aad-token-0123456789"

    client = openai.AzureOpenAI(azure_ad_token_provider=token, azure_endpoint=server.root_url, api_version="2024-10-21")
    run = nbparrot.map(ROWS, "Say {t}", client=client, cache="off", progress=False)
    assert len(answered(run)) == 3 and run.status == "finished"
    assert server.stats()["last_request"]["auth"] == "bearer" and len(calls) == 1


def test_azure_embeddings_through_a_client(make_server):
    server = make_server(api_key=KEY)
    client = openai.AzureOpenAI(api_key=KEY, azure_endpoint=server.root_url, api_version="2024-10-21")
    run = nbparrot.embed(pd.DataFrame({"text": ["one", "two"]}), "text", model="mock-embed", client=client,
                         cache="off", progress=False)
    assert run.result().map(len).tolist() == [64, 64]
    seen = server.stats()["last_request"]
    assert seen["path"] == "/openai/deployments/mock-embed/embeddings" and seen["auth"] == "api-key"


def test_explicit_base_url_or_key_must_agree_with_the_client_and_no_key_is_shown(make_server):
    server = make_server(api_key=KEY)
    client = openai.OpenAI(api_key=KEY, base_url=server.base_url)
    other_key = "sk-another-secret-key-99999999"
    with pytest.raises(nbparrot.ConfigError, match="give the key once") as caught:
        nbparrot.map(ROWS, "Say {t}", client=client, api_key=other_key)
    assert KEY not in str(caught.value) and other_key not in str(caught.value)
    assert KEY[:12] not in str(caught.value) and other_key[:12] not in str(caught.value)
    with pytest.raises(nbparrot.ConfigError, match="disagree"):
        nbparrot.map(ROWS, "Say {t}", client=client, base_url="http://127.0.0.1:9/v1")
    with pytest.raises(nbparrot.ConfigError, match="client must be an openai.OpenAI"):
        nbparrot.map(ROWS, "Say {t}", client="https://api.openai.com/v1")
    assert server.stats()["requests"] == 0
    same = nbparrot.map(ROWS, "Say {t}", client=client, base_url=server.base_url + "/", api_key=KEY,
                        cache="off", progress=False)
    assert same.status == "finished"


def test_a_client_set_for_the_session_is_used_until_a_call_names_its_own_endpoint(make_server):
    ours, other = make_server(api_key=KEY), make_server()
    nbparrot.configure(client=openai.OpenAI(api_key=KEY, base_url=ours.base_url, default_headers={"X-S": "1"}))
    try:
        nbparrot.map(ROWS, "Say {t}", cache="off", progress=False)
        assert ours.stats()["ok"] == 3 and ours.stats()["last_request"]["headers"]["x-s"] == "1"
        nbparrot.map(ROWS, "Say {t}", base_url=other.base_url, api_key="sk-x", cache="off", progress=False)
        assert other.stats()["ok"] == 3 and ours.stats()["ok"] == 3
    finally:
        nbparrot.configure(client=None)


def test_a_wrong_key_in_a_client_is_never_shown():
    wrong = "sk-wrong-client-key-abcdefghijklmnop"
    script = textwrap.dedent(f"""
        import sys, openai, nbparrot
        from nbparrot.server import ServerProcess
        with ServerProcess(api_key="sk-right") as server:
            client = openai.OpenAI(api_key={wrong!r}, base_url=server.base_url)
            try:
                run = nbparrot.map([{{"t": 1}}], "{{t}}", client=client, cache="off")
                print(run.summary(), run.error, run.errors.to_string())
            except Exception as exc:  # a script whose run failed may raise
                print(type(exc).__name__, exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    assert "401" in text or "Incorrect API key" in text, text
    assert wrong not in text and wrong[:16] not in text


def test_nbparrot_never_imports_openai_unless_given_a_client(make_server):
    server = make_server()
    script = textwrap.dedent(f"""
        import sys, nbparrot
        nbparrot.map([{{"t": 1}}], "{{t}}", base_url={server.base_url!r}, api_key="sk-x", cache="off", progress=False)
        print("openai" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_dask_refuses_a_client_object_before_any_work():
    dd = pytest.importorskip("dask.dataframe")
    import nbparrot.dask  # noqa: F401 - registers ddf.llm

    ddf = dd.from_pandas(pd.DataFrame({"t": ["a", "b"]}), npartitions=1)
    client = openai.OpenAI(api_key=KEY, base_url="http://127.0.0.1:9/v1")
    with pytest.raises(nbparrot.ConfigError, match="pass base_url= and api_key= instead"):
        ddf.llm.map("Say {t}", client=client)
    nbparrot.configure(client=openai.OpenAI(api_key=KEY, base_url="http://127.0.0.1:9/v1", organization="org-1"))
    try:  # the session's client, whose organization header would not reach the workers
        with pytest.raises(nbparrot.ConfigError, match="session's client="):
            ddf.llm.map("Say {t}")
    finally:
        nbparrot.configure(client=None)


GOOG, APIM, PORTKEY, XKEY = ("goog-" + "1a2b3c4d" * 4, "apim-" + "5e6f7a8b" * 4, "pk-" + "9c0d1e2f" * 4,
                             "xk-" + "3a4b5c6d" * 4)
SECRET_HEADERS = {"x-goog-api-key": GOOG, "Ocp-Apim-Subscription-Key": APIM, "X-Portkey-Api-Key": PORTKEY,
                  "x-api-key": XKEY}


def test_key_headers_of_a_client_are_sent_but_never_shown_by_nbparrot_or_the_server(make_server):
    server = make_server(api_key=KEY)
    client = openai.OpenAI(api_key=KEY, base_url=server.base_url, default_headers={**SECRET_HEADERS, "X-Team": "blue"})
    run = nbparrot.map(ROWS, "Say {t}", client=client, cache="off", progress=False)
    assert run.status == "finished"
    endpoint = run.engine.endpoint
    assert {k: v for k, v in endpoint.headers().items() if k in SECRET_HEADERS} == SECRET_HEADERS  # sent as given
    echoed = endpoint.redact("the gateway echoed: " + " ".join(f"{k}: {v}" for k, v in SECRET_HEADERS.items()))
    stats = json.dumps(server.stats())
    shown = "\n".join([echoed, repr(endpoint), str(endpoint), repr(run), str(run), stats])
    assert not [v for v in (*SECRET_HEADERS.values(), KEY) if v in shown], shown
    assert server.stats()["last_request"]["headers"]["x-team"] == "blue"  # what is not a credential stays visible


def test_batch_mode_sends_a_clients_query_to_the_files_and_batches_endpoints(make_server):
    server = make_server(api_key=KEY, batch_seconds=0.2)
    client = openai.OpenAI(api_key=KEY, base_url=server.base_url, default_query={"tenant": "t-7"})
    run = nbparrot.map(ROWS, "Say {t}", client=client, mode="batch", poll_interval=0.05, cache="off", progress=False)
    assert [a.split("]")[0] for a in answered(run)] == [
        "[" + expected_tag([{"role": "user", "content": f"Say {r['t']}"}]) for r in ROWS]
    seen = server.stats()["last_request"]  # the last Files / Batches call: the output file's content
    assert seen["path"].startswith(("/v1/files", "/v1/batches")) and seen["query"] == {"tenant": "***"}
