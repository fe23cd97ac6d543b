"""Prompt caching as OpenAI describes it, made deterministic so a test can check the cost arithmetic.

A prompt of at least 1,024 tokens whose beginning an earlier request of the same model already
sent reports that beginning as ``usage.prompt_tokens_details.cached_tokens``: the longest seen
prefix of 1,024 + 128·k tokens (tokens counted as the server does, 4 characters of the joined
prompt text each). Prefixes are remembered after each answer; the memory is bounded.
"""

from __future__ import annotations

import hashlib

MIN_TOKENS = 1024  # shorter prompts are never cached
STEP = 128  # cached tokens come in steps of this many past MIN_TOKENS
CHARS_PER_TOKEN = 4
MAX_PREFIXES = 200_000  # remembered prefix hashes; past this the memory starts afresh


class PromptCache:
    """Which prompt prefixes have been seen, per model (sha1 digests of the prefix text)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()

    def clear(self) -> None:
        self._seen.clear()

    def cached_tokens(self, model: str, prompt_text: str, prompt_tokens: int) -> int:
        """Tokens of this prompt served from the cache (0 if none), and remember its prefixes."""
        if prompt_tokens < MIN_TOKENS or len(prompt_text) < MIN_TOKENS * CHARS_PER_TOKEN:
            return 0
        seen, digest = self._seen, hashlib.sha1(model.encode() + b"\0")
        cached, start, tokens = 0, 0, MIN_TOKENS
        new: list[bytes] = []
        while tokens <= prompt_tokens and tokens * CHARS_PER_TOKEN <= len(prompt_text):
            end = tokens * CHARS_PER_TOKEN
            digest.update(prompt_text[start:end].encode("utf-8", "surrogatepass"))
            key = digest.digest()
            if key in seen:
                cached = tokens
            else:
                new.append(key)
            start, tokens = end, tokens + STEP
        if len(seen) + len(new) > MAX_PREFIXES:
            seen.clear()
        seen.update(new)
        return cached
