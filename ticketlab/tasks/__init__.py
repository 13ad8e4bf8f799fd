"""Task registry: turns the name the user typed (``--task SST-2``) into a :class:`Task`.

Names are matched case-insensitively and ignoring ``-``/``_`` so that the official spellings
(``SST-2``, ``STS-B``) and the hub's (``sst2``, ``stsb``) all work. An unknown name is a
:class:`TicketlabError` that lists the known names and suggests the closest one.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from ticketlab.errors import TicketlabError
from ticketlab.tasks.base import DataSource, Task
from ticketlab.tasks.csv_json import TextClassificationTask
from ticketlab.tasks.glue import GLUE_TASKS
from ticketlab.tasks.mlm import MlmTask
from ticketlab.tasks.squad import SquadTask
from ticketlab.tasks.vision import VISION_TASKS

#: Canonical name -> factory(source) building the task.
_FACTORIES: dict[str, Callable[[DataSource | None], Task]] = {
    **GLUE_TASKS,
    "csv": lambda source: TextClassificationTask("csv", source),
    "json": lambda source: TextClassificationTask("json", source),
    "squad": SquadTask,
    "mlm": MlmTask,
    **VISION_TASKS,
}

#: Every task name :func:`get_task` accepts (canonical spellings).
TASK_NAMES: tuple[str, ...] = tuple(_FACTORIES)

#: Extra spellings -> canonical name (after lower-casing and dropping "-" and "_").
_ALIASES = {"jsonl": "json", "tsv": "csv", "maskedlm": "mlm",
            "cifar10animals": "cifar10-animals", "cifar10vehicles": "cifar10-vehicles",
            "images": "imagefolder"}


def _normalise(name: str) -> str:
    """``SST-2`` -> ``sst2``, ``sts_b`` -> ``stsb``: one key per task however it is spelled."""
    return name.strip().lower().replace("-", "").replace("_", "")


def get_task(name: str, source: DataSource | None = None) -> Task:
    """Build the task called ``name``; ``source`` is handed to tasks that need it up front."""
    key = _normalise(name)
    key = _ALIASES.get(key, key)
    if key not in _FACTORIES:
        close = difflib.get_close_matches(key, TASK_NAMES, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise TicketlabError(
            f"unknown task {name!r}",
            f"{hint}known tasks: {', '.join(TASK_NAMES)}",
        )
    return _FACTORIES[key](source)


def task_class(name: str) -> Task:
    """The task called ``name`` without its data: what :func:`ticketlab.hparams.build_hparams`
    reads (``paper_defaults``, ``options``)."""
    return get_task(name)


def task_label(task: str) -> str:
    """A task as tables and plots spell it: GLUE's own spelling (``sst2`` -> ``SST-2``),
    any other task by its name."""
    return GLUE_TASKS[task].folder if task in GLUE_TASKS else task


__all__ = ["TASK_NAMES", "DataSource", "Task", "get_task", "task_class", "task_label"]
