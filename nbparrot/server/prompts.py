"""Prompt helpers: message text, the sha1 digest and tag of a prompt, token counts, filler, durations.

Choice ``i`` of a prompt's answer starts with ``[<tag>#<i>]`` where ``<tag>`` is
``sha1(prompt text)[:12]`` and the prompt text is every message's text joined by newlines
(:func:`expected_tag`), then, when the prompt holds images or files, a line of their marks
(``[image:<image_tag>]``, see :mod:`.media`). Prompt tokens are ``ceil(total chars of all text
contents / 4)`` plus each image's or file's tokens.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from .media import Media, read_part


def _content_text(content: Any) -> str:
    """Text of one message content: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _prompt_parts(messages: list[dict]) -> tuple[str, int, str]:
    """Return (prompt text, total content chars, last user message text) in one pass."""
    return _prompt_media(messages)[:3]


def _prompt_media(messages: list[dict], model: str = "") -> tuple[str, int, str, list[Media]]:
    """(prompt text with its media marks, text chars, last user message text, the images and files)."""
    texts = [_content_text(m.get("content")) for m in messages]
    last_user = ""
    for message, text in zip(reversed(messages), reversed(texts)):
        if message.get("role") == "user":
            last_user = text
            break
    media = [found for k, m in enumerate(messages) if isinstance(m.get("content"), list)
             for j, part in enumerate(m["content"]) if isinstance(part, dict)
             for found in (read_part(part, f"messages[{k}].content[{j}]", model),) if found is not None]
    text = "\n".join(texts)
    if media:
        text += "\n" + " ".join(found.mark for found in media)
    return text, sum(map(len, texts)), last_user, media


def _digest(prompt_text: str) -> str:
    """Full sha1 hex digest of the prompt text (its first 12 chars are the tag)."""
    return hashlib.sha1(prompt_text.encode("utf-8", "surrogatepass")).hexdigest()


def prompt_tag(messages: list[dict]) -> str:
    """The tag of a prompt (sha1 prefix, no choice suffix): the key of stats' received/answered."""
    return _digest(_prompt_parts(messages)[0])[:12]


def expected_tag(messages: list[dict], choice: int = 0) -> str:
    """The ``<tag>#<choice>`` the server puts at the start of choice ``choice``'s answer."""
    return f"{prompt_tag(messages)}#{choice}"


def prompt_tokens(messages: list[dict], model: str = "") -> int:
    """Prompt tokens as the server counts them: ceil(total text chars / 4), plus each image's and file's."""
    _, chars, _, media = _prompt_media(messages, model)
    return (chars + 3) // 4 + sum(found.tokens for found in media)


def format_duration(seconds: float) -> str:
    """Format a duration like OpenAI's rate-limit headers (Go style): "12ms", "1.5s", "6m0s"."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    sec = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{sec}s"
    if minutes:
        return f"{minutes}m{sec}s"
    return f"{sec}s"


def _mask_key(key: str) -> str:
    """Mask an API key like OpenAI does, keeping only the first 3 and last 2 characters."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 5) + key[-2:]


_LOREM = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
    "labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco "
    "laboris nisi ut aliquip ex ea commodo consequat duis aute irure dolor in reprehenderit in "
    "voluptate velit esse cillum dolore eu fugiat nulla pariatur excepteur sint occaecat "
    "cupidatat non proident sunt in culpa qui officia deserunt mollit anim id est laborum "
)
_FILLER = _LOREM * 64  # ~25k chars; longer answers repeat it (see _filler)


def _filler(length: int) -> str:
    """Deterministic lorem-ipsum filler of exactly ``length`` characters."""
    if length <= 0:
        return ""
    if length <= len(_FILLER):
        return _FILLER[:length]
    return (_LOREM * (length // len(_LOREM) + 1))[:length]
