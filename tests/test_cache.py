"""The answer cache: keys, round trips, persistence, concurrent kernels, kill -9, housekeeping."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import nbparrot.cache as cache_module
from nbparrot.cache import Cache, CachedAnswer, default_cache_dir, request_key
from nbparrot.config import Endpoint
from nbparrot.errors import ConfigError

URL = "https://api.openai.com/v1"
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarize: café ☕"}],
    "max_tokens": 256,
    "temperature": 0.2,
}
REPO = Path(__file__).resolve().parent.parent


def answer(i: int, model: str = "gpt-4o-mini") -> CachedAnswer:
    return CachedAnswer(f"answer {i}", "stop", 10 + i, 5, model)


def rows_in_file(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


@pytest.fixture
def cache(tmp_path):
    cache = Cache(tmp_path / "cache")
    yield cache
    cache.close()


# ---- keys -------------------------------------------------------------------------------

def test_key_is_the_hash_of_url_and_body_only():
    canonical = json.dumps({"base_url": URL, "body": BODY}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert request_key(URL, BODY) == hashlib.sha256(canonical.encode()).hexdigest()


def test_key_ignores_dict_order_and_a_trailing_slash():
    reordered = {name: BODY[name] for name in reversed(list(BODY))}
    reordered["messages"] = [{"content": m["content"], "role": m["role"]} for m in BODY["messages"]]
    assert request_key(URL, reordered) == request_key(URL, BODY)
    assert request_key(URL + "/", copy.deepcopy(BODY)) == request_key(URL, BODY)


def _changed(change):
    body = copy.deepcopy(BODY)
    change(body)
    return body


@pytest.mark.parametrize("body", [
    _changed(lambda b: b.update(model="gpt-4.1-mini")),
    _changed(lambda b: b["messages"][1].update(content="Summarize: cafe ☕")),
    _changed(lambda b: b["messages"][1].update(role="assistant")),
    _changed(lambda b: b["messages"].pop(0)),
    _changed(lambda b: b.update(temperature=0.3)),
    _changed(lambda b: b.update(max_tokens=257)),
    _changed(lambda b: b.update(n=2)),
    _changed(lambda b: b.update(seed=1)),
    _changed(lambda b: b.update(response_format={"type": "json_object"})),
    _changed(lambda b: b["messages"][1].update(content="Summarize: café ☕\ud800")),  # a lone surrogate
], ids=["model", "text", "role", "system", "temperature", "max_tokens", "n", "new param", "format", "surrogate"])
def test_any_change_to_the_body_changes_the_key(body):
    assert request_key(URL, body) != request_key(URL, BODY)


def test_the_endpoint_is_part_of_the_key():
    assert request_key("http://127.0.0.1:8000/v1", BODY) != request_key(URL, BODY)


def test_a_json_schema_change_deep_inside_changes_the_key():
    schema = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object", "properties": {
        "label": {"type": "string", "enum": ["a", "b"]}}}}}
    other = copy.deepcopy(schema)
    other["json_schema"]["schema"]["properties"]["label"]["enum"].append("c")
    assert request_key(URL, {**BODY, "response_format": schema}) != request_key(URL, {**BODY, "response_format": other})


# ---- storing and reading ------------------------------------------------------------------

def test_answers_round_trip(cache):
    stored = {
        "text": CachedAnswer("Un café ☕, s'il vous plaît.", "stop", 12, 7, "gpt-4o-mini"),
        "n=2": CachedAnswer(["first", "second"], ["stop", "length"], 12, 30, "gpt-4o-mini"),
        "none": CachedAnswer(None, "tool_calls", 1, 0, "gpt-4o-mini"),
        "json": CachedAnswer({"label": "a", "score": 0.5}, "stop", 3, 4, "m"),
        "surrogate": CachedAnswer("broken \ud800 text", "stop", 1, 1, "m"),
    }
    for key, value in stored.items():
        cache.put(key, value)
    assert cache.get_many([*stored, "missing"]) == stored


def test_an_answer_that_is_not_json_is_dropped_with_a_warning_and_the_rest_kept(cache):
    with pytest.warns(RuntimeWarning, match="not JSON"):
        cache.put("bad", CachedAnswer(object(), "stop", 1, 1, "m"))
        cache.put("good", answer(1))
        cache.flush()
    assert cache.get_many(["bad", "good"]) == {"good": answer(1)}
    assert "not JSON" in cache.info()["write_error"]


@pytest.mark.parametrize("stored, asked", [(600, 100), (1500, 700), (600, 600)],
                         ids=["few keys", "many keys, large file", "most of the file"])
def test_get_many_finds_exactly_the_stored_keys(cache, stored, asked):
    for i in range(stored):
        cache.put(f"k{i}", answer(i))
    keys = [f"k{i}" for i in range(stored - asked, stored + 50)]  # 50 never stored
    assert cache.get_many(keys) == {f"k{i}": answer(i) for i in range(stored - asked, stored)}


def test_a_later_put_replaces_the_answer(cache):
    cache.put("k", answer(1))
    cache.put("k", answer(2))
    assert cache.get_many(["k"]) == {"k": answer(2)}
    assert cache.info()["entries"] == 1


def test_answers_persist_across_instances(tmp_path):
    first = Cache(tmp_path)
    for i in range(100):
        first.put(f"k{i}", answer(i))
    first.close()
    second = Cache(tmp_path)
    assert second.get_many([f"k{i}" for i in range(100)]) == {f"k{i}": answer(i) for i in range(100)}
    second.close()


def test_flush_makes_writes_visible_to_another_connection(cache):
    for i in range(10):
        cache.put(f"k{i}", answer(i))
    cache.flush()
    assert rows_in_file(cache.path) == 10


def test_puts_from_many_threads(cache):
    def work(t: int) -> None:
        for i in range(250):
            cache.put(f"t{t}-{i}", answer(i))
        cache.flush()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert rows_in_file(cache.path) == 2000


def test_the_idle_writer_thread_exits_and_a_later_put_starts_another(cache, monkeypatch):
    monkeypatch.setattr(cache_module, "_IDLE_SECONDS", 0.05)
    cache.put("a", answer(1))
    cache.flush()
    writer = cache._writer
    if writer is not None:
        writer.join(10)
    assert cache._writer is None
    cache.put("b", answer(2))
    assert cache.get_many(["a", "b"]) == {"a": answer(1), "b": answer(2)}


def test_close_is_idempotent_and_a_closed_cache_reopens(cache):
    cache.put("a", answer(1))
    cache.close()
    cache.close()
    assert rows_in_file(cache.path) == 1
    cache.put("b", answer(2))
    assert cache.get_many(["a", "b"]) == {"a": answer(1), "b": answer(2)}


def test_a_locked_file_is_waited_out_not_raised(cache, monkeypatch):
    monkeypatch.setattr(cache_module, "_BUSY_TIMEOUT", 0.05)  # past SQLite's own wait: our retry loop
    cache.get_many([])
    other = sqlite3.connect(cache.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another kernel holds the write lock
    cache.put("k", answer(1))
    with pytest.raises(TimeoutError):
        cache.flush(timeout=0.3)
    other.execute("COMMIT")
    other.close()
    cache.flush()
    assert cache.get_many(["k"]) == {"k": answer(1)}
    assert cache.info()["write_error"] is None


# ---- what is on disk ------------------------------------------------------------------------

def test_no_api_key_or_prompt_reaches_the_cache_files(tmp_path):
    secret = "sk-SENTINEL" + "7" * 40
    endpoint = Endpoint("http://127.0.0.1:9/v1", api_key=secret)
    assert secret in endpoint.headers()["Authorization"]  # it is in every request sent...
    cache = Cache(tmp_path)
    for i in range(200):  # ...as a run would key and store its answers
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"prompt number {i}"}], "max_tokens": 16}
        cache.put(request_key(endpoint.base_url, body), answer(i))
    cache.flush()

    def leaked() -> list[str]:
        files = [p for p in tmp_path.rglob("*") if p.is_file()]
        assert files
        return [p.name for p in files if b"SENTINEL" in p.read_bytes() or b"prompt number" in p.read_bytes()]

    assert leaked() == []  # with the -wal file still there
    cache.close()
    assert leaked() == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_directory_and_files_are_private(tmp_path):
    cache = Cache(tmp_path / "new" / "cache")
    cache.put("k", answer(1))
    cache.flush()
    assert (cache.path.parent.stat().st_mode & 0o777) == 0o700
    files = list(cache.path.parent.iterdir())
    assert {p.name for p in files} >= {"answers.sqlite3", "answers.sqlite3-wal"}
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in files), [(p.name, oct(p.stat().st_mode)) for p in files]
    cache.close()


def test_nothing_is_created_before_first_use(tmp_path):
    Cache(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_an_unwritable_directory_is_a_config_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = Cache(blocker / "cache")
    with pytest.raises(ConfigError, match="NBPARROT_CACHE_DIR") as caught:
        cache.get_many([])
    assert str(blocker / "cache") in str(caught.value)


def test_put_into_an_unwritable_directory_warns_instead_of_raising(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cache = Cache(blocker / "cache")
    with pytest.warns(RuntimeWarning, match="not stored"):
        cache.put("k", answer(1))
        cache.flush()
    assert "NBPARROT_CACHE_DIR" in cache.write_error


def test_a_file_that_is_not_a_database_is_a_config_error(tmp_path):
    (tmp_path / "answers.sqlite3").write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(ConfigError, match="answers.sqlite3"):
        Cache(tmp_path).info()


def test_a_newer_schema_is_a_config_error(tmp_path):
    Cache(tmp_path).close()
    Cache(tmp_path).info()
    with sqlite3.connect(tmp_path / "answers.sqlite3") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    with pytest.raises(ConfigError, match="schema version 99"):
        Cache(tmp_path).get_many(["k"])


# ---- info and clear ---------------------------------------------------------------------------

def test_info_and_clear_by_model(cache):
    empty = cache.info()
    assert (empty["entries"], empty["models"], empty["oldest"], empty["newest"]) == (0, {}, None, None)
    for i in range(3):
        cache.put(f"a{i}", answer(i, "model-a"))
    for i in range(2):
        cache.put(f"b{i}", answer(i, "model-b"))
    info = cache.info()
    assert info["path"] == cache.path and info["entries"] == 5 and info["size_bytes"] > 0
    assert info["models"] == {"model-a": 3, "model-b": 2}
    assert info["oldest"] <= info["newest"]
    assert info["write_error"] is None

    assert cache.clear("model-a") == 3
    assert cache.info()["models"] == {"model-b": 2}
    assert cache.get_many(["a0", "b0"]) == {"b0": answer(0, "model-b")}
    assert cache.clear("no-such-model") == 0
    assert cache.clear() == 2
    assert cache.info()["entries"] == 0
    assert integrity(cache.path) == "ok"


# ---- where it lives ------------------------------------------------------------------------

def test_default_dir_is_the_override(tmp_path, monkeypatch):
    monkeypatch.setenv("NBPARROT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    assert Cache().path == tmp_path / "mine" / "answers.sqlite3"


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="XDG layout")
def test_default_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("NBPARROT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "nbparrot"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "nbparrot"


# ---- other processes ------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from nbparrot.cache import Cache, CachedAnswer
    directory, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print("ready", flush=True)
    sys.stdin.readline()  # both start together, creating the file at the same time
    cache = Cache(directory)
    for i in range(count):
        cache.put(f"{tag}-{i}", CachedAnswer(f"answer {tag} {i}", "stop", 1, 2, tag))
        if i % 20 == 19:
            cache.flush()  # many small transactions, interleaved with the other process's
    cache.close()
    print("done", flush=True)
""")

EXITS = textwrap.dedent("""
    import sys
    from nbparrot.cache import Cache, CachedAnswer
    cache = Cache(sys.argv[1])
    for i in range(int(sys.argv[2])):
        cache.put(f"row-{i}", CachedAnswer(f"answer {i}", "stop", 1, 2, "m"))
    # no flush, no close: the interpreter's exit writes them
""")

KILLED = textwrap.dedent("""
    import sys, time
    from nbparrot.cache import Cache, CachedAnswer
    cache = Cache(sys.argv[1])
    for i in range(int(sys.argv[2])):
        cache.put(f"row-{i}", CachedAnswer(f"answer {i}", "stop", 1, 2, "m"))
    cache.flush()
    print("flushed", flush=True)
    time.sleep(300)
""")


def _python(script: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def test_two_processes_writing_at_once(tmp_path):
    procs = [_python(WRITER, tmp_path, tag, 2000) for tag in ("p1", "p2")]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            assert proc.returncode == 0 and out.strip() == "done"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    path = tmp_path / "answers.sqlite3"
    assert rows_in_file(path) == 4000
    assert integrity(path) == "ok"
    cache = Cache(tmp_path)
    assert cache.info()["models"] == {"p1": 2000, "p2": 2000}
    cache.close()


def test_answers_still_queued_at_exit_are_written(tmp_path):
    proc = _python(EXITS, tmp_path, 3000)
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert rows_in_file(tmp_path / "answers.sqlite3") == 3000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_gets_its_own_writer(cache):
    cache.put("parent", answer(1))
    cache.get_many(["parent"])  # the parent's writer thread and connection exist now
    pid = os.fork()
    if pid == 0:  # the child: must neither hang on the parent's writer nor use its connection
        code = 1
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang kills the child, not the test run
            signal.alarm(30)
            cache.put("child", answer(2))
            code = 0 if cache.get_many(["parent", "child"]) == {"parent": answer(1), "child": answer(2)} else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    cache.put("parent again", answer(3))
    assert len(cache.get_many(["parent", "child", "parent again"])) == 3
    assert integrity(cache.path) == "ok"


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGKILL")
def test_flushed_answers_survive_kill_9(tmp_path):
    proc = _python(KILLED, tmp_path, 1000)
    try:
        assert proc.stdout.readline().strip() == "flushed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "answers.sqlite3-wal").exists()  # no clean close: recovered from the WAL
    cache = Cache(tmp_path)
    found = cache.get_many([f"row-{i}" for i in range(1000)])
    assert found == {f"row-{i}": CachedAnswer(f"answer {i}", "stop", 1, 2, "m") for i in range(1000)}
    assert integrity(cache.path) == "ok"
    cache.close()


# ---- processes sharing one cache directory ---------------------------------------------------

SHARER = textwrap.dedent("""
    import sys
    from nbparrot.cache import Cache, CachedAnswer
    cache = Cache(sys.argv[1])
    cache.get_many([])  # the readers' connection is open before the writer thread opens its own
    for line in sys.stdin:  # one line per step: "<tag> <count>" writes, commits and answers "ok"
        tag, count = line.split()
        for i in range(int(count)):
            cache.put(f"{tag}-{i}", CachedAnswer(f"answer {tag} {i}", "stop", 1, 2, tag))
        cache.flush()
        print("ok", flush=True)
    cache.close()
""")


def _step(proc: subprocess.Popen, line: str) -> None:
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ok"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")
def test_a_process_closing_the_cache_never_discards_another_process_answers(tmp_path):
    # One process keeps its connections open and writes, while others open the same file, write
    # and close. A process that dropped its own file locks (any descriptor on the file closed while
    # it has connections) looks absent to them: the last one to close would checkpoint and delete
    # the WAL under it, and its later commits would go to a deleted file.
    long_lived = _python(SHARER, tmp_path)
    procs = [long_lived]
    try:
        for round_ in range(3):
            _step(long_lived, f"long{round_}a 20")
            short = _python(SHARER, tmp_path)
            procs.append(short)
            _step(short, f"short{round_} 50")
            short.stdin.close()
            assert short.wait(30) == 0
            _step(long_lived, f"long{round_}b 20")
        long_lived.stdin.close()
        assert long_lived.wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    path = tmp_path / "answers.sqlite3"
    assert integrity(path) == "ok"
    assert rows_in_file(path) == 3 * (20 + 50 + 20)


MAPPER = textwrap.dedent("""
    import sys
    import nbparrot
    base_url, cache_dir, tag, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rows = [{"text": f"{tag} {i}"} for i in range(count)]
    nbparrot.map(rows, "Say {text}", base_url=base_url, api_key="sk-test", concurrency=4, cache_dir=cache_dir,
                 progress=False).result()
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")
def test_runs_sharing_a_cache_dir_keep_every_answer_and_a_rerun_sends_nothing(make_server, tmp_path):
    import nbparrot

    server = make_server(latency_ms=20)
    counts = {}

    def start(tag: str, count: int) -> subprocess.Popen:
        counts[tag] = count
        return subprocess.Popen([sys.executable, "-c", MAPPER, server.base_url, str(tmp_path), tag, str(count)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = []
    try:
        long_run = start("long", 2000)  # about 10 s of answers at 4 in flight
        procs.append(long_run)
        deadline = time.monotonic() + 60
        while sum(server.stats()["answered"].values()) < 20:  # it has opened the cache and is writing answers
            assert time.monotonic() < deadline and long_run.poll() is None, "the long run did not get going"
            time.sleep(0.02)
        for short in ("a", "b", "c"):  # one after the other, each exiting while the long run writes
            proc = start(short, 50)
            procs.append(proc)
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        assert long_run.poll() is None, "the long run ended before the short ones: make it longer"
        _, err = long_run.communicate(timeout=120)
        assert long_run.returncode == 0, err
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    path = tmp_path / "answers.sqlite3"
    assert integrity(path) == "ok"
    assert rows_in_file(path) == sum(counts.values())
    server.reset()
    rows = [{"text": f"{tag} {i}"} for tag, count in counts.items() for i in range(count)]
    run = nbparrot.map(rows, "Say {text}", base_url=server.base_url, api_key="sk-test", cache_dir=tmp_path,
                       progress=False)
    run.result()
    assert server.stats()["requests"] == 0 and run.progress.cached == len(rows)


# ---- how soon an answer is on disk ----------------------------------------------------------------

def test_an_answer_reaches_the_file_without_a_flush(cache):
    cache.get_many([])  # the file exists
    other = sqlite3.connect(cache.path)  # another process's view: only committed rows
    try:
        for i in range(3):  # each time the writer is idle, so each answer is committed on its own
            cache.put(f"k{i}", answer(i))
            deadline = time.monotonic() + 10
            while other.execute("SELECT COUNT(*) FROM answers WHERE key = ?", (f"k{i}",)).fetchone()[0] == 0:
                assert time.monotonic() < deadline, f"answer {i} was not committed"
                time.sleep(0.005)
    finally:
        other.close()


KILLED_RUN = textwrap.dedent("""
    import sys
    import nbparrot
    base_url, cache_dir, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rows = [{"text": f"row {i}"} for i in range(300)]
    nbparrot.map(rows, "Say {text}", base_url=base_url, api_key="sk-test", concurrency=concurrency,
                 cache_dir=cache_dir, progress=False).result()
""")


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGKILL")
def test_after_kill_9_a_rerun_resends_at_most_the_requests_in_flight(make_server, tmp_path, interrupt_after_answers):
    import nbparrot

    concurrency = 8
    server = make_server(latency_ms=50)  # 160 answers a second: 50 ms of gathering would hold about 8
    argv = [sys.executable, "-c", KILLED_RUN, server.base_url, str(tmp_path), str(concurrency)]
    proc, _, err = interrupt_after_answers(argv, server, 100, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, err
    sent_before = set(server.stats()["received"])
    assert 100 <= len(sent_before) < 300
    server.reset()
    run = nbparrot.map([{"text": f"row {i}"} for i in range(300)], "Say {text}", base_url=server.base_url,
                       api_key="sk-test", concurrency=concurrency, cache_dir=tmp_path, progress=False)
    run.result()
    assert run.progress.done == 300
    sent_again = sent_before & set(server.stats()["received"])
    # A row holds its slot until its answer is handed to the cache, so at most `concurrency` rows had
    # been sent and not handed over at the kill. The answers arrive in waves of `concurrency`, 50 ms
    # apart: gathering answers for 50 ms before a commit lost the previous wave too (16 here), while
    # an answer committed as it lands leaves at most the last few of a wave still being written.
    assert len(sent_again) <= concurrency + concurrency // 2
