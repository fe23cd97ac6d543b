"""A persistent answer cache, so a rerun sends only the rows that have no answer yet.

Every request is named by ``request_key``: a hash of the endpoint's base URL and the full
request body (model, messages, every generation parameter). Before a run the engine looks
all its keys up at once with ``Cache.get_many`` and settles the rows it finds without a
request; each answer that lands is handed to ``Cache.put``. A cell rerun after a cancel, a
crash, a kernel restart or even ``kill -9`` therefore resends only the rows still missing,
and editing the template for some rows resends only those.

Storage is one SQLite file (``<dir>/answers.sqlite3``, standard library only) in WAL mode
with ``synchronous=NORMAL`` and a busy timeout, so several kernels can read and write it at
once; a lock held by another writer is waited out and retried, never raised. Nothing but
SQLite opens the file once it exists: closing any descriptor of it would drop this process's
locks, and another process closing its last connection could then delete the WAL under ours.

``put`` costs the caller (the notebook's event-loop thread) only a queue append, which wakes
the background writer thread if it is waiting. The writer commits whatever is queued at once,
in groups of up to 500 rows, with no timed wait: an answer that finds it idle is committed on
its own (a fraction of a millisecond later on an idle machine), and answers that land while a
commit runs queue up and go together in the next one, so the groups grow with the load by
themselves. A committed answer is safe from a killed process, ``kill -9`` included (though not
from a power cut), so a rerun after a kill resends the requests that were in flight and at most
the few answers the writer had not yet committed.

Only the key hash and the answer are stored: no API key, no header, no prompt text.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import sqlite3
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Callable, Mapping, NamedTuple, Sequence, TypeVar

from .errors import ConfigError

__all__ = ["Cache", "CachedAnswer", "default_cache_dir", "request_key", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
FILENAME = "answers.sqlite3"

_BUSY_TIMEOUT = 10.0  # seconds SQLite itself waits for another connection's lock
_BATCH_ROWS = 500  # most rows per write transaction, so another kernel never waits long
_IDLE_SECONDS = 5.0  # the writer thread exits after this long without work (restarted on demand)
_CHECKPOINT_PAGES = 10_000  # the writer's WAL checkpoint interval (SQLite's default is 1,000)
_CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's variable limit (999 before 3.32)

_KEY_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                default=lambda part: part.key())  # an image part: its content's digest
_VALUE_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"))  # for text SQLite cannot take as UTF-8
_DECODER = json.JSONDecoder()

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT, content TEXT,"
    " finish_reason TEXT, prompt_tokens INT, completion_tokens INT, created REAL, extra TEXT)",
    # Covers info()'s per-model counts and time range, and clear(model), without reading answers.
    "CREATE INDEX IF NOT EXISTS answers_by_model ON answers (model, created)",
    # Batch API jobs in progress: a rerun after a kernel restart reattaches instead of paying twice.
    "CREATE TABLE IF NOT EXISTS batch_jobs (job TEXT PRIMARY KEY, batch_ids TEXT NOT NULL, created REAL)",
)
_INSERT = ("INSERT OR REPLACE INTO answers (key, model, content, finish_reason, prompt_tokens,"
           " completion_tokens, created, extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_SELECT_ALL = "SELECT key, model, content, finish_reason, prompt_tokens, completion_tokens, extra FROM answers"
_SELECT = _SELECT_ALL + " WHERE key IN ({})"
_COUNT = "SELECT COUNT(*) FROM answers"
_STOP = object()  # queued by close(): the writer exits once everything before it is written

T = TypeVar("T")


def default_cache_dir() -> Path:
    """``NBPARROT_CACHE_DIR`` if set, else the platform's per-user cache directory.

    That is ``$XDG_CACHE_HOME/nbparrot`` or ``~/.cache/nbparrot`` on Linux,
    ``~/Library/Caches/nbparrot`` on macOS and ``%LOCALAPPDATA%\\nbparrot\\Cache`` on Windows.
    """
    override = os.environ.get("NBPARROT_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA")
        return (Path(local) if local else Path.home() / "AppData" / "Local") / "nbparrot" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "nbparrot"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"  # relative: ignored, per XDG
    return base / "nbparrot"


def request_key(base_url: str, body: Mapping[str, Any]) -> str:
    """The cache key of one request: sha256 (hex) of the canonical JSON of URL and body.

    Canonical JSON is sorted keys, no spaces, UTF-8 (``ensure_ascii=False``), so the order
    of dict keys never matters while any change to the body does: model, messages, every
    generation parameter, ``n``, ``response_format``. The base URL is included (without a
    trailing ``/``) because two endpoints serving "the same" model may answer differently.
    Headers are not part of the key: the API key, which lives only in the headers, never
    reaches the cache, and two keys for the same endpoint share answers.

    It runs once per row on the kernel's thread: about 6 µs for a typical 600-character body
    (Python 3.11 on a 2-core cloud VM), so 0.6 s for 100,000 rows.
    """
    text = _KEY_ENCODER.encode({"base_url": base_url.rstrip("/"), "body": body})
    try:
        data = text.encode()
    except UnicodeEncodeError:  # a lone surrogate in the prompt: still a valid, distinct key
        data = text.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


class CachedAnswer(NamedTuple):
    """One stored answer, as the engine settles a row from it."""

    content: Any  # str, a list of str when n > 1, or whatever JSON value was stored
    finish_reason: Any
    prompt_tokens: int
    completion_tokens: int
    model: str
    extra: Any = None  # what an operator read from the raw answer besides its text (a confidence), if anything


class Cache:
    """The answer cache in ``directory`` (default: ``default_cache_dir()``).

    Nothing is created until first use; then the directory (mode 0o700) and the file
    ``answers.sqlite3`` (mode 0o600) are made. ``get_many``, ``info`` and ``clear`` raise
    ``ConfigError`` if the cache cannot be written, so the engine's lookup before a run is
    also the check that the cache works. Every method may be called from any thread; a
    closed cache reopens on its next use. Open caches are flushed and closed at exit.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.path = (Path(directory).expanduser() if directory is not None else default_cache_dir()) / FILENAME
        self.write_error: str | None = None  # the last failed write, if any (see _write)
        self._queue: SimpleQueue = SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_lock = threading.Lock()  # guards starting and retiring the writer
        self._conn: sqlite3.Connection | None = None  # the readers' connection
        self._read_lock = threading.Lock()
        self._warned = False

    def __repr__(self) -> str:
        return f"Cache({str(self.path.parent)!r})"

    # ---- public -------------------------------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, CachedAnswer]:
        """The stored answers of those ``keys`` that have one (after flushing this cache's writes)."""
        wanted = set(keys)
        self.flush()
        with self._read_lock:
            conn = self._reader()
            # When most of the file is wanted (a rerun), one pass over it is 2-3x faster than a
            # lookup per key; a small lookup does not even count the entries.
            if len(wanted) >= _CHUNK and 2 * len(wanted) >= _retrying(lambda: conn.execute(_COUNT).fetchone()[0]):
                rows = [row for row in _retrying(lambda: conn.execute(_SELECT_ALL).fetchall()) if row[0] in wanted]
            else:
                rows = []
                ordered = sorted(wanted)  # in key order, neighbouring lookups share index pages
                full = _SELECT.format(",".join("?" * _CHUNK))
                for start in range(0, len(ordered), _CHUNK):
                    chunk = ordered[start:start + _CHUNK]
                    sql = full if len(chunk) == _CHUNK else _SELECT.format(",".join("?" * len(chunk)))
                    rows += _retrying(lambda: conn.execute(sql, chunk).fetchall())
        decode = _DECODER.raw_decode  # 4x faster than json.loads; the text is our own compact JSON
        return {key: CachedAnswer(decode(content)[0], decode(finish)[0], prompt_tokens, completion_tokens, model,
                                  None if extra is None else decode(extra)[0])
                for key, model, content, finish, prompt_tokens, completion_tokens, extra in rows}

    def put(self, key: str, answer: CachedAnswer) -> None:
        """Store ``answer`` under ``key`` soon: a queue append here, the write on the writer thread.

        Never raises: a write that fails is reported by a warning and in ``write_error``, and
        the row is simply requested again next time.
        """
        self._queue.put((key, answer))
        if self._writer is None:
            self._start_writer()

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything put so far is committed (or its failure reported, see ``put``).

        Raises ``TimeoutError`` after ``timeout`` seconds, e.g. while another kernel holds the lock.
        """
        if self._writer is None and self._queue.empty():
            return
        done = threading.Event()
        self._queue.put(done)
        if self._writer is None:
            self._start_writer()
        if not done.wait(timeout):
            raise TimeoutError(f"the answer cache at {self.path} did not finish writing within {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        """Flush, stop the writer thread and close the file. Idempotent."""
        self.flush(timeout)
        with self._writer_lock:
            writer = self._writer
            if writer is not None:
                self._queue.put(_STOP)
        if writer is not None:
            writer.join(timeout)
        with self._read_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def info(self) -> dict:
        """What is stored: path, entries, size_bytes, models ({model: entries}), oldest and
        newest (``time.time()`` seconds, None when empty), and write_error."""
        self.flush()
        with self._read_lock:
            conn = self._reader()
            rows = _retrying(lambda: conn.execute(
                "SELECT model, COUNT(*), MIN(created), MAX(created) FROM answers GROUP BY model").fetchall())
        files = (self.path, self.path.with_name(FILENAME + "-wal"), self.path.with_name(FILENAME + "-shm"))
        return {
            "path": self.path,
            "entries": sum(row[1] for row in rows),
            "size_bytes": sum(p.stat().st_size for p in files if p.exists()),
            "models": {row[0]: row[1] for row in rows},
            "oldest": min((row[2] for row in rows), default=None),
            "newest": max((row[3] for row in rows), default=None),
            "write_error": self.write_error,
        }

    def clear(self, model: str | None = None) -> int:
        """Delete every entry, or those of one ``model``; returns how many. Then shrink the file."""
        self.flush()
        with self._read_lock:
            conn = self._reader()
            if model is None:
                removed = _retrying(lambda: conn.execute("DELETE FROM answers").rowcount)
            else:
                removed = _retrying(lambda: conn.execute("DELETE FROM answers WHERE model = ?", (model,)).rowcount)
            _retrying(lambda: conn.execute("VACUUM"))
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # best effort: other readers may hold it
        return removed

    def job_batches(self, job: str) -> list[str]:
        """The Batch API batch ids recorded for a job (empty if none)."""
        with self._read_lock:
            conn = self._reader()
            row = _retrying(lambda: conn.execute("SELECT batch_ids FROM batch_jobs WHERE job = ?", (job,)).fetchone())
        return json.loads(row[0]) if row else []

    def record_job(self, job: str, batch_ids: Sequence[str]) -> None:
        """Remember a job's batch ids at once (committed before returning), or forget it with []."""
        with self._read_lock:
            conn = self._reader()
            if batch_ids:
                _retrying(lambda: conn.execute("INSERT OR REPLACE INTO batch_jobs (job, batch_ids, created) "
                                               "VALUES (?, ?, ?)", (job, json.dumps(list(batch_ids)), time.time())))
            else:
                _retrying(lambda: conn.execute("DELETE FROM batch_jobs WHERE job = ?", (job,)))

    # ---- opening ------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        """The readers' connection (hold ``_read_lock``); the first one creates and checks the file."""
        if self._conn is None:
            self._conn = self._open()
            _open_caches.add(self)
        return self._conn

    def _open(self) -> sqlite3.Connection:
        conn = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _create_private(self.path)
            if not os.access(self.path, os.R_OK | os.W_OK):  # SQLite would quietly open it read-only
                raise PermissionError(errno.EACCES, "not readable and writable", str(self.path))
            conn = self._connect()
            version = _retrying(lambda: _create_schema(conn))
        except (OSError, sqlite3.Error) as exc:
            if conn is not None:
                conn.close()
            raise ConfigError(
                f"cannot use the answer cache at {self.path} ({exc}); set NBPARROT_CACHE_DIR to a "
                f"writable directory, or turn the cache off with nbparrot.configure(cache='off')") from exc
        if version != str(SCHEMA_VERSION):
            conn.close()
            raise ConfigError(
                f"the answer cache at {self.path} has schema version {version}, this nbparrot reads "
                f"version {SCHEMA_VERSION}; set NBPARROT_CACHE_DIR to another directory or delete the file")
        return conn

    def _connect(self) -> sqlite3.Connection:
        # Autocommit (isolation_level=None): transactions are explicit, reads always see the latest commit.
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    # ---- the writer thread --------------------------------------------------------------

    def _start_writer(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="nbparrot-cache-writer", daemon=True)
                self._writer.start()
                _open_caches.add(self)

    def _write_loop(self) -> None:
        """Take whatever is queued (up to 500 rows), commit it, wake the flushes waiting on it.

        No timed wait: an answer that finds this thread idle is committed at once, and answers
        that land while a commit runs queue up and go together in the next one, so the groups
        grow with the load by themselves.
        """
        queue = self._queue
        conn: sqlite3.Connection | None = None
        try:
            while True:
                try:
                    item = queue.get(timeout=_IDLE_SECONDS)
                except Empty:
                    if self._retire():
                        return
                    continue
                rows, flushed, stop = [], [], False
                while True:
                    if item is _STOP:
                        stop = True
                    elif isinstance(item, threading.Event):
                        flushed.append(item)
                    else:
                        rows.append(item)
                    if len(rows) >= _BATCH_ROWS:
                        break
                    try:
                        item = queue.get_nowait()
                    except Empty:
                        break
                if rows:
                    conn = self._write(conn, rows)
                for event in flushed:
                    event.set()
                if stop and self._retire():
                    return
        finally:
            if conn is not None:
                conn.close()

    def _retire(self) -> bool:
        """Let the writer thread exit if nothing is queued; a later put starts a new one."""
        with self._writer_lock:
            # Cleared before the check: a put that still saw this writer had queued its row already.
            self._writer = None
            if self._queue.empty():
                return True
            self._writer = threading.current_thread()
            return False

    def _write(self, conn: sqlite3.Connection | None, rows: list[tuple[str, CachedAnswer]]) -> sqlite3.Connection | None:
        """Commit ``rows`` in one transaction, waiting out other writers' locks; returns the connection.

        A row whose answer is not JSON is dropped, and so is the whole group if the file cannot
        be written: either way with a warning, and the rows are requested again next time.
        """
        now = time.time()
        params, dropped = _rows_to_params(rows, _VALUE_ENCODER, now)
        try:
            if conn is None:
                conn = self._open()
                # Checkpoints (which fsync) every ~40 MB of WAL rather than every 4 MB: random keys
                # touch many index pages per commit, and this halves the cost of a burst of answers.
                conn.execute(f"PRAGMA wal_autocheckpoint={_CHECKPOINT_PAGES}")
            try:
                _retrying(lambda: _insert(conn, params))
            except UnicodeEncodeError:  # a lone surrogate in an answer: store that group escaped
                params, _ = _rows_to_params(rows, _ASCII_ENCODER, now)
                _retrying(lambda: _insert(conn, params))
        except (ConfigError, sqlite3.Error, ValueError) as exc:
            self._report(f"{len(rows)} answer(s) not stored in {self.path}: {exc}")
            if conn is not None:
                conn.close()
            return None
        if dropped:
            self._report(f"{len(dropped)} answer(s) not stored, not JSON: {dropped[0]}")
        return conn

    def _report(self, message: str) -> None:
        self.write_error = message
        if not self._warned:
            self._warned = True
            warnings.warn(f"nbparrot cache: {message} (they will be requested again next time)", RuntimeWarning)


def _rows_to_params(rows: list[tuple[str, CachedAnswer]], encoder: json.JSONEncoder,
                    now: float) -> tuple[list[tuple], list[str]]:
    """INSERT parameters for ``rows``, and the reasons of those that could not be encoded."""
    encode = encoder.encode
    params, dropped = [], []
    for key, answer in rows:
        try:
            params.append((key, answer.model, encode(answer.content), encode(answer.finish_reason),
                           int(answer.prompt_tokens or 0), int(answer.completion_tokens or 0), now,
                           None if answer.extra is None else encode(answer.extra)))
        except (TypeError, ValueError) as exc:
            dropped.append(f"{type(exc).__name__}: {exc}")
    return params, dropped


def _insert(conn: sqlite3.Connection, params: list[tuple]) -> None:
    conn.execute("BEGIN IMMEDIATE")  # take the write lock up front, through the busy timeout
    try:
        conn.executemany(_INSERT, params)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _create_schema(conn: sqlite3.Connection) -> str:
    """Make the tables if missing; returns the file's schema version."""
    conn.execute("PRAGMA journal_mode=WAL")  # stored in the file: once set, every connection uses it
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            conn.execute(statement)
        if "extra" not in {row[1] for row in conn.execute("PRAGMA table_info(answers)")}:
            conn.execute("ALTER TABLE answers ADD COLUMN extra TEXT")  # files written before it existed
        conn.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        version = conn.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()[0]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return version


def _create_private(path: Path) -> None:
    """Create the database file with mode 0o600 if it does not exist yet (its -wal and -shm files
    copy that mode when SQLite makes them); an existing file is left alone, not even opened.

    Never open and close a descriptor of an existing database file in a process that may hold
    connections to it: closing any descriptor of a file drops all of the process's POSIX locks on
    it, so another process closing its last connection would take this one for gone, checkpoint
    and delete the WAL under it, and this process's later commits would be lost. A file made here
    with O_EXCL is a new one, which no connection of this process can be holding.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _retrying(action: Callable[[], T]) -> T:
    """Run ``action``, again and again while another connection holds the lock past the busy timeout."""
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):  # SQLITE_BUSY and SQLITE_LOCKED: "database (table) is locked"
                raise
        time.sleep(0.05)  # some busy paths return at once, without the busy handler


_open_caches: weakref.WeakSet[Cache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child has no writer thread (its puts would wait forever) and must open its own
    connections (SQLite's must not cross a fork); what the parent had queued is the parent's."""
    for cache in list(_open_caches):
        cache._conn, cache._writer, cache._queue = None, None, SimpleQueue()
        cache._writer_lock, cache._read_lock = threading.Lock(), threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_open_caches() -> None:
    """Commit what is still queued before the interpreter exits (bounded: never hang the exit)."""
    for cache in list(_open_caches):
        try:
            cache.close(timeout=_BUSY_TIMEOUT)
        except TimeoutError:
            pass
