"""Setting up a run: θ0, its prunable set, the task's data — all validated before any disk write.

Both IMP (:mod:`ticketlab.imp`) and single fine-tunes start here, so a bad path, an unknown task
or an empty split fails before a run directory exists (nothing half-written is left behind).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.hparams import DataHparams, RunHparams
from ticketlab.models import fingerprint, load_model, load_tokenizer, prunable_parameters
from ticketlab.tasks import get_task
from ticketlab.tasks.base import DataSource, Task
from ticketlab.tasks.mlm import missing_head_weights, name_tied_weights_once, train_mlm_head

if TYPE_CHECKING:
    from ticketlab.train import Runtime


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


def train_subset(examples: list[dict[str, Any]], data: DataHparams) -> list[dict[str, Any]]:
    """The training examples a run uses: all, the first ``max_train_samples``, or — with
    ``sample_seed`` — that many drawn at random (kept in file order)."""
    n = data.max_train_samples
    if not n or n >= len(examples):
        return examples
    if data.sample_seed is None:
        return examples[:n]
    keep = sorted(random.Random(data.sample_seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def prepare(hp: RunHparams, runtime: Runtime | None = None) -> Setup:
    """Load the task data and θ0 (seeded head), featurise, and find the prunable set.

    For MLM, a checkpoint without an MLM head is refused unless ``init_mlm_head_steps`` is set;
    then the head alone is trained first (on ``runtime``), so θ0 and γ0 include that head.
    """
    source = data_source(hp)
    task = get_task(hp.data.task, source)
    task.configure(hp.data)
    if hp.model.init_mlm_head_steps and task.head != "masked-lm":
        raise TicketlabError(
            f"--init-mlm-head trains a masked-language-model head, but task {hp.data.task} "
            f"uses a {task.head} head.", "Leave --init-mlm-head out (it is for --task mlm).")
    train_examples = train_subset(task.load(source, task.train_split), hp.data)
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
    name_tied_weights_once(model)  # BERT's MLM decoder is the word embedding: store it once
    if task.head == "masked-lm" and not hp.model.init_mlm_head_steps:
        missing = missing_head_weights(hp.model.model, hp.model.trust_remote_code)
        if missing:
            raise TicketlabError(
                f"{hp.model.model!r} has no MLM head: the checkpoint lacks {len(missing)} of its "
                f"weights ({', '.join(missing[:2])}, …), so every masked-token prediction would "
                "come from a random head.",
                "Pass --init-mlm-head N to first train the head alone for N steps (body frozen "
                "and not pruned), e.g. --init-mlm-head 500; or use a checkpoint that has its "
                "MLM head (e.g. bert-base-uncased).")
    prunable = prunable_parameters(model, hp.prune.prune_pooler, hp.prune.include,
                                   hp.prune.exclude)
    max_len = min(hp.data.max_length, getattr(tokenizer, "model_max_length", 10**6) or 10**6)
    train_features = task.featurize(train_examples, tokenizer, max_len, task.train_split)
    eval_sets = {
        split: (task.featurize(ex, tokenizer, max_len, split), ex)
        for split, ex in eval_examples.items()
    }
    collator = task.collator(tokenizer)
    if hp.model.init_mlm_head_steps:
        train_mlm_head(model, train_features, collator, hp.model.init_mlm_head_steps,
                       hp.train.batch_size, hp.train.seed, runtime)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Setup(hp=hp, task=task, tokenizer=tokenizer, model=model, prunable=prunable,
                 fingerprint=fingerprint(prunable), theta0=theta0,
                 train_features=train_features, eval_sets=eval_sets, collator=collator)
