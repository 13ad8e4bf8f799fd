"""How a command prints its results: a table fitted to the terminal, or ``--json``/``--csv``
for scripts.

With ``--json`` or ``--csv`` the standard output holds exactly one document — nothing else —
and everything a command says along the way (progress, "calibrating…") goes to the standard
error, so ``ticketlab runs --json | jq`` and ``ticketlab bench … --csv > bench.csv`` work.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import typer

from ticketlab.cli.app import console
from ticketlab.errors import TicketlabError
from ticketlab.reports.tables import Table

JSON_HELP = "Print the results as one JSON document (everything else goes to stderr)."
CSV_HELP = "Print the results as CSV (everything else goes to stderr)."


def json_option() -> Any:
    return typer.Option(False, "--json", help=JSON_HELP, metavar="")


def csv_option() -> Any:
    return typer.Option(False, "--csv", help=CSV_HELP, metavar="")


def output_format(as_json: bool, as_csv: bool = False) -> str:
    """``table``, ``json`` or ``csv`` from the two flags (both at once is refused)."""
    if as_json and as_csv:
        raise TicketlabError("--json and --csv were both given.", "Pick one of them.")
    return "json" if as_json else "csv" if as_csv else "table"


@contextlib.contextmanager
def messages_to_stderr(fmt: str) -> Iterator[None]:
    """While a ``--json``/``--csv`` command works, the console — and any plain ``print``, such
    as the training loop's progress lines without a terminal — writes to stderr."""
    if fmt == "table":
        yield
        return
    before = console.stderr
    console.stderr = True
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        console.stderr = before


def print_json(data: Any) -> None:
    """One JSON document on stdout, unwrapped and uncoloured whatever the terminal."""
    typer.echo(json.dumps(data, indent=2, default=str))


def print_table(table: Table, fmt: str = "table") -> None:
    """``table`` fitted to the console's width, or its records as JSON or CSV."""
    if fmt == "json":
        typer.echo(table.to_json())
    elif fmt == "csv":
        typer.echo(table.to_csv(), nl=False)
    else:
        console.print(table.to_rich(console.width))
