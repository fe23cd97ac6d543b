"""Command line: ``python -m nbparrot demo``, ``python -m nbparrot serve [flags]``, ``--version``; no command prints the help."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="python -m nbparrot", description="nbparrot command line")
    parser.add_argument("--version", action="version", version=f"nbparrot {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,serve}")
    demo = commands.add_parser("demo", help="run a demo batch on the bundled local server (nothing is spent)")
    demo.add_argument("--rows", type=int, default=200, help="rows of sample data (default 200)")
    from .server import add_arguments

    serve = commands.add_parser("serve", help="start the bundled OpenAI-compatible server (loopback only)")
    add_arguments(serve)
    args = parser.parse_args(argv)
    if args.command is None:  # nothing asked: say what there is
        parser.print_help()
        return 0
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args.rows)
    import asyncio

    from .server import config_from_args, serve as serve_forever

    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve_forever(config))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
