"""``python -m ticketlab.cli``: the same app as the ``ticketlab`` script."""

from ticketlab.cli import main

main()
