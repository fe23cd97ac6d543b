"""Small hardening: credentials in base_url never shown, and a run cancelled before its first step."""

from __future__ import annotations

import asyncio
import base64
import json
import socket

import pandas as pd
import pytest

import nbparrot
from nbparrot.config import Endpoint, resolve_endpoint
from nbparrot.errors import ConfigError, FatalError, redact, redact_url

PASSWORD = "s3cret-Pa55word-never-shown"
PATH_KEY = "sk-proj-0123456789abcdefPATHKEY"
ROWS = [{"q": "alpha"}, {"q": "beta"}, {"q": "gamma"}]


def with_userinfo(url: str, userinfo: str = f"alice:{PASSWORD}") -> str:
    return url.replace("://", f"://{userinfo}@", 1)


def free_port() -> int:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def everything_shown(run: nbparrot.Run, captured: str) -> str:
    """Every text a user may see about a run (not the URL the requests go to: see display_url)."""
    endpoint = run.engine.endpoint
    return "\n".join([repr(endpoint), str(endpoint), endpoint.display_url,
                      endpoint.display_chat_url, repr(run), str(run), run.errors.to_string(),
                      " ".join(str(e) for e in run.errors["error"]), str(run.error), str(run.progress.last_error),
                      captured])


# ---- user:password@ in base_url: HTTP Basic auth, never displayed ------------------------------


def test_userinfo_becomes_basic_auth_and_the_password_is_shown_nowhere(server, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-key-not-for-this-endpoint")
    run = nbparrot.map(ROWS, "Say: {q}", base_url=with_userinfo(server.base_url), cache="off")
    assert run.status == "finished" and run.progress.done == 3, run.errors
    endpoint = run.engine.endpoint
    assert endpoint.base_url == server.base_url and endpoint.basic_auth == ("alice", PASSWORD)
    assert PASSWORD not in endpoint.chat_url
    assert endpoint.api_key is None  # the environment's key is not sent along with the URL's credentials
    token = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    assert endpoint.headers()["Authorization"] == f"Basic {token}"
    assert "basic_auth=set" in repr(endpoint)
    assert PASSWORD not in everything_shown(run, capsys.readouterr().err)


@pytest.mark.parametrize("server", [{"api_key": "sk-the-only-key-it-takes-0123"}], indirect=True)
def test_refused_basic_auth_stops_the_run_without_showing_the_password(server, capsys):
    with pytest.raises(nbparrot.AuthenticationError) as caught:
        nbparrot.map(ROWS, "Say: {q}", base_url=with_userinfo(server.base_url), cache="off")
    run = caught.value.run
    assert run.status == "failed"
    assert isinstance(run.error, nbparrot.AuthenticationError)
    assert list(run.errors["status"]) == ["failed"] + ["cancelled"] * (len(ROWS) - 1)  # the one sent, the rest
    shown = everything_shown(run, capsys.readouterr().err)
    assert PASSWORD not in shown and "alice" not in shown


def test_userinfo_and_an_explicit_api_key_is_a_config_error_that_hides_the_password():
    with pytest.raises(ConfigError, match="Basic") as caught:
        nbparrot.map(ROWS, "Say: {q}", base_url=with_userinfo("http://127.0.0.1:9/v1"), api_key="sk-explicit-0123")
    assert PASSWORD not in str(caught.value) and "***@127.0.0.1:9" in str(caught.value)


def test_userinfo_is_never_echoed_by_url_checks():
    for url in (with_userinfo("ftp://host/v1"), with_userinfo("http://host/v1") + "?x=1"):
        with pytest.raises(ConfigError) as caught:
            resolve_endpoint(url)
        assert PASSWORD not in str(caught.value), caught.value


def test_userinfo_details():
    # percent-encoded parts are decoded; a blank user with the key as password works for OpenAI itself
    endpoint = resolve_endpoint("https://:sk-key%40part-0123456789@api.openai.com/v1/")
    assert endpoint.basic_auth == ("", "sk-key@part-0123456789") and endpoint.is_openai
    assert endpoint.base_url == "https://api.openai.com/v1"
    # Azure keeps its own api-key header next to Basic auth
    azure = resolve_endpoint("https://u:pw@res.openai.azure.com/openai/deployments/gpt-4o", api_key="azure-key")
    headers = azure.headers()
    assert headers["api-key"] == "azure-key" and headers["Authorization"].startswith("Basic ")
    # an Endpoint built by hand never keeps them in its URL either
    direct = Endpoint(f"http://bob:{PASSWORD}@127.0.0.1:9/v1")
    assert direct.base_url == "http://127.0.0.1:9/v1" and PASSWORD not in repr(direct)
    assert direct.redact(f"echo {PASSWORD}") == "echo ***"


# ---- a key in the URL path ----------------------------------------------------------------------


def test_key_in_the_path_is_masked_when_the_server_is_down(capsys):
    base_url = f"http://127.0.0.1:{free_port()}/v1/{PATH_KEY}/"
    with pytest.raises(nbparrot.EndpointUnreachableError) as caught:
        nbparrot.map(ROWS, "Say: {q}", base_url=base_url, api_key="sk-header-key-0123456789",
                     max_retries=1, backoff=0.01, cache="off")
    run = caught.value.run
    assert "could not reach" in str(caught.value) and PATH_KEY not in str(caught.value)
    assert PATH_KEY in run.engine.endpoint.chat_url  # the requests still need it
    shown = everything_shown(run, capsys.readouterr().err)
    assert "could not reach" in shown and PATH_KEY[:8] not in shown


def test_redact_url():
    assert redact_url(f"http://u:{PASSWORD}@h:1/v1/{PATH_KEY}/x") == "http://***@h:1/v1/sk-p***/x"
    assert redact_url("http://h/v1/0123456789abcdef0123456789abcdef/openai") == "http://h/v1/0123***/openai"
    kept = ["https://x.openai.azure.com/openai/deployments/gpt-4o-mini-2024-07-18",
            "http://127.0.0.1:8000/v1/chat/completions", "https://platform.openai.com/account/api-keys"]
    assert [redact_url(u) for u in kept] == kept
    text = f"could not reach http://a:{PASSWORD}@h/v1/{PATH_KEY} (refused); see http://h/docs."
    assert redact(text) == "could not reach http://***@h/v1/sk-p*** (refused); see http://h/docs."
    assert PATH_KEY not in str(FatalError(f"403 from http://h/{PATH_KEY}/chat/completions"))


# ---- a key in a client's default query or headers ------------------------------------------------

SECRET = "qk" + "7f3a9c1e" * 4


def client_with_secrets(base_url: str):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(api_key="sk-header-key-0123456789", base_url=base_url,
                         default_headers={"x-goog-api-key": SECRET}, default_query={"key": SECRET, "tag": "t1"})


def all_text(caught: pytest.ExceptionInfo, capsys) -> str:
    run = caught.value.run
    return "\n".join([str(caught.value), repr(caught.value), everything_shown(run, capsys.readouterr().err)])


@pytest.mark.parametrize("case", ["unknown model", "429 for an hour"])
def test_a_key_in_the_default_query_is_shown_nowhere_when_the_endpoint_refuses(make_server, capsys, case):
    server = make_server(p429=1.0, retry_after_429=3600.0) if case.startswith("429") else make_server()
    model = "no-such-model" if case == "unknown model" else "gpt-4o-mini"
    error = nbparrot.ModelNotFoundError if case == "unknown model" else nbparrot.RateLimitWaitError
    with pytest.raises(error) as caught:
        nbparrot.map(ROWS, "Say: {q}", client=client_with_secrets(server.base_url), model=model, cache="off")
    endpoint = caught.value.run.engine.endpoint
    assert f"key={SECRET}" in endpoint.chat_url  # the requests still carry it
    shown = all_text(caught, capsys) + json.dumps(server.stats())
    assert "/chat/completions?key=***&tag=***" in str(caught.value)
    assert SECRET not in shown and SECRET[:12] not in shown, shown
    assert server.stats()["last_request"]["query"] == {"key": "***", "tag": "***"}


@pytest.fixture
def redirecting():
    """A loopback endpoint that answers every request with a 307 to a URL holding a key in path and query."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    class Redirect(BaseHTTPRequestHandler):
        def _answer(self):
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:9/v1/{PATH_KEY}/chat/completions?key={SECRET}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_a_redirect_shows_neither_our_query_key_nor_the_one_in_its_location(redirecting, capsys):
    with pytest.raises(FatalError, match="redirects") as caught:
        nbparrot.map(ROWS, "Say: {q}", client=client_with_secrets(redirecting), cache="off")
    shown = all_text(caught, capsys)
    assert "(to http://127.0.0.1:9/v1/sk-p***/chat/completions?key=***)" in str(caught.value)
    assert SECRET not in shown and SECRET[:12] not in shown and PATH_KEY not in shown, shown


def test_redact_url_masks_query_values_but_the_api_version():
    assert (redact_url("https://h/openai/deployments/d/chat/completions?api-version=2024-10-21&key=abc&flag#top")
            == "https://h/openai/deployments/d/chat/completions?api-version=2024-10-21&key=***&flag#top")
    assert redact(f"see http://h/v1?token={SECRET}.") == "see http://h/v1?token=***."
    endpoint = Endpoint("http://h/v1", "sk-k-0123456789", query=(("key", SECRET), ("api-version", "2025-01-01")))
    assert endpoint.display_chat_url == "http://h/v1/chat/completions?key=***&api-version=2025-01-01"
    assert endpoint.redact(f"the gateway says: bad key {SECRET}") == "the gateway says: bad key ***"


# ---- cancelled before its first step, awaited from another task ---------------------------------


@pytest.mark.parametrize("how", ["wait_for", "ensure_future", "done_and_result"])
def test_cancel_before_the_first_step_then_await_from_another_task(server, how):
    async def main() -> nbparrot.Run:
        run = nbparrot.map(pd.DataFrame({"q": ["a", "b"]}), "Say: {q}", base_url=server.base_url,
                           api_key="sk-test-0123456789", cache="off", progress=False)
        run.cancel()  # before the run's task has taken its first step
        with pytest.warns(UserWarning, match="cancelled"):
            if how == "wait_for":
                result = await asyncio.wait_for(run, 5)
            elif how == "ensure_future":
                result = await asyncio.ensure_future(run._wait())
            else:
                async def look() -> object:
                    assert run._task.done()
                    assert run.done()  # no longer waits for the task's done callback
                    return run.result()
                result = await asyncio.create_task(look())
        assert result.isna().all()
        return run

    run = asyncio.run(main())
    assert run.status == "cancelled" and run.done()
    assert list(run.errors["status"]) == ["cancelled", "cancelled"]
    assert all(o.status == "cancelled" and o.error for o in run.outcomes)
    assert server.stats()["requests"] == 0


# ---- what a new user trips on: keys for Azure, an endpoint that is not there ---------------------


def test_a_missing_key_for_an_azure_url_names_the_azure_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    azure = "https://myres.openai.azure.com/openai/deployments/gpt4o"
    with pytest.raises(ConfigError, match="AZURE_OPENAI_API_KEY"):
        resolve_endpoint(azure)
    with pytest.raises(ConfigError, match="set the OPENAI_API_KEY environment"):
        resolve_endpoint("https://api.openai.com/v1")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", "azure-key-0123456789")
    endpoint = resolve_endpoint(azure)
    assert endpoint.azure and endpoint.api_key == "azure-key-0123456789"
    assert endpoint.headers()["api-key"] == "azure-key-0123456789"


def test_a_refused_first_connection_gives_up_after_two_quick_retries_and_says_why():
    port = free_port()
    with pytest.raises(nbparrot.EndpointUnreachableError) as caught:
        nbparrot.map(ROWS, "Say: {q}", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-x", cache="off",
                     backoff=0.01)  # max_retries is 5: a refused first connection gets 2
    message = str(caught.value)
    assert f"connection refused by 127.0.0.1:{port}" in message and "ClientConnectorError" not in message
    errors = caught.value.run.errors
    # the row that was tried is failed, with its three attempts; the others were never sent
    assert errors["status"].tolist() == ["failed", "cancelled", "cancelled"]
    assert errors["attempts"].tolist() == [3, 0, 0] and "connection refused" in errors["error"].iloc[0]


def test_connection_failures_in_words():
    """A name that does not resolve is not retried before anything answered; a refusal twice.

    Built from the errors aiohttp raises (a real DNS lookup would leave the machine)."""
    import aiohttp
    from aiohttp.client_reqrep import ConnectionKey

    from nbparrot.engine.words import _cannot_connect, _describe

    key = ConnectionKey("nonexistent.invalid", 80, False, True, None, None, None)
    dns = aiohttp.ClientConnectorDNSError(key, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert _cannot_connect(dns) == (0, "DNS name not found: nonexistent.invalid (Name or service not known)")
    flaky = aiohttp.ClientConnectorDNSError(key, socket.gaierror(socket.EAI_AGAIN, "Temporary failure"))
    assert _cannot_connect(flaky)[0] == 2
    refused = aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connect call failed"))
    assert _describe(refused) == "connection refused by nonexistent.invalid:80 (nothing is listening there)"
    assert _cannot_connect(aiohttp.ServerDisconnectedError()) is None  # the endpoint is there: retried as usual
