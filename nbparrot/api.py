"""``nbparrot.map``: the one entry point every face (accessor, magics) builds on."""

from __future__ import annotations

import asyncio
from typing import Any, Mapping, Sequence

from pathlib import Path

from .prepare import prepare
from .cache import Cache, default_cache_dir
from .config import defaults, resolve_endpoint
from .batch_api import BatchEngine
from .engine import Engine, EngineSettings
from .errors import ConfigError
from .panel import Silent, make_view
from .pricing import format_usd
from .results import ColumnSink, Shape
from .run import Run
from .structured import Schema

__all__ = ["map", "open_cache"]

CACHE_MODES = ("use", "refresh", "off")
_caches: dict[Path, Cache] = {}


def open_cache(directory: str | Path | None = None) -> Cache:
    """The answer cache in ``directory`` (default: NBPARROT_CACHE_DIR or the user cache dir), shared per process."""
    path = Path(directory).expanduser() if directory is not None else default_cache_dir()
    path = path.resolve()
    cache = _caches.get(path)
    if cache is None:
        cache = _caches[path] = Cache(path)
    return cache


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, not {value!r}")
    return value


def map(  # noqa: A001 - the name users expect, as in pandas' Series.map
    data: Any,
    template: str | Sequence[Mapping[str, str]],
    *,
    model: str | None = None,
    system: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    concurrency: int | None = None,
    max_retries: int | None = None,
    timeout: float | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    n: int = 1,
    params: Mapping[str, Any] | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
    on_missing: str = "skip",
    backoff: float = 1.0,
    schema: Any = None,
    explode: bool = False,
    dedupe: bool = False,
    meta: bool = False,
    into: str | None = None,
    name: str = "answer",
    max_reasks: int = 2,
    cache: str | None = None,
    cache_dir: str | Path | None = None,
    max_cost: float | None = None,
    confirm_over: float | None = None,
    confirm: bool = False,
    mode: str = "live",
    poll_interval: float | None = None,
    progress: bool = True,
) -> Run:
    """Send ``template`` rendered for every row of ``data`` to a chat-completions endpoint.

    ``data`` is a DataFrame or a list of dicts; ``{field}`` names in the template come from
    its columns or keys. Returns a ``Run``: in a notebook it is already going (``await`` it);
    in a script it has finished. In a notebook the call returns within a few tens of
    milliseconds at any size, after the cheap checks (fields against columns, arguments): the
    planning (each row rendered, cache lookups, the cost estimate) goes on on the loop while the
    panel says "preparing", and ``run.estimate`` is None until then. Nothing is sent before it
    is done. ``run.result()`` gives the answers in the input's shape and
    ``run.errors`` the rows without one. ``params`` adds any other body field (``top_p``,
    ``seed``, ``stop``...); ``rpm``/``tpm`` fix the limits instead of learning them from the
    endpoint's headers; ``backoff`` is the base in seconds of the retry backoff.

    ``schema`` (a pydantic model, ``{"field": type}``, or ``list[Model]``) asks for JSON, validates
    it (re-asking up to ``max_reasks`` times) and gives its fields as columns; ``n``, ``explode``,
    ``dedupe`` and ``meta`` shape the result as described in ``nbparrot.results``; ``into`` names a
    DataFrame column that is filled as answers land; ``name`` names the answer column.

    ``cache`` is "use" (default: answered requests are not sent again), "refresh" (send, and
    store the new answers) or "off"; ``cache_dir`` overrides where it lives. ``max_cost`` (USD)
    is a hard budget: nothing is sent that could take spend past it. ``confirm_over`` (USD):
    when the run could cost more, the panel asks before sending, once the estimate is known (a
    script needs ``confirm=True``; where no panel can ask, the call plans the whole batch itself
    to decide).

    ``mode="batch"`` sends the rows through the OpenAI Batch API at half price (see
    ``nbparrot.batch_api``); ``poll_interval`` is how often its status is checked (seconds). A
    batch is planned in full before the call returns, in a notebook too (its ``max_cost`` check
    needs the estimate).
    ``progress=False`` shows nothing while the run goes (no panel, no text line).
    """
    # Every argument is checked before the rows are rendered, and all of it before any request.
    model = model or defaults.model
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model must be a model name, not {model!r}")
    endpoint = resolve_endpoint(base_url, api_key)
    settings = EngineSettings(
        concurrency=_positive_int("concurrency", defaults.concurrency if concurrency is None else concurrency),
        max_retries=defaults.max_retries if max_retries is None else max_retries,
        timeout=float(defaults.timeout if timeout is None else timeout),
        backoff_base=float(backoff),
        rpm=rpm,
        tpm=tpm,
        max_reasks=max_reasks,
        max_cost=max_cost,
        max_wait=float(defaults.max_wait),
        max_response_bytes=int(defaults.max_response_bytes),
        first_byte_timeout=float(defaults.first_byte_timeout),
    )
    if settings.max_retries < 0:
        raise ConfigError(f"max_retries must be 0 or more, not {settings.max_retries!r}")
    if settings.timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
    if max_reasks < 0:
        raise ConfigError(f"max_reasks must be 0 or more, not {max_reasks!r}")
    if max_cost is not None and not max_cost > 0:
        raise ConfigError(f"max_cost must be a positive number of USD, not {max_cost!r}")
    cache_mode = defaults.cache if cache is None else cache
    if cache_mode not in CACHE_MODES:
        raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache_mode!r}")
    if mode not in ("live", "batch"):
        raise ConfigError(f"mode must be 'live' or 'batch', not {mode!r}")
    body: dict[str, Any] = {"model": model}
    token_field = "max_completion_tokens" if endpoint.is_openai else "max_tokens"
    body[token_field] = _positive_int("max_tokens", defaults.max_tokens if max_tokens is None else max_tokens)
    if temperature is not None:
        body["temperature"] = float(temperature)
    if _positive_int("n", n) > 1:
        body["n"] = n
    for key, value in (params or {}).items():
        if key in ("messages", "stream"):
            raise ConfigError(f"params may not set {key!r}")
        body[key] = value
    parsed_schema = Schema(schema) if schema is not None else None
    prepared = prepare(data, template, system=system if system is not None else defaults.system,
                       on_missing=on_missing)
    if into is not None:
        if prepared.frame is None:
            raise ConfigError("into= fills a DataFrame column; data is a list of dicts")
        if prepared.variants > 1 or explode:
            raise ConfigError("into= needs one answer per row: it cannot be used with several templates or explode=True")
    kind = BatchEngine if mode == "batch" else Engine
    extra = {"poll_interval": poll_interval} if mode == "batch" else {}
    engine = kind(endpoint, body, prepared, settings,
                  schema=parsed_schema, cache=None if cache_mode == "off" else open_cache(cache_dir),
                  refresh=cache_mode == "refresh", **extra)
    # Cache lookups and the cost estimate, before any request: here in a script or a batch; inside
    # a running loop (a notebook) the run does it on the loop, in slices, before it sends anything.
    estimate = engine.plan() if mode == "batch" or not _loop_running() else None
    if mode == "batch" and max_cost is not None and (estimate.max_cost or 0) > max_cost:
        raise ConfigError(f"a batch cannot be stopped half-way, and this one could cost up to "
                          f"{format_usd(estimate.max_cost)}, above max_cost={format_usd(max_cost)}")
    label = prepared.templates[0] if prepared.variants == 1 else f"{prepared.variants} templates"
    run = Run(engine, prepared, model=model, label=label,
              shape=Shape(name, explode=explode, dedupe=dedupe, meta=meta))
    sink = ColumnSink(run, prepared.frame, into) if into is not None else None
    return run.start(make_view if progress else Silent, ask_over=None if confirm else confirm_over,
                     before=sink.begin if sink else None)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
