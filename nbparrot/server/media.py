"""Image and file content parts: checked, hashed and counted as OpenAI counts them.

An ``image_url`` part with a data URL is decoded; its mark is ``[image:<image_tag(bytes)>]`` and
its tokens follow the tile rule (:func:`nbparrot.images.image_tokens`, from the size in its
header). An ``http(s)`` URL is never fetched: its mark hashes the URL, and it is counted at the
most the rule allows. A ``file`` part (a PDF as a data URL) is marked ``[file:<tag>]`` and counted
per page. Each answer starts with its prompt's marks (see :mod:`.chat`), so a test can check that
every row got its own image: :func:`image_tag` of the bytes it sent.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any, NamedTuple

from ..images.cost import image_tokens, pdf_tokens
from ..images.header import SENDABLE, is_pdf, pdf_pages, probe
from .wire import _Reject

__all__ = ["image_tag", "Media", "read_part"]

DETAILS = ("auto", "low", "high")


class Media(NamedTuple):
    """One image or file of a prompt: its mark in the answer and its prompt tokens."""

    mark: str
    tokens: int


def image_tag(data: bytes | str) -> str:
    """The 8 hex digits that mark an image (its bytes, or its URL) or a file in an answer: ``sha256[:8]``."""
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:8]


def _reject(message: str, param: str, code: str = "invalid_value") -> _Reject:
    return _Reject(400, message, "invalid_request_error", code, param)


def _decode(url: Any, param: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a base64 data URL; 400 if it is not one."""
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url[:100]:
        raise _reject(f"Invalid '{param}': expected a base64 data URL.", param)
    head, _, payload = url.partition(",")
    try:
        return head[5:].split(";")[0], base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _reject(f"Invalid '{param}': the base64 data could not be decoded.", param) from None


def read_part(part: dict, where: str, model: str) -> Media | None:
    """The mark and tokens of an ``image_url`` or ``file`` part (None for a text part); 400 for a bad one."""
    kind = part.get("type")
    if kind == "image_url":
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else None
        detail = spec.get("detail", "auto") if isinstance(spec, dict) else None
        if detail not in DETAILS:
            raise _reject(f"Invalid '{where}.image_url.detail': expected one of 'auto', 'low', 'high'.",
                          f"{where}.image_url.detail")
        if isinstance(url, str) and url[:8].lower().startswith(("http://", "https://")):
            return Media(f"[image:{image_tag(url)}]", image_tokens(None, None, detail, model))
        _, data = _decode(url, f"{where}.image_url.url")
        found = probe(data)
        if found is None or found[0] not in SENDABLE:
            raise _reject("You uploaded an unsupported image. Please make sure your image has of one the following "
                          "formats: ['png', 'jpeg', 'gif', 'webp'].", f"{where}.image_url.url", "invalid_image_format")
        return Media(f"[image:{image_tag(data)}]", image_tokens(found[1], found[2], detail, model))
    if kind == "file":
        spec = part.get("file")
        file_data = spec.get("file_data") if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not spec.get("filename"):
            raise _reject(f"Missing required parameter: '{where}.file.filename'.", f"{where}.file.filename",
                          "missing_required_parameter")
        _, data = _decode(file_data, f"{where}.file.file_data")
        if not is_pdf(data):
            raise _reject(f"Invalid file data: '{where}.file.file_data'. Expected a PDF.", f"{where}.file.file_data",
                          "invalid_value")
        return Media(f"[file:{image_tag(data)}]", pdf_tokens(pdf_pages(data), model))
    if kind == "text":
        return None
    raise _reject(f"Invalid value: '{kind}'. Supported values are: 'text', 'image_url' and 'file'.", f"{where}.type")
