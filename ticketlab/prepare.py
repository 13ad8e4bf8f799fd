"""Setting up a run: θ0, its prunable set, the task's data — all validated before any disk write.

IMP, single fine-tunes and every baseline start here, so a bad path, an unknown task, a model
of the wrong kind for the task, or an empty split fails before a run directory exists (nothing
half-written is left behind). What differs between model families (a tokenizer or an image
normalisation, which matrices are prunable, which names are the head) is asked of the family
(:mod:`ticketlab.families`); nothing here branches on text or images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ticketlab.errors import TicketlabError
from ticketlab.families import family_for
from ticketlab.families.base import Family
from ticketlab.hparams import DataHparams, RunHparams, TrainHparams
from ticketlab.models import fingerprint, prunable_parameters, tensor_digests
from ticketlab.tasks import get_task
from ticketlab.tasks.base import DataSource, Task

if TYPE_CHECKING:
    from ticketlab.hparams import Runtime


@dataclass
class Setup:
    """Everything a level needs: the model at θ0 with its head γ0, and featurised data."""

    hp: RunHparams
    task: Task
    family: Family
    processor: Any
    model: nn.Module
    prunable: dict[str, nn.Parameter]
    fingerprint: str
    theta0: dict[str, torch.Tensor]
    train_features: dict[str, Any]
    eval_sets: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]
    collator: Any
    #: Digest of every body tensor of θ0 (see :func:`ticketlab.models.tensor_digests`).
    digests: dict[str, str] = field(default_factory=dict)
    #: Body weights the checkpoint lacked (randomly initialised under the seed).
    missing: list[str] = field(default_factory=list)

    @property
    def tokenizer(self) -> Any:
        """The processor of a text model (kept under the name text users expect)."""
        return self.processor

    def head_names(self) -> list[str]:
        """Parameters outside the base model: the task head (γ), never pruned."""
        return self.family.head_names(self.model, self.theta0)

    def full_key(self, name: str) -> str:
        """State-dict key of a base-model-relative prunable name (``bert.`` + name)."""
        prefix = self.family.base_prefix(self.model)
        return f"{prefix}.{name}" if prefix else name

    def input_space(self) -> Any:
        """The family's adversarial input space for this model (pixels, word embeddings)."""
        return self.family.input_space(self.model, self.processor)

    def eval_attack(self) -> Any:
        """The evaluation attack of ``--eval-attack`` (None: standard evaluation only)."""
        hp = self.hp.train
        if hp.eval_attack == "none":
            return None
        from ticketlab.attacks import Attack

        if hp.adv_eps is None or hp.adv_step is None:
            raise TicketlabError(
                f"Task {self.hp.data.task} has no default attack budget for --eval-attack.",
                "Give --adv-eps and --adv-step (e.g. 0.0314 and 0.0078 for CIFAR images).")
        return Attack(hp.adv_eps, hp.adv_step, hp.eval_attack_steps, hp.adv_norm or "linf")

    def mask_meta(self) -> dict[str, Any]:
        """What every mask written from this setup records about θ0."""
        return {"fingerprint": self.fingerprint, "theta0": self.digests,
                "family": self.family.name, "model": self.hp.model.model}


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
    ``sample_seed`` — that many drawn at random (kept in file order); then, with
    ``train_fraction``, a stratified share of them."""
    n = data.max_train_samples
    if n and n < len(examples):
        if data.sample_seed is None:
            examples = examples[:n]
        else:
            keep = sorted(random.Random(data.sample_seed).sample(range(len(examples)), n))
            examples = [examples[i] for i in keep]
    if data.train_fraction is not None and data.train_fraction < 1:
        examples = stratified_fraction(examples, data.train_fraction, data.sample_seed or 0)
    return examples


def stratified_fraction(examples: list[dict[str, Any]], fraction: float, seed: int
                        ) -> list[dict[str, Any]]:
    """``fraction`` of the examples of every label (at least one each), drawn with ``seed``
    and kept in file order: a 1 % subset of CIFAR-10 still has every class, in proportion.
    Examples without a ``label`` (MLM lines, SQuAD questions) are drawn as one stratum."""
    rng = random.Random(seed)
    strata: dict[Any, list[int]] = {}
    for i, ex in enumerate(examples):
        strata.setdefault(ex.get("label") if isinstance(ex, dict) else None, []).append(i)
    keep: list[int] = []
    for key in sorted(strata, key=repr):
        members = strata[key]
        k = max(1, round(len(members) * fraction))
        keep += rng.sample(members, min(k, len(members)))
    return [examples[i] for i in sorted(keep)]


def load_examples(hp: RunHparams, task: Task, source: DataSource
                  ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """The run's training examples and every evaluation split's, refusing empty splits."""
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
    return train_examples, eval_examples


def prepare(hp: RunHparams, runtime: Runtime | None = None, family: Family | None = None
            ) -> Setup:
    """Load the task data and θ0 (seeded head), featurise, and find the prunable set.

    ``family`` overrides the one ``--model`` names (the Python API's
    :class:`~ticketlab.families.base.ModuleFamily` for any ``nn.Module``). For MLM, a
    checkpoint without an MLM head is refused unless ``init_mlm_head_steps`` is set; then the
    head alone is trained first (on ``runtime``), so θ0 and γ0 include that head.
    """
    source = data_source(hp)
    task = get_task(hp.data.task, source)
    task.configure(hp.data)
    fam = family or family_for(hp.model.model)
    if task.inputs != fam.inputs:
        raise TicketlabError(
            f"Task {hp.data.task} takes {task.inputs} inputs, but {hp.model.model!r} is a "
            f"{fam.name} model ({fam.inputs} inputs).",
            f"Pick a {task.inputs} model for this task (or a {fam.inputs} task for this model).")
    if hp.train.eval_attack != "none" and not task.robust_evaluation:
        raise TicketlabError(
            f"Task {hp.data.task} has no robust evaluation: --eval-attack scores classifiers "
            "by whether a prediction survives the attack.",
            "Leave --eval-attack out for this task (regression, span extraction, MLM).")
    if hp.model.init_mlm_head_steps and task.head != "masked-lm":
        raise TicketlabError(
            f"--init-mlm-head trains a masked-language-model head, but task {hp.data.task} "
            f"uses a {task.head} head.", "Leave --init-mlm-head out (it is for --task mlm).")
    train_examples, eval_examples = load_examples(hp, task, source)
    processor = fam.processor(hp.model.model, hp.model.trust_remote_code)
    loaded = fam.load(hp.model.model, task.head, task.num_labels(train_examples),
                      seed=hp.train.seed, trust_remote_code=hp.model.trust_remote_code)
    model = loaded.model
    check = getattr(fam, "check_processor", None)
    if check is not None:
        check(model, processor)
    if task.head == "masked-lm" and loaded.missing_head and not hp.model.init_mlm_head_steps:
        missing = loaded.missing_head
        raise TicketlabError(
            f"{hp.model.model!r} has no MLM head: the checkpoint lacks {len(missing)} of its "
            f"weights ({', '.join(missing[:2])}, …), so every masked-token prediction would "
            "come from a random head.",
            "Pass --init-mlm-head N to first train the head alone for N steps (body frozen "
            "and not pruned), e.g. --init-mlm-head 500; or use a checkpoint that has its "
            "MLM head (e.g. bert-base-uncased).")
    prunable = prunable_parameters(model, hp.prune.prune_pooler, hp.prune.include,
                                   hp.prune.exclude, loaded.missing,
                                   hp.model.prune_missing_weights, family=fam)
    max_len = fam.max_length(processor, hp.data.max_length)
    train_features = task.featurize(train_examples, processor, max_len, task.train_split)
    eval_sets = {split: (task.featurize(ex, processor, max_len, split), ex)
                 for split, ex in eval_examples.items()}
    collator = task.collator(processor)
    if hp.model.init_mlm_head_steps:
        train_missing_head(model, task, train_features, collator, hp.model.init_mlm_head_steps,
                           hp.train.batch_size, hp.train.seed, fam.base_module(model), runtime)
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    unpruned_missing = [] if hp.model.prune_missing_weights else loaded.missing
    digests = tensor_digests(fam.base_module(model).state_dict(), unpruned_missing)
    return Setup(hp=hp, task=task, family=fam, processor=processor, model=model,
                 prunable=prunable, fingerprint=fingerprint(prunable), theta0=theta0,
                 train_features=train_features, eval_sets=eval_sets, collator=collator,
                 digests=digests, missing=list(loaded.missing))


def train_missing_head(model: nn.Module, task: Task, features: dict[str, Any], collator: Any,
                       steps: int, batch_size: int, seed: int, body: nn.Module,
                       runtime: Runtime | None = None) -> Any:
    """Train only the task head for ``steps`` steps, the body frozen (and never pruned).

    Used for MLM on a checkpoint without its MLM head (``--init-mlm-head``): the shared
    training loop runs with every body parameter's ``requires_grad`` off, so the optimizer sees
    the head alone; the tied decoder weight *is* the word embedding, a body parameter, and
    stays as pre-trained. Returns the loop's :class:`~ticketlab.train.TrainResult`.
    """
    from ticketlab.hparams import Runtime
    from ticketlab.tasks.mlm import HEAD_INIT_LR
    from ticketlab.train import train

    hp = TrainHparams(lr=HEAD_INIT_LR, batch_size=batch_size, max_steps=steps, seed=seed,
                      group_by_length=False)
    params = list(body.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        return train(model, {}, None, features, collator, hp, runtime or Runtime(), seed=seed,
                     description="train head", forward=task.forward,
                     feature_keys=task.feature_keys, length_key=task.length_key)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
