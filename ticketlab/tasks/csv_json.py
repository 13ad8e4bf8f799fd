"""Text classification on the user's own data: CSV/TSV (task ``csv``) or JSON/JSONL (``json``).

This is how someone finds a ticket for their own problem without writing a task class. The data
is a folder with ``train.<ext>`` and ``dev.<ext>`` (or ``validation``/``test``), or explicit
``train_file``/``eval_file`` options. Labels are arbitrary strings; their ids come from the
sorted set of distinct TRAIN labels, so the same train file always gives the same mapping (a
ticket found in one run must mean the same logits in the next). Which columns hold the text,
the optional second text and the label is set through ``DataSource.options``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ticketlab.errors import TicketlabError
from ticketlab.tasks.base import DataSource, explicit_file
from ticketlab.tasks.sequence_classification import SequenceClassificationTask

#: Option keys understood in ``DataSource.options`` (all values are strings).
OPTIONS = ("text_column", "text_pair_column", "label_column", "train_file", "eval_file")

#: Extensions each task name looks for in a data folder, in order of preference.
EXTENSIONS = {"csv": (".csv", ".tsv"), "json": (".jsonl", ".json")}

#: File stems tried for the evaluation split, in order of preference.
EVAL_STEMS = ("dev", "validation", "test")

_OPTIONS_FIX = (
    "set the column options (text_column, text_pair_column, label_column) to columns that exist"
)


def _label_string(value: Any, where: str) -> str:
    """Normalise a label to a string: JSON ``1``, ``1.0`` and CSV ``"1"`` are the same label."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (str, float)):
        text = str(value).strip()
        if text:
            return text
    raise TicketlabError(
        f"{where}: label {value!r} is empty or not a string or number",
        "give every example a label",
    )


def _sort_key(label: str) -> tuple[int, str]:
    """Numeric order for integer labels ("2" < "10"), else plain string order."""
    return (int(label), label)


def sorted_labels(labels: set[str]) -> tuple[str, ...]:
    """The deterministic label order: numeric if every label is an integer, else lexicographic."""
    try:
        return tuple(sorted(labels, key=_sort_key))
    except ValueError:
        return tuple(sorted(labels))


class TextClassificationTask(SequenceClassificationTask):
    """Single-text or text-pair classification read from CSV/TSV or JSON/JSONL files.

    ``name`` is ``csv`` or ``json``: it picks which extensions a data folder is searched for and
    how an explicit file with an unknown extension is read. Explicit files with a known
    extension are read according to that extension.
    """

    main_metric = "accuracy"
    metrics = ("accuracy", "macro_f1")
    options = OPTIONS

    def __init__(self, name: str = "csv", source: DataSource | None = None) -> None:
        """``source`` lets :attr:`label_names` load the train labels before ``load`` is called."""
        if name not in EXTENSIONS:
            raise ValueError(f"unknown text-classification format {name!r}")
        self.name = name
        self.source = source
        self._labels: tuple[str, ...] | None = None
        self._labels_source: DataSource | None = None
        if source is not None:
            self._options(source)  # fail early on a misspelled option

    # ---- labels ----------------------------------------------------------------------------

    @property
    def label_names(self) -> tuple[str, ...]:
        """Sorted distinct TRAIN labels; loads the train file if that has not happened yet."""
        if self._labels is None:
            if self.source is None:
                raise RuntimeError(
                    f"task {self.name}: label_names needs the train data; call "
                    "load(source, 'train') first or construct the task with a source"
                )
            self.load(self.source, self.train_split)
        assert self._labels is not None
        return self._labels

    # ---- loading ---------------------------------------------------------------------------

    def load(self, source: DataSource, split: str) -> list[dict[str, Any]]:
        """Read ``train`` (which also fixes the label set) or ``dev`` examples."""
        if split not in (self.train_split, *self.eval_splits):
            raise TicketlabError(
                f"task {self.name} has no split {split!r}",
                f"use one of: {', '.join((self.train_split, *self.eval_splits))}",
            )
        opts = self._options(source)
        if split != self.train_split and (self._labels is None or self._labels_source != source):
            self.load(source, self.train_split)  # the label ids come from the train file
        path = self.find_file(source, split)
        records = list(self._records(path))
        if not records:
            raise TicketlabError(
                f"{path} has no examples (the file is empty or has only a header)",
                "give a file with at least one example",
            )
        text_col, pair_col = opts["text_column"], opts["text_pair_column"]
        label_col = opts["label_column"]
        raw: list[tuple[str, str | None, str]] = []
        for where, record in records:
            for col in (text_col, pair_col, label_col):
                if col and col not in record:
                    raise TicketlabError(
                        f"{where}: no column {col!r}; the columns are "
                        f"{', '.join(repr(k) for k in record) or '(none)'}",
                        _OPTIONS_FIX,
                    )
            text_a = self._text(record[text_col], where, text_col)
            text_b = self._text(record[pair_col], where, pair_col) if pair_col else None
            raw.append((text_a, text_b, _label_string(record[label_col], where)))

        if split == self.train_split:
            labels = sorted_labels({label for _, _, label in raw})
            if len(labels) < 2:
                raise TicketlabError(
                    f"{path}: only one distinct label ({', '.join(labels)}); classification "
                    "needs at least two",
                    "check label_column, or add examples of the other classes",
                )
            self._labels, self._labels_source = labels, source
        assert self._labels is not None
        label_ids = {label: i for i, label in enumerate(self._labels)}
        examples: list[dict[str, Any]] = []
        for (where, _), (text_a, text_b, label) in zip(records, raw, strict=True):
            if label not in label_ids:
                raise TicketlabError(
                    f"{where}: label {label!r} does not occur in the train file; the train "
                    f"labels are {', '.join(repr(x) for x in self._labels)}",
                    "fix the label or add examples of it to the train file",
                )
            examples.append(
                {
                    "text_a": text_a,
                    "text_b": text_b,
                    "label": label_ids[label],
                    "idx": len(examples),
                }
            )
        return examples

    def _options(self, source: DataSource) -> dict[str, str]:
        """Options with defaults filled in; an unknown key is an error (likely a typo)."""
        self.check_options(source)
        opts = {"text_column": "text", "text_pair_column": "", "label_column": "label"}
        opts.update(source.options)
        return opts

    @staticmethod
    def _text(value: Any, where: str, column: str) -> str:
        """Texts must be strings (numbers are accepted and stringified)."""
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise TicketlabError(
            f"{where}: column {column!r} holds {value!r}, not text",
            "give every example a text in that column",
        )

    def find_file(self, source: DataSource, split: str) -> Path:
        """The file for ``split``: an explicit option, else ``<stem>.<ext>`` in the folder."""
        option = self.file_option(split)
        if source.options.get(option):
            return explicit_file(source.options[option], option, source.path)
        if source.path is None:
            raise TicketlabError(
                f"task {self.name} needs data: no data folder and no {option} given",
                f"pass --data-dir with train/dev files, or set the {option} option",
            )
        root = Path(source.path)
        if not root.exists():
            raise TicketlabError(
                f"data path {root} does not exist", "pass an existing folder as --data-dir"
            )
        if not root.is_dir():
            raise TicketlabError(
                f"data path {root} is a file, not a folder",
                "pass its folder as --data-dir (holding train and dev files), "
                "or set the train_file and eval_file options",
            )
        stems = (self.train_split,) if split == self.train_split else EVAL_STEMS
        names = [stem + ext for stem in stems for ext in EXTENSIONS[self.name]]
        for name in names:
            if (root / name).is_file():
                return root / name
        other = next(n for n in EXTENSIONS if n != self.name)
        hint = ""
        if any((root / (s + e)).is_file() for s in stems for e in EXTENSIONS[other]):
            hint = f" (the folder has {other} files: use task {other})"
        raise TicketlabError(
            f"task {self.name}: no {split} file in {root}; looked for {', '.join(names)}{hint}",
            f"add one of those files, or set the {option} option",
        )

    def _records(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(location, record)`` pairs; the location names file and line for errors."""
        ext = path.suffix.lower()
        if ext in (".csv", ".tsv") or (ext not in (".json", ".jsonl") and self.name == "csv"):
            yield from self._csv_records(path, delimiter="\t" if ext == ".tsv" else ",")
        else:
            yield from self._json_records(path)

    @staticmethod
    def _csv_records(path: Path, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
        """CSV/TSV with a header row; a short row leaves its missing fields as None."""
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                reader = csv.DictReader(handle, delimiter=delimiter)
                if not reader.fieldnames:
                    raise TicketlabError(
                        f"{path} is empty", "give a file with a header row and examples"
                    )
                for row in reader:
                    where = f"{path}, line {reader.line_num}"
                    missing = [k for k, v in row.items() if k is not None and v is None]
                    if missing:
                        raise TicketlabError(
                            f"{where}: row has fewer fields than the header "
                            f"(no {', '.join(repr(k) for k in missing)})",
                            "repair that line (a missing delimiter or an unclosed quote)",
                        )
                    yield where, {k: v for k, v in row.items() if k is not None}
        except UnicodeDecodeError as exc:
            raise TicketlabError(f"{path} is not UTF-8 text ({exc})", "save it as UTF-8") from exc
        except csv.Error as exc:
            raise TicketlabError(f"{path}: cannot parse as CSV ({exc})", "repair it") from exc

    @staticmethod
    def _json_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
        """A JSON array of objects, or JSON Lines (one object per line)."""
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise TicketlabError(f"{path} is not UTF-8 text ({exc})", "save it as UTF-8") from exc
        if not text.strip():
            raise TicketlabError(f"{path} is empty", "give a file with at least one example")
        items: list[tuple[str, Any]] = []
        if text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TicketlabError(
                    f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})", "repair that line"
                ) from exc
            items = [(f"{path}, item {i}", obj) for i, obj in enumerate(data)]
        else:
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TicketlabError(
                        f"{path}, line {lineno}: invalid JSON ({exc.msg})",
                        "repair that line; JSON Lines files hold one object per line",
                    ) from exc
                items.append((f"{path}, line {lineno}", obj))
        for where, obj in items:
            if not isinstance(obj, dict):
                raise TicketlabError(
                    f"{where}: expected a JSON object, found {type(obj).__name__}",
                    'give one object per example, e.g. {"text": ..., "label": ...}',
                )
            yield where, obj
