"""Compact per-row storage for a million rows: requests as a source, packed keys, token budgets, the queue."""

from __future__ import annotations

from array import array
from collections import deque
from typing import Any, Mapping, Sequence

from ..outcomes import CHUNK, MASK, SHIFT, Chunked


class _Listed:
    """A plain list of message lists (None = skipped) as the engine's source of requests."""

    def __init__(self, prompts: Sequence[list | None], skip_reasons: Mapping[int, str]):
        self._prompts, self._reasons = prompts, skip_reasons

    def __len__(self) -> int:
        return len(self._prompts)

    def render(self, row: int) -> list | None:
        return self._prompts[row]

    def skip_reason(self, row: int) -> str:
        return self._reasons.get(row, "skipped")


class _Keys:
    """Cache keys by row, packed: 32 bytes a row (in chunks allocated as rows are keyed) instead of a
    64-character str (~113 bytes) in a dict."""

    __slots__ = ("_chunks", "_other")

    def __init__(self, n: int):
        self._chunks: list[bytearray | None] = [None] * ((n + MASK) >> SHIFT)
        self._other: dict[int, str] = {}  # a key that is not 64 hex digits, kept as it is

    def __setitem__(self, row: int, key: str) -> None:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        if len(raw) == 32 and raw.hex() == key:
            chunk = self._chunks[row >> SHIFT]
            if chunk is None:
                chunk = self._chunks[row >> SHIFT] = bytearray(32 * CHUNK)
            at = 32 * (row & MASK)
            chunk[at:at + 32] = raw
        else:
            self._other[row] = key

    def __getitem__(self, row: int) -> str:
        if self._other and row in self._other:
            return self._other[row]
        at = 32 * (row & MASK)
        return self._chunks[row >> SHIFT][at:at + 32].hex()


class _Costs:
    """Each row's budgeted tokens (8 bytes a row, in chunks); -1 while unknown. Dict-like where the engine uses it."""

    __slots__ = ("_tokens",)

    def __init__(self, n: int):
        self._tokens = Chunked("q", n, -1)

    def get(self, row: int, default: Any = None) -> Any:
        tokens = self._tokens[row]
        return default if tokens < 0 else tokens

    def __setitem__(self, row: int, tokens: int) -> None:
        self._tokens[row] = tokens

    def pop(self, row: int, default: Any = None) -> Any:
        tokens = self.get(row, default)
        self._tokens[row] = -1
        return tokens

    def clear(self) -> None:
        self._tokens.clear()


class _Queue:
    """Rows waiting to be sent: the planned ones in an array (8 bytes a row, nothing for the garbage
    collector to walk), with rows put back for another try in a deque in front of them."""

    __slots__ = ("_rows", "_head", "_front")

    def __init__(self) -> None:
        self._rows = array("q")
        self._head = 0
        self._front: deque[int] = deque()

    def extend(self, rows: Sequence[int]) -> None:
        self._rows.extend(rows)

    def appendleft(self, row: int) -> None:
        self._front.appendleft(row)

    def popleft(self) -> int:
        if self._front:
            return self._front.popleft()
        if self._head >= len(self._rows):
            raise IndexError("pop from an empty queue")
        row = self._rows[self._head]
        self._head += 1
        if self._head >= 65536 and 2 * self._head >= len(self._rows):
            del self._rows[:self._head]
            self._head = 0
        return row

    def __getitem__(self, index: int) -> int:
        if index != 0:
            raise IndexError("only the head of the queue can be read")
        if self._front:
            return self._front[0]
        if self._head >= len(self._rows):
            raise IndexError("the queue is empty")
        return self._rows[self._head]

    def __len__(self) -> int:
        return len(self._front) + len(self._rows) - self._head

    def __bool__(self) -> bool:
        return bool(self._front) or self._head < len(self._rows)

    def __iter__(self) -> Any:
        yield from self._front
        yield from self._rows[self._head:]
