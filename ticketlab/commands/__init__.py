"""CLI command groups that live in their own modules (export, experiments, ...).

Each module imports ``app`` (and the shared option helpers) from :mod:`ticketlab.cli`, declares
its commands with ``@app.command()``, and is listed in ``ticketlab.cli.COMMAND_MODULES``. Heavy
imports stay inside the command functions so ``ticketlab --help`` stays fast.
"""
