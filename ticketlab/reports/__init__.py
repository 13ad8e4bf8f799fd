"""Everything ticketlab shows: terminal tables, figures and report pages.

Experiments compute, reports render. The modules here take plain data (numbers, strings,
records read from the store, or small objects described by a :class:`typing.Protocol`) and
import nothing from :mod:`ticketlab.experiments`, so the experiments can use them without the
import circle they once had (analysis ↔ matching ↔ plots ↔ rewinding ↔ transfer).

- :mod:`.tables`: rich terminal tables that fit the terminal (dropping or wrapping the less
  useful columns first), their ``--json``/``--csv`` forms, and Table 2 as Markdown, CSV, LaTeX
  and JSON.
- :mod:`.figures`: every matplotlib figure (object API on the Agg canvas, no pyplot).
- :mod:`.documents`: report pages — Markdown, HTML — and the small TOML writer for specs.
"""
