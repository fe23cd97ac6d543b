"""The command line: one flag per :class:`ServerConfig` field, and ``python -m nbparrot.server``."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from .app import serve
from .config import ServerConfig


def _bool(text: str) -> bool:
    """A boolean flag value: true/false, yes/no, 1/0."""
    value = text.strip().lower()
    if value not in ("true", "false", "yes", "no", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return value in ("true", "yes", "1")


_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("host", str, "loopback address to bind (127.0.0.1, localhost or ::1)"),
    ("port", int, "port (0 = pick a free one)"),
    ("latency_ms", float, "fixed latency / time to first token, ms"),
    ("jitter_ms", float, "extra uniform random latency in [0, jitter], ms"),
    ("per_token_ms", float, "extra latency per completion token, ms"),
    ("rpm", int, "requests per minute limit"),
    ("tpm", int, "tokens per minute limit"),
    ("burst_seconds", float, "bucket capacity in seconds of limit (60 = a full minute)"),
    ("completion_tokens", int, "completion tokens per choice"),
    ("completion_tokens_max", int, "if set, completion tokens vary in [completion-tokens, this]"),
    ("api_key", str, "require this Bearer key (others get 401)"),
    ("models", str, "comma-separated model names served (others get 404)"),
    ("context_window", int, "context window in tokens"),
    ("p500", float, "probability of a 500"),
    ("p502", float, "probability of an HTML 502"),
    ("p503", float, "probability of a 503"),
    ("p_reset", float, "probability of a connection reset mid-body"),
    ("pstall", float, "probability of a stall (no answer, reset after --stall-seconds)"),
    ("stall_seconds", float, "how long a stalled request hangs"),
    ("pquota", float, "probability of a 429 insufficient_quota"),
    ("p429", float, "probability of a 429 rate_limit_exceeded asking to wait --retry-after-429 seconds"),
    ("retry_after_429", float, "seconds the injected 429s ask to wait"),
    ("usage", _bool, "send a usage object in answers (false: none, as some gateways)"),
    ("usage_scale", float, "count prompt tokens this many times over (an endpoint whose tokenizer counts more)"),
    ("prompt_cache", _bool, "report cached_tokens for repeated prompt prefixes of 1,024+ tokens, as OpenAI"),
    ("huge_bytes", int, "bytes of the answers the <<huge-answer>> and <<huge-junk>> markers ask for"),
    ("seed", int, "seed of the fault RNG"),
    ("json_schema", _bool, "accept response_format json_schema (false: 400, as older endpoints)"),
    ("logprobs", _bool, "answer logprobs when asked (false: \"logprobs\": null, as gateways that drop them)"),
    ("batch_seconds", float, "seconds a batch takes from creation to completed (a tenth validating, a tenth finalizing)"),
    ("max_lifetime", float, "exit after this many seconds"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ServerConfig field (dashes for underscores) to ``parser``."""
    defaults = ServerConfig()
    for name, kind, text in _FLAGS:
        default = getattr(defaults, name)
        if name == "models":
            default = ",".join(default)
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=default,
                            help=f"{text} (default: {default})")
    parser.add_argument("--no-retry-after", dest="retry_after", action="store_false",
                        help="429s carry no retry-after / retry-after-ms headers")
    parser.add_argument("--preset", dest="p_reset", type=float, default=argparse.SUPPRESS, action=_Renamed,
                        help=argparse.SUPPRESS)  # the old name of --p-reset


class _Renamed(argparse.Action):
    """A flag's old name: still taken, with a warning naming the new one."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        new = "--" + self.dest.replace("_", "-")
        print(f"warning: {option_string} is deprecated, use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def config_from_args(ns: argparse.Namespace) -> ServerConfig:
    """Build a ServerConfig from parsed flags (raises ValueError on invalid values)."""
    values = {name: getattr(ns, name) for name, _, _ in _FLAGS if hasattr(ns, name)}
    if isinstance(values.get("models"), str):
        values["models"] = tuple(m.strip() for m in values["models"].split(",") if m.strip())
    values["retry_after"] = getattr(ns, "retry_after", True)
    return ServerConfig(**values)


def config_to_argv(config: ServerConfig) -> list[str]:
    """The command-line flags that reproduce ``config`` (only non-default values)."""
    defaults = ServerConfig()
    argv: list[str] = []
    for name, _, _ in _FLAGS:
        value = getattr(config, name)
        if value == getattr(defaults, name) or value is None:
            continue
        text = ",".join(value) if name == "models" else repr(value) if isinstance(value, float) else str(value)
        argv += ["--" + name.replace("_", "-"), text]
    if not config.retry_after:
        argv.append("--no-retry-after")
    return argv


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m nbparrot.server``."""
    parser = argparse.ArgumentParser(prog="python -m nbparrot.server",
                                     description="nbparrot's OpenAI-compatible mock server (loopback only).")
    add_arguments(parser)
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    parser.add_argument("--cpu", type=int, default=None, help="pin the server to this CPU")
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    if ns.cpu is not None:
        os.sched_setaffinity(0, {ns.cpu})
    try:
        asyncio.run(serve(config, parent_pid=ns.parent_pid))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"nbparrot server: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
