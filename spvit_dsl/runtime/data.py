"""Runtime — data: a ``data`` setting (``digits`` | ``synthetic`` | a folder) → training and validation sets.

Input: the spec's ``data`` value and the backbone :class:`~spvit_dsl.space.plan.Geometry` (image size, channels, classes).
Output: :class:`Data` (two map-style datasets, an optional timm Mixup and the training loss) and, per epoch,
resumable loaders (:func:`make_loader`) that shard with ``DistributedSampler`` under torchrun.

* ``digits`` — scikit-learn's 1797 real 8×8 digit images scaled to [0, 1], resized bilinearly to the spec's image
  size, channels replicated to ``in_chans``; a fixed 80/20 split drawn with seed 0.
* ``synthetic`` — deterministic random images (a per-class template plus per-image noise, each image generated from
  its index), so it is learnable, costs no memory and needs no files.
* a folder — ImageNet layout (``train/`` and ``val/`` with one sub-folder per class) through timm's pipeline:
  ``ImageDataset``, ``create_transform`` with DeiT's augmentation, ``Mixup``/CutMix and label smoothing (SPViT §4).
  An unreadable image stops the search with a :class:`~spvit_dsl.lang.errors.UsageError` naming the file (timm would
  silently skip it).
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, TensorDataset

from ..lang.errors import UsageError
from ..space.plan import Geometry

__all__ = ["Data", "UnreadableImage", "load_data", "make_loader", "digits_tensors"]

SYNTHETIC_TRAIN, SYNTHETIC_VAL = 1024, 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class UnreadableImage(UsageError):
    """An image file of the data folder that PIL cannot decode."""


@dataclass
class Data:
    """What the search trains and validates on."""

    train: Dataset
    val: Dataset
    num_classes: int
    source: str  # "digits", "synthetic" or the folder
    mixup: Any = None  # timm Mixup (image folders) or None
    train_loss: nn.Module | None = None  # None: plain cross-entropy
    train_eval: Dataset | None = (
        None  # the training images with evaluation transforms (None: ``train`` has none)
    )

    def train_plain(self) -> Dataset:
        """The training images without augmentation (proxy sets, teachers' inputs)."""
        return self.train_eval if self.train_eval is not None else self.train

    def loss(self) -> nn.Module:
        return self.train_loss if self.train_loss is not None else nn.CrossEntropyLoss()


# --------------------------------------------------------------------------------------------- built-in sets
def _digits_arrays() -> tuple[Any, Any]:
    """scikit-learn's digits (images (1797, 8, 8) in 0..16, labels). Read from the file scikit-learn ships, located
    without importing scikit-learn (its import costs seconds); ``load_digits`` when the file is not there."""
    import gzip
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "datasets", "data", "digits.csv.gz")
        if os.path.isfile(path):
            with gzip.open(path, "rt") as fh:
                raw = np.loadtxt(fh, delimiter=",")
            return raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def digits_tensors(geometry: Geometry) -> tuple[Tensor, Tensor]:
    """All 1797 digits as (N, in_chans, img, img) floats in [0, 1] and their labels."""
    images, target = _digits_arrays()
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    size = geometry.img_size
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    x = x.repeat(1, geometry.in_chans, 1, 1)
    return x.contiguous(), torch.as_tensor(target, dtype=torch.long)


def _digits(geometry: Geometry) -> Data:
    if geometry.num_classes < 10:
        raise UsageError(
            f"data 'digits' has 10 classes but the backbone has {geometry.num_classes}; set classes = 10"
        )
    x, y = digits_tensors(geometry)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    train, val = order[:cut], order[cut:]
    return Data(TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), 10, "digits")


class SyntheticImages(Dataset):
    """Deterministic random images: ``template[label] + noise``, both drawn from seeds fixed by the index."""

    def __init__(self, geometry: Geometry, size: int, offset: int = 0) -> None:
        self.shape = (geometry.in_chans, geometry.img_size, geometry.img_size)
        self.classes = geometry.num_classes
        self.size, self.offset = size, offset
        gen = torch.Generator().manual_seed(1234)
        # templates at low resolution, upsampled: cheap for 224-pixel images and smooth enough to learn
        low = torch.randn(self.classes, self.shape[0], 8, 8, generator=gen)
        self.templates = F.interpolate(low, size=self.shape[1:], mode="bilinear", align_corners=False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        gen = torch.Generator().manual_seed(1_000_003 * (index + self.offset) + 17)
        label = int(torch.randint(self.classes, (1,), generator=gen))
        return self.templates[label] + 0.5 * torch.randn(self.shape, generator=gen), label

    def label(self, index: int) -> int:
        """The label of sample ``index`` without drawing its image."""
        gen = torch.Generator().manual_seed(1_000_003 * (index + self.offset) + 17)
        return int(torch.randint(self.classes, (1,), generator=gen))


def _synthetic(geometry: Geometry) -> Data:
    return Data(
        SyntheticImages(geometry, SYNTHETIC_TRAIN),
        SyntheticImages(geometry, SYNTHETIC_VAL, SYNTHETIC_TRAIN),
        geometry.num_classes,
        "synthetic",
    )


# --------------------------------------------------------------------------------------------- image folders
def _strict_dataset_class() -> type:
    from PIL import Image
    from timm.data import ImageDataset

    class StrictImageDataset(ImageDataset):
        """timm's ImageDataset, but an unreadable image is an error naming the file instead of a silent skip, and
        with ``rng_key = (seed, epoch)`` set (training loaders) every random augmentation of an image is drawn from
        generators seeded by ``(seed, epoch, index)``: the same whatever was loaded before it, in whichever worker,
        so a resumed epoch augments exactly as an uninterrupted one."""

        rng_key: tuple[int, int] | None = None

        def __getitem__(self, index: int) -> tuple[Any, int]:
            if self.rng_key is None:
                return self._load(index)
            with seeded_rngs(_sample_seed(*self.rng_key, index)):
                return self._load(index)

        def _load(self, index: int) -> tuple[Any, int]:
            path = self.reader.filename(index, absolute=True)
            fh, target = self.reader[index][:2]
            try:
                with fh:
                    img: Image.Image = Image.open(fh)
                    img = img.convert("RGB")
            except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... for broken files
                raise UnreadableImage(
                    f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}"
                ) from None
            if self.transform is not None:
                img = self.transform(img)
            return img, target

    return StrictImageDataset


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**62


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU generators (what torchvision and timm transforms draw from) for the
    block, and restore their previous states after it, so the caller's random streams are untouched."""
    state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])


def _check_folder(path: str) -> tuple[str, str]:
    if not os.path.exists(path):
        raise UsageError(
            f"data folder not found: {path} (expected digits, synthetic or a folder with train/ and val/)"
        )
    if not os.path.isdir(path):
        raise UsageError(f"data path is not a folder: {path}")
    parts = []
    for split in ("train", "val"):
        sub = os.path.join(path, split)
        if not os.path.isdir(sub):
            raise UsageError(
                f"data folder {path} has no {split}/ folder (expected the ImageNet layout: "
                "train/<class>/*.jpg and val/<class>/*.jpg)"
            )
        if not _has_images(sub):
            raise UsageError(f"data folder {sub} is empty: no images in its class folders")
        parts.append(sub)
    return parts[0], parts[1]


def _has_images(folder: str) -> bool:
    for _root, _dirs, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
            return True
    return False


class _Channels(nn.Module):
    """Adapt timm's RGB tensors to the backbone's ``in_chans`` (mean to one channel, or repeat)."""

    def __init__(self, chans: int) -> None:
        super().__init__()
        self.chans = chans

    def forward(self, x: Tensor) -> Tensor:
        if self.chans == 3:
            return x
        if self.chans == 1:
            return x.mean(0, keepdim=True)
        return x.repeat((self.chans + 2) // 3, 1, 1)[: self.chans]


def _folder(path: str, geometry: Geometry, augment: bool = True) -> Data:
    from timm.data import Mixup, create_transform
    from timm.loss import SoftTargetCrossEntropy
    from torchvision import transforms as T

    train_dir, val_dir = _check_folder(path)
    size = geometry.img_size
    tf_train = create_transform(
        size,
        is_training=True,
        # DeiT's RandAugment, magnitude clipped at 9: at 10 timm's posterize keeps 0 bits, which Pillow >= 10 refuses
        auto_augment="rand-m9-mstd0.5-inc1-mmax9" if augment else None,
        re_prob=0.25 if augment else 0.0,
        interpolation="bicubic",
    )
    tf_val = create_transform(size, is_training=False, interpolation="bicubic")
    if geometry.in_chans != 3:
        tf_train, tf_val = (
            T.Compose([tf_train, _Channels(geometry.in_chans)]),
            T.Compose([tf_val, _Channels(geometry.in_chans)]),
        )
    cls = _strict_dataset_class()
    try:
        train = cls(train_dir, transform=tf_train)
        val = cls(val_dir, transform=tf_val, class_map=_class_map(train))
    except (RuntimeError, OSError) as e:
        raise UsageError(f"cannot use data folder {path}: {' '.join(str(e).split())}") from None
    classes = len(train.reader.class_to_idx)
    if classes > geometry.num_classes:
        raise UsageError(
            f"data folder {path} has {classes} classes but the backbone has {geometry.num_classes}"
        )
    mixup = (
        Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=geometry.num_classes)
        if augment
        else None
    )
    loss = SoftTargetCrossEntropy() if mixup is not None else nn.CrossEntropyLoss(label_smoothing=0.1)
    plain = cls(train_dir, transform=tf_val, class_map=_class_map(train))
    return Data(train, val, classes, path, mixup, loss, plain)


def _class_map(train: Any) -> dict[str, int]:
    return dict(train.reader.class_to_idx)


def load_data(value: str, geometry: Geometry) -> Data:
    """``digits``, ``synthetic`` or an ImageNet-layout folder; every problem is a one-line UsageError."""
    if value == "digits":
        return _digits(geometry)
    if value == "synthetic":
        return _synthetic(geometry)
    return _folder(os.path.expanduser(value), geometry)


def labels_of(dataset: Dataset) -> list[int]:
    """The label of every sample, without decoding images where the dataset knows them (tensors, timm image
    folders, synthetic images); otherwise by reading each sample."""
    if isinstance(dataset, TensorDataset):
        return [int(v) for v in dataset.tensors[1].tolist()]
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    reader = getattr(dataset, "reader", None)
    samples = getattr(reader, "samples", None)
    if samples is not None:
        return [int(t) for _, t in samples]
    if isinstance(dataset, SyntheticImages):
        return [dataset.label(i) for i in range(len(dataset))]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


def per_class(labels: list[int], k: int, seed: int = 0) -> list[int]:
    """Indices of ``k`` samples of every class (fewer where a class has fewer), drawn with ``seed``, ascending."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for y in sorted(by_class):
        members = by_class[y]
        pick = torch.randperm(len(members), generator=gen)[:k].tolist()
        out += [members[j] for j in pick]
    return sorted(out)


# --------------------------------------------------------------------------------------------- loaders
class SkipSampler(Sampler[int]):
    """A ``DistributedSampler`` for one epoch, skipping the first ``skip`` indices (mid-epoch resume)."""

    def __init__(self, inner: DistributedSampler, skip: int = 0) -> None:
        self.inner, self.skip = inner, skip

    def __iter__(self) -> Iterator[int]:
        return iter(list(self.inner)[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.skip)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    epoch: int = 0,
    skip_batches: int = 0,
    rank: int = 0,
    world: int = 1,
    workers: int = 0,
    pin: bool = False,
) -> DataLoader:
    """One epoch's loader: deterministic order from ``(seed, epoch)``, sharded over ``world`` ranks; training
    drops the last partial batch when a full one exists (Mixup needs even batches). Evaluation shards are strided
    (rank, rank + world, ...): every image exactly once over all ranks, none repeated to even them out."""
    if not train:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=list(range(rank, len(dataset), world)),  # type: ignore[arg-type]
            num_workers=workers,
            pin_memory=pin,
        )
    shard: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train and world > 1
    )
    shard.set_epoch(epoch)
    drop_last = train and len(shard) >= batch_size
    if hasattr(dataset, "rng_key"):  # per-image augmentation seeds: (seed, epoch, index)
        dataset.rng_key = (seed, epoch)
    sampler = SkipSampler(shard, skip_batches * batch_size)
    gen = torch.Generator().manual_seed(
        seed * 100_003 + epoch
    )  # worker seeds; the global RNG stays untouched
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin,
        persistent_workers=False,
        generator=gen,
    )


def batches_per_epoch(dataset: Dataset, batch_size: int, *, world: int = 1) -> int:
    n = len(dataset) // world if world > 1 else len(dataset)  # type: ignore[arg-type]
    return n // batch_size if n >= batch_size else (1 if n else 0)
