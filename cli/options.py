"""Helpers shared by the stage commands."""

from __future__ import annotations

from pydantic import ValidationError


def format_option_errors(err: ValidationError) -> str:
    """Format one line per invalid option, named as on the command line (``--overlap-px``)."""
    lines = []
    for error in err.errors():
        options = ", ".join(f"--{str(part).replace('_', '-')}" for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  {options}: {message}" if options else f"  {message}")
    return "\n".join(lines)
