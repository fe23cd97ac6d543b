"""One image or document value of a row, from its source to the content part that is sent.

A ``MediaPart`` is what a rendered row holds in place of an image: the user's value and the
options, nothing read yet. Planning asks it for its cache key (the sha256 of the image's bytes,
or of a PIL image's / array's pixels, read once) and its tokens (the size from the header);
then the row's messages are dropped, and nothing of the image stays but the row's key and cost.
Sending asks for its wire form (``encode_messages``, in a worker thread so a photo's decode never
stalls the kernel's loop): the bytes are read again, downscaled with Pillow when the long side is
over the limit, and base64-encoded into a data URL spliced into the body; the part is dropped, so
at most the in-flight requests' images are held encoded. An ``http(s)://`` URL is sent as it
is (never fetched); a PDF goes as a ``file`` part.

A value that cannot be sent (a missing file, an unreadable or truncated image, a type that is
not an image, an image too large even after downscaling) raises ``MediaError``, naming the path
or the column: the engine fails that row and sends the others.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..errors import ConfigError, RenderError
from .cost import image_tokens, pdf_tokens
from .header import HEAD_BYTES, SENDABLE, complete, is_pdf, pdf_pages, probe

__all__ = ["MediaOptions", "MediaPart", "MediaError", "is_media", "expand", "encode_messages", "media_options",
           "DETAILS"]

DETAILS = ("auto", "low", "high")
_PIXELS = threading.Lock()  # sending encodes in worker threads; a PIL image object is not safe to share
_NO_LOCK = contextlib.nullcontext()
MAX_BYTES = 20 * 1024 * 1024  # OpenAI's limit per image; a larger encoded image fails its row
LOW_PX, HIGH_PX = 512, 2048  # what the endpoint scales an image to anyway, per detail


class MediaError(RenderError):
    """An image or file value that cannot be sent; the message names the path or the column."""


@dataclass(frozen=True)
class MediaOptions:
    """Which fields hold images or documents, and how they are sent."""

    columns: tuple[str, ...] = ()  # named by images=[...]; PIL images, arrays and bytes are found without
    detail: str = "auto"
    max_px: int | None = None  # the long side images are scaled down to; None: 512 for low detail, else 2048

    @property
    def limit(self) -> int:
        return self.max_px or (LOW_PX if self.detail == "low" else HIGH_PX)


def media_options(images: Any = None, detail: Any = None, max_image_px: Any = None) -> MediaOptions:
    """Check the ``images=``, ``detail=`` and ``max_image_px=`` options (``ConfigError``)."""
    if images is None:
        columns: tuple[str, ...] = ()
    elif isinstance(images, str):
        columns = (images,)
    elif isinstance(images, (list, tuple, set, frozenset)) and all(isinstance(c, str) for c in images):
        columns = tuple(images)
    else:
        raise ConfigError(f"images must be a column name or a list of column names, not {images!r}")
    detail = "auto" if detail is None else detail
    if detail not in DETAILS:
        raise ConfigError(f"detail must be one of {', '.join(DETAILS)}, not {detail!r}")
    if max_image_px is not None and (isinstance(max_image_px, bool) or not isinstance(max_image_px, int)
                                     or max_image_px < 16):
        raise ConfigError(f"max_image_px must be a whole number of pixels, at least 16, not {max_image_px!r}")
    return MediaOptions(columns, detail, max_image_px)


def is_media(value: Any) -> bool:
    """True for the values taken as images without being named: bytes, PIL images, 2-D/3-D numpy arrays."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    pil = sys.modules.get("PIL.Image")
    if pil is not None and isinstance(value, pil.Image):
        return True
    kind = type(value)
    return kind.__name__ == "ndarray" and kind.__module__ == "numpy" and value.ndim in (2, 3)


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError("this image needs Pillow (to read, convert or scale it): pip install 'nbparrot[images]'") from None
    return Image


class MediaPart:
    """An image or document in a rendered row, read only when its key, tokens or wire form is asked for."""

    __slots__ = ("value", "field", "options", "_data", "_info", "_array")

    def __init__(self, value: Any, field: str, options: MediaOptions):
        self.value, self.field, self.options = value, field, options
        self._data: bytes | None = None
        self._info: tuple[str, int | None, int | None] | None = None  # (mime, width, height); pages for a PDF
        self._array: Any = None  # a numpy value made a PIL image, once

    # ---- what it is ---------------------------------------------------------------------

    @property
    def url(self) -> str | None:
        """The ``http(s)://`` URL the value is, sent as it is; else None."""
        value = self.value
        if isinstance(value, str) and value[:8].lower().startswith(("http://", "https://")):
            return value
        return None

    def _where(self) -> str:
        value = self.value
        if isinstance(value, (str, os.PathLike)) and not str(value).startswith("data:"):
            return f"{os.fspath(value)!r} (column {self.field!r})"
        return f"the value in {self.field!r}"

    def _bytes(self) -> bytes:
        """The value's encoded bytes (a file, bytes, a data URL); read once per part."""
        if self._data is not None:
            return self._data
        value = self.value
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, str) and value.startswith("data:"):
            head, _, payload = value.partition(",")
            if not head.endswith(";base64"):
                raise MediaError(f"{self._where()}: a data URL must be base64 (data:<type>;base64,...)")
            try:
                data = base64.b64decode(payload, validate=True)
            except ValueError:
                raise MediaError(f"{self._where()}: the data URL is not valid base64") from None
        elif isinstance(value, (str, os.PathLike)):
            data = self._read()
        else:
            raise MediaError(f"{self.field!r} holds a {type(value).__name__}, not an image: give a path, URL, "
                             "bytes, a PIL image or a numpy array")
        self._data = data
        return data

    def _read(self, limit: int = -1) -> bytes:
        """The file the value names (its first ``limit`` bytes), or ``MediaError`` naming it."""
        path = os.fspath(self.value)
        try:
            with open(Path(path).expanduser(), "rb") as file:
                return file.read(limit)
        except FileNotFoundError:
            raise MediaError(f"no such file: {path!r} (column {self.field!r})") from None
        except OSError as exc:
            raise MediaError(f"cannot read {path!r} (column {self.field!r}): {exc.strerror or exc}") from None

    def _pixels(self) -> Any:
        """A PIL image or array value as a PIL image (None for encoded data)."""
        value = self.value
        pil = sys.modules.get("PIL.Image")
        if pil is not None and isinstance(value, pil.Image):
            return value
        if type(value).__name__ == "ndarray" and type(value).__module__ == "numpy":
            if self._array is not None:
                return self._array
            image = _pillow()
            try:
                self._array = image.fromarray(value)
                return self._array
            except (TypeError, ValueError) as exc:
                raise MediaError(f"{self._where()}: cannot make an image of an array of shape {value.shape} and dtype "
                                 f"{value.dtype} ({exc}); use uint8 values, shape (h, w) or (h, w, 3|4)") from None
        return None

    def info(self) -> tuple[str, int | None, int | None]:
        """``(mime, width, height)``; for a PDF ``("application/pdf", pages, None)``; for a URL sizes are None."""
        if self._info is not None:
            return self._info
        if self.url is not None:
            info: tuple[str, int | None, int | None] = ("url", None, None)
        else:
            pixels = self._pixels()
            if pixels is not None:
                info = ("pixels", *pixels.size)
            else:
                info = self._probe_encoded()
        self._info = info
        return info

    def _probe_encoded(self) -> tuple[str, int | None, int | None]:
        value = self.value
        if self._data is None and isinstance(value, (str, os.PathLike)) and not str(value).startswith("data:"):
            head = self._read(HEAD_BYTES)  # the header alone: the whole file is read only to hash or send it
            found = probe(head)
            if found is not None:
                return found
            if is_pdf(head) and len(head) < HEAD_BYTES:
                return "application/pdf", pdf_pages(head), None
        data = self._bytes()
        found = probe(data)
        if found is not None:
            return found
        if is_pdf(data):
            return "application/pdf", pdf_pages(data), None
        image = _pillow()
        try:
            with image.open(io.BytesIO(data)) as opened:  # another format Pillow reads: converted to PNG when sent
                return "pixels", *opened.size
        except (OSError, ValueError, image.DecompressionBombError) as exc:
            kind = "an empty file" if not data else f"not an image or a PDF ({type(exc).__name__}: {exc})"
            raise MediaError(f"{self._where()} is {kind}") from None

    # ---- what planning asks -------------------------------------------------------------

    def key(self) -> dict:
        """What the cache key holds for this part: a digest of the content (read once), and how it is sent."""
        url = self.url
        options = self.options
        if url is not None:
            return {"image_url": url, "detail": options.detail}
        pixels = self._pixels()
        if pixels is not None:
            digest = hashlib.sha256(f"{pixels.mode} {pixels.size}".encode())
            digest.update(pixels.tobytes())
        else:
            digest = hashlib.sha256(self._bytes())
        return {"media": digest.hexdigest(), "detail": options.detail, "max_px": options.limit}

    def tokens(self, model: str = "") -> int:
        """Prompt tokens of this part, as the endpoint counts the image it will see (after downscaling)."""
        mime, width, height = self.info()
        if mime == "application/pdf":
            return pdf_tokens(width or 1, model)
        if width is not None and height is not None:
            width, height = _fit(width, height, self.options.limit)
        return image_tokens(width, height, self.options.detail, model)

    def label(self) -> str:
        """A short name for previews: the file name, the URL, or the column."""
        value = self.value
        if isinstance(value, (str, os.PathLike)) and not str(value).startswith("data:"):
            text = os.fspath(value)
            return text if self.url is not None else (os.path.basename(text) or text)
        return self.field

    # ---- what sending asks --------------------------------------------------------------

    def wire(self) -> dict:
        """The content part as sent: ``image_url`` (a data URL, or the URL itself) or ``file`` (a PDF)."""
        part, payload = self.wire_spliced("")
        if payload is None:
            return part
        spec = part["file"] if part["type"] == "file" else part["image_url"]
        key = "file_data" if part["type"] == "file" else "url"
        spec[key] = b"".join(payload).decode("ascii")
        return part

    def wire_spliced(self, marker: str) -> tuple[dict, tuple[bytes, ...] | None]:
        """The content part with ``marker`` where its data URL goes, and that data URL as pieces of ASCII
        bytes (None for an http(s) URL, which is in the part): base64 need not pass through ``json.dumps``."""
        url = self.url
        detail = self.options.detail
        if url is not None:
            return {"type": "image_url", "image_url": {"url": url, "detail": detail}}, None
        mime, width, height = self.info()
        if mime == "application/pdf":
            name = self.label() if self.label() != self.field else f"{self.field}.pdf"
            return ({"type": "file", "file": {"filename": name, "file_data": marker}},
                    _data_url("application/pdf", self._bytes()))
        limit = self.options.limit
        if mime in SENDABLE and max(width or 0, height or 0) <= limit:
            data = self._bytes()
            if not complete(data, mime):
                raise MediaError(f"{self._where()} is a truncated {mime.split('/')[1].upper()} image (its end is missing)")
        else:
            mime, data = self._encode(limit)
        if len(data) > MAX_BYTES:
            raise MediaError(f"{self._where()} is {len(data) / 1e6:.1f} MB even after scaling to {limit} px, "
                             f"over the {MAX_BYTES // (1024 * 1024)} MB an image may be; lower max_image_px")
        return {"type": "image_url", "image_url": {"url": marker, "detail": detail}}, _data_url(mime, data)

    def _encode(self, limit: int) -> tuple[str, bytes]:
        """Decode, scale down to ``limit`` px on the long side, and encode (JPEG stays JPEG, else PNG)."""
        image = _pillow()
        with _PIXELS if self._pixels() is not None else _NO_LOCK:  # the user's own PIL image: one thread at a time
            return self._encode_locked(image, limit)

    def _encode_locked(self, image: Any, limit: int) -> tuple[str, bytes]:
        pixels = self._pixels()
        source_jpeg = False
        try:
            if pixels is None:
                pixels = image.open(io.BytesIO(self._bytes()))
                source_jpeg = pixels.format == "JPEG"
                if source_jpeg:
                    pixels.draft("RGB", (limit, limit))  # let the JPEG decoder scale by 1/2, 1/4, 1/8 as it reads
                pixels.load()
            if max(pixels.size) > limit:
                pixels = pixels.copy() if pixels is self.value else pixels
                pixels.thumbnail((limit, limit), image.Resampling.LANCZOS, reducing_gap=2.0)
            out = io.BytesIO()
            if source_jpeg and pixels.mode in ("RGB", "L"):
                pixels.save(out, "JPEG", quality=90)
                return "image/jpeg", out.getvalue()
            if pixels.mode not in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"):
                pixels = pixels.convert("RGBA" if "A" in pixels.mode else "RGB")
            pixels.save(out, "PNG")
            return "image/png", out.getvalue()
        except MediaError:
            raise
        except (OSError, ValueError, SyntaxError, image.DecompressionBombError) as exc:
            raise MediaError(f"{self._where()}: cannot read the image ({type(exc).__name__}: {exc})") from None

    def __repr__(self) -> str:
        return f"MediaPart({self.label()!r})"


def _fit(width: int, height: int, limit: int) -> tuple[int, int]:
    """The size after scaling the long side down to ``limit`` (as ``Image.thumbnail`` does)."""
    if max(width, height) <= limit:
        return width, height
    scale = limit / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _data_url(mime: str, data: bytes) -> tuple[bytes, ...]:
    """A data URL in pieces: joined once, into the request body."""
    return b"data:" + mime.encode() + b";base64,", base64.b64encode(data)


_MARKER = f"nbparrot-media-{os.urandom(8).hex()}-"  # never in a prompt: 64 random bits


def encode_messages(messages: Sequence[dict], prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """``prefix``, the JSON of ``messages`` as sent, ``suffix``: each image's base64 data URL spliced in.

    ``json.dumps`` of a megabyte of base64 scans every character for escapes (about 3.5 ms a MB);
    base64 needs none, so each part is dumped with a marker in its place and the bytes go in after,
    in one join with the rest of the body (the image is copied once, not once per step).
    """
    payloads: list[tuple[bytes, ...]] = []
    dumped = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(part, MediaPart) for part in content):
            parts = []
            for part in content:
                if isinstance(part, MediaPart):
                    part, payload = part.wire_spliced(f"{_MARKER}{len(payloads)}")
                    if payload is not None:
                        payloads.append(payload)
                parts.append(part)
            message = {**message, "content": parts}
        dumped.append(message)
    text = json.dumps(dumped).encode()
    pieces = text.split(_MARKER.encode())
    out = [prefix, pieces[0]]
    for piece in pieces[1:]:
        number, _, rest = piece.partition(b'"')
        out += (*payloads[int(number)], b'"', rest)
    out.append(suffix)
    return b"".join(out)


def expand(messages: Sequence[dict]) -> list[dict]:
    """``messages`` with every ``MediaPart`` replaced by its wire form (raises ``MediaError``)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(part, MediaPart) for part in content):
            message = {**message, "content": [part.wire() if isinstance(part, MediaPart) else part for part in content]}
        out.append(message)
    return out


def parts_of(messages: Iterable[dict]) -> list[MediaPart]:
    """The ``MediaPart`` items of rendered messages, in order."""
    return [part for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if isinstance(part, MediaPart)]
