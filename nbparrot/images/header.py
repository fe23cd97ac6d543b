"""An image's format and size from its first bytes, without decoding it (and without Pillow).

PNG, GIF, JPEG and WebP are the formats OpenAI takes as they are; their headers say the size in
the first few bytes (JPEG: in the frame header, after any metadata segments, usually within
the first 64 KB). PDFs are recognised by their signature and their pages counted roughly. The
bundled server reads what it receives with the same functions, so both sides count alike.
"""

from __future__ import annotations

import re
import struct

__all__ = ["probe", "complete", "is_pdf", "pdf_pages", "HEAD_BYTES", "SENDABLE"]

HEAD_BYTES = 65536  # read this much of a file first; the whole file only if the size is not in it
SENDABLE = ("image/png", "image/jpeg", "image/gif", "image/webp")  # sent without re-encoding
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG start-of-frame markers (not DHT/JPG/DAC)
_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


def probe(data: bytes) -> tuple[str, int, int] | None:
    """``(mime type, width, height)`` of a PNG, GIF, JPEG or WebP from its header; None if not one of those
    (or the header is cut short)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return "image/png", width, height
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return "image/gif", width, height
    if data[:2] == b"\xff\xd8":
        return _jpeg(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        return _webp(data)
    return None


def _jpeg(data: bytes) -> tuple[str, int, int] | None:
    at, end = 2, len(data)
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length
            at += 2
            continue
        length = (data[at + 2] << 8) | data[at + 3]
        if marker in _SOF:
            if at + 9 > end:
                return None
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            return "image/jpeg", width, height
        at += 2 + length
    return None


def _webp(data: bytes) -> tuple[str, int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return "image/webp", width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return "image/webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return "image/webp", int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def complete(data: bytes, mime: str) -> bool:
    """False for a PNG, JPEG, GIF or WebP whose end is missing (a truncated file), found without decoding."""
    if mime == "image/png":
        return data[-12:-8] == b"\x00\x00\x00\x00" and data[-8:-4] == b"IEND"
    if mime == "image/jpeg":
        return b"\xff\xd9" in data[-1024:]  # the end-of-image marker (some cameras write a few bytes after it)
    if mime == "image/gif":
        return data.rstrip(b"\x00")[-1:] == b"\x3b"
    if mime == "image/webp":
        return len(data) >= int.from_bytes(data[4:8], "little") + 8
    return True


def is_pdf(data: bytes) -> bool:
    """True for a PDF (its ``%PDF-`` signature, allowed within the first 1 KB as readers do)."""
    return b"%PDF-" in data[:1024]


def pdf_pages(data: bytes) -> int:
    """Pages of a PDF, counted from its ``/Type /Page`` objects (at least 1). Rough: pages kept in
    compressed object streams are not seen, so a compressed PDF may count as 1 page."""
    return max(1, len(_PAGE.findall(data)))
