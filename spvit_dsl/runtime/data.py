"""Runtime — data: the ``data`` settings → training and validation sets.

Input: the spec's ``data`` (with ``data_dir``, ``train_split``, ``val_split``: timm's ``--dataset``, ``--data-dir``,
``--train-split``, ``--val-split``) and the backbone :class:`~spvit_dsl.space.plan.Geometry` (image size, channels,
classes). Output: :class:`Data` (two map-style datasets, an optional timm Mixup and the training loss) and, per
epoch, resumable loaders (:func:`make_loader`) that shard with ``DistributedSampler`` under torchrun.

* ``digits`` — scikit-learn's 1797 real 8×8 digit images scaled to [0, 1], resized bilinearly to the spec's image
  size, channels replicated to ``in_chans``; a fixed 80/20 split drawn with seed 0.
* ``synthetic`` — deterministic random images (a per-class template plus per-image noise, each image generated from
  its index), so it is learnable, costs no memory and needs no files.
* a folder — ImageNet layout: per split a folder of class folders or an ImageNet-style tar of them, found as timm
  finds split folders (``train/``; ``validation/``, ``val/`` ...; and ``train.tar``, ``val.tar``).
* what ``timm.data.create_dataset`` reads: ``torch/NAME`` (torchvision sets from ``data_dir``, never downloaded),
  ``hfds/NAME`` (Hugging Face datasets, offline: a local folder or the cache in ``data_dir``), ``wds/NAME``
  (WebDataset shards in ``data_dir``, read by index). The last two need the ``data`` extra.

Everything but digits and synthetic goes through timm's pipeline: ``ImageDataset`` over timm's readers,
``create_transform`` with DeiT's augmentation, ``Mixup``/CutMix and label smoothing (SPViT §4), RGB adapted to the
backbone's channels. An unreadable image stops the search with a :class:`~spvit_dsl.lang.errors.UsageError` naming
the file (timm would silently skip it).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, TensorDataset

from ..compile.strategies import DATA, TORCH_FILES, data_problem, data_source
from ..lang.errors import UsageError
from ..space.plan import Geometry

__all__ = [
    "Data",
    "UnreadableImage",
    "data_of_settings",
    "data_options",
    "digits_tensors",
    "load_data",
    "make_loader",
]

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


# --------------------------------------------------------------------------------------------- timm's pipeline
def _strict_dataset_class() -> type:
    from PIL import Image
    from timm.data import ImageDataset

    class StrictImageDataset(ImageDataset):
        """timm's ImageDataset over any reader, but an unreadable image is an error naming the file instead of a
        silent skip, and with ``rng_key = (seed, epoch)`` set (training loaders) every random augmentation of an
        image is drawn from generators seeded by ``(seed, epoch, index)``: the same whatever was loaded before it,
        in whichever worker, so a resumed epoch augments exactly as an uninterrupted one."""

        rng_key: tuple[int, int] | None = None

        def __getitem__(self, index: int) -> tuple[Any, int]:
            if self.rng_key is None:
                return self._load(index)
            with seeded_rngs(_sample_seed(*self.rng_key, index)):
                return self._load(index)

        def _load(self, index: int) -> tuple[Any, int]:
            try:
                item, target = self.reader[index][:2]
                if isinstance(item, Image.Image):  # torchvision's in-memory sets (CIFAR, MNIST)
                    img = item.convert("RGB")
                else:
                    with item:
                        img = Image.open(item).convert("RGB")
            except (
                Exception
            ) as e:  # opening or decoding: OSError, ValueError, SyntaxError... for broken files
                raise UnreadableImage(
                    f"cannot read image {_where(self.reader, index)}: {' '.join(str(e).split()) or type(e).__name__}"
                ) from None
            if self.transform is not None:
                img = self.transform(img)
            return img, int(target)

    return StrictImageDataset


def _where(reader: Any, index: int) -> str:
    """A sample's file for messages: a path, ``archive.tar:member``, ``shard.tar:key`` or the sample's index."""
    name = reader.filename(index, absolute=True)
    root = str(getattr(reader, "root", "") or "")
    if not name:  # e.g. a Hugging Face image stored as bytes
        return f"sample {index} of split '{getattr(reader, 'split', '')}'"
    return f"{root}:{name}" if root.endswith(".tar") and not str(name).startswith(root) else str(name)


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


def _transforms(geometry: Geometry, augment: bool) -> tuple[Any, Any]:
    """timm's training and evaluation transforms at the backbone's image size, then its channel count."""
    from timm.data import create_transform
    from torchvision import transforms as T

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
    if geometry.in_chans == 3:
        return tf_train, tf_val
    chans = _Channels(geometry.in_chans)
    return T.Compose([tf_train, chans]), T.Compose([tf_val, chans])


def _assemble(readers: tuple[Any, Any], geometry: Geometry, label: str, augment: bool = True) -> Data:
    """Training, validation and plain training sets over two timm readers, with DeiT's augmentation, Mixup/CutMix
    and label smoothing (SPViT §4); the class count is checked against the backbone's."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    classes = _class_count(*readers)
    if classes > geometry.num_classes:
        raise UsageError(
            f"{label} has {classes} classes but the backbone has {geometry.num_classes} (set classes = {classes})"
        )
    tf_train, tf_val = _transforms(geometry, augment)
    cls = _strict_dataset_class()
    train, val = (
        cls(None, reader=readers[0], transform=tf_train),
        cls(None, reader=readers[1], transform=tf_val),
    )
    mixup = (
        Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=geometry.num_classes)
        if augment
        else None
    )
    loss = SoftTargetCrossEntropy() if mixup is not None else nn.CrossEntropyLoss(label_smoothing=0.1)
    plain = cls(None, reader=readers[0], transform=tf_val)
    return Data(train, val, classes, label, mixup, loss, plain)


def _class_count(*readers: Any) -> int:
    """The size of the first reader's class table (folders, torchvision, ClassLabel), at least the largest label
    + 1 (WebDataset's .cls files and plain integer labels have no table)."""
    table = getattr(readers[0], "class_to_idx", None) or getattr(readers[0], "class_name_to_idx", None)
    labels = [t for r in readers for t in reader_targets(r) or ()]
    return max(len(table or ()), max(labels, default=-1) + 1)


def reader_targets(reader: Any) -> list[int] | None:
    """Every label of a timm reader without decoding an image, where the reader keeps them; else None."""
    samples = getattr(reader, "samples", None)
    if isinstance(samples, list):  # timm's image folders: (path, target) pairs
        return [int(t) for _, t in samples]
    targets = getattr(reader, "targets", None)  # timm's tar reader, torchvision, WebDataset shards
    if targets is not None:
        return [int(t) for t in targets]
    if hasattr(reader, "iter_targets"):  # Hugging Face datasets: the label column alone
        return [int(t) for t in reader.iter_targets()]
    return None


# --------------------------------------------------------------------------------------------- folders and tar files
def _split_path(root: str, split: str) -> str | None:
    """timm's split search (``_search_split``): ``root/<split>`` or, for train and validation names, any of timm's
    synonyms (``val/``, ``valid/``, ``eval/`` ...); each also as ``<name>.tar`` (our addition); None: none exists
    (timm would read ``root`` itself)."""
    from timm.data.dataset_factory import _EVAL_SYNONYM, _TRAIN_SYNONYM

    name = split.split("[")[0]  # timm: "train[:10%]" names the folder train/
    names = [
        name,
        *(s for group in (_TRAIN_SYNONYM, _EVAL_SYNONYM) if name in group for s in group if s != name),
    ]
    for candidate in (os.path.join(root, n) + ext for n in names for ext in ("", ".tar")):
        if os.path.exists(candidate):
            return candidate
    return None


def _check_folder(path: str, splits: tuple[str, str]) -> tuple[str, str]:
    if not os.path.exists(path):
        raise UsageError(
            f"data folder not found: {path} (expected digits, synthetic or a folder with train/ and val/)"
        )
    if not os.path.isdir(path):
        raise UsageError(
            f"data path is not a folder: {path} (a tar file holds one split: put train.tar and val.tar in a folder)"
        )
    parts = []
    for split in splits:
        sub = _split_path(path, split)
        if sub is None:
            raise UsageError(
                f"data folder {path} has no {split.split('[')[0]}/ folder (expected the ImageNet layout: "
                "train/<class>/*.jpg and val/<class>/*.jpg, or train.tar and val.tar)"
            )
        if os.path.isdir(sub) and not _has_images(sub):
            raise UsageError(f"data folder {sub} is empty: no images in its class folders")
        parts.append(sub)
    return parts[0], parts[1]


def _has_images(folder: str) -> bool:
    for _root, _dirs, files in os.walk(folder):
        if any(f.lower().endswith(IMAGE_SUFFIXES) for f in files):
            return True
    return False


def _folder_reader(path: str, class_map: dict[str, int] | None = None) -> Any:
    """timm's reader of a class-folder tree or of an ImageNet-style tar (``<class>/<image>`` members); the tar
    reader reopens the archive per image, so loader workers never share a file offset."""
    from timm.data.readers.reader_image_folder import ReaderImageFolder
    from timm.data.readers.reader_image_in_tar import ReaderImageInTar

    if os.path.isfile(path) and not path.endswith(".tar"):
        raise UsageError(f"data split {path} is a file but not a .tar of class folders")
    try:
        if os.path.isfile(path):
            return ReaderImageInTar(path, class_map=class_map or "", cache_tarfiles=False)
        return ReaderImageFolder(path, class_map=class_map or "")
    except (RuntimeError, OSError, ValueError, tarfile.TarError) as e:
        what = "no images in class folders" if isinstance(e, ValueError) else " ".join(str(e).split())
        raise UsageError(f"cannot use data {path}: {what}") from None


def _folder(path: str, geometry: Geometry, splits: tuple[str, str] = ("train", "validation")) -> Data:
    train_dir, val_dir = _check_folder(path, splits)
    train = _folder_reader(train_dir)
    val = _folder_reader(val_dir, dict(getattr(train, "class_to_idx", None) or train.class_name_to_idx))
    return _assemble((train, val), geometry, f"data folder {path}")


# --------------------------------------------------------------------------------------------- timm's other formats
class _TorchvisionReader:
    """A timm-style reader over a torchvision dataset from ``timm.data.create_dataset("torch/NAME")``: file-backed
    sets (ImageFolder, ImageNet, Places365) give file handles, in-memory ones (CIFAR, MNIST) PIL images."""

    def __init__(self, dataset: Any, name: str) -> None:
        self.dataset, self.name = dataset, name
        # (path, target) pairs of the file-backed sets
        self.files = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
        targets = getattr(dataset, "targets", None)
        self.targets = None if targets is None else [int(t) for t in targets]
        names = getattr(dataset, "classes", None) or getattr(dataset, "all_categories", None) or ()
        self.class_to_idx = dict(
            getattr(dataset, "class_to_idx", None) or {c: i for i, c in enumerate(names)}
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if self.files is not None:
            path, target = self.files[index]
            return open(path, "rb"), int(target)
        image, target = self.dataset[index]
        return image, int(target)

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        return str(self.files[index][0]) if self.files is not None else f"{self.name}[{index}]"


def _torch_readers(name: str, root: str, splits: tuple[str, str]) -> tuple[Any, Any]:
    """torch/NAME as timm reads it (train split: timm's train names; anything else: the test or val set), never
    downloading; a missing or partial root is one line saying what it must hold."""
    from timm.data import create_dataset
    from timm.data.dataset_factory import _search_split

    name = name.lower()
    cls, files = TORCH_FILES[name]
    if not os.path.isdir(root):
        raise UsageError(f"data_dir not found: {root} (torch/{name} reads {files} there)")
    readers = []
    for split in splits:
        # timm reads data_dir itself when a folder set has no folder for the split: the training images
        if name in ("image_folder", "folder") and _search_split(root, split) == root:
            raise UsageError(
                f"data_dir {root} has no {split.split('[')[0]}/ folder (torch/{name} reads {files})"
            )
        try:
            dataset = create_dataset(f"torch/{name}", root=root, split=split, download=False)
        except (
            Exception
        ) as e:  # torchvision: RuntimeError for missing files, KeyError, EOFError... for broken
            raise UsageError(_torch_missing(name, root, e)) from None
        readers.append(_TorchvisionReader(dataset, f"torch/{name}:{split}"))
    return readers[0], readers[1]


def _torch_missing(name: str, root: str, error: Exception) -> str:
    cls, files = TORCH_FILES[name]
    reason = " ".join(str(error).split()) or type(error).__name__
    if name in ("image_folder", "folder", "imagenet"):
        return f"cannot read torch/{name} in {root}: {reason} (expected {files} there)"
    folder = files.split()[0].rstrip("/")
    fetch = f"fetch them once with torchvision.datasets.{cls}('{root}', download=True)"
    if os.path.basename(os.path.normpath(root)) == folder:
        parent = os.path.dirname(os.path.normpath(root)) or "."
        return f'torch/{name}: data_dir is the folder that holds {folder}/, i.e. data_dir = "{parent}"'
    if "/" in files.split()[0] and os.path.isdir(os.path.join(root, folder)):
        return (
            f"torch/{name}: {os.path.join(root, folder)} is there but torchvision rejects its files ({reason}): it "
            f"reads only the official {cls} files and checks their md5 sums; {fetch}"
        )
    return (
        f"torch/{name}: {cls} files missing or unreadable in {root} ({reason}): expected {files} there; spvit-dsl "
        f"never downloads: {fetch}"
    )


def _need(module: str, prefix: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"data '{prefix}/...' needs the {module} package: pip install 'spvit-dsl[data]'")


@contextlib.contextmanager
def _hf_offline() -> Iterator[Any]:
    """Hugging Face ``datasets`` with the hub switched off (a hub id is read from the cache), quietly; the
    library's settings are restored after the block."""
    datasets: Any = importlib.import_module("datasets")  # an optional package: imported by name, untyped
    config: Any = importlib.import_module("datasets.config")
    offline, bars = config.HF_HUB_OFFLINE, datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    config.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        config.HF_HUB_OFFLINE = offline
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _hfds_readers(name: str, root: str, splits: tuple[str, str]) -> tuple[Any, Any]:
    """hfds/NAME through timm's ReaderHfds, offline: NAME is a hub id in the cache at ``root`` (the default cache
    when empty) or a local folder of data files (parquet, arrow, an image folder). The image column is ``image``
    (timm's default) or else the first Image column; the label ``label`` or else the first ClassLabel column."""
    _need("datasets", "hfds")
    from timm.data.readers.reader_hfds import ReaderHfds

    name = os.path.expanduser(name)
    readers = []
    with _hf_offline() as datasets:
        for split in splits:
            try:
                features = datasets.load_dataset(name, split=split, cache_dir=root or None).features
                image = _column(features, "image", datasets.Image)
                target = _column(features, "label", datasets.ClassLabel)
                readers.append(ReaderHfds(name, root or None, split, input_key=image, target_key=target))
            except (OSError, ValueError, RuntimeError) as e:
                raise UsageError(_hfds_missing(name, root, split, e)) from None
    return readers[0], readers[1]


def _column(features: Any, preferred: str, kind: type) -> str:
    if preferred in features:
        return preferred
    return next((k for k, f in features.items() if isinstance(f, kind)), preferred)


def _hfds_missing(name: str, root: str, split: str, error: Exception) -> str:
    reason = " ".join(str(error).split()).rstrip(".") or type(error).__name__
    if isinstance(error, ConnectionError):  # neither a local folder nor in the cache
        cache = root or "the default cache (~/.cache/huggingface/datasets)"
        return (
            f"hfds/{name} is neither a local folder nor in the Hugging Face cache at {cache}; spvit-dsl reads "
            f"Hugging Face datasets offline: fill the cache once with datasets.load_dataset('{name}', "
            f"cache_dir=DATA_DIR) on a machine with network"
        )
    hint = "; set train_split / val_split to one of them" if "split" in reason.lower() else ""
    return f"cannot read hfds/{name} split '{split}': {reason}{hint}"


class _ShardReader:
    """WebDataset shards read by index (a search draws samples by index: resumable, shardable epochs). Samples
    are grouped as WebDataset groups tar members (the key is the path up to the first dot of the file name); the
    image is timm's first of ``jpg``, ``png``, ``webp``; the label is the ``.cls`` member or, when the split names an
    ``alt_label``, that field of the ``.json`` member (timm's ``ReaderWds``); samples labelled < 0 are left out."""

    IMAGE_KEYS = ("jpg", "png", "webp")

    def __init__(self, root: str, shards: list[str], alt_label: str = "") -> None:
        self.root, self.shards, self.alt_label = root, shards, alt_label
        self.entries: list[tuple[int, str, int, int]] = []  # shard, key, image offset, image size
        self.targets: list[int] = []
        for i, shard in enumerate(shards):
            self._index(i, shard)

    def _index(self, shard_index: int, path: str) -> None:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(path, mode="r:") as tf:  # uncompressed: images are read in place by offset
            for member in tf:
                key, dot, ext = _sample_key(member.name)
                if member.isfile() and dot:
                    groups.setdefault(key, {})[ext.lower()] = member
            for key, members in groups.items():
                image = next((members[k] for k in self.IMAGE_KEYS if k in members), None)
                target = self._target(tf, path, key, members) if image is not None else -1
                if image is not None and target >= 0:
                    self.entries.append((shard_index, key, image.offset_data, image.size))
                    self.targets.append(target)

    def _target(self, tf: tarfile.TarFile, path: str, key: str, members: dict[str, tarfile.TarInfo]) -> int:
        field = "json" if self.alt_label else "cls"
        if field not in members:
            raise UsageError(f"WebDataset sample {path}:{key} has no .{field} member (its label)")
        raw = tf.extractfile(members[field])
        text = raw.read().decode() if raw is not None else ""
        try:
            return int(json.loads(text)[self.alt_label]) if self.alt_label else int(text.strip())
        except (ValueError, KeyError, TypeError):
            raise UsageError(f"WebDataset sample {path}:{key}: unreadable label {text[:40]!r}") from None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        shard, _key, offset, size = self.entries[index]
        with open(self.shards[shard], "rb") as fh:
            fh.seek(offset)
            return io.BytesIO(fh.read(size)), self.targets[index]

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        shard, key, _offset, _size = self.entries[index]
        return f"{self.shards[shard]}:{key}"


def _sample_key(name: str) -> tuple[str, str, str]:
    """WebDataset's key rule: ``dir/n01440764_10026.seg.png`` → (``dir/n01440764_10026``, ".", ``seg.png``); a
    name without a dot, or starting with one, belongs to no sample (no dot returned)."""
    folder, base = os.path.split(name)
    key, dot, ext = base.partition(".")
    return (os.path.join(folder, key), dot, ext) if key else (name, "", "")


def _wds_readers(name: str, root: str, splits: tuple[str, str]) -> tuple[Any, Any]:
    """wds/NAME as timm's ``ReaderWds`` resolves a split (a name in ``root/_info.json``, or a brace pattern of shard
    files such as ``train-{0000..0009}.tar``), read by index from local uncompressed shards."""
    _need("webdataset", "wds")
    from timm.data.readers.reader_wds import ReaderWds

    if not os.path.isdir(root):
        raise UsageError(f"data_dir not found: {root} (wds/{name} reads .tar shards there)")
    readers = []
    for split in splits:
        try:
            info = ReaderWds(root=root, name=name, split=split).split_info
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(
                f"wds/{name} has no split '{split}' in {root}: {' '.join(str(e).split())} (name a split of "
                '_info.json, or shards by pattern: train_split = "train-{0000..0009}.tar")'
            ) from None
        shards = [os.path.join(root, f) for f in info.filenames]
        remote = next((s for s in shards if "://" in s or s.startswith("pipe:")), None)
        if remote is not None or not shards:
            raise UsageError(f"wds/{name} split '{split}' names no local shard files ({remote or 'none'})")
        try:
            readers.append(_ShardReader(root, shards, info.alt_label))
        except (OSError, tarfile.TarError) as e:
            raise UsageError(
                f"cannot read WebDataset shards of wds/{name}: {' '.join(str(e).split())}"
            ) from None
    return readers[0], readers[1]


_FORMATS: dict[str, Any] = {"torch": _torch_readers, "hfds": _hfds_readers, "wds": _wds_readers}


def data_of_settings(settings: Mapping[str, Any], geometry: Geometry) -> Data:
    """The data a search's settings name (``digits`` when they name none: a data-free strategy's)."""
    return load_data(str(settings.get("data", "digits")), geometry, **data_options(settings))


def data_options(settings: Mapping[str, Any]) -> dict[str, str]:
    """The keyword arguments of :func:`load_data` besides ``data`` from a search's settings (defaults where a
    setting is absent): ``load_data(str(settings["data"]), geometry, **data_options(settings))``."""
    return {
        key: str(settings.get(key, DATA[key].default)) for key in ("data_dir", "train_split", "val_split")
    }


def load_data(
    value: str,
    geometry: Geometry,
    *,
    data_dir: str = "",
    train_split: str = "train",
    val_split: str = "validation",
) -> Data:
    """``digits``, ``synthetic``, an ImageNet-layout folder (class folders or tar files per split), or what timm's
    ``create_dataset`` reads (``torch/NAME``, ``hfds/NAME``, ``wds/NAME`` at ``data_dir``); every problem is a
    one-line UsageError."""
    settings = {"data": value, "data_dir": data_dir, "train_split": train_split, "val_split": val_split}
    problem = data_problem(settings)
    if problem is not None:
        raise UsageError(f"{problem.message} ({problem.hint})")
    source = data_source(value)
    if source.kind == "digits":
        return _digits(geometry)
    if source.kind == "synthetic":
        return _synthetic(geometry)
    splits = (train_split, val_split)
    if source.kind == "folder":
        return _folder(os.path.expanduser(value), geometry, splits)
    readers = _FORMATS[source.kind](source.name, os.path.expanduser(data_dir), splits)
    for reader, split in zip(readers, splits, strict=True):
        if len(reader) == 0:
            raise UsageError(f"data '{value}' split '{split}' holds no images")
    return _assemble(readers, geometry, f"data '{value}'")


def labels_of(dataset: Dataset) -> list[int]:
    """The label of every sample, without decoding images where the dataset knows them (tensors, timm readers,
    synthetic images); otherwise by reading each sample."""
    if isinstance(dataset, TensorDataset):
        return [int(v) for v in dataset.tensors[1].tolist()]
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    targets = reader_targets(getattr(dataset, "reader", None))
    if targets is not None:
        return targets
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
