"""Small inline thumbnails for the views: the panel's preview and the ``---`` comparison.

A thumbnail is a data-URL ``<img>`` (JPEG, at most ``THUMB_PX`` on its long side, a few KB), so it
is part of the output and stays in the saved notebook. A URL is shown by the browser from the URL
itself (nbparrot fetches nothing); a PDF as a small "PDF" tag; a value that cannot be read (a decompression bomb
too) as a "?" tag whose tooltip says why: a thumbnail never breaks the view it is in.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from .parts import MediaError, MediaOptions, MediaPart

__all__ = ["thumbnail_html", "row_thumbnails", "THUMB_PX"]

THUMB_PX = 48
_STYLE = f"max-width:{THUMB_PX}px;max-height:{THUMB_PX}px;float:left;margin-right:6px"
_TAG = ("display:inline-block;font-size:10px;padding:1px 4px;margin-right:6px;border:1px solid currentColor;"
        "border-radius:3px;opacity:0.7;vertical-align:middle")


def thumbnail_html(value: Any, px: int = THUMB_PX) -> str:
    """An inline ``<img>`` (or a small tag) showing an image value: path, URL, bytes, PIL image, array or part."""
    part = value if isinstance(value, MediaPart) else MediaPart(value, "image", MediaOptions())
    title = html.escape(part.label(), quote=True)
    url = part.url
    if url is not None:
        return (f"<img src='{html.escape(url, quote=True)}' title='{title}' alt='{title}' loading='lazy' "
                f"referrerpolicy='no-referrer' style='{_STYLE}'>")
    try:
        mime, _, _ = part.info()
        if mime == "application/pdf":
            return f"<span title='{title}' style='{_TAG}'>PDF</span>"
        from PIL import Image

        pixels = part._pixels()
        if pixels is None:
            pixels = Image.open(io.BytesIO(part._bytes()))
            if pixels.format == "JPEG":
                pixels.draft("RGB", (px * 2, px * 2))
        small = pixels.copy() if pixels is part.value else pixels
        small.thumbnail((px, px))
        if small.mode not in ("RGB", "L"):
            small = _flatten(small) if "A" in small.mode or "transparency" in small.info else small.convert("RGB")
        out = io.BytesIO()
        small.save(out, "JPEG", quality=70)
    except Exception as exc:  # noqa: BLE001 - any decode error (a decompression bomb too): a thumbnail never breaks a view
        why = html.escape(str(exc) if isinstance(exc, MediaError) else f"{part.label()}: {type(exc).__name__}", quote=True)
        return f"<span title='{why}' style='{_TAG}'>?</span>"
    data = base64.b64encode(out.getvalue()).decode("ascii")
    return f"<img src='data:image/jpeg;base64,{data}' title='{title}' alt='{title}' style='{_STYLE}'>"


def row_thumbnails(prepared: Any, request: int) -> str:
    """The thumbnails of a request's images (empty when it has none): what the views put beside its answer."""
    parts = getattr(prepared, "media_parts", None)
    return "".join(thumbnail_html(part) for part in parts(request)) if parts is not None else ""


def _flatten(image: Any) -> Any:
    """An image with transparency on white (JPEG has no alpha)."""
    from PIL import Image

    rgba = image.convert("RGBA")
    back = Image.new("RGB", rgba.size, (255, 255, 255))
    back.paste(rgba, mask=rgba.getchannel("A"))
    return back
