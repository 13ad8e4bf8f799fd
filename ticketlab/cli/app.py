"""The Typer application, its console, and how a user error is shown.

User-facing text is printed literally: :func:`say` fills a template of ours (which may hold
rich markup such as ``[green]``) with values that are escaped, so a message, a path or a task
option that contains brackets (``[grid]``, ``[MASK]``) is shown as written instead of being
eaten as markup.
"""

from __future__ import annotations

import functools
import os
import traceback
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ticketlab import __version__
from ticketlab.errors import TicketlabError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Find, test, transfer and ship lottery tickets (sparse matching subnetworks) of "
         "pre-trained networks.",
)
console = Console(highlight=False)
_state = {"debug": False}


def say(template: str, *values: Any, **kw: Any) -> None:
    """Print ``template`` (ours: may hold rich markup) with ``{}`` filled by escaped values."""
    console.print(template.format(*(escape(str(v)) for v in values)), **kw)


def print_error(e: TicketlabError) -> None:
    """``Error: …`` and ``Fix: …``, the user's text shown literally."""
    # soft_wrap: the terminal wraps, not rich, so a long path or phrase stays one piece in a log
    # or a pipe (rich's 80-column default broke "found on a text\nencoder" after a long path)
    console.print(Text.assemble(("Error:", "bold red"), " ", e.problem), soft_wrap=True)
    if e.fix:
        console.print(Text.assemble(("Fix:", "bold"), " ", e.fix), soft_wrap=True)


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn TicketlabError into one clear message and exit code 2 (traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TicketlabError as e:
            if _state["debug"]:
                traceback.print_exc()
            print_error(e)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("Interrupted. Finished levels are stored; rerun the same command "
                          "to resume.")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"ticketlab {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.", metavar=""),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.",
                                 callback=_version, is_eager=True, metavar=""),
) -> None:
    _state["debug"] = debug
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
