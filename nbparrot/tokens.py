"""Token estimates that work offline.

The pacer needs each request's token cost before it is sent, and the cost estimate needs
the whole run's. tiktoken is exact for OpenAI models but downloads its encoding files on
first use, which fails on machines without that access, so the estimate here never needs
it: ``ceil(utf-8 bytes / 4)`` per message content plus 4 tokens of chat framing per message
and 3 for the reply's priming. For English text that is within a few percent of the real
count and slightly above it (a budget should err high); for text outside ASCII it counts
bytes rather than characters, which keeps it from badly undercounting (e.g. CJK, where a
character is often a whole token).
"""

from __future__ import annotations

from typing import Iterable, Mapping

__all__ = ["estimate_text_tokens", "estimate_prompt_tokens", "PER_MESSAGE", "PER_REPLY"]

PER_MESSAGE = 4  # role and separators around each message
PER_REPLY = 3  # the assistant priming every reply


def estimate_text_tokens(text: str) -> int:
    """Estimated tokens in one piece of text."""
    # surrogatepass: a lone surrogate (not valid text, never sent) is counted, not an exception
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    return (size + 3) // 4


def estimate_prompt_tokens(messages: Iterable[Mapping[str, object]], model: str = "") -> int:
    """Estimated prompt tokens of a chat request's messages; an image or PDF part (a
    ``nbparrot.images.MediaPart``) counts its own tokens for ``model``."""
    total = PER_REPLY
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += PER_MESSAGE + estimate_text_tokens(content)
        elif isinstance(content, list):  # content parts: text, and images that know their tokens
            total += PER_MESSAGE + sum(
                estimate_text_tokens(part.get("text", "")) if isinstance(part, dict) else part.tokens(model)
                for part in content
            )
        else:
            total += PER_MESSAGE
    return total
