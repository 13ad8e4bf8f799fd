"""The nine GLUE tasks, read from the official TSV files or from the Hugging Face hub.

Local files are the default in practice (the experiments must run offline and reproducibly),
so the TSV reader is strict: every way a file can be wrong (missing, wrong header, short row,
unknown label, empty) is a :class:`TicketlabError` that names the file, the line and the fix,
instead of a ``KeyError`` deep inside training. Label ids follow the hub's order so that a
model fine-tuned on hub data and one fine-tuned on local files agree on what each logit means.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, ClassVar

from ticketlab.errors import TicketlabError
from ticketlab.tasks.base import DataSource
from ticketlab.tasks.sequence_classification import SequenceClassificationTask

#: The hub dataset used when no local folder is given.
HUB_DATASET = "nyu-mll/glue"

_DATA_DIR_FIX = (
    "pass --data-dir pointing at the GLUE folder (the one containing e.g. SST-2/train.tsv) "
    "or at the task's own folder (containing train.tsv)"
)


def _folder_key(name: str) -> str:
    """Compare folder names loosely: ``SST-2``, ``sst2`` and ``Sst-2`` are the same folder."""
    return name.lower().replace("-", "").replace("_", "")


class GlueTask(SequenceClassificationTask):
    """One GLUE task; subclasses only declare their file format and metrics.

    ``split_files`` maps each split to its local file name and hub split name; ``columns``
    names the TSV columns that hold the first text, the optional second text and the label.
    ``label_values`` maps the label strings found in the files to ids (in hub order).
    """

    #: Official folder name inside the GLUE root, e.g. ``SST-2``.
    folder: ClassVar[str]
    #: Config name of :data:`HUB_DATASET`.
    hub_config: ClassVar[str]
    #: TSV header names of (text_a, text_b or None, label).
    columns: ClassVar[tuple[str, str | None, str]]
    #: Hub column names of (text_a, text_b or None); the hub's label column is ``label``.
    hub_columns: ClassVar[tuple[str, str | None]]
    #: Label string in the TSV -> label id; empty for regression.
    label_values: ClassVar[dict[str, int]] = {}
    #: Names for a headerless file's columns (CoLA); None when the file has a header row.
    headerless_columns: ClassVar[tuple[str, ...] | None] = None
    #: split -> (local file name, hub split name).
    split_files: ClassVar[dict[str, tuple[str, str]]] = {
        "train": ("train.tsv", "train"),
        "dev": ("dev.tsv", "validation"),
    }

    def __init__(self, source: DataSource | None = None) -> None:
        """``source`` is kept for a uniform :func:`get_task` signature; ``load`` gets its own."""
        self.source = source

    # ---- loading ---------------------------------------------------------------------------

    def load(self, source: DataSource, split: str) -> list[dict[str, Any]]:
        """Read ``split`` from ``source.path`` (GLUE root or task folder), or the hub if None."""
        if split not in self.split_files:
            raise TicketlabError(
                f"GLUE task {self.name} has no split {split!r}",
                f"use one of: {', '.join(self.split_files)}",
            )
        if source.path is None:
            return self._load_hub(split)
        return self.read_tsv(self.find_file(Path(source.path), split))

    def find_file(self, root: Path, split: str) -> Path:
        """Locate ``split``'s TSV under a GLUE root (``root/SST-2/dev.tsv``) or a task folder."""
        filename = self.split_files[split][0]
        if not root.exists():
            raise TicketlabError(f"data path {root} does not exist", _DATA_DIR_FIX)
        if not root.is_dir():
            raise TicketlabError(f"data path {root} is a file, not a folder", _DATA_DIR_FIX)
        task_dirs = [root / self.folder]
        task_dirs += sorted(
            child
            for child in root.iterdir()
            if child.is_dir()
            and child.name != self.folder
            and _folder_key(child.name) == _folder_key(self.folder)
        )
        for task_dir in task_dirs:
            if (task_dir / filename).is_file():
                return task_dir / filename
        if (root / filename).is_file():
            self._check_not_other_task(root)
            return root / filename
        raise TicketlabError(
            f"GLUE task {self.name}: no {filename} found "
            f"(looked for {root / self.folder / filename} and {root / filename})",
            _DATA_DIR_FIX,
        )

    def _check_not_other_task(self, folder: Path) -> None:
        """Catch ``--data-dir .../SST-2`` given for CoLA before it turns into a parse error."""
        for cls in GLUE_TASKS.values():
            if cls is not type(self) and _folder_key(folder.name) == _folder_key(cls.folder):
                raise TicketlabError(
                    f"data path {folder} looks like GLUE task {cls.name}'s folder "
                    f"({cls.folder}), but the task is {self.name}",
                    f"point --data-dir at the {self.folder} folder or the GLUE root, "
                    f"or run task {cls.name}",
                )

    def read_tsv(self, path: Path) -> list[dict[str, Any]]:
        """Parse one GLUE TSV into examples, validating header, row lengths and labels."""
        examples: list[dict[str, Any]] = []
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
                header = self._read_header(reader, path)
                wanted = [c for c in self.columns if c is not None]
                missing = [c for c in wanted if c not in header]
                if missing:
                    raise TicketlabError(
                        f"{path}: header lacks column(s) {', '.join(missing)}; expected columns "
                        f"{', '.join(wanted)} for GLUE task {self.name}, found {', '.join(header)}",
                        f"give the official GLUE {self.folder} file (see {_DATA_DIR_FIX})",
                    )
                a_col, b_col, label_col = self.columns
                ia, il = header.index(a_col), header.index(label_col)
                ib = header.index(b_col) if b_col is not None else None
                for row in reader:
                    if not row:  # a blank line, e.g. at the end of a hand-edited file
                        continue
                    line = reader.line_num
                    if len(row) < len(header):
                        raise TicketlabError(
                            f"{path}, line {line}: row has {len(row)} column(s), "
                            f"the header has {len(header)}",
                            "repair or remove that line (a stray tab or a truncated row)",
                        )
                    examples.append(
                        {
                            "text_a": row[ia],
                            "text_b": row[ib] if ib is not None else None,
                            "label": self._parse_label(row[il], path, line),
                            "idx": len(examples),
                        }
                    )
        except UnicodeDecodeError as exc:
            raise TicketlabError(
                f"{path} is not UTF-8 text ({exc})", "give the official GLUE file"
            ) from exc
        except csv.Error as exc:
            raise TicketlabError(f"{path}: cannot parse as TSV ({exc})", _DATA_DIR_FIX) from exc
        if not examples:
            raise TicketlabError(
                f"{path} has no examples (the file is empty or has only a header)",
                f"give the full GLUE {self.folder} file",
            )
        return examples

    def _read_header(self, reader: Any, path: Path) -> list[str]:
        """The header row, or the fixed column names of a headerless file (CoLA)."""
        if self.headerless_columns is not None:
            return list(self.headerless_columns)
        for row in reader:
            if row:
                return [name.strip() for name in row]
        raise TicketlabError(f"{path} is empty", f"give the full GLUE {self.folder} file")

    def _parse_label(self, value: str, path: Path, line: int) -> int | float:
        """Map a TSV label string to its id (or a STS-B score to a float), or fail clearly."""
        value = value.strip()
        if value in self.label_values:
            return self.label_values[value]
        allowed = ", ".join(repr(v) for v in self.label_values)
        raise TicketlabError(
            f"{path}, line {line}: label {value!r} is not one of GLUE task {self.name}'s "
            f"labels ({allowed})",
            f"fix that line or check that the file belongs to {self.folder}",
        )

    def _load_hub(self, split: str) -> list[dict[str, Any]]:
        """Read ``split`` from :data:`HUB_DATASET`; fail with a hint to use local files."""
        hub_split = self.split_files[split][1]
        try:
            import datasets

            rows = datasets.load_dataset(HUB_DATASET, self.hub_config, split=hub_split)
        except Exception as exc:  # any network/cache failure: the remedy is the same
            raise TicketlabError(
                f"could not load GLUE {self.hub_config}/{hub_split} from the Hugging Face hub "
                f"({HUB_DATASET}): the hub could not be reached ({type(exc).__name__}: {exc})",
                _DATA_DIR_FIX,
            ) from exc
        a_col, b_col = self.hub_columns
        cast = float if self.regression else int
        examples = [
            {
                "text_a": row[a_col],
                "text_b": row[b_col] if b_col is not None else None,
                "label": cast(row["label"]),
                "idx": int(row.get("idx", i)),
            }
            for i, row in enumerate(rows)
        ]
        if not examples:
            raise TicketlabError(
                f"GLUE {self.hub_config}/{hub_split} from the hub is empty", _DATA_DIR_FIX
            )
        return examples


_BINARY = {"0": 0, "1": 1}
_ENTAILMENT = {"entailment": 0, "not_entailment": 1}


class ColaTask(GlueTask):
    """CoLA: is a sentence grammatical? Headerless TSV; scored by Matthews correlation."""

    name = "cola"
    folder = "CoLA"
    hub_config = "cola"
    headerless_columns = ("source", "label", "original_mark", "sentence")
    columns = ("sentence", None, "label")
    hub_columns = ("sentence", None)
    label_values = _BINARY
    label_names = ("unacceptable", "acceptable")
    main_metric = "matthews_correlation"
    metrics = ("matthews_correlation", "accuracy")


class Sst2Task(GlueTask):
    """SST-2: binary sentiment of movie-review phrases."""

    name = "sst2"
    folder = "SST-2"
    hub_config = "sst2"
    columns = ("sentence", None, "label")
    hub_columns = ("sentence", None)
    label_values = _BINARY
    label_names = ("negative", "positive")


class MrpcTask(GlueTask):
    """MRPC: are two news sentences paraphrases? Accuracy and F1 of the positive class."""

    name = "mrpc"
    folder = "MRPC"
    hub_config = "mrpc"
    columns = ("#1 String", "#2 String", "Quality")
    hub_columns = ("sentence1", "sentence2")
    label_values = _BINARY
    label_names = ("not_equivalent", "equivalent")
    metrics = ("accuracy", "f1")


class QqpTask(GlueTask):
    """QQP: are two Quora questions duplicates? Accuracy and F1 of the positive class."""

    name = "qqp"
    folder = "QQP"
    hub_config = "qqp"
    columns = ("question1", "question2", "is_duplicate")
    hub_columns = ("question1", "question2")
    label_values = _BINARY
    label_names = ("not_duplicate", "duplicate")
    metrics = ("accuracy", "f1")


class StsbTask(GlueTask):
    """STS-B: similarity score 0-5 of a sentence pair; regression with one output."""

    name = "stsb"
    folder = "STS-B"
    hub_config = "stsb"
    columns = ("sentence1", "sentence2", "score")
    hub_columns = ("sentence1", "sentence2")
    label_names = ()
    regression = True
    main_metric = "pearson"
    metrics = ("pearson", "spearmanr")

    def _parse_label(self, value: str, path: Path, line: int) -> float:
        """A score must be a number in [0, 5]; anything else means a corrupt or foreign file."""
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not math.isfinite(score):
            raise TicketlabError(
                f"{path}, line {line}: STS-B score {value!r} is not a number",
                "fix that line; scores are numbers between 0 and 5",
            )
        if not 0.0 <= score <= 5.0:
            raise TicketlabError(
                f"{path}, line {line}: STS-B score {value!r} is outside the range 0 to 5",
                "fix that line; scores are numbers between 0 and 5",
            )
        return score


class MnliTask(GlueTask):
    """MNLI: three-way entailment; evaluated on matched and mismatched (``mm_``) dev sets."""

    name = "mnli"
    folder = "MNLI"
    hub_config = "mnli"
    columns = ("sentence1", "sentence2", "gold_label")
    hub_columns = ("premise", "hypothesis")
    label_values = {"entailment": 0, "neutral": 1, "contradiction": 2}
    label_names = ("entailment", "neutral", "contradiction")
    eval_splits = {"dev_matched": "", "dev_mismatched": "mm_"}
    split_files = {
        "train": ("train.tsv", "train"),
        "dev_matched": ("dev_matched.tsv", "validation_matched"),
        "dev_mismatched": ("dev_mismatched.tsv", "validation_mismatched"),
    }


class QnliTask(GlueTask):
    """QNLI: does a Wikipedia sentence answer the question?"""

    name = "qnli"
    folder = "QNLI"
    hub_config = "qnli"
    columns = ("question", "sentence", "label")
    hub_columns = ("question", "sentence")
    label_values = _ENTAILMENT
    label_names = ("entailment", "not_entailment")


class RteTask(GlueTask):
    """RTE: two-way textual entailment."""

    name = "rte"
    folder = "RTE"
    hub_config = "rte"
    columns = ("sentence1", "sentence2", "label")
    hub_columns = ("sentence1", "sentence2")
    label_values = _ENTAILMENT
    label_names = ("entailment", "not_entailment")


class WnliTask(GlueTask):
    """WNLI: Winograd-schema entailment (labels 0 = not entailment, 1 = entailment)."""

    name = "wnli"
    folder = "WNLI"
    hub_config = "wnli"
    columns = ("sentence1", "sentence2", "label")
    hub_columns = ("sentence1", "sentence2")
    label_values = _BINARY
    label_names = ("not_entailment", "entailment")


#: Task name -> class, in the order GLUE lists them.
GLUE_TASKS: dict[str, type[GlueTask]] = {
    cls.name: cls
    for cls in (
        ColaTask,
        Sst2Task,
        MrpcTask,
        QqpTask,
        StsbTask,
        MnliTask,
        QnliTask,
        RteTask,
        WnliTask,
    )
}
