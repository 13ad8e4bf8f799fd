"""Masked language modelling (task ``mlm``, masked-lm head): BERT's pre-training task.

The paper's MLM tickets are the ones that transfer to every other task, so MLM is a task like
any other here: same ``find``/``finetune``, same training loop.

Data: raw text, one paragraph per line — WikiText's ``wiki.train.tokens``/``wiki.valid.tokens``
(``.raw`` too) or ``train.txt``/``valid.txt`` in a folder, explicit ``train_file``/``eval_file``
options, one text file (its last 5 % of lines become the evaluation split), or WikiText-103
from the hub when no data is given. A *sample* (``--max-train-samples``) is one non-empty line.

Features follow the paper's code (``TextDataset`` of HF's old ``run_language_modeling.py``):
the text is tokenised as one stream, cut into blocks of ``block_size - 2`` tokens, and each
block gets [CLS] … [SEP]; the incomplete last block is dropped. WikiText's ``<unk>``
placeholders become the tokenizer's unknown token, a special token that is never masked (there
is no word to predict there).

Masking: 15 % of the non-special tokens, of which 80 % become [MASK], 10 % a random token and
10 % stay, via ``transformers.DataCollatorForLanguageModeling`` — drawn anew for every training
batch, but drawn ONCE with a fixed seed for the evaluation blocks, so every level and every
seed is scored on exactly the same masked tokens. Metrics (computed per batch by
:meth:`MlmTask.batch_outputs`, so batch × length × vocabulary logits are never kept): masked-
token accuracy (the paper's MLM number, the main metric), the mean cross-entropy ``loss`` on
masked tokens, and ``perplexity`` = exp(loss).

A checkpoint without an MLM head (the offline MiniLM-L6 ships the bare encoder): its head
would be random, so ``find --task mlm`` refuses it unless ``--init-mlm-head N`` first trains the
head alone (:func:`ticketlab.prepare.train_missing_head`: body frozen and not pruned, N steps
on the same training blocks). The head is never prunable: the prunable set is the encoder's
layers, and the decoder's weight is the word-embedding matrix, which is not in it either.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ticketlab.errors import TicketlabError
from ticketlab.tasks.base import DataSource, Task, explicit_file

#: The hub dataset (and config) used when no local data is given: WikiText-103, as the paper.
HUB_DATASET, HUB_CONFIG = "Salesforce/wikitext", "wikitext-103-raw-v1"
#: Option keys understood in ``DataSource.options``.
OPTIONS = ("train_file", "eval_file")
#: BERT's masking: share of tokens chosen, and of those, the share replaced by [MASK] / random.
MLM_PROBABILITY, MASK_REPLACE_PROB, RANDOM_REPLACE_PROB = 0.15, 0.8, 0.1
#: Seed of the one fixed masking of the evaluation blocks (the same for every run).
EVAL_MASK_SEED = 20200723
#: Learning rate of ``--init-mlm-head``: a head trained from scratch on a frozen body needs far
#: more than fine-tuning's 5e-5 to get anywhere in a few hundred steps.
HEAD_INIT_LR = 1e-3
#: Share of lines held out for evaluation when the data is one text file.
HOLDOUT_SHARE = 0.05
#: split -> (file names tried in order, hub split name).
_SPLITS = {
    "train": (("wiki.train.tokens", "wiki.train.raw", "train.txt", "train.tokens"), "train"),
    "dev": (("wiki.valid.tokens", "wiki.valid.raw", "valid.txt", "validation.txt", "dev.txt"),
            "validation"),
}
_FILE_FIX = ("pass --data-dir pointing at a folder with wiki.train.tokens and wiki.valid.tokens "
             "(or train.txt and valid.txt), at one text file, or use --train-file/--eval-file")


class MlmCollator:
    """Training batches are masked on the fly; pre-masked evaluation blocks are only padded.

    The two cases are told apart by the features themselves: evaluation features carry their
    fixed ``labels``, training features do not. A class rather than a closure so DataLoader
    workers can pickle it.
    """

    def __init__(self, tokenizer: Any) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer = tokenizer
        self._mask = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=MLM_PROBABILITY, mask_replace_prob=MASK_REPLACE_PROB,
            random_replace_prob=RANDOM_REPLACE_PROB)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        if "labels" not in features[0]:
            return dict(self._mask(features))
        labels = [list(f["labels"]) for f in features]
        batch = dict(self.tokenizer.pad([{k: v for k, v in f.items() if k != "labels"}
                                         for f in features], return_tensors="pt"))
        width = batch["input_ids"].shape[1]
        batch["labels"] = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
        return batch


class MlmTask(Task):
    """Masked language modelling on raw text, scored by masked-token accuracy."""

    name = "mlm"
    options = OPTIONS
    head = "masked-lm"
    main_metric = "accuracy"
    eval_splits = {"dev": ""}
    output_keys = ()
    settings = ("block_size",)
    block_size: int
    #: The paper's code: lr 5e-5 (run_language_modeling's default), batch 16, one epoch; its
    #: blocks are 512 tokens, the default here is 128 (16× cheaper attention on a CPU).
    #: Evaluation batches are smaller because each one's logits are batch × block × vocabulary.
    paper_defaults = {"lr": 5e-5, "batch_size": 16, "epochs": 1.0, "block_size": 128,
                      "eval_batch_size": 32}

    # ---- loading ---------------------------------------------------------------------------

    def load(self, source: DataSource, split: str) -> list[dict[str, Any]]:
        """Non-empty lines of ``split`` as ``{"text": line}``."""
        self.check_split(split, list(_SPLITS))
        self.check_options(source)
        option = self.file_option(split)
        if source.options.get(option):
            lines = read_lines(explicit_file(source.options[option], option, source.path))
        elif source.path is None:
            lines = _load_hub(split)
        elif Path(source.path).is_file():
            lines = read_lines(Path(source.path))
            if not source.options.get("eval_file"):  # one file: hold out its tail for dev
                cut = len(lines) - max(1, round(len(lines) * HOLDOUT_SHARE))
                if cut < 1:
                    raise TicketlabError(
                        f"{source.path} has {len(lines)} line(s): too few to hold some out "
                        "for evaluation", "give a longer text, or an --eval-file")
                lines = lines[:cut] if split == self.train_split else lines[cut:]
        else:
            lines = read_lines(find_text_file(Path(source.path), split))
        return [{"text": line} for line in lines]

    def num_labels(self, train_examples: list[dict[str, Any]] | None = None) -> int:
        """Not used: the MLM head's outputs are the vocabulary."""
        return 0

    # ---- features --------------------------------------------------------------------------

    def featurize(
        self, examples: list[dict[str, Any]], tokenizer: Any, max_length: int, split: str
    ) -> dict[str, list]:
        """Blocks of ``block_size`` tokens; evaluation blocks come masked, with ``labels``.

        ``max_length`` is not used: for MLM the block size is the sequence length.
        """
        if tokenizer.mask_token_id is None:
            raise TicketlabError("the tokenizer has no [MASK] token, so it cannot do MLM",
                                 "use a BERT-family model's tokenizer")
        limit = getattr(tokenizer, "model_max_length", None) or 10**6
        if self.block_size > limit:
            raise TicketlabError(
                f"--block-size {self.block_size} is longer than the model's {limit} positions.",
                f"Use --block-size {min(limit, 512)} or less.")
        blocks = make_blocks([ex["text"] for ex in examples], tokenizer, self.block_size)
        if not blocks:
            raise TicketlabError(
                f"The {split} text of task mlm is shorter than one block of {self.block_size} "
                "tokens.", "Give more text (raise --max-train-samples/--max-eval-samples) or "
                "lower --block-size.")
        features: dict[str, list] = {"input_ids": blocks,
                                     "attention_mask": [[1] * len(b) for b in blocks]}
        if split != self.train_split:
            features["input_ids"], features["labels"] = fixed_masking(blocks, tokenizer)
            if not any(t != -100 for row in features["labels"] for t in row):
                raise TicketlabError(
                    f"The {split} text of task mlm is so short that no token was masked.",
                    "Give more evaluation text (raise --max-eval-samples).")
        return features

    def collator(self, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        """Dynamic 15 % / 80-10-10 masking for training; padding only for evaluation."""
        return MlmCollator(tokenizer)

    # ---- scoring ---------------------------------------------------------------------------

    def forward(self, model: Any, batch: dict[str, Any]) -> Any:
        """Vocabulary scores at the masked positions only: see :func:`masked_positions_forward`."""
        return masked_positions_forward(model, batch)

    def batch_outputs(self, outputs: Any, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Per block: masked tokens, how many were predicted right, and their summed loss.

        ``outputs.logits`` holds one row per masked token (:func:`masked_positions_forward`),
        in the row-major order of ``labels != -100``; sums go back to their blocks.
        """
        import torch

        labels = batch["labels"]
        chosen = labels != -100
        logits, gold = outputs.logits.detach(), labels[chosen]
        block = chosen.nonzero()[:, 0]
        zeros = torch.zeros(len(labels), dtype=torch.float64, device=labels.device)
        correct = zeros.index_add(0, block, (logits.argmax(-1) == gold).double())
        loss = zeros.index_add(0, block, torch.nn.functional.cross_entropy(
            logits.float(), gold, reduction="none").double())
        return {"masked": chosen.sum(1).cpu().numpy().astype(np.float64),
                "correct": correct.cpu().numpy(), "loss_sum": loss.cpu().numpy()}

    def compute_metrics(
        self,
        outputs: dict[str, np.ndarray],
        features: dict[str, list],
        examples: list[dict[str, Any]],
    ) -> dict[str, float]:
        """Masked-token accuracy, mean masked-token loss and perplexity over all blocks."""
        masked = float(np.sum(outputs["masked"]))
        if masked == 0:
            raise ValueError("no masked tokens to score")  # featurize guarantees some
        loss = float(np.sum(outputs["loss_sum"])) / masked
        return {"accuracy": float(np.sum(outputs["correct"])) / masked, "loss": loss,
                "perplexity": math.exp(min(loss, 700.0))}


def masked_positions_forward(model: Any, batch: dict[str, Any]) -> Any:
    """Run a masked-LM model with vocabulary scores computed only where ``labels`` != -100.

    Why: the output layer (hidden × vocabulary, 384 × 30,522 for MiniLM) applied at every
    position costs as much as the whole encoder, and 85 % of those scores are thrown away by
    the loss. A forward pre-hook on the model's output embedding (the decoder Linear every
    HF masked-LM exposes through ``get_output_embeddings``) keeps only the masked rows of its
    input, so the model returns ``logits`` of shape (masked tokens, vocabulary); the loss is
    the same mean cross-entropy over masked tokens the model computes itself. The call still
    goes through ``model(...)``, so a DDP wrapper synchronises gradients as usual. Returns a
    ``MaskedLMOutput`` with ``loss`` and those ``logits``.
    """
    import torch
    from transformers.modeling_outputs import MaskedLMOutput

    labels = batch.get("labels")
    decoder = getattr(model, "module", model).get_output_embeddings()
    if labels is None or decoder is None:
        return model(**batch)
    chosen = labels != -100
    handle = decoder.register_forward_pre_hook(lambda _module, args: (args[0][chosen],))
    try:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        handle.remove()
    loss = torch.nn.functional.cross_entropy(logits.float(), labels[chosen])
    return MaskedLMOutput(loss=loss, logits=logits)


# --------------------------------------------------------------------------------------------
# Text and blocks
# --------------------------------------------------------------------------------------------


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped; an empty file is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TicketlabError(f"{path} is not UTF-8 text ({exc})", _FILE_FIX) from exc
    except OSError as exc:
        raise TicketlabError(f"cannot read {path} ({exc})", _FILE_FIX) from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise TicketlabError(f"{path} has no text", "give a file with text in it")
    return lines


def find_text_file(root: Path, split: str) -> Path:
    """``split``'s file in ``root`` or in exactly one of its sub-folders (``wikitext-2/``)."""
    names = _SPLITS[split][0]
    for name in names:
        if (root / name).is_file():
            return root / name
    found = sorted({sub / name for sub in root.iterdir() if sub.is_dir()
                    for name in names if (sub / name).is_file()})
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise TicketlabError(
            f"task mlm: several {split} files under {root}: {', '.join(map(str, found))}",
            "point --data-dir at the one folder you mean")
    raise TicketlabError(f"task mlm: no {split} file in {root}; looked for {', '.join(names)}",
                         _FILE_FIX)


def make_blocks(texts: list[str], tokenizer: Any, block_size: int) -> list[list[int]]:
    """Tokenise ``texts`` as one stream and cut it into [CLS] + (block_size - 2) + [SEP] blocks.

    (``<s>`` … ``</s>`` for RoBERTa-style tokenizers, whose cls/sep tokens those are.)

    Tokenising line by line gives the same stream as tokenising the whole file at once (as the
    paper's code does): BERT's pre-tokeniser splits at every line break anyway.
    """
    if tokenizer.unk_token is not None:
        texts = [t.replace("<unk>", tokenizer.unk_token) for t in texts]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise TicketlabError("the tokenizer has no [CLS]/[SEP] tokens to frame a block with",
                             "use a BERT-family model's tokenizer")
    body = block_size - 2
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)["input_ids"]
    stream = list(itertools.chain.from_iterable(ids))
    return [[cls, *stream[i: i + body], sep] for i in range(0, len(stream) - body + 1, body)]


def fixed_masking(
    blocks: list[list[int]], tokenizer: Any
) -> tuple[list[list[int]], list[list[int]]]:
    """Mask evaluation blocks once, reproducibly: BERT's 15 % / 80-10-10 with a fixed seed.

    The collator's own seeded generator is used, so the result is independent of the global
    RNG and identical for every run that evaluates the same blocks.
    """
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(
        tokenizer, mlm_probability=MLM_PROBABILITY, mask_replace_prob=MASK_REPLACE_PROB,
        random_replace_prob=RANDOM_REPLACE_PROB, seed=EVAL_MASK_SEED)
    batch = collator([{"input_ids": b} for b in blocks])
    return batch["input_ids"].tolist(), batch["labels"].tolist()


def _load_hub(split: str) -> list[str]:
    hub_split = _SPLITS[split][1]
    try:
        import datasets

        rows = datasets.load_dataset(HUB_DATASET, HUB_CONFIG, split=hub_split)
    except Exception as exc:  # any network/cache failure: the remedy is the same
        raise TicketlabError(
            f"could not load {HUB_DATASET} ({HUB_CONFIG}) {hub_split} from the Hugging Face "
            f"hub: {type(exc).__name__}: {exc}", _FILE_FIX) from exc
    return [t.strip() for t in rows["text"] if t.strip()]
