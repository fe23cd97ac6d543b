"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A started mock ServerProcess; parametrize indirectly with a dict of ServerConfig fields."""
    from nbparrot.server import ServerProcess

    kwargs = dict(getattr(request, "param", None) or {})
    with ServerProcess(**kwargs) as srv:
        yield srv


@pytest.fixture
def make_server() -> Iterator[Callable[..., Any]]:
    """A factory ``make_server(**config)`` of started mock servers, all stopped at teardown."""
    from nbparrot.server import ServerProcess

    servers: list[ServerProcess] = []

    def make(**config: Any) -> ServerProcess:
        srv = ServerProcess(**config)
        servers.append(srv)
        return srv.start()

    yield make
    for srv in servers:
        srv.stop()


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test (and every process it starts) caches answers in its own temp dir, never ~/.cache."""
    monkeypatch.setenv("NBPARROT_CACHE_DIR", str(tmp_path_factory.mktemp("nbparrot-cache")))


@pytest.fixture
def interrupt_after_answers() -> Callable[..., Any]:
    """``interrupt(argv, server, answered, sig)``: run a script, signal it mid-run, return (proc, out, err)."""
    return _interrupt_after_answers


def _interrupt_after_answers(argv: list[str], server: Any, answered: int, sig: int, *, text: bool = False):
    """Start ``argv``, wait (bounded) until ``server`` has sent ``answered`` answers, send ``sig``;
    returns the finished process and its (stdout, stderr)."""
    import os
    import subprocess
    import time

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=text)
    try:
        deadline = time.monotonic() + 30
        while sum(server.stats()["answered"].values()) < answered:
            assert time.monotonic() < deadline and proc.poll() is None, "the run did not get going"
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, out, err
