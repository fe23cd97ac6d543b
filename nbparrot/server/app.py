"""The app: :class:`_MockServer` wires the endpoints' state and handlers; :func:`build_app`, :func:`serve`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import time

from typing import Any

from aiohttp import web

from ..errors import SHOWN_QUERY, secret_header
from .batches import _Batch, _BatchEndpoints
from .chat import _ChatEndpoint
from .config import ServerConfig, check_loopback
from .embeddings import _EmbeddingsEndpoint
from .files import _FileEndpoints, _StoredFile
from .limits import _Bucket, _Gate, _Stats, _fault_bands
from .promptcache import PromptCache
from .prompts import _mask_key
from .wire import _Reject


class _MockServer(_Gate, _ChatEndpoint, _EmbeddingsEndpoint, _FileEndpoints, _BatchEndpoints):
    """State and handlers of one mock server app."""

    def __init__(self, config: ServerConfig) -> None:
        """Set up buckets, RNGs and counters from the config."""
        self.config = config
        self.models = frozenset(config.models)
        self.stats = _Stats()
        self.rng = random.Random(config.seed)
        self.jitter_rng = random.Random(config.seed + 1)
        self.requests_bucket = _Bucket(config.rpm, config.burst_seconds, floor=1.0) if config.rpm else None
        self.tokens_bucket = _Bucket(config.tpm, config.burst_seconds) if config.tpm else None
        self.fault_bands = _fault_bands(config)
        self.counter = 0
        self.id_prefix = f"{os.getpid():x}{int(time.time()) & 0xFFFFFF:x}"
        self.serial = 0  # of file and batch ids
        self.files: dict[str, _StoredFile] = {}
        self.batches: dict[str, _Batch] = {}
        self.prompt_cache = PromptCache()

    # ---- helpers

    def count(self, status: int) -> None:
        """Count one finished response by status code."""
        key = str(status)
        self.stats.status[key] = self.stats.status.get(key, 0) + 1

    def error(self, status: int, message: str, type_: str, code: str | None, param: str | None,
              headers: dict[str, str]) -> web.Response:
        """An OpenAI-style JSON error response."""
        self.count(status)
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return web.Response(status=status, body=json.dumps(body).encode(), headers=headers,
                            content_type="application/json")

    def base_headers(self, started: float) -> dict[str, str]:
        """x-request-id and openai-processing-ms, present on every chat response."""
        self.counter += 1
        return {
            "x-request-id": f"req_{self.id_prefix}{self.counter:010x}",
            "openai-processing-ms": str(int((time.perf_counter() - started) * 1000)),
            "openai-organization": "org-mock",
        }

    def check_auth(self, request: web.Request) -> str | None:
        """Return an error message if an api_key is configured and the request's key differs."""
        if self.config.api_key is None:
            return None
        auth = request.headers.get("Authorization", "")
        if "api-key" in request.headers and not auth:  # Azure's header
            auth = "Bearer " + request.headers["api-key"]
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return ("You didn't provide an API key. You need to provide your API key in an Authorization header "
                    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with "
                    "blank username) if you're accessing the API from your browser and are prompted for a "
                    "username. You can obtain an API key from https://platform.openai.com/account/api-keys.")
        key = auth[7:].strip()
        if key == self.config.api_key:
            return None
        return (f"Incorrect API key provided: {_mask_key(key)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.")

    def note_request(self, request: web.Request) -> None:
        """Keep what the latest request carried (path, query names, auth scheme, plain headers) for ``/stats``."""
        self.stats.last_request = _described(request)

    async def counted(self, handle: Any, request: web.Request) -> web.StreamResponse:
        """Run a model endpoint's handler with the in-flight counters kept (chat and embeddings)."""
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        if stats.in_flight > stats.peak_in_flight:
            stats.peak_in_flight = stats.in_flight
        try:
            return await handle(request)
        finally:
            stats.in_flight -= 1

    async def accept(self, request: web.Request, parse: Any, started: float,
                    now: float) -> tuple[Any, Any, web.Response | None]:
        """The key checked, then the JSON body read and ``parse``d: ``(body, parsed, None)``, or the
        error response to send instead as ``(None, None, response)``."""
        self.note_request(request)
        if request.match_info.get("deployment") is not None and "api-version" not in request.query:
            headers = {**self.limit_headers(now), **self.base_headers(started)}  # Azure's answer without a version
            return None, None, self.error(404, "Resource not found", "invalid_request_error", "404", None, headers)
        auth_error = self.check_auth(request)
        if auth_error is not None:
            headers = {**self.limit_headers(now), **self.base_headers(started)}
            code = "invalid_api_key" if "Incorrect" in auth_error else None
            return None, None, self.error(401, auth_error, "invalid_request_error", code, None, headers)
        try:
            try:
                body = json.loads(await request.read())
            except (ValueError, UnicodeDecodeError):
                raise _Reject(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                              "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
                              "but what was sent was not valid JSON.)", "invalid_request_error", None) from None
            return body, parse(body), None
        except _Reject as rej:
            headers = {**self.limit_headers(now), **self.base_headers(started)}
            return None, None, self.error(rej.status, rej.message, rej.type, rej.code, rej.param, headers)

    # ---- other endpoints

    async def list_models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the configured model list."""
        auth_error = self.check_auth(request)
        if auth_error is not None:
            body = {"error": {"message": auth_error, "type": "invalid_request_error", "param": None,
                              "code": "invalid_api_key" if "Incorrect" in auth_error else None}}
            return web.json_response(body, status=401)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "nbparrot"} for m in self.config.models]
        return web.json_response({"object": "list", "data": data})

    async def get_stats(self, request: web.Request) -> web.Response:
        """GET /stats: counters, per-tag received/answered counts and the config."""
        out = self.stats.as_dict()
        out["config"] = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "api_key"}
        return web.json_response(out)

    async def reset_stats(self, request: web.Request) -> web.Response:
        """POST /stats/reset: zero the counters and refill the rate-limit buckets (files and batches stay)."""
        self.stats = _Stats()
        self.prompt_cache.clear()
        for bucket in (self.requests_bucket, self.tokens_bucket):
            if bucket is not None:
                bucket.reset()
        return web.json_response({"ok": True})

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: liveness probe."""
        return web.Response(text="ok")


def _described(request: web.Request) -> dict:
    """What a test may check about a request's credentials and extras, without the secrets themselves."""
    headers = request.headers
    auth = headers.get("Authorization", "")
    scheme = "api-key" if "api-key" in headers else auth.split(" ", 1)[0].lower() if auth else None
    query = {k: v if k.lower() in SHOWN_QUERY else "***" for k, v in request.query.items()}
    return {"auth": scheme, "query": query, "path": request.path,
            "headers": {k.lower(): v for k, v in headers.items() if not secret_header(k)}}


_STATE_KEY = web.AppKey("nbparrot_mock", _MockServer)


def build_app(config: ServerConfig) -> web.Application:
    """Build the aiohttp application of the mock server (state lives on the app)."""
    check_loopback(config.host)
    server = _MockServer(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_STATE_KEY] = server
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/chat/completions", server.chat)
    app.router.add_post("/v1/embeddings", server.embeddings)
    # Azure OpenAI's deployment routes (?api-version= required; the key may come in an api-key header)
    app.router.add_post("/openai/deployments/{deployment}/chat/completions", server.chat)
    app.router.add_post("/openai/deployments/{deployment}/embeddings", server.embeddings)
    app.router.add_post("/embeddings", server.embeddings)
    app.router.add_get("/v1/models", server.list_models)
    app.router.add_get("/models", server.list_models)
    app.router.add_get("/stats", server.get_stats)
    app.router.add_get("/v1/stats", server.get_stats)
    app.router.add_post("/stats/reset", server.reset_stats)
    app.router.add_post("/v1/stats/reset", server.reset_stats)
    app.router.add_get("/health", server.health)
    for prefix in ("/v1", ""):
        app.router.add_post(prefix + "/files", server.create_file)
        app.router.add_get(prefix + "/files", server.list_files)
        app.router.add_get(prefix + "/files/{file_id}", server.get_file)
        app.router.add_get(prefix + "/files/{file_id}/content", server.file_content)
        app.router.add_delete(prefix + "/files/{file_id}", server.delete_file)
        app.router.add_post(prefix + "/batches", server.create_batch)
        app.router.add_get(prefix + "/batches", server.list_batches)
        app.router.add_get(prefix + "/batches/{batch_id}", server.get_batch)
        app.router.add_post(prefix + "/batches/{batch_id}/cancel", server.cancel_batch)
    return app


async def serve(config: ServerConfig, *, parent_pid: int | None = None) -> None:
    """Serve until cancelled, ``max_lifetime`` elapses or ``parent_pid`` dies; print the URL once bound."""
    check_loopback(config.host)
    host = "127.0.0.1" if config.host == "localhost" else config.host
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, config.port)
        await site.start()
        port = runner.addresses[0][1]
        shown = f"[{host}]" if ":" in host else host
        print(f"nbparrot server listening on http://{shown}:{port}/v1", flush=True)
        done = asyncio.Event()
        watchdog = None
        if parent_pid is not None:
            watchdog = asyncio.ensure_future(_watch_parent(parent_pid, done))
        try:
            await asyncio.wait_for(done.wait(), timeout=config.max_lifetime)
        except asyncio.TimeoutError:
            pass
        finally:
            if watchdog is not None:
                watchdog.cancel()
    finally:
        await runner.cleanup()


async def _watch_parent(parent_pid: int, done: asyncio.Event) -> None:
    """Set ``done`` once the parent process is gone (we got re-parented)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    done.set()

