"""``ddf.llm.map(template, ...)`` on a dask DataFrame: one nbparrot run per partition, on the workers.

``import nbparrot.dask`` registers ``ddf.llm`` (and ``ddf.parrot``, which stays available if
another package already owns ``ddf.llm``); ``import nbparrot`` does it too when
``dask.dataframe`` was imported first. ``ddf.llm.map`` takes the options of ``nbparrot.map``
and returns a *lazy* dask Series (or DataFrame when ``schema``, ``meta``, ``explode`` or several
templates give columns) built with ``map_partitions``; nothing is sent until it is computed.
Each partition then runs ``nbparrot.map(partition, template, ...)`` to completion on its worker,
with the progress line silenced there.

How the options travel, decided on the client when ``.llm.map`` is called:

- **Defaults** (``nbparrot.configure(...)``): model, system, max_tokens, concurrency, retries,
  timeout, cache mode, endpoint and key are resolved here and sent explicitly, so a worker's
  own environment never changes what is asked.
- **The API key** travels inside an object whose repr is ``<hidden>``: it is not in
  ``repr()`` of the graph, in task names, or in ``explain()``. (It is in the pickled task the
  workers receive, as it must be for them to send requests.)
- **The cache** directory (``cache_dir=``, else ``NBPARROT_CACHE_DIR``, else the user cache
  directory, all as the client sees them) is resolved here and given to every worker: workers on
  one machine share one SQLite file (WAL), each partition's answers are committed before it
  reports done, and a rerun reads them from any worker. SQLite's WAL does not work on network
  file systems: on a cluster of several machines each machine keeps its own file at that path.
- **Rate limits**: ``rpm=`` / ``tpm=`` are the limits of the whole cluster. They are divided by
  the number of partitions that can run at once -- the worker threads of the active
  ``distributed`` client, else the local scheduler's threads -- and each worker process paces
  all of its partitions through one shared pacer sized to its threads' share, so the total
  rate across workers stays within the limits. The pacer starts with half a second's worth of
  budget rather than a minute's, so the start is not a burst. ``concurrency`` is divided the
  same way. Limits learned from ``x-ratelimit-*`` headers (when ``rpm``/``tpm`` are not given)
  are per process: each worker re-syncs to the remaining budget the server reports and a 429
  pauses the whole process. The share is fixed when ``.llm.map`` is called: a cluster that grows
  afterwards can exceed it, and fewer partitions than worker threads leave part of it unused.
- ``max_cost`` is split evenly over the partitions, so the total never passes it; a partition
  that reaches its share stops with ``BudgetExceededError``.
- ``into=`` (fill a column in place) and ``confirm_over`` (ask in the panel) need the notebook's
  own frame and panel, and are refused: assign the result (``ddf["x"] = ddf.llm.map(...)``), and
  cap spend with ``max_cost``.

Rows without an answer are NA; ``meta=True`` adds the ``error``, token and ``cost`` columns,
since ``run.errors`` and ``run.usage`` live in the worker processes. Schema fields typed
``int`` / ``bool`` come back as pandas' nullable ``Int64`` / ``boolean`` (``float`` as
``float64``), so that every partition has the dtypes the lazy frame announces.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import threading
import uuid
from pathlib import Path
from urllib.parse import quote
from typing import Any

import dask
import dask.dataframe as dd
import pandas as pd
from dask.dataframe.extensions import register_dataframe_accessor

from . import api
from .accessor import copy_map_signature, copy_signature, register_accessors
from .operators import decisions, embeddings
from .cache import default_cache_dir
from .config import defaults, resolve_endpoint
from .errors import ConfigError, NbparrotError
from .headless import off_loop
from .ratelimit import Bucket, Pacer

__all__ = ["DaskLLMAccessor", "register", "cluster_slots"]

#: The pacer of given rpm/tpm limits starts with, and never holds more than, this many seconds' worth.
BURST_SECONDS = 0.5
_REFUSED = {
    "into": "into= fills a pandas DataFrame's column in place as answers land; a dask DataFrame is "
            "lazy and has no such column: assign the result instead, ddf['answer'] = ddf.llm.map(...)",
    "confirm_over": "confirm_over asks in the notebook's panel before sending, and dask partitions run "
                    "on workers without one: cap the spend with max_cost= (split evenly over the "
                    "partitions), or try the template on ddf.head(20).llm.map(...) first",
    "client": "an openai client object stays in this process (its headers and token do not travel to the "
              "workers): pass base_url= and api_key= instead",
    "cascade": "a cascade learns where the cheap model is unsure from a sample of the whole frame, which "
               "partitions on separate workers cannot share: run it on a pandas frame (e.g. ddf.compute())",
}
_META_DTYPES = {"prompt_tokens": "int64", "completion_tokens": "int64", "attempts": "int64",
                "cost": "float64", "latency": "float64", "cached": "bool"}


# ---- the plan one .llm.map call sends to its partitions ---------------------------------


class _Secret:
    """An API key that shows as ``<hidden>`` wherever it is printed (it still pickles)."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<hidden>"

    __str__ = __repr__

    def __reduce__(self):
        return (_Secret, (self._value,))


class _Plan:
    """Everything a partition needs: the template, the resolved options and the rate share.

    Its repr never shows the key, and its dask token is random (one per ``.llm.map`` call), so
    neither task names nor graph reprs carry anything derived from it.
    """

    def __init__(self, func: Any, args: tuple, options: dict[str, Any], key: _Secret, *, slots: int,
                 rpm: float | None, tpm: float | None, client_pid: int, dtypes: Any = None,
                 url: _Secret | None = None):
        self.func = func  # nbparrot.map, filter or classify: what each partition runs
        self.args = args  # its arguments after the data: the template (and the labels)
        self.template = args[0]
        self.options = options  # nbparrot.map's keyword arguments, without api_key
        self.key = key
        self.url = url  # base_url with its user:password@, when it had them (hidden like the key)
        self.slots = slots  # partitions that can run at once across the cluster
        self.rpm = rpm  # the cluster-wide limits as given
        self.tpm = tpm
        self.client_pid = client_pid
        self.dtypes = dtypes  # of the result: a dtype (Series) or {column: dtype}
        self.token = uuid.uuid4().hex

    def __dask_tokenize__(self) -> str:
        return self.token

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.options.items() if k in ("model", "base_url", "concurrency", "cache")}
        limits = ", ".join(f"{name}={value:g}" for name, value in (("rpm", self.rpm), ("tpm", self.tpm)) if value)
        template = repr(self.template)
        template = template if len(template) <= 60 else template[:57] + "..."
        return (f"<nbparrot.dask plan {template} {shown}, api_key=<hidden>, "
                f"{limits + ' ' if limits else ''}shared by {self.slots} worker thread(s)>")

    def worker_options(self) -> dict[str, Any]:
        options = {**self.options, "api_key": self.key.reveal(), "progress": False}
        if self.url is not None:
            options["base_url"] = self.url.reveal()
        return options


def cluster_slots() -> int:
    """How many partitions can run at once: the active distributed client's worker threads, else
    the threads (or processes) of dask's configured local scheduler."""
    scheduler = dask.config.get("scheduler", None)
    if hasattr(scheduler, "nthreads"):  # a distributed Client given as the scheduler
        return max(1, sum(scheduler.nthreads().values()))
    if "distributed" in sys.modules and scheduler in (None, "dask.distributed", "distributed"):
        from distributed import get_client

        try:
            client = get_client()
        except ValueError:  # no client: dask's local scheduler runs the graph
            pass
        else:
            return max(1, sum(client.nthreads().values()))
    if scheduler in ("sync", "synchronous", "single-threaded"):
        return 1
    return max(1, int(dask.config.get("num_workers", None) or dask.system.CPU_COUNT))


def _check_limit(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"{name} must be a positive number per minute, not {value!r}")
    return float(value)


def _plan(frame: dd.DataFrame, func: Any, args: tuple, options: dict[str, Any]) -> _Plan:
    """Check the options and resolve, here on the client, everything a worker must not guess."""
    what = f"ddf.llm.{func.__name__}"
    for name, why in _REFUSED.items():
        if options.get(name) is not None:
            raise ConfigError(f"{why} ({what} got {name}={options[name]!r})")
    parameters = inspect.signature(func).parameters
    allowed = set(list(parameters)[1 + len(args):])
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {what}; it takes the options of "
                          f"nbparrot.{func.__name__}")
    options = dict(options)
    options.pop("confirm", None)  # only meaningful with confirm_over
    endpoint = resolve_endpoint(options.pop("base_url", None), options.pop("api_key", None))
    if endpoint.extra_headers or endpoint.query:  # from nbparrot.configure(client=...)
        raise ConfigError(f"{_REFUSED['client']} ({what} would use the session's client=, with its own headers)")
    options["base_url"] = endpoint.base_url
    options["model"] = options.get("model") or parameters["model"].default or defaults.model  # embed's own default
    for name in ("system", "max_retries", "timeout", "max_tokens"):
        if name in parameters and options.get(name) is None:
            options[name] = getattr(defaults, name)
    mode = options.get("cache") or defaults.cache
    options["cache"] = mode
    if mode != "off":
        directory = options.get("cache_dir")
        path = Path(directory).expanduser() if directory is not None else default_cache_dir()
        options["cache_dir"] = str(path.resolve())
    else:
        options.pop("cache_dir", None)

    slots = cluster_slots()
    rpm, tpm = _check_limit("rpm", options.get("rpm")), _check_limit("tpm", options.get("tpm"))
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None:
            options[name] = value / slots  # one running partition's share (see _shared_pacer)
    concurrency = defaults.concurrency if options.get("concurrency") is None else options["concurrency"]
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"concurrency must be a positive integer, not {concurrency!r}")
    options["concurrency"] = max(1, concurrency // slots)
    if options.get("max_cost") is not None:
        max_cost = options["max_cost"]
        if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or not max_cost > 0:
            raise ConfigError(f"max_cost must be a positive number of USD, not {max_cost!r}")
        options["max_cost"] = max_cost / max(1, frame.npartitions)
    url = None
    if endpoint.basic_auth is not None:
        scheme, rest = endpoint.base_url.split("://", 1)
        user, password = (quote(part, safe="") for part in endpoint.basic_auth)
        url = _Secret(f"{scheme}://{user}:{password}@{rest}")
    return _Plan(func, args, options, _Secret(endpoint.api_key or ""), slots=slots, rpm=rpm, tpm=tpm,
                 client_pid=os.getpid(), url=url)


# ---- dtypes: every partition looks like the lazy frame says ----------------------------


def _dtypes(empty: Any, input_columns: pd.Index, options: dict[str, Any]) -> Any:
    """The dtypes of the result, from an empty run's result and what each column holds."""
    from .structured import Schema, text_dtype

    text = text_dtype()
    name = options.get("name") or "answer"
    schema = options.get("schema")
    plain_text = schema is None and (int(options.get("n") or 1) == 1 or bool(options.get("explode")))
    fields: dict[str, Any] = Schema(schema).dtypes() if schema is not None else {}
    if isinstance(empty, pd.Series):
        if empty.dtype == "boolean" or isinstance(empty.dtype, pd.CategoricalDtype):
            return empty.dtype  # a decision: filter's mask, classify's labels
        if empty.name in fields:  # a one-field schema: that field's values
            return fields[empty.name]
        return text if plain_text else object
    dtypes: dict[str, Any] = {}
    for column in empty.columns:
        if column in input_columns and column not in fields and column != name:
            dtypes[column] = empty.dtypes[column]  # the input's own columns, as they come
        elif column in fields:
            dtypes[column] = fields[column]
        elif column == name:
            dtypes[column] = text if plain_text else object
        elif column in ("choice", "item"):
            dtypes[column] = "Int64"
        elif column in _META_DTYPES and options.get("meta"):
            dtypes[column] = _META_DTYPES[column]
        elif column == "template" or options.get("meta"):
            dtypes[column] = text
        else:  # classify's label (a Categorical) and confidence keep theirs
            dtypes[column] = empty.dtypes[column]
    return dtypes


def _conform(result: Any, dtypes: Any) -> Any:
    """Cast a partition's result to the announced dtypes (a cast that cannot apply is left alone)."""
    if isinstance(result, pd.Series):
        if result.dtype != dtypes:
            try:
                return result.astype(dtypes)
            except (TypeError, ValueError):
                return result
        return result
    changes = {}
    for column, dtype in dtypes.items():
        if column in result.columns and result.dtypes[column] != dtype:
            try:
                changes[column] = result[column].astype(dtype)
            except (TypeError, ValueError):
                pass
    return result.assign(**changes) if changes else result


# ---- on the workers ---------------------------------------------------------------------


class _SharedPacer(Pacer):
    """One pacer for every partition a worker process runs, from any of its threads."""

    __slots__ = ("_lock",)

    def __init__(self, rpm: float | None, tpm: float | None, now: float):
        super().__init__(rpm, tpm, now)
        self._lock = threading.Lock()
        # A minute's worth at once is a single process's privilege: with several sharing the
        # limit, each starts (and refills to) only half a second's worth of its share.
        if self.requests is not None:
            capacity = max(1.0, rpm / 60.0 * BURST_SECONDS)
            self.requests = Bucket(rpm, now, capacity=capacity, level=capacity)
        if self.tokens is not None:
            capacity = max(1.0, tpm / 60.0 * BURST_SECONDS)
            self.tokens = Bucket(tpm, now, capacity=capacity, level=capacity)

    def delay(self, cost: float, now: float) -> float:
        with self._lock:
            tokens = self.tokens
            if self.fixed and tokens is not None and tokens.capacity < cost <= tokens.limit:
                tokens.capacity = cost  # one request larger than half a second's worth must still fit
            return super().delay(cost, now)

    def take(self, cost: float, now: float) -> tuple[float, float, float]:
        with self._lock:
            return super().take(cost, now)

    def observe(self, headers: Any, mark: tuple[float, float, float], now: float) -> None:
        with self._lock:
            super().observe(headers, mark, now)

    def backoff(self, seconds: float, now: float) -> None:
        with self._lock:
            super().backoff(seconds, now)


_pacers: dict[tuple, _SharedPacer] = {}
_pacers_lock = threading.Lock()


def _threads_here(plan: _Plan) -> tuple[int, str]:
    """Partition slots in this process (and which worker it is), to size its share of the limits."""
    if "distributed" in sys.modules:
        from distributed import get_worker

        try:
            worker = get_worker()
        except ValueError:
            pass
        else:
            return max(1, worker.state.nthreads), str(worker.address)
    if os.getpid() == plan.client_pid:  # dask's threaded (or sync) scheduler: all slots are here
        return plan.slots, ""
    return 1, ""  # dask's multiprocessing scheduler: one partition per process at a time


def _shared_pacer(plan: _Plan, options: dict[str, Any]) -> _SharedPacer:
    """This process's pacer for the endpoint and model: per-slot limits times the slots here."""
    threads, worker = _threads_here(plan)
    rpm = options["rpm"] * threads if options.get("rpm") else None
    tpm = options["tpm"] * threads if options.get("tpm") else None
    key = (worker, options["base_url"], options["model"], rpm, tpm)
    with _pacers_lock:
        pacer = _pacers.get(key)
        if pacer is None:
            pacer = _pacers[key] = _SharedPacer(rpm, tpm, asyncio.get_running_loop().time())
    return pacer


async def _run_paced(partition: pd.DataFrame, plan: _Plan, options: dict[str, Any]) -> Any:
    run = plan.func(partition, *plan.args, **options)  # on this loop: started, not yet stepped
    engine = getattr(run, "engine", None)
    if isinstance(getattr(engine, "pacer", None), Pacer):
        pacer = _shared_pacer(plan, options)
        engine.pacer = pacer  # before the run's first step, so every request goes through it
        run.progress.limits = pacer.limits
    elif options.get("rpm") or options.get("tpm"):
        raise NbparrotError("nbparrot.dask cannot share rpm/tpm between partitions: this run has no pacer")
    return await run


def _without_loop(work: Any) -> Any:
    """``work()`` where no event loop runs: right here, or in a helper thread when this thread
    runs one (a notebook computing with ``scheduler="sync"``), where ``asyncio.run`` cannot go."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return work()
    return off_loop(work)


def _partition(partition: pd.DataFrame, plan: _Plan) -> Any:
    options = plan.worker_options()
    result = asyncio.run(_run_paced(partition, plan, options))
    if options.get("cache") != "off":
        api.open_cache(options["cache_dir"]).flush()  # on disk before another worker may look
    return _conform(result, plan.dtypes)


def _llm_map(partition: pd.DataFrame, plan: _Plan) -> Any:
    """One partition, on a worker: ``nbparrot.map`` run to completion, with no progress display."""
    return _without_loop(lambda: _partition(partition, plan))


def _empty_result(meta: pd.DataFrame, plan: _Plan) -> Any:
    """The result on an empty partition, computed here without a request; also checks the options."""
    def work() -> Any:  # no loop in this thread: nbparrot runs it to completion
        return plan.func(meta, *plan.args, **plan.worker_options()).result()

    return _without_loop(work)


# ---- the accessor -----------------------------------------------------------------------


class DaskLLMAccessor:
    """``ddf.llm``: LLM calls over this dask DataFrame's rows, one nbparrot run per partition."""

    def __init__(self, frame: dd.DataFrame):
        self._frame = frame

    def map(self, template: Any, **options: Any) -> Any:
        """A lazy dask Series (or DataFrame) of the answers; see ``nbparrot.dask`` and ``nbparrot.map``.

        Computing it runs ``nbparrot.map(partition, template, **options)`` on the workers.
        ``rpm`` / ``tpm`` / ``concurrency`` are cluster-wide and shared out between the worker
        threads; limits learned from headers are per process. ``into=`` and ``confirm_over``
        are refused; ``max_cost`` is split evenly over the partitions.
        """
        return self._lazy(api.map, template, options=options)

    def filter(self, predicate: Any, **options: Any) -> Any:
        """A lazy dask DataFrame of the rows the model says ``predicate`` is true of (``mask=True``: a
        boolean Series); partition-wise, with the same rules as ``ddf.llm.map``; see ``nbparrot.filter``."""
        return self._lazy(decisions.filter, predicate, options=options)

    def classify(self, template: Any, labels: Any, **options: Any) -> Any:
        """A lazy Categorical Series of one of ``labels`` per row, partition-wise, with the same rules
        as ``ddf.llm.map``; see ``nbparrot.classify``."""
        decisions.normalize_labels(labels)  # bad labels fail here, not on the workers
        return self._lazy(decisions.classify, template, labels, options=options)

    def embed(self, template_or_column: Any, **options: Any) -> Any:
        """A lazy Series of float32 vectors (object dtype), partition-wise, with the same rules as
        ``ddf.llm.map``; see ``nbparrot.embed``."""
        return self._lazy(embeddings.embed, template_or_column, options=options)

    def _lazy(self, func: Any, *args: Any, options: dict[str, Any]) -> Any:
        frame = self._frame
        plan = _plan(frame, func, args, options)
        empty = _empty_result(frame._meta, plan)
        vectors = func is embeddings.embed and isinstance(empty, pd.Series)  # float32 arrays: object
        plan.dtypes = object if vectors else _dtypes(empty, frame._meta.columns, plan.options)
        meta = _conform(empty, plan.dtypes)
        return frame.map_partitions(_llm_map, plan, meta=meta, enforce_metadata=True)


copy_map_signature(DaskLLMAccessor.map)
copy_signature(DaskLLMAccessor.filter, decisions.filter)
copy_signature(DaskLLMAccessor.classify, decisions.classify)
copy_signature(DaskLLMAccessor.embed, embeddings.embed)


def register() -> list[str]:
    """Register ``ddf.parrot`` and, unless another package owns it, ``ddf.llm``."""
    return register_accessors(dd.DataFrame, register_dataframe_accessor, DaskLLMAccessor, "ddf")


register()
