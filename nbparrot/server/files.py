"""The Files API (``/v1/files``): uploads kept in memory, listed, read and deleted as OpenAI does."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from .config import FILE_MAX_BYTES, FILE_PURPOSES
from .wire import _find, _guarded, _list_object, _page, _Reject


@dataclass
class _StoredFile:
    """An uploaded file, or a batch's output or error file, held in memory."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def obj(self) -> dict:
        """OpenAI's file object."""
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "expires_at": None, "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None}


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    """A multipart field's bytes, or a 400 once they exceed ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(1 << 20):
        size += len(chunk)
        if size > limit:
            raise _Reject(400, f"File is too large: the maximum size of an upload is {limit:,} bytes.",
                          "invalid_request_error", "file_too_large", "file")
        chunks.append(chunk)
    return b"".join(chunks)


class _FileEndpoints:
    """/v1/files (a mixin of the app; state in memory, POST /stats/reset keeps it)."""

    def new_id(self, prefix: str) -> str:
        """A fresh object id: ``prefix`` then hex (this process and start time, then a serial number)."""
        self.serial += 1
        return f"{prefix}{self.id_prefix}{self.serial:06x}"

    def store_file(self, filename: str, purpose: str, data: bytes) -> _StoredFile:
        """Keep a file in memory under a new id."""
        file = _StoredFile(self.new_id("file-"), filename, purpose, data, int(time.time()))
        self.files[file.id] = file
        return file

    def find_file(self, request: web.Request) -> _StoredFile:
        """The file named by the URL, or a 404."""
        return _find(self.files, request.match_info["file_id"], "No such File object: {}", "id")


    @_guarded
    async def create_file(self, request: web.Request) -> web.Response:
        """POST /v1/files: a multipart upload with the fields ``file`` and ``purpose``."""
        if request.content_type != "multipart/form-data":
            raise _Reject(400, "Uploads must be multipart/form-data with the fields 'file' and 'purpose'.",
                          "invalid_request_error", None)
        data: bytes | None = None
        filename = purpose = ""
        try:
            async for part in await request.multipart():
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "file":
                    filename = part.filename or "file"
                    data = await _read_part(part, FILE_MAX_BYTES)
                elif part.name == "purpose":
                    purpose = (await _read_part(part, 1024)).decode("utf-8", "replace").strip()
        except ValueError as exc:
            raise _Reject(400, f"Could not parse the multipart body: {exc}", "invalid_request_error", None) from None
        if data is None:
            raise _Reject(400, "Missing required parameter: 'file'.", "invalid_request_error",
                          "missing_required_parameter", "file")
        if not purpose:
            raise _Reject(400, "Missing required parameter: 'purpose'.", "invalid_request_error",
                          "missing_required_parameter", "purpose")
        if purpose not in FILE_PURPOSES:
            raise _Reject(400, f"'{purpose}' is not one of {list(FILE_PURPOSES)} - 'purpose'",
                          "invalid_request_error", "invalid_value", "purpose")
        self.stats.files_uploaded += 1
        return web.json_response(self.store_file(filename, purpose, data).obj())

    @_guarded
    async def list_files(self, request: web.Request) -> web.Response:
        """GET /v1/files: the stored files, newest first (``order=asc`` for oldest), optionally of one purpose."""
        files = list(self.files.values())
        if request.query.get("order", "desc") == "desc":
            files.reverse()
        purpose = request.query.get("purpose")
        if purpose:
            files = [f for f in files if f.purpose == purpose]
        page, has_more = _page(files, request, 10_000, 10_000)
        return web.json_response(_list_object([f.obj() for f in page], has_more))

    @_guarded
    async def get_file(self, request: web.Request) -> web.Response:
        """GET /v1/files/{file_id}: the file object."""
        return web.json_response(self.find_file(request).obj())

    @_guarded
    async def file_content(self, request: web.Request) -> web.Response:
        """GET /v1/files/{file_id}/content: the file's bytes."""
        return web.Response(body=self.find_file(request).data, content_type="application/octet-stream")

    @_guarded
    async def delete_file(self, request: web.Request) -> web.Response:
        """DELETE /v1/files/{file_id}."""
        file = self.find_file(request)
        del self.files[file.id]
        return web.json_response({"id": file.id, "object": "file", "deleted": True})
