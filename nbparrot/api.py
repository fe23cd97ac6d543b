"""``nbparrot.map``: the one entry point every face (accessor, magics) builds on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .prepare import MISSING_POLICIES, Prepared, prepare
from .cache import Cache, default_cache_dir
from .config import Endpoint, defaults, resolve_endpoint
from .batch_api import BatchEngine
from .engine import Engine, EngineSettings
from .errors import ConfigError
from .images.parts import MediaOptions, media_options
from .panel import Silent, make_view
from .pricing import format_usd
from .results import ColumnSink, Shape
from .run import Run
from .options import BATCH, CHAT, RUN, check_options, takes_options
from .structured import Schema

__all__ = ["map", "open_cache", "resolve", "launch", "RunSetup"]

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


@dataclass
class RunSetup:
    """What every run resolves from the shared options, all checked before any row is rendered."""

    model: str
    endpoint: Endpoint
    settings: EngineSettings
    cache: Cache | None
    refresh: bool
    options: dict[str, Any]  # every shared option, defaults filled in

    def chat_body(self, *, n: int = 1) -> dict[str, Any]:
        """The shared part of a chat-completions body: model, max tokens, temperature, n, params."""
        options = self.options
        body: dict[str, Any] = {"model": self.model}
        token_field = "max_completion_tokens" if self.endpoint.is_openai else "max_tokens"
        max_tokens = options.get("max_tokens")
        body[token_field] = _positive_int("max_tokens", defaults.max_tokens if max_tokens is None else max_tokens)
        if options.get("temperature") is not None:
            body["temperature"] = float(options["temperature"])
        if _positive_int("n", n) > 1:
            body["n"] = n
        for key, value in (options.get("params") or {}).items():
            if key in ("messages", "stream"):
                raise ConfigError(f"params may not set {key!r}")
            body[key] = value
        return body

    @property
    def media(self) -> MediaOptions:
        """The ``images=``, ``detail=`` and ``max_image_px=`` options, checked."""
        get = self.options.get
        return media_options(get("images"), get("detail"), get("max_image_px"))

    def text_only(self, what: str) -> None:
        """Refuse the image options in a call that sends rows as text (``ConfigError``), rather than ignore them."""
        given = [name for name in ("images", "detail", "max_image_px") if self.options.get(name) is not None]
        if given:
            raise ConfigError(f"{what} sends rows as text: {', '.join(given)} cannot be used with it")

    @property
    def system(self) -> str | None:
        system = self.options.get("system")
        return system if system is not None else defaults.system


def resolve(options: dict[str, Any]) -> RunSetup:
    """Check the shared options (see ``nbparrot.options``) and resolve endpoint, limits and cache."""
    model = options.get("model") or defaults.model
    if not isinstance(model, str) or not model:
        raise ConfigError(f"model must be a model name, not {model!r}")
    endpoint = resolve_endpoint(options.get("base_url"), options.get("api_key"), client=options.get("client"), model=model)
    get = options.get
    settings = EngineSettings(
        concurrency=_positive_int("concurrency", defaults.concurrency if get("concurrency") is None else get("concurrency")),
        max_retries=defaults.max_retries if get("max_retries") is None else get("max_retries"),
        timeout=float(defaults.timeout if get("timeout") is None else get("timeout")),
        backoff_base=float(get("backoff", 1.0)),
        rpm=get("rpm"),
        tpm=get("tpm"),
        max_reasks=get("max_reasks", 2),
        max_cost=get("max_cost"),
        max_wait=float(defaults.max_wait),
        max_response_bytes=int(defaults.max_response_bytes),
        first_byte_timeout=float(defaults.first_byte_timeout),
    )
    if settings.max_retries < 0:
        raise ConfigError(f"max_retries must be 0 or more, not {settings.max_retries!r}")
    if settings.timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, not {get('timeout')!r}")
    if settings.max_reasks < 0:
        raise ConfigError(f"max_reasks must be 0 or more, not {settings.max_reasks!r}")
    if settings.max_cost is not None and not settings.max_cost > 0:
        raise ConfigError(f"max_cost must be a positive number of USD, not {settings.max_cost!r}")
    cache_mode = defaults.cache if get("cache") is None else get("cache")
    cache_mode = {True: "use", False: "off"}.get(cache_mode, cache_mode) if isinstance(cache_mode, bool) else cache_mode
    if cache_mode not in CACHE_MODES:
        raise ConfigError(f"cache must be one of {', '.join(CACHE_MODES)} (or True / False), not {cache_mode!r}")
    if get("mode", "live") not in ("live", "batch"):
        raise ConfigError(f"mode must be 'live' or 'batch', not {get('mode')!r}")
    media_options(get("images"), get("detail"), get("max_image_px"))  # checked before anything else is done
    if get("on_missing", "skip") not in MISSING_POLICIES:
        raise ConfigError(f"on_missing must be one of {', '.join(MISSING_POLICIES)}, not {get('on_missing')!r}")
    cache = None if cache_mode == "off" else open_cache(get("cache_dir"))
    return RunSetup(model, endpoint, settings, cache, cache_mode == "refresh", options)


def launch(setup: RunSetup, prepared: Prepared, body: Mapping[str, Any], shape: Callable[[Run], Any], *,
           schema: Schema | None = None, engine: type[Engine] | None = None, label: str | None = None,
           into: str | None = None, run_class: type[Run] = Run, **engine_options: Any) -> Run:
    """Build the engine and the ``Run`` (a ``run_class``) and start it: in a notebook it goes on in the
    background."""
    options = setup.options
    batch = options.get("mode") == "batch"
    kind = engine or (BatchEngine if batch else Engine)
    if batch:
        engine_options["poll_interval"] = options.get("poll_interval")
    run_engine = kind(setup.endpoint, body, prepared, setup.settings, schema=schema, cache=setup.cache,
                      refresh=setup.refresh, **engine_options)
    # Cache lookups and the cost estimate, before any request: here in a script or a batch; inside
    # a running loop (a notebook) the run does it on the loop, in slices, before it sends anything.
    estimate = run_engine.plan() if batch or not _loop_running() else None
    max_cost = options.get("max_cost")
    if batch and max_cost is not None and (estimate.max_cost or 0) > max_cost:
        raise ConfigError(f"a batch cannot be stopped half-way, and this one could cost up to "
                          f"{format_usd(estimate.max_cost)}, above max_cost={format_usd(max_cost)}")
    if label is None:
        label = prepared.templates[0] if prepared.variants == 1 else f"{prepared.variants} templates"
    run = run_class(run_engine, prepared, model=setup.model, label=label, shape=shape)
    sink = ColumnSink(run, prepared.frame, into) if into is not None else None
    return run.start(make_view if options.get("progress", True) else Silent,
                     ask_over=None if options.get("confirm") else options.get("confirm_over"),
                     before=sink.begin if sink else None)


@takes_options(RUN, CHAT, BATCH)
def map(  # noqa: A001 - the name users expect, as in pandas' Series.map
    data: Any,
    template: str | Sequence[Mapping[str, str]],
    *,
    schema: Any = None,
    n: int = 1,
    explode: bool = False,
    dedupe: bool = False,
    into: str | None = None,
    name: str = "answer",
    **options: Any,
) -> Run:
    """Send ``template`` rendered for every row of ``data`` to a chat-completions endpoint.

    ``data`` is a DataFrame or a list of dicts; ``{field}`` names in the template come from
    its columns or keys. Returns a ``Run``: in a notebook it is already going (``await`` it);
    in a script it has finished, and a run stopped by a fatal error (bad key, endpoint down,
    ``max_cost``) raises that error here, with the run as ``err.run``. In a notebook the call returns within a few tens of
    milliseconds at any size, after the cheap checks (fields against columns, arguments): the
    planning (each row rendered, cache lookups, the cost estimate) goes on on the loop while the
    panel says "preparing", and ``run.estimate`` is None until then. Nothing is sent before it
    is done. ``run.result()`` gives the answers in the input's shape and ``run.errors`` the rows
    without one.

    schema: a pydantic model, ``{"field": type}``, or ``list[Model]``: asks for JSON, validates it
        (re-asking up to ``max_reasks`` times) and gives its fields as columns.
    n: answers per row (a list per row); ``explode`` gives one row per choice (and per item of a
        list schema); ``dedupe`` drops repeated answers, keeping first-seen order.
    into: a DataFrame column filled as answers land (pending rows NA).
    name: the name of the answer Series / column.
    """
    options = check_options(map, options)
    setup = resolve(options)  # every argument is checked before the rows are rendered
    body = setup.chat_body(n=n)
    parsed_schema = Schema(schema) if schema is not None else None
    prepared = prepare(data, template, system=setup.system, on_missing=options["on_missing"], media=setup.media)
    if into is not None:
        if prepared.frame is None:
            raise ConfigError("into= fills a DataFrame column; data is a list of dicts")
        if prepared.variants > 1 or explode:
            raise ConfigError("into= needs one answer per row: it cannot be used with several templates or explode=True")
    return launch(setup, prepared, body, Shape(name, explode=explode, dedupe=dedupe, meta=options["meta"]),
                  schema=parsed_schema, into=into)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
