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
