"""HTTP plumbing shared by the endpoints: OpenAI-style errors, parameter checks, pages, resets."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web


def _find(store: dict, key: str, message: str, param: str) -> Any:
    """``store[key]``, or a 404 with OpenAI's wording for that kind of object."""
    found = store.get(key)
    if found is None:
        raise _Reject(404, message.format(key), "invalid_request_error", None, param)
    return found


class _Reject(Exception):
    """A ready-made error response raised from request parsing."""

    def __init__(self, status: int, message: str, type_: str, code: str | int | None, param: str | None = None):
        """Keep the pieces of an OpenAI-style error body."""
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        """The JSON error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        """The JSON error response (not counted in the chat statistics)."""
        return web.json_response(self.body(), status=self.status)


_HTML_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
    "</body>\r\n</html>\r\n"
).encode()


def _int_param(body: dict, key: str, minimum: int, maximum: int | None = None) -> int | None:
    """Read an optional integer request parameter or raise a 400 like OpenAI's."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Reject(400, f"Invalid type for '{key}': expected an integer, but got {type(value).__name__} instead.",
                      "invalid_request_error", "invalid_type", key)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise _Reject(400, f"Invalid '{key}': integer must be {bound}, got {value}.",
                      "invalid_request_error", "invalid_value", key)
    return value


_Handler = Callable[[Any, web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: _Handler) -> _Handler:
    """Wrap a files or batches handler: Bearer auth first, and a :class:`_Reject` it raises becomes its error."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: web.Request) -> web.StreamResponse:
        self.note_request(request)
        auth_error = self.check_auth(request)
        if auth_error is not None:
            code = "invalid_api_key" if "Incorrect" in auth_error else None
            return _Reject(401, auth_error, "invalid_request_error", code).response()
        try:
            return await handler(self, request)
        except _Reject as rej:
            return rej.response()

    return wrapper


async def _json_object(request: web.Request) -> dict:
    """The request's JSON object body, or a 400."""
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise _Reject(400, "The request body must be a JSON object.", "invalid_request_error", None)
    return body


def _page(items: list, request: web.Request, default_limit: int, max_limit: int) -> tuple[list, bool]:
    """The ``limit`` items after the one whose id is ``after`` (query parameters), and whether more follow."""
    text = request.query.get("limit")
    limit = default_limit
    if text is not None:
        limit = int(text) if text.isdigit() else 0
        if not 1 <= limit <= max_limit:
            raise _Reject(400, f"Invalid 'limit': integer must be between 1 and {max_limit}, got {text!r}.",
                          "invalid_request_error", "invalid_value", "limit")
    after = request.query.get("after")
    if after:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return items[:limit], len(items) > limit


def _list_object(data: list[dict], has_more: bool) -> dict:
    """OpenAI's cursor-paginated list object."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def _abort(request: web.Request) -> None:
    """Reset the client's TCP connection (RST, not a clean close), like a dropped upstream."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


async def _flush_then_abort(request: web.Request) -> None:
    """Let the partial response reach the client, then reset the connection."""
    transport = request.transport
    for _ in range(100):
        if transport is None or transport.is_closing() or not transport.get_write_buffer_size():
            break
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.005)  # give the client a moment to read what was sent before the RST
    _abort(request)
