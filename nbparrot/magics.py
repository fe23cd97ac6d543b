"""``%%llm`` and ``%llm``: prompt iteration in a notebook.

- ``%%llm [-o NAME] [options]`` sends the cell as one prompt, ``{name}`` fields filled from
  the notebook's variables, and streams the answer into the cell output as Markdown while
  the cell has already returned; ``-o NAME`` binds the final text (or parsed JSON) when done.
- ``%%llm --over DF [--sample K] -o NAME``: the cell is a row template run over a DataFrame
  as a ``Run`` (panel, Cancel, preview); ``NAME`` is bound to the Run at once.
- Several prompt variants separated by a line ``---`` run over the same rows and are shown
  side by side, with tokens, cost and latency per variant; ``--expect COLUMN`` scores each
  against that column (accuracy, cost, latency; see ``nbparrot.operators.scoring``).
- ``%llm status | cancel [ID|all] | cost | models | cache info|clear`` manage the session.
- In a notebook executed headlessly (nbconvert, papermill) the stream and the comparison finish
  within their cell, so the saved notebook holds them (see ``nbparrot.headless``).
Defaults (model, base_url, concurrency, system, max_tokens) via ``%config NbparrotMagics.model = ...``.
This module holds the magic class, its argument parsing and the line commands; the stream's
display is ``nbparrot.stream_view``, the side-by-side comparison ``nbparrot.comparison``.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import re
import shlex
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class, no_var_expand
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import HTML
from traitlets import Int, Unicode, observe

from . import api
from .operators import decisions, scoring
from .cache import CachedAnswer, request_key
from .comparison import show_comparison_when_done
from .config import configure, defaults, resolve_endpoint
from .errors import NbparrotError
from .images.parts import MediaError, expand, is_media, media_options
from .prepare import prepare
from .headless import in_background, run_coroutine
from .pricing import cost_of, format_usd
from .run import live_runs, record_usage, session_usage
from .stream import stream_chat
from .stream_view import StreamView
from .structured import Schema
from .templates import Template
from .tokens import estimate_prompt_tokens, estimate_text_tokens

__all__ = ["NbparrotMagics", "load_ipython_extension"]

_VARIANT_SPLIT = re.compile(r"^\s*---\s*$", re.MULTILINE)
_tasks: set[asyncio.Task] = set()  # strong references to single-prompt tasks


@magics_class
class NbparrotMagics(Magics):
    """nbparrot's magics; traits are the session defaults (``%config NbparrotMagics.model = "gpt-4.1-mini"``)."""

    model = Unicode(defaults.model, help="default model").tag(config=True)
    base_url = Unicode("", help="default endpoint base URL ('' = OPENAI_BASE_URL or OpenAI)").tag(config=True)
    concurrency = Int(defaults.concurrency, help="requests in flight at once").tag(config=True)
    system = Unicode("", help="default system prompt ('' = none)").tag(config=True)
    max_tokens = Int(defaults.max_tokens, help="default max_tokens").tag(config=True)

    @observe("model", "base_url", "concurrency", "system", "max_tokens")
    def _to_defaults(self, change: dict) -> None:
        value = change["new"]
        configure(**{change["name"]: (value or None) if change["name"] in ("base_url", "system") else value})

    @magic_arguments()
    @argument("-o", "--output", metavar="NAME", help="bind the result to this variable (a Run with --over)")
    @argument("-m", "--model", help="model name")
    @argument("-s", "--system", help="system prompt")
    @argument("-t", "--temperature", type=float, help="sampling temperature")
    @argument("--max-tokens", type=int, help="maximum tokens per answer")
    @argument("-n", type=int, default=1, help="answers per prompt")
    @argument("--json", action="store_true", help="ask for a JSON object and parse it")
    @argument("--schema", metavar="NAME", help="a pydantic model (or dict of field: type) from the namespace")
    @argument("--base-url", help="endpoint base URL")
    @argument("--no-cache", action="store_true", help="send even if this exact request was answered before")
    @argument("--over", metavar="DF", help="run the cell as a row template over this DataFrame")
    @argument("--sample", type=int, metavar="K", help="with --over: only K rows (a fixed random sample)")
    @argument("--batch", action="store_true", help="with --over: send through the OpenAI Batch API (half price)")
    @argument("--filter", action="store_true", help="with --over: the cell is a predicate; keep the rows it is true of")
    @argument("--classify", metavar="LABELS", help="with --over: one of these comma-separated labels per row")
    @argument("--images", metavar="NAMES", help="comma-separated variables (or columns) holding image paths/URLs; "
              "PIL images, arrays and bytes are found without it")
    @argument("--detail", choices=("auto", "low", "high"), help="image detail")
    @argument("--expect", metavar="COLUMN", help="with --over: score each variant against this column (accuracy, cost, latency)")
    @argument("command", nargs="*", help="line form: status | cancel [ID|all] | cost | models | cache info|clear")
    @no_var_expand  # {name} fields are ours to fill, from the cell body only
    @line_cell_magic
    def llm(self, line: str, cell: str | None = None) -> Any:
        """Send prompts to an LLM from a notebook (see the nbparrot module docs and README).

        Cell form: ``%%llm [options]`` with the prompt as the cell body; ``{name}`` fields come
        from the notebook's variables (plain names only). Lines ``---`` separate variants to
        compare side by side. Line form: ``%llm status``, ``%llm cancel [ID|all]``,
        ``%llm cost``, ``%llm models``, ``%llm cache info``, ``%llm cache clear``.
        """
        try:
            args = parse_argstring(self.llm, line)
        except (UsageError, SystemExit, argparse.ArgumentError) as exc:
            raise UsageError(f"%llm: {exc}") from None
        try:
            if cell is None:
                return self._line(args)
            return self._cell(args, cell)
        except NbparrotError as exc:
            raise UsageError(f"%llm: {exc}") from None

    # ---- line form ----------------------------------------------------------------------

    def _line(self, args: argparse.Namespace) -> Any:
        words = args.command
        if not words:
            raise UsageError("%llm needs a command (status, cancel, cost, models, cache) or a cell: %%llm")
        command, rest = words[0], words[1:]
        if command == "status":
            return _status_table()
        if command == "cancel":
            return _cancel(rest)
        if command == "cost":
            return _cost_table()
        if command == "models":
            return _models(args.base_url)
        if command == "cache":
            return _cache(rest)
        raise UsageError(f"%llm: unknown command {command!r}; use status, cancel, cost, models or cache")

    # ---- cell form ----------------------------------------------------------------------

    def _cell(self, args: argparse.Namespace, cell: str) -> Any:
        if args.command:
            raise UsageError(f"%%llm: unexpected words {' '.join(args.command)!r} (options start with -)")
        if args.json and args.schema:
            raise UsageError("%%llm: use --json or --schema, not both")
        variants = [v.strip() for v in _VARIANT_SPLIT.split(cell) if v.strip()]
        if not variants:
            raise UsageError("%%llm: the cell is empty; write the prompt below the %%llm line")
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"%%llm: -o needs a variable name, not {args.output!r}")
        ns = self.shell.user_ns
        schema = self._schema(args, ns)
        if args.batch and args.over is None:
            raise UsageError("%%llm: --batch needs --over DF (a batch is worth it for many rows)")
        if (args.filter or args.classify) and args.over is None:
            raise UsageError("%%llm: --filter and --classify need --over DF")
        if args.filter and args.classify:
            raise UsageError("%%llm: use --filter or --classify, not both")
        if args.expect is not None and args.over is None:
            raise UsageError("%%llm: --expect needs --over DF (the rows and their expected values)")
        if args.over is not None:
            frame = self._frame(args, ns)
            template = variants if len(variants) > 1 else variants[0]
            options = self._options(args, schema)
            if args.expect is not None:
                return self._scored(args, frame, variants, options)
            if args.filter or args.classify:
                if schema is not None or args.json or args.n != 1:
                    raise UsageError("%%llm: --filter / --classify decide the answer's shape: no --json, --schema or -n")
                del options["schema"], options["n"]
                run = (decisions.filter(frame, template, **options) if args.filter else
                       decisions.classify(frame, template, [w.strip() for w in args.classify.split(",") if w.strip()],
                                          **options))
            else:
                run = api.map(frame, template, **options)
            if args.output:
                ns[args.output] = run
            if len(variants) > 1:
                show_comparison_when_done(run, variants)
            return None
        media = _media_names(args, variants, ns)
        if media:  # images in the prompt: a one-record template, its images read and sent as content parts
            record = {f: ns[f] for v in variants for f in Template(v).fields}
            if len(variants) > 1:
                run = api.map([record], variants, **self._options(args, schema))
                if args.output:
                    ns[args.output] = run
                show_comparison_when_done(run, variants)
                return None
            options = self._options(args, schema)
            prepared = prepare([record], variants[0], media=media_options(options.get("images"), args.detail))
            return self._single(args, prepared.render(0)[0]["content"], schema)
        rendered = [_render(v, ns) for v in variants]
        if len(rendered) > 1:  # compare variants on the one prompt: a one-row run with a template each
            escaped = [r.replace("{", "{{").replace("}", "}}") for r in rendered]
            run = api.map([{}], escaped, **self._options(args, schema))
            if args.output:
                ns[args.output] = run
            show_comparison_when_done(run, rendered)
            return None
        return self._single(args, rendered[0], schema)

    def _scored(self, args: argparse.Namespace, frame: Any, variants: list[str], options: dict[str, Any]) -> None:
        """``--expect COLUMN``: every variant scored against the column; the scores shown when done."""
        schema, n = options.pop("schema"), options.pop("n")
        if schema is not None or args.json or n != 1 or args.batch:
            raise UsageError("%%llm: --expect compares answers as they come: no --json, --schema, -n or --batch")
        task = "filter" if args.filter else "classify" if args.classify else "map"
        labels = [w.strip() for w in args.classify.split(",") if w.strip()] if args.classify else None
        run = scoring.compare(frame, variants, expect=args.expect, task=task, labels=labels, **options)
        if args.output:
            self.shell.user_ns[args.output] = run
        show_comparison_when_done(run, variants, render=lambda run, _variants: scoring.scores_html(run))

    def _options(self, args: argparse.Namespace, schema: Any) -> dict[str, Any]:
        options: dict[str, Any] = {"model": args.model, "system": args.system, "temperature": args.temperature,
                                   "max_tokens": args.max_tokens, "n": args.n, "base_url": args.base_url,
                                   "schema": schema}
        if args.json:
            options["params"] = {"response_format": {"type": "json_object"}}
        if args.no_cache:
            options["cache"] = "refresh"
        if args.batch:
            options["mode"] = "batch"
        if args.images:
            options["images"] = [name.strip() for name in args.images.split(",") if name.strip()]
        if args.detail:
            options["detail"] = args.detail
        return options

    def _schema(self, args: argparse.Namespace, ns: dict) -> Any:
        if args.schema is None:
            return None
        if args.schema not in ns:
            raise UsageError(f"%%llm: --schema {args.schema}: no such variable in the notebook")
        return ns[args.schema]

    def _frame(self, args: argparse.Namespace, ns: dict) -> Any:
        import pandas as pd

        if args.over not in ns:
            raise UsageError(f"%%llm: --over {args.over}: no such variable in the notebook")
        frame = ns[args.over]
        if not isinstance(frame, pd.DataFrame):
            raise UsageError(f"%%llm: --over {args.over} is a {type(frame).__name__}, not a DataFrame")
        if args.sample is not None:
            if args.sample < 1:
                raise UsageError("%%llm: --sample needs a positive number of rows")
            if args.sample < len(frame):
                frame = frame.sample(n=args.sample, random_state=0).sort_index(kind="stable")
        return frame

    def _single(self, args: argparse.Namespace, prompt: str | list, schema: Any) -> None:
        """One prompt (text, or content parts with images): stream the answer into the output; bind ``-o`` when it ends."""
        model = args.model or defaults.model
        endpoint = resolve_endpoint(args.base_url, model=model)
        system = args.system if args.system is not None else defaults.system
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens or defaults.max_tokens}
        if args.temperature is not None:
            body["temperature"] = args.temperature
        if args.n > 1:
            body["n"] = args.n
        parsed_schema = Schema(schema) if schema is not None else None
        if parsed_schema is not None:
            body["response_format"] = parsed_schema.response_format()
        elif args.json:
            body["response_format"] = {"type": "json_object"}
        body["messages"] = messages
        try:
            key = request_key(endpoint.base_url, body)  # an image's key is the digest of its bytes
            body["messages"] = expand(messages)
        except MediaError as exc:
            raise UsageError(f"%%llm: {exc}") from None
        view = StreamView(args.n)
        cache = api.open_cache() if defaults.cache != "off" else None
        if cache is not None and not args.no_cache:
            hit = cache.get_many([key]).get(key)
            if hit is not None:
                texts = hit.content if isinstance(hit.content, list) else [hit.content]
                view.update(texts, final=True, note="from cache")
                self._bind(args, texts, parsed_schema)
                record_usage(model, cached=1)
                return

        def spent(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float | None:
            """Price the tokens and add them to the session's totals (``%llm cost``)."""
            cost = cost_of(model, prompt_tokens, completion_tokens, cached_tokens, base_url=endpoint.base_url)
            record_usage(model, requests=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cost=cost)
            return cost

        def partly_paid() -> None:
            """An answer cut short (Stop, a broken stream) was paid for as far as it came: our estimate."""
            if any(view.texts):
                spent(estimate_prompt_tokens(messages, model), sum(estimate_text_tokens(t) for t in view.texts))

        async def go() -> None:
            started = time.monotonic()
            try:
                result = await stream_chat(endpoint, body, view.update, timeout=defaults.timeout)
                estimated = not result.usage_sent  # no usage from the endpoint: count our estimate, never zero
                if estimated:
                    result.prompt_tokens = estimate_prompt_tokens(messages, model)
                    result.completion_tokens = sum(estimate_text_tokens(t) for t in result.texts)
                cost = spent(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
                note = (f"{'~' if estimated else ''}{result.prompt_tokens + result.completion_tokens:,} tokens"
                        f"{' (estimated: the endpoint sent no usage)' if estimated else ''} · "
                        f"{format_usd(cost)} · {time.monotonic() - started:.1f}s")
                view.update(result.texts, final=True, note=note)
                if self._bind(args, result.texts, parsed_schema, view) and cache is not None:
                    content = result.texts if args.n > 1 else result.texts[0]
                    finish = result.finish_reasons if args.n > 1 else result.finish_reasons[0]
                    cache.put(key, CachedAnswer(content, finish, result.prompt_tokens, result.completion_tokens, model))
            except asyncio.CancelledError:
                partly_paid()
                if not view.stopping:
                    raise
                view.stopped()
                if not (parsed_schema is not None or args.json):  # a cut JSON answer would not parse
                    self._bind(args, view.texts, None)
            except Exception as exc:  # noqa: BLE001 - any failure ends the stream on screen, saying why
                partly_paid()
                view.fail(str(exc) if isinstance(exc, NbparrotError) else f"{type(exc).__name__}: {exc}")
            finally:
                view._end()  # whatever happened: no Stop button, no timer left behind

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # the IPython terminal: no loop runs the cell, so wait here
            asyncio.run(go())
            return
        if not in_background():  # a notebook executed headlessly: the answer lands in this cell
            run_coroutine(go)
            return
        task = loop.create_task(go())
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        view.controls(task)

    def _bind(self, args: argparse.Namespace, texts: list[str], schema: Schema | None,
              view: "StreamView | None" = None) -> bool:
        """Bind ``-o`` to the text(s), or parsed JSON; False (and a note) if the JSON does not parse."""
        values: list[Any] = list(texts)
        if schema is not None or args.json:
            try:
                values = [schema.parse(t) if schema is not None else json.loads(t) for t in texts]
            except ValueError as exc:
                if view is not None:
                    view.fail(f"the answer is not usable JSON: {exc}")
                return False
        if args.output:
            self.shell.user_ns[args.output] = values if args.n > 1 else values[0]
        return True


def _media_names(args: argparse.Namespace, variants: list[str], ns: dict) -> list[str]:
    """The prompt's fields that are images: named with --images, or bytes / PIL images / arrays."""
    named = [name.strip() for name in (args.images or "").split(",") if name.strip()]
    fields = []
    for variant in variants:
        try:
            template = Template(variant)
            template.check((k for k in ns if not k.startswith("_")), what="notebook's variables")
        except NbparrotError as exc:
            raise UsageError(f"%%llm: {exc}") from None
        fields += [f for f in template.fields if f in named or is_media(ns[f])]
    return list(dict.fromkeys(fields))


def _render(text: str, ns: dict) -> str:
    """Fill ``{name}`` fields from the notebook's variables (plain names only), before any request."""
    try:
        template = Template(text)
        template.check((k for k in ns if not k.startswith("_")), what="notebook's variables")
    except NbparrotError as exc:
        raise UsageError(f"%%llm: {exc}") from None
    return template.render(ns)


def _table(css: str, header: list[str], rows: list[list[Any]]) -> HTML:
    """A small HTML table with escaped cells."""
    cells = lambda tag, values: "".join(f"<{tag}>{html.escape(str(v))}</{tag}>" for v in values)  # noqa: E731
    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return HTML(f"<table class='{css}'><tr>{cells('th', header)}</tr>{body}</table>")


def _status_table() -> HTML:
    runs = live_runs()
    if not runs:
        return HTML("<i>no runs going in this kernel</i>")
    return _table("nbparrot-status", ["run", "status", "settled", "in flight", "cost", "template"],
                  [[r.id, r.status, f"{r.progress.settled}/{r.progress.total}", r.progress.in_flight,
                    format_usd(r.cost), r.label[:60]] for r in runs])


def _cancel(words: list[str]) -> str:
    runs = {r.id: r for r in live_runs()}
    if not words or words == ["all"]:
        for run in runs.values():
            run.cancel()
        return f"cancelled {len(runs)} run(s)"
    try:
        ids = [int(w) for w in words]
    except ValueError:
        raise UsageError(f"%llm cancel: expected run ids or 'all', not {' '.join(words)!r}") from None
    unknown = [i for i in ids if i not in runs]
    if unknown:
        raise UsageError(f"%llm cancel: no running run {unknown[0]} (running: {', '.join(map(str, runs)) or 'none'})")
    for i in ids:
        runs[i].cancel()
    return f"cancelled run(s) {', '.join(map(str, ids))}"


def _cost_table() -> HTML:
    usage = session_usage()
    if not usage:
        return HTML("<i>nothing sent in this session yet</i>")
    return _table("nbparrot-cost", ["model", "requests", "prompt tokens", "completion tokens", "cached answers", "cost"],
                  [[model, f"{u['requests']:,}", f"{u['prompt_tokens']:,}", f"{u['completion_tokens']:,}",
                    f"{u['cached']:,}", format_usd(u["cost"])] for model, u in usage.items()])


def _models(base_url: str | None) -> list[str]:
    import urllib.error
    import urllib.request

    endpoint = resolve_endpoint(base_url)
    request = urllib.request.Request(endpoint.base_url + "/models", headers=endpoint.headers())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}) if _is_loopback(endpoint.base_url)
                                         else urllib.request.ProxyHandler())
    try:
        with opener.open(request, timeout=30) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise UsageError(f"%llm models: {exc.code} from {endpoint.display_url}/models") from None
    except (urllib.error.URLError, OSError) as exc:
        raise UsageError(f"%llm models: cannot reach {endpoint.display_url} ({endpoint.redact(str(exc))})") from None
    return sorted(m.get("id", "") for m in data.get("data", []))


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")


def _cache(words: list[str]) -> Any:
    cache = api.open_cache()
    if words == ["info"] or not words:
        return cache.info()
    if words == ["clear"]:
        return f"removed {cache.clear()} cached answers from {cache.path}"
    raise UsageError(f"%llm cache: expected 'info' or 'clear', not {shlex.join(words)!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbparrot``: register the magics (and their ``%config`` traits)."""
    magics = NbparrotMagics(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)
