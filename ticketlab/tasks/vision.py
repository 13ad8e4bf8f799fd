"""Image classification tasks: CIFAR-10/100 in their official binary layout, two CIFAR-10
derived targets for transfer, any ImageFolder tree, and the hub.

Features keep the raw uint8 images (N×3×H×W; CIFAR's native 32×32), so 10,000 test images are
30 MB and featurising costs nothing. The collator does the rest per batch: the CV code's
training augmentation (random crop with zero padding of 1/8 of the side, horizontal flip;
VITA-Group/CV_LTH_Pre-training ``dataset.py:10-15``), then scaling to [0, 1], resizing to
``--image-size`` and the pre-trained model's normalisation (ImageNet's mean/std — the CV code
normalises with CIFAR's own statistics, ``dataset.py:9``; a pre-trained network expects the
statistics it was trained with). Evaluation batches are never augmented.

Augmentation is bit-reproducible: its random numbers come from the collator's own
``torch.Generator``, which the training loop reseeds with the run's seed at the start of every
training (``reseed``), so a level trained after a resume sees the same crops and flips as in an
uninterrupted run, whatever else drew from torch's global generator before.

The pickled "python version" of CIFAR is refused: loading it runs ``pickle``, which executes
whatever the file carries. Only the binary version (``cifar-10-binary.tar.gz``) is read.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ticketlab.errors import TicketlabError
from ticketlab.tasks.base import DataSource, Task, classification_worst_case

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
#: CIFAR-10 classes that are vehicles (the rest are animals): the 2- and 4-class targets.
CIFAR10_VEHICLES = (0, 1, 8, 9)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: The CV code's settings (VITA-Group/CV_LTH_Pre-training @ HEAD), each with where it is:
#:
#: - optimizer SGD, momentum 0.9, weight decay 2e-4 on every parameter:
#:   main_imp_downstream.py:112-114 (args at :49-50)
#: - lr 0.1: main_imp_downstream.py:48
#: - batch 256: main_imp_downstream.py:47 (the README's small-dataset command keeps it)
#: - 182 epochs a level: main_imp_downstream.py:51
#: - schedule: 1 warm-up epoch (linear, utils.py:191-200; main_imp_downstream.py:52), then
#:   ×0.1 at epochs 91 and 136 (MultiStepLR, main_imp_downstream.py:53, :115) — ticketlab's
#:   ``step`` schedule at 50 % and 75 % of the steps; warm-up 1/182 of the steps
#: - no gradient clipping (utils.py:73-75: backward, step)
#: - 20 % of the *remaining* weights per level: ``--rate 0.2`` (main_imp_downstream.py:57),
#:   applied by torch's ``prune.global_unstructured`` to the still-unpruned weights
#:   (pruning_utils.py:30-34), i.e. ticketlab's ``remaining`` schedule, global L1 ranking
#: - 19 pruning rounds (main_imp_downstream.py:56): 1 − 0.8^19 = 98.56 % sparsity
#: - rewinding to the pre-trained weights with the task head as first drawn
#:   (``--prune_type pt_trans``: main_imp_downstream.py:96-103, :225) = rewind step 0
#: - prunable: every Conv2d but ``conv1`` (pruning_utils.py:19-26); fc and BatchNorm never
#: - 32 px images (RandomCrop(32, padding=4), dataset.py:11)
PAPER_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 2e-4,
    "batch_size": 256, "epochs": 182.0, "warmup_ratio": 1 / 182, "lr_scheduler_type": "step",
    "max_grad_norm": 0.0, "rate": 0.2, "schedule": "remaining", "target_sparsity": 0.9856,
    "image_size": 32, "eval_batch_size": 256, "group_by_length": False,
    # Adversarial training and robust evaluation (used only with --adversarial/--eval-attack):
    # Double-Win-LTH's ticket search (main_adv.py:83-85, :321-323: advertorch LinfPGDAttack,
    # random start, pixels clipped to [0, 1]): L∞ ε 8/255, 3 steps of 16/(3·255). Its
    # evaluation attack (main_adv_eval.py:62-64) is PGD-20 with steps of 2/255; ticketlab's
    # --eval-attack-steps defaults to 10 with the training step size.
    "adv_norm": "linf", "adv_eps": 8 / 255, "adv_step": 16 / (3 * 255), "adv_steps": 3,
}


# --- reading the data -------------------------------------------------------------------------
def read_cifar_binary(path: Path, record_labels: int = 1, label_index: int = 0,
                      num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×3×32×32 uint8) and labels of one CIFAR binary file.

    A record is ``record_labels`` label bytes (CIFAR-10: 1; CIFAR-100: coarse then fine) and
    3,072 pixel bytes: 1,024 red, 1,024 green, 1,024 blue, rows top to bottom.
    """
    record = record_labels + 3072
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % record:
        raise TicketlabError(
            f"{path} is not a CIFAR binary file: {data.size:,} bytes is not a whole number of "
            f"{record:,}-byte records.",
            "Use the official binary version (cifar-10-binary.tar.gz / cifar-100-binary.tar.gz), "
            "unpacked unchanged.")
    rows = data.reshape(-1, record)
    labels = rows[:, label_index].astype(np.int64)
    if labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise TicketlabError(
            f"{path}: record {bad} has label {int(labels[bad])}, outside the {num_classes} "
            "classes.", "The file is damaged or of another dataset; restore the original.")
    return rows[:, record_labels:].reshape(-1, 3, 32, 32), labels


def _refuse_pickled(folder: Path) -> None:
    pickled = [p for p in (folder / "data_batch_1", folder / "cifar-10-batches-py",
                           folder / "cifar-100-python", folder / "train") if p.exists()]
    if pickled and not any(folder.glob("*.bin")):
        raise TicketlabError(
            f"{folder} holds the pickled python layout of CIFAR ({pickled[0].name}); ticketlab "
            "never unpickles data files, since loading a pickle runs the code it carries.",
            "Download the binary version instead (cifar-10-binary.tar.gz → "
            "cifar-10-batches-bin/, cifar-100-binary.tar.gz → cifar-100-binary/).")


def find_binary_folder(root: Path, name: str, marker: str) -> Path:
    """The folder holding ``marker`` (e.g. ``test_batch.bin``): ``root`` itself or its
    ``name`` sub-folder (``cifar-10-batches-bin``), or one level deeper."""
    for folder in (root, root / name, *sorted(p / name for p in root.iterdir() if p.is_dir())):
        if (folder / marker).is_file():
            return folder
    for folder in (root, root / name.replace("-bin", "-py"), root / "cifar-10-batches-py",
                   root / "cifar-100-python"):
        if folder.is_dir():
            _refuse_pickled(folder)
    raise TicketlabError(
        f"No {marker} in {root} or {root / name}: not the CIFAR binary layout.",
        f"Point --data-dir at the unpacked binary version ({name}/ with {marker}).")


def _class_names(folder: Path, file: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
    path = folder / file
    if not path.is_file():
        return fallback
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    return names if len(names) == len(fallback) else fallback


class ImageClassificationTask(Task):
    """An image classification task. Subclasses load examples ``{"image": uint8 3×H×W,
    "label": int}``; featurising, collation and metrics are shared."""

    head = "image-classification"
    inputs = "image"
    main_metric = "accuracy"
    train_split = "train"
    eval_splits = {"test": ""}
    feature_keys = ("pixel_values", "labels", "augment")
    length_key = None
    output_keys = ("logits",)
    settings = ("image_size",)
    paper_defaults = PAPER_DEFAULTS
    robust_evaluation = True
    #: Class names in label order.
    classes: tuple[str, ...] = ()

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.classes

    def worst_case(self, clean: Any, adversarial: Any, batch: dict[str, Any]) -> Any:
        """See :func:`ticketlab.tasks.base.classification_worst_case`."""
        return classification_worst_case(clean, adversarial, batch)

    def num_labels(self, train_examples: list[dict[str, Any]] | None = None) -> int:
        return len(self.classes)

    def featurize(self, examples: list[dict[str, Any]], processor: Any, max_length: int,
                  split: str) -> dict[str, Any]:
        """Stack the uint8 images (no copy beyond the stack); training features carry the
        ``augment`` flag the collator reads."""
        import torch

        if not examples:
            return {"pixel_values": torch.zeros(0, 3, 32, 32, dtype=torch.uint8),
                    "labels": torch.zeros(0, dtype=torch.long)}
        shapes = {tuple(ex["image"].shape) for ex in examples}
        if len(shapes) != 1:
            raise TicketlabError(
                f"task {self.name}: images of different sizes {sorted(shapes)[:3]}",
                "Use one size per split (ImageFolder images are resized on loading).")
        features = {"pixel_values": torch.from_numpy(np.stack([ex["image"] for ex in examples])),
                    "labels": torch.tensor([int(ex["label"]) for ex in examples])}
        if split == self.train_split:
            features["augment"] = torch.ones(len(examples), dtype=torch.bool)
        return features

    def collator(self, processor: Any) -> ImageCollator:
        spec = processor
        if spec is None or not hasattr(spec, "mean"):
            raise TicketlabError(f"Task {self.name} needs an image model's normalisation, not "
                                 f"{type(processor).__name__}.", "Use an image model.")
        return ImageCollator(spec.mean, spec.std, int(self.image_size))

    def compute_metrics(self, outputs: dict[str, np.ndarray], features: dict[str, Any],
                        examples: list[dict[str, Any]]) -> dict[str, float]:
        """Top-1 accuracy, and top-5 with more than 10 classes (CIFAR-100)."""
        return classification_metrics(np.asarray(outputs["logits"]),
                                       np.asarray(features["labels"]), len(self.classes))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: int
                           ) -> dict[str, float]:
    if len(logits) != len(labels):
        raise ValueError(f"{len(logits)} predictions but {len(labels)} labels")
    metrics = {"accuracy": float(np.mean(logits.argmax(-1) == labels))}
    if classes > 10:
        top5 = np.argsort(-logits, axis=-1)[:, :5]
        metrics["top5_accuracy"] = float(np.mean((top5 == labels[:, None]).any(-1)))
    return metrics


class ImageCollator:
    """uint8 images -> a normalised float batch: augmentation (training features only),
    [0, 1], resize to ``size``, (x − mean) / std. A class (not a closure) so DataLoader
    workers can pickle it."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], size: int,
                 seed: int = 0) -> None:
        import torch

        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation stream (the training loop calls this with the run's seed
        when a training starts: resumed levels repeat exactly)."""
        self.generator.manual_seed(seed)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        images = torch.stack([f["pixel_values"] for f in features])
        labels = torch.stack([torch.as_tensor(f["labels"]) for f in features]).long()
        if "augment" in features[0] and bool(features[0]["augment"]):
            images = crop_and_flip(images, self.generator)
        x = images.float().div_(255.0)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=self.size < x.shape[-1])
        x = (x - self.mean) / self.std
        return {"pixel_values": x.contiguous(), "labels": labels}


def crop_and_flip(images: Any, generator: Any) -> Any:
    """The CV code's training augmentation on a uint8 batch: pad each side by 1/8 of the
    image (4 px at 32) with zeros, take a random crop of the original size, flip half the
    images horizontally. One generator draw per batch, so the stream is reproducible."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        crop = padded[i, :, dy:dy + h, dx:dx + w]
        out[i] = crop.flip(-1) if flips[i] else crop
    return out


# --- CIFAR ------------------------------------------------------------------------------------
def _as_examples(images: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
    return [{"image": images[i], "label": int(labels[i])} for i in range(len(labels))]


class CifarTask(ImageClassificationTask):
    """CIFAR-10 (``--data-dir`` holding ``cifar-10-batches-bin/``: ``data_batch_1..5.bin``,
    ``test_batch.bin``) or, without ``--data-dir``, the hub's ``uoft-cs/cifar10``."""

    name = "cifar10"
    classes = CIFAR10_CLASSES
    folder = "cifar-10-batches-bin"
    hub_id = "uoft-cs/cifar10"
    hub_label = "label"

    def __init__(self, source: DataSource | None = None) -> None:
        super().__init__(source)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if source is not None and source.path is not None:
            self.classes = self._read_classes(source.path)

    def _read_classes(self, root: Path) -> tuple[str, ...]:
        try:
            folder = find_binary_folder(root, self.folder, "test_batch.bin")
        except TicketlabError:
            return type(self).classes
        return _class_names(folder, "batches.meta.txt", type(self).classes)

    def files(self, folder: Path, split: str) -> list[Path]:
        if split == "train":
            found = sorted(folder.glob("data_batch_*.bin"),
                           key=lambda p: int(p.stem.rsplit("_", 1)[-1])
                           if p.stem.rsplit("_", 1)[-1].isdigit() else 0)
            if not found:
                raise TicketlabError(f"No data_batch_*.bin in {folder}.",
                                     "Unpack the full CIFAR-10 binary archive there.")
            return found
        return [folder / "test_batch.bin"]

    def read(self, source: DataSource, split: str) -> tuple[np.ndarray, np.ndarray]:
        """All images and labels of ``split`` (cached: the collator never re-reads)."""
        self.check_split(split, ("train", "test"))
        if split in self._cache:
            return self._cache[split]
        if source.path is None:
            images, labels = self._from_hub(split)
        else:
            folder = find_binary_folder(source.path, self.folder, self.marker)
            parts = [self.read_file(f) for f in self.files(folder, split)]
            images = np.concatenate([p[0] for p in parts])
            labels = np.concatenate([p[1] for p in parts])
        self._cache[split] = (images, labels)
        return images, labels

    marker = "test_batch.bin"

    def read_file(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if not path.is_file():
            raise TicketlabError(f"{path} does not exist.",
                                 "Unpack the full CIFAR binary archive into --data-dir.")
        return read_cifar_binary(path, 1, 0, 10)  # the file's labels, before any relabel

    def _from_hub(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            import datasets

            ds = datasets.load_dataset(self.hub_id, split=split)
        except Exception as e:  # offline, no cache, the hub unreachable
            raise TicketlabError(
                f"Could not load {self.hub_id} ({split}) from the hub: "
                f"{str(e).splitlines()[0][:160]}",
                f"Pass --data-dir with the unpacked binary {self.folder}/ (offline), or go "
                "online.") from e
        column = "img" if "img" in ds.column_names else "image"
        images = np.stack([np.asarray(im.convert("RGB")).transpose(2, 0, 1) for im in ds[column]])
        return images.astype(np.uint8), np.asarray(ds[self.hub_label], dtype=np.int64)

    def load(self, source: DataSource, split: str) -> list[dict[str, Any]]:
        images, labels = self.read(source, split)
        return _as_examples(*self.relabel(images, labels))

    def relabel(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Derived tasks keep some classes and rename them; CIFAR itself keeps all."""
        return images, labels


class Cifar100Task(CifarTask):
    """CIFAR-100, fine labels (``cifar-100-binary/``: ``train.bin``, ``test.bin``; records
    carry a coarse and a fine label byte), or the hub's ``uoft-cs/cifar100``."""

    name = "cifar100"
    classes = tuple(f"class_{i}" for i in range(100))
    folder = "cifar-100-binary"
    marker = "test.bin"
    hub_id = "uoft-cs/cifar100"
    hub_label = "fine_label"

    def _read_classes(self, root: Path) -> tuple[str, ...]:
        try:
            folder = find_binary_folder(root, self.folder, self.marker)
        except TicketlabError:
            return type(self).classes
        return _class_names(folder, "fine_label_names.txt", type(self).classes)

    def files(self, folder: Path, split: str) -> list[Path]:
        return [folder / ("train.bin" if split == "train" else "test.bin")]

    def read_file(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        if not path.is_file():
            raise TicketlabError(f"{path} does not exist.",
                                 "Unpack the full CIFAR-100 binary archive into --data-dir.")
        return read_cifar_binary(path, 2, 1, 100)


class CifarAnimalsTask(CifarTask):
    """CIFAR-10 as 2 classes: its 4 vehicle classes (airplane, automobile, ship, truck) vs its
    6 animal classes. A second real target with another class count, for transfer."""

    name = "cifar10-animals"
    classes = ("vehicle", "animal")

    def _read_classes(self, root: Path) -> tuple[str, ...]:
        return type(self).classes

    def relabel(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return images, (~np.isin(labels, CIFAR10_VEHICLES)).astype(np.int64)


class CifarVehiclesTask(CifarTask):
    """CIFAR-10's 4 vehicle classes only (airplane, automobile, ship, truck → 0-3): a third
    target with other images and another class count."""

    name = "cifar10-vehicles"
    classes = tuple(CIFAR10_CLASSES[i] for i in CIFAR10_VEHICLES)

    def _read_classes(self, root: Path) -> tuple[str, ...]:
        return type(self).classes

    def relabel(self, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = np.isin(labels, CIFAR10_VEHICLES)
        lookup = np.full(10, -1, dtype=np.int64)
        lookup[list(CIFAR10_VEHICLES)] = np.arange(len(CIFAR10_VEHICLES))
        return images[keep], lookup[labels[keep]]


# --- ImageFolder ------------------------------------------------------------------------------
class ImageFolderTask(ImageClassificationTask):
    """Your own images: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` (or ``test/``) under
    ``--data-dir``, classes in sorted folder order (torchvision's ImageFolder convention).
    Each image is read with Pillow, converted to RGB, its shorter side resized to
    ``--image-size`` and centre-cropped to a square (stored as uint8 at that size)."""

    name = "imagefolder"
    eval_splits = {"val": ""}
    paper_defaults = {**PAPER_DEFAULTS, "image_size": 224}

    def __init__(self, source: DataSource | None = None) -> None:
        super().__init__(source)
        if source is not None and source.path is not None:
            self.classes = self._scan_classes(source.path)

    def _split_dir(self, root: Path, split: str) -> Path:
        names = ("train",) if split == "train" else ("val", "validation", "test")
        for name in names:
            if (root / name).is_dir():
                return root / name
        raise TicketlabError(f"No {'/'.join(names)} folder in {root}.",
                             f"Lay the data out as {root}/train/<class>/*.jpg and "
                             f"{root}/val/<class>/*.jpg.")

    def _scan_classes(self, root: Path) -> tuple[str, ...]:
        if not root.is_dir():
            raise TicketlabError(f"--data-dir {root} is not a folder.",
                                 "Point it at a folder with train/ and val/ sub-folders.")
        folder = self._split_dir(root, "train")
        classes = tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))
        if len(classes) < 2:
            raise TicketlabError(f"{folder} has {len(classes)} class folder(s); a classifier "
                                 "needs at least 2.", f"Put each class in its own folder under "
                                 f"{folder}.")
        return classes

    def load(self, source: DataSource, split: str) -> list[dict[str, Any]]:
        self.check_split(split, ("train", "val"))
        if source.path is None:
            raise TicketlabError("Task imagefolder needs --data-dir.",
                                 "Pass the folder holding train/<class>/ and val/<class>/.")
        try:
            from PIL import Image
        except ImportError as e:
            raise TicketlabError("Reading image files needs Pillow.",
                                 "Run: pip install pillow") from e
        folder = self._split_dir(source.path, split)
        present = sorted(p.name for p in folder.iterdir() if p.is_dir())
        unknown = [c for c in present if c not in self.classes]
        if unknown:
            raise TicketlabError(f"{folder} has class folders the training split lacks: "
                                 f"{', '.join(unknown[:5])}.",
                                 "Use the same class folders in train/ and val/.")
        examples = []
        for label, name in enumerate(self.classes):
            for path in sorted((folder / name).iterdir() if (folder / name).is_dir() else ()):
                if path.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                try:
                    with Image.open(path) as im:
                        image = square(im.convert("RGB"), int(self.image_size))
                except OSError as e:
                    raise TicketlabError(f"{path} is not a readable image ({e}).",
                                         "Remove or replace the file.") from e
                examples.append({"image": image, "label": label, "path": str(path)})
        return examples


def square(image: Any, size: int) -> np.ndarray:
    """A PIL image as uint8 3×size×size: shorter side resized to ``size`` (bilinear), then the
    centre crop."""
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                         Image.BILINEAR)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


#: name -> task class, for the task registry.
VISION_TASKS: dict[str, Callable[[DataSource | None], Task]] = {
    "cifar10": CifarTask,
    "cifar100": Cifar100Task,
    "cifar10-animals": CifarAnimalsTask,
    "cifar10-vehicles": CifarVehiclesTask,
    "imagefolder": ImageFolderTask,
}
