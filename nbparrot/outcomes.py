"""One outcome per request, stored column-wise so a million rows cost the garbage collector nothing.

``Outcomes`` holds what happened to every request of a run in flat columns: the status, attempt
and token counts, latency and the cached flag in ``bytearray`` / ``array`` columns, and the
answers, parsed values and error texts in dicts keyed by row (one per chunk of rows), which
hold only the rows that have one. None of these is a container the cyclic garbage collector
has to walk item by item (a dict of ``int -> str`` is not even tracked), so a full collection
during a 1,000,000-row run costs what it would cost without the run, instead of a pass over a
million ``Outcome`` objects (about 250 ms measured on the 2-core bench machine: a stall of the
whole notebook).

The number columns are cut in chunks of 65,536 rows, each allocated when a row in it is first
written: creating the outcomes of a million rows costs well under a millisecond (one flat 8-byte
column would touch 8 MB at once), and a run never pays for more than it has used.

``outcomes[k]`` gives an ``Outcome``: a small view of row ``k`` with the familiar attributes
(``status``, ``content``, ``parsed``, ``finish_reason``, ``error``, ``attempts``,
``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``latency``, ``cached``), readable and writable as on
the plain object this replaces.
"""

from __future__ import annotations

from array import array
from typing import Any, Iterator

__all__ = ["Outcome", "Outcomes", "PENDING", "OK", "FAILED", "CANCELLED", "SKIPPED"]

PENDING, OK, FAILED, CANCELLED, SKIPPED = "pending", "ok", "failed", "cancelled", "skipped"
_NAMES = (PENDING, OK, FAILED, CANCELLED, SKIPPED)
_CODES = {name: code for code, name in enumerate(_NAMES)}
_NAN = float("nan")
_OTHER = 255  # finish-reason code: the value is kept in ``finish_other`` (unhashable, or too many kinds)
SHIFT = 16
CHUNK = 1 << SHIFT  # rows per chunk of a number column
MASK = CHUNK - 1


class Chunked:
    """A fixed-length column of numbers (an ``array`` typecode) in chunks allocated on first write."""

    __slots__ = ("chunks", "default", "_blank")

    def __init__(self, typecode: str, n: int, default: Any = 0):
        self.chunks: list[array | None] = [None] * ((n + MASK) >> SHIFT)
        self.default = default
        self._blank = array(typecode, [default]) * CHUNK

    def __getitem__(self, row: int) -> Any:
        chunk = self.chunks[row >> SHIFT]
        return self.default if chunk is None else chunk[row & MASK]

    def __setitem__(self, row: int, value: Any) -> None:
        chunk = self.chunks[row >> SHIFT]
        if chunk is None:
            chunk = self.chunks[row >> SHIFT] = self._blank[:]
        chunk[row & MASK] = value

    def clear(self) -> None:
        """Every row back to the default."""
        self.chunks = [None] * len(self.chunks)


class Sparse:
    """Values of some rows, in one dict per chunk of rows: a dict of ``int -> str`` is not tracked by
    the garbage collector at all, and a chunk's dict never grows past CHUNK entries, so adding a
    row never rehashes a million entries at once (a resize of one big dict at 700,000 rows would)."""

    __slots__ = ("chunks",)

    def __init__(self, n: int):
        self.chunks: list[dict[int, Any] | None] = [None] * ((n + MASK) >> SHIFT)

    def get(self, row: int) -> Any:
        chunk = self.chunks[row >> SHIFT]
        return None if chunk is None else chunk.get(row)

    def set(self, row: int, value: Any) -> None:
        """Store ``value`` for ``row`` (None removes it)."""
        chunk = self.chunks[row >> SHIFT]
        if value is None:
            if chunk is not None:
                chunk.pop(row, None)
        elif chunk is None:
            self.chunks[row >> SHIFT] = {row: value}
        else:
            chunk[row] = value

    def fill(self, rows: list[int], value: Any) -> None:
        """The same ``value`` for every row of ``rows`` (sorted), a chunk at a time."""
        from bisect import bisect_left

        start = 0
        while start < len(rows):
            number = rows[start] >> SHIFT
            stop = bisect_left(rows, (number + 1) << SHIFT, start)
            chunk = self.chunks[number]
            if chunk is None:
                chunk = self.chunks[number] = {}
            chunk.update(dict.fromkeys(rows[start:stop], value))
            start = stop

    def __len__(self) -> int:
        return sum(len(chunk) for chunk in self.chunks if chunk)


class Outcomes:
    """The outcomes of ``n`` requests, in input order (see the module docstring)."""

    __slots__ = ("status", "attempts", "prompt_tokens", "completion_tokens", "latency", "cached",
                 "content", "parsed", "extra", "error", "cached_tokens", "status_error", "finish", "finish_values", "finish_codes",
                 "finish_other", "tokens_other")

    def __init__(self, n: int):
        self.status = bytearray(n)  # codes of _NAMES; 0 = pending
        self.attempts = Chunked("i", n)
        self.prompt_tokens = Chunked("q", n)
        self.completion_tokens = Chunked("q", n)
        self.latency = Chunked("d", n, _NAN)
        self.cached = bytearray(n)
        self.content = Sparse(n)  # only rows with an answer (kept, too, when a schema rejects it)
        self.parsed = Sparse(n)
        self.extra = Sparse(n)  # what an operator reads from the raw answer besides the text (a confidence)
        self.error = Sparse(n)
        self.cached_tokens = Sparse(n)  # prompt tokens the provider served from its prompt cache (rows with any)
        self.status_error: dict[int, str] = {}  # status code -> the error of its rows that have none of their own
        self.finish = bytearray(n)  # index into finish_values; 0 = None
        self.finish_values: list[Any] = [None]
        self.finish_codes: dict[Any, int] = {}
        self.finish_other = Sparse(n)  # e.g. one list per row when n > 1
        self.tokens_other: dict[tuple[str, int], Any] = {}  # token counts that are not ints (never seen)

    def __len__(self) -> int:
        return len(self.status)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return [Outcome(self, k) for k in range(*key.indices(len(self.status)))]
        n = len(self.status)
        if key < 0:
            key += n
        if not 0 <= key < n:
            raise IndexError("outcome index out of range")
        return Outcome(self, key)

    def __iter__(self) -> Iterator["Outcome"]:
        for k in range(len(self.status)):
            yield Outcome(self, k)

    @staticmethod
    def code(status: str) -> int:
        """The byte that stands for ``status`` in the ``status`` column."""
        return _CODES[status]

    def count_status(self, status: str) -> int:
        """How many rows have ``status``."""
        return self.status.count(_CODES[status])

    def rows_with(self, *statuses: str) -> list[int]:
        """The rows whose status is one of ``statuses``, in order."""
        import numpy as np

        codes = np.frombuffer(self.status, dtype=np.uint8)
        if not len(codes):
            return []
        mask = np.isin(codes, [_CODES[s] for s in statuses])
        return np.flatnonzero(mask).tolist()

    def settle_pending(self, status: str, error: str) -> int:
        """Give every pending row ``status`` and ``error`` at once; returns how many there were.

        The error is kept once for the status (``status_error``) while every row given that status
        had the same one, instead of once per row: cancelling a million rows stays cheap."""
        import numpy as np

        codes = np.frombuffer(self.status, dtype=np.uint8)
        code = _CODES[status]
        pending = codes == _CODES[PENDING]
        count = int(np.count_nonzero(pending))
        if not count:
            return 0
        shared = self.status_error.get(code)
        if shared is None and not self.status.count(code):
            self.status_error[code] = shared = error
        if shared == error:
            codes[pending] = code
        else:  # rows of that status already carry another reason: these get their own
            rows = np.flatnonzero(pending).tolist()
            codes[pending] = code
            self.error.fill(rows, error)
        return count

    def __repr__(self) -> str:
        counts = ", ".join(f"{name} {self.status.count(code)}" for code, name in enumerate(_NAMES)
                           if self.status.count(code))
        return f"<Outcomes of {len(self)} rows: {counts or 'none'}>"


def _number(column: str, fallback: bool = False) -> property:
    """A property reading and writing ``column`` (a ``Chunked``) at the view's row (inlined: hot path)."""
    def get(self: "Outcome") -> Any:
        store, row = self._s, self._r
        if fallback and store.tokens_other:
            other = store.tokens_other.get((column, row))
            if other is not None:
                return other
        values = getattr(store, column)
        chunk = values.chunks[row >> SHIFT]
        return values.default if chunk is None else chunk[row & MASK]

    def set(self: "Outcome", value: Any) -> None:
        store, row = self._s, self._r
        values = getattr(store, column)
        chunk = values.chunks[row >> SHIFT]
        if chunk is None:
            chunk = values.chunks[row >> SHIFT] = values._blank[:]
        if not fallback:
            chunk[row & MASK] = value
            return
        if store.tokens_other:
            store.tokens_other.pop((column, row), None)
        try:
            chunk[row & MASK] = value
        except (TypeError, OverflowError):  # not an int: keep it as it came
            chunk[row & MASK] = 0
            store.tokens_other[(column, row)] = value

    return property(get, set)


def _sparse(column: str) -> property:
    def get(self: "Outcome") -> Any:
        store, row = self._s, self._r
        chunk = getattr(store, column).chunks[row >> SHIFT]
        value = None if chunk is None else chunk.get(row)
        if value is None and column == "error" and store.status_error:
            value = store.status_error.get(store.status[row])
        return value

    def set(self: "Outcome", value: Any) -> None:
        getattr(self._s, column).set(self._r, value)

    return property(get, set)


class Outcome:
    """What happened to one row: its answer or its error, and what it cost (a view into ``Outcomes``)."""

    __slots__ = ("_s", "_r")

    def __init__(self, store: Outcomes | None = None, row: int = 0):
        self._s = store if store is not None else Outcomes(1)
        self._r = row

    @property
    def status(self) -> str:
        return _NAMES[self._s.status[self._r]]

    @status.setter
    def status(self, value: str) -> None:
        try:
            self._s.status[self._r] = _CODES[value]
        except KeyError:
            raise ValueError(f"unknown outcome status {value!r}") from None

    attempts = _number("attempts")
    _latency = _number("latency")

    @property
    def latency(self) -> float | None:
        value = self._latency
        return None if value != value else value

    @latency.setter
    def latency(self, value: float | None) -> None:
        self._latency = _NAN if value is None else value

    @property
    def cached(self) -> bool:
        return bool(self._s.cached[self._r])

    @cached.setter
    def cached(self, value: bool) -> None:
        self._s.cached[self._r] = 1 if value else 0

    @property
    def finish_reason(self) -> Any:
        store, row = self._s, self._r
        code = store.finish[row]
        return store.finish_other.get(row) if code == _OTHER else store.finish_values[code]

    @finish_reason.setter
    def finish_reason(self, value: Any) -> None:
        store, row = self._s, self._r
        if store.finish[row] == _OTHER:
            store.finish_other.set(row, None)
        if value is None:
            store.finish[row] = 0
            return
        try:
            code = store.finish_codes.get(value)
        except TypeError:  # unhashable: a list of reasons when n > 1
            code = None
        else:
            if code is None and len(store.finish_values) < _OTHER and isinstance(value, str):
                code = store.finish_codes[value] = len(store.finish_values)
                store.finish_values.append(value)
        if code is None:
            store.finish[row] = _OTHER
            store.finish_other.set(row, value)
        else:
            store.finish[row] = code

    content = _sparse("content")  # the answer text (a list of texts when n > 1); kept when a schema rejects it
    parsed = _sparse("parsed")  # the validated value(s), when a schema was given
    extra = _sparse("extra")  # e.g. the confidence classify reads from logprobs
    error = _sparse("error")
    prompt_tokens = _number("prompt_tokens", fallback=True)
    completion_tokens = _number("completion_tokens", fallback=True)

    @property
    def cached_tokens(self) -> int:
        """Of ``prompt_tokens``, those the provider served from its prompt cache (at the cached-input price)."""
        return self._s.cached_tokens.get(self._r) or 0

    @cached_tokens.setter
    def cached_tokens(self, value: int) -> None:
        self._s.cached_tokens.set(self._r, value or None)

    def copy_from(self, other: "Outcome") -> None:
        """Take every field of ``other`` (e.g. a stage's outcome, into the staged run's own)."""
        self.status, self.attempts, self.latency, self.cached = other.status, other.attempts, other.latency, other.cached
        self.prompt_tokens, self.completion_tokens = other.prompt_tokens, other.completion_tokens
        self.cached_tokens = other.cached_tokens
        self.content, self.parsed, self.extra, self.error = other.content, other.parsed, other.extra, other.error
        self.finish_reason = other.finish_reason

    def __repr__(self) -> str:
        detail = repr(self.content)[:60] if self.status == OK else self.error
        return f"<Outcome {self.status} attempts={self.attempts} {detail}>"
