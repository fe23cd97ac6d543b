"""The OpenAI Batch API behind the same call: ``df.llm.map(..., mode="batch")``, at half price.

``BatchEngine`` is an ``Engine`` whose ``run`` sends the rows as JSONL batch files instead of
one request each: every row gets a stable ``custom_id`` (its position and request key),
files are split beyond 50,000 lines or 200 MB, uploaded with ``purpose="batch"`` and
submitted with ``completion_window="24h"``. It then polls in the background on the kernel's
loop (the panel shows each batch's status and counts), downloads the output and error files
and maps every line back to its row by ``custom_id``: answers land (and are cached) as in a
normal run, failed lines become row errors, rows missing from both are failed.

The batch ids are written to the cache database as soon as they exist, keyed by the job
(endpoint + every request), so re-running the cell after a kernel restart reattaches to the
batch instead of paying twice. Cancel cancels the remote batches. Re-asks for answers that do
not match a schema need another round trip, so in batch mode such rows simply fail, their
text kept.

A batch is planned (every row rendered, keyed, looked up in the cache and costed) before
``map`` returns, in a notebook too: its ``max_cost`` check needs the whole estimate, and the
JSONL files hold every line at once anyway. Batch mode is not built for a million rows in
one kernel the way a live run is. Each line is built once, its images read, scaled and encoded
in a thread (the loop, and Cancel, stay free), and a file is uploaded as soon as the next line
would not fit in it, so no more than one file's lines (200 MB) are held at a time. Each batch's
metadata names the rows its file holds, which is how a rerun knows the job was submitted whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from typing import Any

import aiohttp

from .engine import FAILED, OK, Engine
from .engine.words import cause, status_cause
from .errors import FatalError, describe_error, error_fields, fatal_error
from .images.parts import MediaError, encode_messages
from .transport import TRANSIENT_ERRORS

__all__ = ["BatchEngine"]

TERMINAL = ("completed", "failed", "expired", "cancelled")
GET_ATTEMPTS = 10  # status and file downloads: retried with backoff up to a minute apart


class BatchEngine(Engine):
    """Sends a run through ``/v1/files`` and ``/v1/batches``; outcomes as ``Engine`` gives them."""

    batch = True
    max_lines = 50_000  # OpenAI's limits per batch input file
    max_bytes = 200 * 1024 * 1024
    poll_interval = 30.0  # the longest wait between status checks; the first come after 1 s, growing 1.5x

    def __init__(self, *args: Any, poll_interval: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.settings.max_reasks = 0
        if poll_interval is not None:
            self.poll_interval = poll_interval
        self._session: aiohttp.ClientSession | None = None
        self._ids: dict[str, int] = {}  # custom_id -> row
        self._job = ""
        self.batch_ids: list[str] = []
        self.batches: dict[str, dict] = {}  # id -> last batch object seen
        self._rows: dict[str, list[int]] = {}  # batch id -> the rows its file holds

    async def run(self) -> list:
        loop = self._loop = asyncio.get_running_loop()
        progress = self.progress
        progress.started = loop.time()
        self.plan()
        rows = list(self._pending)
        headers = {k: v for k, v in self.endpoint.headers().items() if k != "Content-Type"}
        timeout = aiohttp.ClientTimeout(total=max(self.settings.timeout, 300.0), connect=10.0)
        try:
            if rows:
                async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
                    self._session = session
                    try:
                        await self._submit_or_reattach(rows)
                        await self._follow()
                    except asyncio.CancelledError:
                        await asyncio.shield(self._cancel_remote())
                        raise
                    except FatalError as exc:
                        self._stop_run(exc)
        finally:
            self._mark_unsent()
            progress.finished = loop.time()
            progress.emit("finished", -1)
        return self.outcomes

    # ---- submitting ---------------------------------------------------------------------

    def _custom_id(self, row: int) -> str:
        """Row ``row``'s ``custom_id``, stable across reruns: its row and request key."""
        return f"{row}-{self._keys[row][:16]}"

    async def _build(self, row: int) -> bytes:
        """Row ``row``'s JSONL line (``MediaError`` for an image that cannot be read or sent). Images are read,
        scaled and base64-encoded in a thread, as a live run does, so the loop (and Cancel) stays free."""
        head = b"".join((b'{"custom_id": ', json.dumps(self._custom_id(row)).encode(),
                         b', "method": "POST", "url": "/v1/chat/completions", "body": ', self._prefix))
        messages = self._messages(row, wire=False)
        if self._media:
            return await self._loop.run_in_executor(None, encode_messages, messages, head, b"}}")
        return b"".join((head, json.dumps(messages).encode(), b"}}"))

    async def _submit_or_reattach(self, rows: list[int]) -> None:
        self._ids = {self._custom_id(row): row for row in rows}
        self._job = hashlib.sha256("\n".join([self.endpoint.base_url, *self._ids]).encode()).hexdigest()
        if self.cache is not None and await self._reattach(rows):
            return
        await self._submit(rows)

    async def _reattach(self, rows: list[int]) -> bool:
        """Follow the batches this job submitted earlier, if all are still going and together hold every row."""
        known = self.cache.job_batches(self._job)  # type: ignore[union-attr]
        spans: list[tuple[int, int, str, dict]] = []
        for batch_id in known:
            batch = await self._get(f"/batches/{batch_id}")
            span = _span((batch.get("metadata") or {}).get("nbparrot_rows"))
            if batch.get("status") in ("failed", "expired", "cancelled", "cancelling") or span is None:
                return False
            spans.append((*span, batch_id, batch))
        spans.sort()
        ends = [0] + [end for _, end, _, _ in spans]
        if not spans or [start for start, _, _, _ in spans] != ends[:-1] or ends[-1] != len(rows):
            return False  # a submission cut short (or another shape): submitted afresh
        for start, end, batch_id, batch in spans:
            self.batch_ids.append(batch_id)
            self.batches[batch_id] = batch
            self._rows[batch_id] = rows[start:end]
        progress = self.progress
        progress.in_flight += progress.queued
        progress.queued = 0
        progress.note = f"reattached to {len(spans)} batch(es) submitted earlier: {', '.join(self.batch_ids)}"
        return True

    async def _submit(self, rows: list[int]) -> None:
        """Build each row's line once and upload a file whenever the next line would pass a file's limits, so
        no more than one file's lines (200 MB) are held. A row whose image cannot be sent fails; the others go."""
        lines: list[tuple[int, bytes]] = []
        size, start = 0, 0
        progress = self.progress
        for position, row in enumerate(rows):
            progress.note = f"building batch file {len(self.batch_ids) + 1} ({len(lines):,} requests so far)"
            try:
                line = await self._build(row)
            except MediaError as exc:
                self._fail(row, str(exc))
                continue
            if lines and (len(lines) >= self.max_lines or size + len(line) + 1 > self.max_bytes):
                await self._upload(lines, start, position)
                lines, size, start = [], 0, position
            lines.append((row, line))
            size += len(line) + 1
            if not self._media and position % 512 == 511:
                await asyncio.sleep(0)  # text lines are built here: let the loop breathe now and then
        if lines:
            await self._upload(lines, start, len(rows))

    async def _upload(self, lines: list[tuple[int, bytes]], start: int, end: int) -> None:
        """Upload one file and submit its batch; it holds ``rows[start:end]`` (less those that failed)."""
        progress = self.progress
        k = len(self.batch_ids) + 1
        progress.note = f"uploading batch file {k} ({len(lines):,} requests)"
        content = await self._loop.run_in_executor(None, _joined, [line for _, line in lines])  # up to 200 MB
        data = aiohttp.FormData()
        data.add_field("purpose", "batch")
        data.add_field("file", content,
                       filename=f"nbparrot-{self._job[:12]}-{k}.jsonl", content_type="application/jsonl")
        file = await self._send("POST", "/files", data=data)
        batch = await self._send("POST", "/batches", json={
            "input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"nbparrot_job": self._job[:32], "nbparrot_rows": f"{start}-{end}"}})
        self.batch_ids.append(batch["id"])
        self.batches[batch["id"]] = batch
        self._rows[batch["id"]] = [row for row, _ in lines]
        progress.queued -= len(lines)
        progress.in_flight += len(lines)
        if self.cache is not None:  # at once: a restart from here on reattaches instead of paying twice
            self.cache.record_job(self._job, self.batch_ids)

    # ---- following ----------------------------------------------------------------------

    async def _follow(self) -> None:
        pending = list(self.batch_ids)
        wait = min(1.0, self.poll_interval)  # early checks catch a failed validation quickly
        while pending:
            for batch_id in list(pending):
                batch = self.batches[batch_id] = await self._get(f"/batches/{batch_id}")
                if batch.get("status") in TERMINAL:
                    await self._harvest(batch)
                    pending.remove(batch_id)
            self._show()
            if pending:
                await asyncio.sleep(wait)
                wait = min(self.poll_interval, wait * 1.5)
        if self.cache is not None:
            self.cache.record_job(self._job, [])

    def _show(self) -> None:
        parts, left = [], 0
        for batch_id, batch in self.batches.items():
            counts = batch.get("request_counts") or {}
            total, completed, failed = counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)
            parts.append(f"{batch_id} {batch.get('status')} {completed + failed}/{total}")
            if batch.get("status") not in TERMINAL:
                left += max(0, total - completed - failed) if total else 0
        self.progress.note = "batch: " + "; ".join(parts)
        self.progress.in_flight = left

    async def _harvest(self, batch: dict) -> None:
        """Map the output and error files' lines back to their rows; rows in neither are failed."""
        expected = set(self._rows[batch["id"]])
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            text = await self._get(f"/files/{file_id}/content", raw=True)
            for line in text.splitlines():
                if line.strip():
                    self._line(json.loads(line), expected)
        errors = (batch.get("errors") or {}).get("data") or []
        reason = "; ".join(e.get("message", "") for e in errors)[:300]
        for row in sorted(expected):
            if self.outcomes[row].status not in (OK, FAILED):
                self.outcomes[row].attempts = 1
                self._fail(row, f"no result for this row: batch {batch['id']} ended {batch.get('status')}"
                                + (f" ({reason})" if reason else ""))

    def _retry(self, row: int, reason: str, why: str = "") -> None:
        """A batch line cannot be sent again in place (an empty answer, say): it fails its row (``why`` is moot)."""
        self._fail(row, reason)

    def _line(self, line: dict, expected: set[int]) -> None:
        row = self._ids.get(line.get("custom_id", ""))
        if row is None or row not in expected or self.outcomes[row].status in (OK, FAILED):
            return
        outcome = self.outcomes[row]
        outcome.attempts = 1
        self.progress.requests += 1
        response = line.get("response") or {}
        status = response.get("status_code")
        if status == 200 and not line.get("error"):
            try:
                self._answer(row, response["body"], None)
                return
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                return self._fail(row, "unreadable answer in the batch output")
        if line.get("error"):
            return self._fail(row, f"{line['error'].get('code') or ''} {line['error'].get('message') or ''}".strip())
        message, code, _ = error_fields(json.dumps(response.get("body") or {}).encode(), self.endpoint.api_key)
        return self._fail(row, describe_error(status, message, code))

    async def _cancel_remote(self) -> None:
        """Cancel our unfinished remote batches (bounded), and forget the job so a rerun starts afresh."""
        for batch_id in self.batch_ids:
            if (self.batches.get(batch_id) or {}).get("status") not in TERMINAL:
                try:
                    await asyncio.wait_for(self._send("POST", f"/batches/{batch_id}/cancel"), 10)
                except (*TRANSIENT_ERRORS, FatalError, _Transient):
                    pass
        if self.cache is not None and self._job:
            self.cache.record_job(self._job, [])

    # ---- HTTP ---------------------------------------------------------------------------

    async def _get(self, path: str, raw: bool = False) -> Any:
        """GET with patience: a batch runs for hours, so a network blip or a 5xx is waited out."""
        for attempt in range(GET_ATTEMPTS):
            try:
                return await self._send("GET", path, raw=raw)
            except (*TRANSIENT_ERRORS, _Transient) as exc:
                if attempt == GET_ATTEMPTS - 1:
                    raise FatalError(f"{self.endpoint.display_url}{path} keeps failing: {exc}") from None
                self.progress.count_retry(exc.cause if isinstance(exc, _Transient) else cause(exc),
                                          self.endpoint.redact(f"{path}: {exc}"))
                await asyncio.sleep(random.uniform(0.5, 1.0) * min(60.0, 2.0 ** attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        url = self.endpoint.url(path)  # with the query every request carries (a client's default_query)
        async with self._session.request(method, url, allow_redirects=False, **kwargs) as response:  # type: ignore[union-attr]
            body = await response.read()
            if response.status != 200:
                message, code, kind = error_fields(body, self.endpoint.api_key)
                where = f"{response.status} from {self.endpoint.display_url}{path}"
                fatal = fatal_error(response.status, message, code, kind, where)
                if fatal is not None:
                    raise fatal
                if response.status >= 500 or response.status == 429:
                    raise _Transient(f"{where}: {message}", status_cause(response.status))
                raise FatalError(f"{where}: {message}", status=response.status)
            return body.decode() if raw else json.loads(body)


class _Transient(Exception):
    """A 5xx or 429 from the Files / Batches API: worth another try for a GET."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


def _joined(lines: list[bytes]) -> bytes:
    """A JSONL file's content (joined in a thread: a 200 MB copy)."""
    return b"\n".join(lines) + b"\n"


def _span(text: Any) -> tuple[int, int] | None:
    """The ``start-end`` row positions a batch's metadata says its file holds, or None."""
    start, _, end = str(text or "").partition("-")
    return (int(start), int(end)) if start.isdigit() and end.isdigit() else None
