"""``python -m nbparrot.server [flags]``: serve until interrupted (see ``--help``)."""

from .cli import main

main()
