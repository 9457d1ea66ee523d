"""Logging set-up for the command line; library modules only create loggers."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Send log records of slidemil's packages to a rich handler on stderr."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=console, show_path=verbose, rich_tracebacks=True, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, RichHandler):
            root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for package in ("cli", "mil", "preprocessing"):
        logging.getLogger(package).setLevel(level)
