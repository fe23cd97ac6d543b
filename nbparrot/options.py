"""The options every run takes, defined and documented once.

``map`` and each operator (``filter``, ``classify``, ``embed``, ...) take their own arguments
plus the shared run options below (endpoint, pacing, retries, cache, budget, display). They
are written once here; ``takes_options`` puts them into an operator's signature and docstring,
so ``help(df.llm.filter)`` and ``inspect.signature`` show every argument it takes, while the
operator's own code sees them as one ``**options`` dict and hands it to ``RunOptions.of``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from .errors import ConfigError

__all__ = ["Option", "RUN", "CHAT", "BATCH", "takes_options", "check_options"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Option:
    """One keyword argument shared by several calls: its name, default, type and one line of help."""

    name: str
    default: Any
    annotation: str
    doc: str


#: Where the requests go and how hard they are pushed; the cache, the budget and the display.
RUN: tuple[Option, ...] = (
    Option("model", None, "str | None", "model name; default ``nbparrot.configure(model=...)``, 'gpt-4o-mini'"),
    Option("base_url", None, "str | None", "OpenAI-compatible endpoint; default OPENAI_BASE_URL, else OpenAI's"),
    Option("api_key", None, "str | None", "default OPENAI_API_KEY (Azure: AZURE_OPENAI_API_KEY); shown nowhere"),
    Option("client", None, "openai.OpenAI | None", "an openai client (OpenAI, AsyncOpenAI, AzureOpenAI, ...): its base URL, "
           "key, headers, organization, project, api-version; requests still go through aiohttp"),
    Option("concurrency", None, "int | None", "requests in flight at once (default 128)"),
    Option("max_retries", None, "int | None", "retries per request after 408/409/429/5xx/connection errors (default 5)"),
    Option("timeout", None, "float | None", "seconds per attempt (default 120)"),
    Option("backoff", 1.0, "float", "base seconds of the capped exponential retry backoff (full jitter)"),
    Option("rpm", None, "float | None", "requests-per-minute limit; default: learned from x-ratelimit-* headers"),
    Option("tpm", None, "float | None", "tokens-per-minute limit; default: learned from the headers"),
    Option("on_missing", "skip", "str", "rows with a missing field value: 'skip' (marked), 'empty' text, or 'error'"),
    Option("meta", False, "bool", "add provenance columns (prompt, model, tokens, cost, latency, attempts, error)"),
    Option("cache", None, "str | bool | None", "'use' (default), 'refresh' or 'off' (True = 'use', False = 'off')"),
    Option("cache_dir", None, "str | Path | None", "where the answer cache lives; default NBPARROT_CACHE_DIR or the user cache dir"),
    Option("max_cost", None, "float | None", "USD hard budget: nothing is sent that could take spend past it"),
    Option("confirm_over", None, "float | None", "USD: above this estimate the panel asks Run / Cancel first"),
    Option("confirm", False, "bool", "run past confirm_over without asking (needed in a script)"),
    Option("progress", True, "bool", "show the panel / progress line (False: nothing, e.g. inside other tools)"),
)

#: What shapes a chat request, for the calls that send chat completions.
CHAT: tuple[Option, ...] = (
    Option("system", None, "str | None", "system prompt (a template too); default ``configure(system=...)``"),
    Option("max_tokens", None, "int | None", "always sent (default 256): providers charge it against TPM up front"),
    Option("temperature", None, "float | None", "sampling temperature"),
    Option("params", None, "Mapping | None", "any other body field (top_p, seed, stop, ...)"),
    Option("max_reasks", 2, "int", "re-asks after an answer that does not match the expected shape"),
    Option("images", None, "str | list[str] | None", "columns holding images or PDFs (paths, URLs, bytes, PIL, arrays); "
           "bytes, PIL images and arrays are found without it"),
    Option("detail", None, "str | None", "image detail: 'auto' (default), 'low' or 'high'"),
    Option("max_image_px", None, "int | None", "scale larger images down to this long side before sending "
           "(default 2048, 512 with detail='low')"),
)

#: The OpenAI Batch API instead of live requests (half price, minutes to hours).
BATCH: tuple[Option, ...] = (
    Option("mode", "live", "str", "'live', or 'batch' for the OpenAI Batch API at half price"),
    Option("poll_interval", None, "float | None", "seconds between Batch API status checks (mode='batch')"),
)


def takes_options(*groups: Iterable[Option]) -> Callable[[F], F]:
    """Give a function ``f(..., **options)`` the options of ``groups`` in its signature and docstring.

    The function still receives them as ``**options`` (only those given); ``check_options``
    refuses names that are not among them, as a signature would.
    """
    options = [o for group in groups for o in group]

    def decorate(func: F) -> F:
        signature = inspect.signature(func)
        own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        names = {p.name for p in own}
        shared = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default, annotation=o.annotation)
                  for o in options if o.name not in names]
        func.__signature__ = signature.replace(parameters=own + shared)  # type: ignore[attr-defined]
        lines = [f"    {o.name}: {o.doc}" for o in options if o.name not in names]
        func.__doc__ = (func.__doc__ or "").rstrip() + "\n\n    Run options (shared by every nbparrot call, see nbparrot.options):\n" + "\n".join(lines) + "\n"
        func.__nbparrot_options__ = tuple(o.name for o in options if o.name not in names)  # type: ignore[attr-defined]
        return func

    return decorate


def check_options(func: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every shared default filled in; a ``ConfigError`` for a name ``func`` does not take."""
    known = getattr(func, "__nbparrot_options__", ())
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{func.__name__}() got unknown option(s) {', '.join(unknown)}; "
                          f"it takes: {', '.join(sorted(known))}")
    defaults = {p.name: p.default for p in inspect.signature(func).parameters.values() if p.name in known}
    return {**defaults, **options}
