"""One error type for everything a user can get wrong.

Every failure that is the user's to fix (a wrong path, a bad flag, a corrupt file) is raised as
:class:`TicketlabError` with two parts: *what* is wrong and *how* to fix it. The CLI prints both
and exits non-zero without a traceback; ``--debug`` shows the traceback. Bugs stay ordinary
exceptions so that they are never mistaken for user errors.
"""

from __future__ import annotations


class TicketlabError(Exception):
    """A problem the user can fix. ``problem`` says what is wrong, ``fix`` says what to do."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem}\nFix: {fix}")


class RunBusy(TicketlabError):
    """Another live process holds the run directory's lock. A sweep skips such a cell instead
    of failing, so several sweeps (or a sweep and a hand-run command) can share one store."""
