"""The ``ticketlab`` command line.

:mod:`.app` holds the Typer application and how errors are shown, :mod:`.options` generates
every training option from the hyperparameter declarations, and each command module registers
its commands on the app when imported here: :mod:`.core` (find, finetune, demo, runs, show,
describe), :mod:`.experiments` (the paper's experiments) and the shipping commands (export,
bench).
"""

from __future__ import annotations

import importlib
import sys

from ticketlab.cli.app import app, console, friendly, say

#: Modules whose commands register on ``app`` when imported.
COMMAND_MODULES: tuple[str, ...] = ("ticketlab.cli.core", "ticketlab.cli.experiments",
                                    "ticketlab.commands.ship", "ticketlab.cli.supertickets")

for _module in COMMAND_MODULES:
    importlib.import_module(_module)


def main() -> None:
    """Console entry point."""
    app()


__all__ = ["app", "console", "friendly", "main", "say"]

if __name__ == "__main__":
    sys.exit(main())
