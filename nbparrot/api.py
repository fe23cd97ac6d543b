"""``nbparrot.map``: the one entry point every face (accessor, magics) builds on."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from .batch import Prepared, prepare
from .config import defaults, resolve_endpoint
from .engine import OK, Engine, EngineSettings
from .errors import ConfigError
from .panel import make_view
from .run import Run

__all__ = ["map", "shape_result"]


def shape_result(run: Run, name: str = "answer") -> Any:
    """Answers in the input's shape: a Series on the DataFrame's index, or dicts with ``name`` added."""
    prepared: Prepared = run.prepared
    values = [o.content if o.status == OK else None for o in run.outcomes]
    if prepared.records is not None:
        return [{**record, name: value} for record, value in zip(prepared.records, values)]
    import pandas as pd

    return pd.Series(values, index=prepared.index, name=name)


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
) -> Run:
    """Send ``template`` rendered for every row of ``data`` to a chat-completions endpoint.

    ``data`` is a DataFrame or a list of dicts; ``{field}`` names in the template come from
    its columns or keys. Returns a ``Run``: in a notebook it is already going (``await`` it);
    in a script it has finished. ``run.result()`` gives the answers in the input's shape and
    ``run.errors`` the rows without one. ``params`` adds any other body field (``top_p``,
    ``seed``, ``stop``...); ``rpm``/``tpm`` fix the limits instead of learning them from the
    endpoint's headers; ``backoff`` is the base in seconds of the retry backoff.
    """
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
    )
    if settings.max_retries < 0:
        raise ConfigError(f"max_retries must be 0 or more, not {settings.max_retries!r}")
    if settings.timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
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
    prepared = prepare(data, template, system=system if system is not None else defaults.system,
                       on_missing=on_missing)
    engine = Engine(endpoint, body, prepared.prompts, settings, skip_reasons=prepared.skip_reasons)
    run = Run(engine, prepared, model=model, shape=shape_result)
    return run.start(make_view)
