"""timm's dataset formats as search data (``torch/``, ``hfds/``, ``wds/``, ImageNet-style tars), each read from a
small dataset the test writes itself, offline; and the data settings' errors, at the setting in the spec.

Formats whose package is optional (``hfds/``: datasets, ``wds/``: webdataset; ``pip install -e ".[data]"``) skip
with that reason when the package is absent."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import struct
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from spvit_dsl.compile.strategies import data_problem, data_source
from spvit_dsl.lang.errors import UsageError
from spvit_dsl.runtime.data import data_options, labels_of, load_data, make_loader

needs_datasets = pytest.mark.skipif(
    importlib.util.find_spec("datasets") is None,
    reason="hfds/ needs the optional package datasets (pip install -e '.[data]')",
)
needs_webdataset = pytest.mark.skipif(
    importlib.util.find_spec("webdataset") is None,
    reason="wds/ needs the optional package webdataset (pip install -e '.[data]')",
)


def _geometry(img_size: int = 16, in_chans: int = 3, num_classes: int = 10) -> SimpleNamespace:
    """What the data stage reads of a backbone's geometry."""
    return SimpleNamespace(img_size=img_size, in_chans=in_chans, num_classes=num_classes)


def _png(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _one_line(error: pytest.ExceptionInfo[UsageError]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------------------------- torch/
def _cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """CIFAR-10's python batches (pickled dicts, 3072 bytes per image, channel-major), 4 images per training batch
    and 5 in the test batch; torchvision's md5 check is relaxed to "the file exists" (no made-up batch has the real
    files' sums). Returns the training labels in order."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels: list[int] = []
    for name, n, first in [*((f"data_batch_{i}", 4, 3 * i) for i in range(1, 6)), ("test_batch", 5, 0)]:
        batch = {
            "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            "labels": [(first + k) % 10 for k in range(n)],
        }
        labels += batch["labels"] if name != "test_batch" else []
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    return labels


def test_torch_cifar10_reads_the_python_batches(tmp_path, monkeypatch):
    labels = _cifar10(tmp_path / "cifar", monkeypatch)
    data = load_data("torch/cifar10", _geometry(), data_dir=str(tmp_path / "cifar"))
    assert (len(data.train), len(data.val), data.num_classes) == (
        20,
        5,
        10,
    )  # validation: the test batch (timm)
    assert labels_of(data.train) == labels and labels_of(data.val) == [0, 1, 2, 3, 4]
    x, y = data.train[3]
    assert x.shape == (3, 16, 16) and y == labels[3]
    xb, yb = next(iter(make_loader(data.train, 8, train=True, seed=0)))
    assert xb.shape == (8, 3, 16, 16) and yb.dtype == torch.long
    assert data.val[0][0].shape == (3, 16, 16) and data.val[0][1] == 0


def test_torch_cifar10_beyond_the_backbone_classes_is_one_line(tmp_path, monkeypatch):
    _cifar10(tmp_path / "cifar", monkeypatch)
    with pytest.raises(UsageError) as info:
        load_data("torch/cifar10", _geometry(num_classes=5), data_dir=str(tmp_path / "cifar"))
    assert _one_line(info) == "data 'torch/cifar10' has 10 classes but the backbone has 5 (set classes = 10)"


def _mnist(root: Path, train: int = 12, test: int = 6) -> None:
    """torchvision's MNIST files (IDX: a big-endian header, then one byte per pixel or label) in root/MNIST/raw/."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
        )
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


@pytest.mark.parametrize("chans", [1, 3])
def test_torch_mnist_adapts_to_the_backbone_channels(tmp_path, chans):
    _mnist(tmp_path)
    data = load_data("torch/mnist", _geometry(in_chans=chans), data_dir=str(tmp_path))
    assert (len(data.train), len(data.val), data.num_classes) == (12, 6, 10)
    assert labels_of(data.val) == [0, 1, 2, 3, 4, 5]
    x, _ = data.val[2]
    assert x.shape == (chans, 16, 16)
    if chans == 3:  # a grey image, replicated to RGB: only the per-channel normalisation differs
        assert not torch.equal(x[0], x[1])


def test_torch_missing_files_say_where_they_go_and_how_to_get_them(tmp_path):
    with pytest.raises(UsageError) as info:
        load_data("torch/cifar10", _geometry(), data_dir=str(tmp_path))
    line = _one_line(info)
    assert f"files missing or unreadable in {tmp_path}" in line
    assert "expected cifar-10-batches-py/ there" in line
    assert f"torchvision.datasets.CIFAR10('{tmp_path}', download=True)" in line
    assert not (tmp_path / "cifar-10-batches-py").exists()  # nothing was downloaded
    with pytest.raises(UsageError) as info:
        load_data("torch/mnist", _geometry(), data_dir=str(tmp_path / "nowhere"))
    assert (
        _one_line(info) == f"data_dir not found: {tmp_path / 'nowhere'} (torch/mnist reads MNIST/raw/ there)"
    )


def test_torch_image_folder_finds_timms_split_folders(tmp_path):
    for split, n in (("train", 3), ("validation", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(n):
                (tmp_path / split / cls / f"{k}.png").write_bytes(_png(k))
    data = load_data("torch/image_folder", _geometry(), data_dir=str(tmp_path))
    assert (len(data.train), len(data.val), data.num_classes) == (6, 4, 2)
    assert labels_of(data.val) == [0, 0, 1, 1]
    with pytest.raises(UsageError) as info:
        load_data("torch/image_folder", _geometry(), data_dir=str(tmp_path), val_split="test")
    assert "has no test/ folder" in _one_line(info)  # timm would read data_dir itself: the training images


# --------------------------------------------------------------------------------------------- ImageNet-style tars
def _class_tar(path: Path, classes: tuple[str, ...], per_class: int, broken: str = "") -> None:
    members = {f"{c}/{c}_{k}.png": _png(10 * i + k) for i, c in enumerate(classes) for k in range(per_class)}
    if broken:
        members[broken] = b"this is not an image"
    _tar(path, members)


def test_a_folder_of_split_tars_reads_like_class_folders(tmp_path):
    _class_tar(tmp_path / "train.tar", ("ant", "bee", "cat"), 3)
    _class_tar(tmp_path / "val.tar", ("bee", "cat"), 2)  # a class missing from val keeps its index
    data = load_data(str(tmp_path), _geometry())
    assert (len(data.train), len(data.val), data.num_classes) == (9, 4, 3)
    assert labels_of(data.train) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and labels_of(data.val) == [1, 1, 2, 2]
    assert data.train[4][0].shape == (3, 16, 16) and data.val[3][1] == 2
    again = load_data(str(tmp_path), _geometry(), train_split="train.tar", val_split="val.tar")
    assert labels_of(again.val) == labels_of(data.val)


def test_an_unreadable_image_in_a_tar_names_the_member(tmp_path):
    _class_tar(tmp_path / "train.tar", ("ant", "bee"), 2)
    _class_tar(tmp_path / "val.tar", ("ant", "bee"), 1, broken="bee/broken.png")
    data = load_data(str(tmp_path), _geometry())
    with pytest.raises(UsageError) as info:
        [data.val[i] for i in range(len(data.val))]
    assert _one_line(info).startswith(f"cannot read image {tmp_path / 'val.tar'}:bee/broken.png: ")


def test_a_tar_as_data_is_refused_with_the_layout(tmp_path):
    _class_tar(tmp_path / "train.tar", ("ant", "bee"), 2)
    with pytest.raises(UsageError) as info:
        load_data(str(tmp_path / "train.tar"), _geometry())
    assert "put train.tar and val.tar in a folder" in _one_line(info)


# --------------------------------------------------------------------------------------------- wds/
def _shards(root: Path, info: bool = True) -> None:
    """Two training shards and one validation shard (WebDataset: members ``key.png`` + ``key.cls``), described by
    timm's ``_info.json``."""
    splits = {"train": 2, "validation": 1}
    for split, count in splits.items():
        for s in range(count):
            members: dict[str, bytes] = {}
            for k in range(3):
                members[f"{split}_{s}_{k}.png"] = _png(100 * s + k)
                members[f"{split}_{s}_{k}.cls"] = str((k + 2 * s) % 5).encode()
            _tar(root / f"{split}-{s:04d}.tar", members)
    if info:
        described = {
            split: {
                "name": split,
                "num_samples": 3 * count,
                "filenames": [f"{split}-{s:04d}.tar" for s in range(count)],
                "shard_lengths": [3] * count,
            }
            for split, count in splits.items()
        }
        (root / "_info.json").write_text(json.dumps({"name": "toy", "splits": described}))


@needs_webdataset
def test_wds_shards_by_split_name_and_by_pattern(tmp_path):
    _shards(tmp_path)
    data = load_data("wds/toy", _geometry(), data_dir=str(tmp_path))
    assert (len(data.train), len(data.val), data.num_classes) == (
        6,
        3,
        5,
    )  # no class table: largest label + 1
    assert labels_of(data.train) == [0, 1, 2, 2, 3, 4] and labels_of(data.val) == [0, 1, 2]
    assert data.train[5][0].shape == (3, 16, 16) and data.train[5][1] == 4
    (tmp_path / "_info.json").unlink()
    shards = load_data(
        "wds/toy",
        _geometry(),
        data_dir=str(tmp_path),
        train_split="train-{0000..0001}.tar",
        val_split="validation-0000.tar",
    )
    assert labels_of(shards.train) == labels_of(data.train) and len(shards.val) == 3


@needs_webdataset
def test_wds_errors_are_one_line(tmp_path):
    _shards(tmp_path)
    with pytest.raises(UsageError) as info:
        load_data("wds/toy", _geometry(), data_dir=str(tmp_path), val_split="test")
    assert _one_line(info).startswith(f"wds/toy has no split 'test' in {tmp_path}: ")
    _tar(tmp_path / "validation-0000.tar", {"v_0.png": _png(0)})  # no label
    with pytest.raises(UsageError) as info:
        load_data("wds/toy", _geometry(), data_dir=str(tmp_path))
    assert (
        _one_line(info)
        == f"WebDataset sample {tmp_path / 'validation-0000.tar'}:v_0 has no .cls member (its label)"
    )


@needs_webdataset
def test_wds_loaders_resume_like_an_uninterrupted_epoch(tmp_path):
    """Shards are read by index, so a resumed epoch skips whole batches and augments the rest exactly as the
    uninterrupted epoch does (the folder path's guarantee)."""
    _shards(tmp_path)
    data = load_data("wds/toy", _geometry(), data_dir=str(tmp_path))
    full = [x for x, _ in make_loader(data.train, 2, train=True, seed=3, epoch=1)]
    resumed = [x for x, _ in make_loader(data.train, 2, train=True, seed=3, epoch=1, skip_batches=1)]
    assert len(full) == 3 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(full[1:], resumed, strict=True))


def test_a_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "webdataset" else real(name, *a)
    )
    with pytest.raises(UsageError) as info:
        load_data("wds/toy", _geometry(), data_dir=str(tmp_path))
    assert _one_line(info) == "data 'wds/...' needs the webdataset package: pip install 'spvit-dsl[data]'"


# --------------------------------------------------------------------------------------------- hfds/
def _hf_folder(root: Path) -> None:
    """A Hugging Face dataset as the Hub stores it: parquet files per split under data/; the image column is
    ``img`` (as in uoft-cs/cifar10), the label a ClassLabel of three names."""
    import datasets

    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"])}
    )
    for split, n in (("train", 6), ("test", 3)):
        rows = {
            "img": [{"bytes": _png(i), "path": None} for i in range(n)],
            "label": [i % 3 for i in range(n)],
        }
        (root / "data").mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(rows, features=features).to_parquet(
            root / "data" / f"{split}-00000-of-00001.parquet"
        )


@needs_datasets
def test_hfds_reads_a_local_folder_then_its_cache_offline(tmp_path, monkeypatch):
    import datasets.config

    offline = datasets.config.HF_HUB_OFFLINE
    monkeypatch.chdir(tmp_path)
    _hf_folder(tmp_path / "toy")
    cache = str(tmp_path / "cache")
    with pytest.raises(UsageError) as info:  # timm's default val_split: this dataset has train and test only
        load_data("hfds/toy", _geometry(), data_dir=cache)
    assert "split 'validation'" in _one_line(info) and "set train_split / val_split" in _one_line(info)
    data = load_data("hfds/toy", _geometry(), data_dir=cache, val_split="test")
    assert (len(data.train), len(data.val), data.num_classes) == (6, 3, 3)
    assert labels_of(data.train) == [0, 1, 2, 0, 1, 2] and data.val[2][0].shape == (3, 16, 16)
    (tmp_path / "toy").rename(tmp_path / "elsewhere")  # now only the cache in data_dir holds it
    cached = load_data("hfds/toy", _geometry(), data_dir=cache, val_split="test")
    assert labels_of(cached.val) == [0, 1, 2] and torch.equal(cached.val[1][0], data.val[1][0])
    assert datasets.config.HF_HUB_OFFLINE == offline  # the library's switch is restored after reading


@needs_datasets
def test_hfds_not_cached_is_one_line(tmp_path):
    with pytest.raises(UsageError) as info:
        load_data("hfds/someone/nothing", _geometry(), data_dir=str(tmp_path))
    line = _one_line(info)
    assert line.startswith(
        f"hfds/someone/nothing is neither a local folder nor in the Hugging Face cache at {tmp_path}"
    )
    assert "datasets.load_dataset('someone/nothing', cache_dir=DATA_DIR)" in line


# --------------------------------------------------------------------------------------------- the settings
def test_data_values_read_as_timm_reads_dataset_names():
    assert data_source("Torch/CIFAR10").kind == "torch" and data_source("Torch/CIFAR10").name == "CIFAR10"
    assert data_source("hfds/uoft-cs/cifar10").name == "uoft-cs/cifar10"
    assert data_source("data/imagenet").kind == "folder"  # not a timm prefix: a relative folder, as before
    assert data_source("digits").kind == "digits"
    ok = {"data": "torch/cifar10", "data_dir": "~/d", "train_split": "train", "val_split": "validation"}
    assert data_problem(ok) is None and data_problem({"seed": 0}) is None  # data-free strategies have no data
    unknown = data_problem(ok | {"data": "torch/svhn"})
    assert unknown is not None and unknown.hint.startswith(
        "expected one of: cifar10, cifar100, fashion_mnist"
    )
    assert data_problem(ok | {"data_dir": ""}).key == "data"
    assert data_problem(ok | {"data": "~/imagenet"}).key == "data_dir"
    assert data_problem(ok | {"data": "digits", "data_dir": "", "val_split": "test"}).key == "val_split"
    assert data_options({"data": "digits"}) == {
        "data_dir": "",
        "train_split": "train",
        "val_split": "validation",
    }


def test_digits_with_timm_settings_is_refused_at_run_time_too():
    with pytest.raises(UsageError) as info:
        load_data("digits", _geometry(), data_dir="~/data")
    assert _one_line(info).startswith("'data_dir' is the root of a torch/, hfds/ or wds/ dataset")
