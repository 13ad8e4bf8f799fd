"""Setting up a run: θ0, its prunable set, the task's data — all validated before any disk write.

Both IMP (:mod:`ticketlab.imp`) and single fine-tunes start here, so a bad path, an unknown task
or an empty split fails before a run directory exists (nothing half-written is left behind).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.hparams import RunHparams
from ticketlab.models import fingerprint, load_model, load_tokenizer, prunable_parameters
from ticketlab.tasks import get_task
from ticketlab.tasks.base import DataSource, Task


@dataclass
class Setup:
    """Everything a level needs: the model at θ0 with its head γ0, and featurised data."""

    hp: RunHparams
    task: Task
    tokenizer: Any
    model: nn.Module
    prunable: dict[str, nn.Parameter]
    fingerprint: str
    theta0: dict[str, torch.Tensor]
    train_features: dict[str, list]
    eval_sets: dict[str, tuple[dict[str, list], list[dict[str, Any]]]]
    collator: Any

    def head_names(self) -> list[str]:
        """Parameters outside the base model: the task head (γ), never pruned."""
        prefix = self.model.base_model_prefix + "."
        return [n for n in self.theta0 if not n.startswith(prefix)]


def data_source(hp: RunHparams) -> DataSource:
    path = Path(hp.data.data_dir).expanduser() if hp.data.data_dir else None
    if path is not None and not path.exists():
        raise TicketlabError(
            f"Data path {path} does not exist.",
            "Point --data-dir at the task's data folder (e.g. a GLUE folder with SST-2/).",
        )
    return DataSource(path=path, options=dict(hp.data.options))


def prepare(hp: RunHparams) -> Setup:
    """Load the task data and θ0 (seeded head), featurise, and find the prunable set."""
    source = data_source(hp)
    task = get_task(hp.data.task, source)
    train_examples = task.load(source, task.train_split)
    if hp.data.max_train_samples:
        train_examples = train_examples[: hp.data.max_train_samples]
    eval_examples = {}
    for split in task.eval_splits:
        examples = task.load(source, split)
        if hp.data.max_eval_samples:
            examples = examples[: hp.data.max_eval_samples]
        eval_examples[split] = examples
    for split, examples in [(task.train_split, train_examples), *eval_examples.items()]:
        if not examples:
            raise TicketlabError(f"The {split} split of {hp.data.task} is empty.",
                                 "Check the data files.")
    tokenizer = load_tokenizer(hp.model.model, hp.model.trust_remote_code)
    model = load_model(hp.model.model, task.head, task.num_labels(train_examples),
                       seed=hp.train.seed, trust_remote_code=hp.model.trust_remote_code,
                       tokenizer=tokenizer)
    prunable = prunable_parameters(model, hp.prune.prune_pooler, hp.prune.include,
                                   hp.prune.exclude)
    max_len = min(hp.data.max_length, getattr(tokenizer, "model_max_length", 10**6) or 10**6)
    train_features = task.featurize(train_examples, tokenizer, max_len, task.train_split)
    eval_sets = {
        split: (task.featurize(ex, tokenizer, max_len, split), ex)
        for split, ex in eval_examples.items()
    }
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Setup(hp=hp, task=task, tokenizer=tokenizer, model=model, prunable=prunable,
                 fingerprint=fingerprint(prunable), theta0=theta0,
                 train_features=train_features, eval_sets=eval_sets,
                 collator=task.collator(tokenizer))
