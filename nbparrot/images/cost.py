"""Image tokens before the run, by OpenAI's documented rules for the model's family.

Tile models (gpt-4o, gpt-4.1, gpt-4.5, o1, o3 and, by default, any model not listed): with
``detail="low"`` an image costs the flat base; otherwise the image is scaled to fit in
2048 x 2048, then so that its shortest side is at most 768, and costs base + tile x the number of
512-px tiles covering it (gpt-4o: 85 + 170 a tile; a 1024 x 1024 image is 765 tokens). gpt-4o-mini
counts the same tiles at 2833 + 5667 a tile (its images cost what gpt-4o's do). Patch models
(gpt-4.1-mini, gpt-4.1-nano, o4-mini, gpt-5-mini, gpt-5-nano): 32-px patches covering the image,
at most 1536 (a larger image is scaled down to fit), times the model's multiplier; ``detail``
does not change them. ``detail="auto"`` is counted as high: an estimate that a budget rests on
errs high. An image whose size is unknown (a URL, never fetched) is counted at the largest the
rule allows. A PDF page is counted as a letter page's image plus ``PDF_PAGE_TEXT`` tokens of text.
"""

from __future__ import annotations

import math

__all__ = ["image_tokens", "pdf_tokens", "PDF_PAGE_TEXT"]

# model prefix -> (base, per tile); the longest matching prefix wins
_TILES = {"gpt-4o-mini": (2833, 5667), "o1": (75, 150), "o3": (75, 150), "computer-use": (65, 129)}
_DEFAULT_TILES = (85, 170)
# model prefix -> multiplier of the 32-px patch count
_PATCHES = {"gpt-4.1-mini": 1.62, "gpt-4.1-nano": 2.46, "o4-mini": 1.72, "gpt-5-mini": 1.62, "gpt-5-nano": 2.46}
MAX_PATCHES = 1536
PDF_PAGE_TEXT = 500  # tokens of extracted text counted per PDF page (a full page of prose)
_PAGE_PX = (1275, 1650)  # a letter page at 150 dpi


def _family(model: str, table: dict) -> object:
    name = model.rsplit("/", 1)[-1].lower()  # "openai/gpt-4o" as routers name it
    matches = [prefix for prefix in table if name.startswith(prefix)]
    return table[max(matches, key=len)] if matches else None


def image_tokens(width: int | None, height: int | None, detail: str = "auto", model: str = "") -> int:
    """Prompt tokens of one image of ``width`` x ``height`` pixels (None: unknown, counted at the most)."""
    multiplier = _family(model, _PATCHES)
    if multiplier is not None:
        if width is None or height is None:
            return math.ceil(MAX_PATCHES * multiplier)
        return math.ceil(_patches(width, height) * multiplier)
    base, tile = _family(model, _TILES) or _DEFAULT_TILES
    if detail == "low":
        return base
    if width is None or height is None:
        width, height = 2048, 768  # the most tiles any image can take: 4 x 2
    return base + tile * _tiles(width, height)


def _tiles(width: int, height: int) -> int:
    w, h = float(max(1, width)), float(max(1, height))
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return math.ceil(w / 512) * math.ceil(h / 512)


def _patches(width: int, height: int) -> int:
    w, h = max(1, width), max(1, height)
    patches = math.ceil(w / 32) * math.ceil(h / 32)
    if patches <= MAX_PATCHES:
        return patches
    shrink = math.sqrt(32 * 32 * MAX_PATCHES / (w * h))
    shrink *= min(math.floor(w * shrink / 32) / (w * shrink / 32), math.floor(h * shrink / 32) / (h * shrink / 32))
    return min(MAX_PATCHES, math.ceil(w * shrink / 32) * math.ceil(h * shrink / 32))


def pdf_tokens(pages: int, model: str = "") -> int:
    """Prompt tokens of a PDF of ``pages`` pages: each page's image (high detail) and its text."""
    return pages * (image_tokens(*_PAGE_PX, "high", model) + PDF_PAGE_TEXT)
