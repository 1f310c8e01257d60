"""Search data: digits, synthetic, loaders (order, resume skipping, sharding)."""

from __future__ import annotations

import dataclasses

import torch
from _search_specs import SMALL

from spvit_dsl.compile.program import compile_text
from spvit_dsl.runtime.data import batches_per_epoch, digits_tensors, load_data, make_loader


def _geometry(**changes):
    g = compile_text(SMALL, "small.vit").space.geometry
    return dataclasses.replace(g, **changes)


def test_digits_are_sklearns_images_resized():
    from sklearn.datasets import load_digits

    g = _geometry(img_size=8, in_chans=1)
    x, y = digits_tensors(g)
    d = load_digits()
    assert x.shape == (1797, 1, 8, 8)
    assert torch.allclose(x[:, 0], torch.as_tensor(d.images, dtype=torch.float32) / 16.0)
    assert torch.equal(y, torch.as_tensor(d.target))


def test_digits_resize_range_channels_and_split():
    g = _geometry(img_size=16, in_chans=3)
    data = load_data("digits", g)
    x, y = data.train.tensors
    xv, _ = data.val.tensors
    assert x.shape[1:] == (3, 16, 16) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x[:, 0], x[:, 2])
    assert len(x) == int(0.8 * 1797) and len(x) + len(xv) == 1797
    assert torch.equal(load_data("digits", g).train.tensors[1], y)  # fixed split


def test_synthetic_is_deterministic_and_class_dependent():
    g = _geometry(img_size=16, in_chans=1)
    a, b = load_data("synthetic", g), load_data("synthetic", g)
    xa, ya = a.train[5]
    xb, yb = b.train[5]
    assert torch.equal(xa, xb) and ya == yb
    assert not torch.equal(a.train[5][0], a.val[5][0])
    same = [a.train[i][0] for i in range(200) if a.train[i][1] == ya][:10]
    other = [a.train[i][0] for i in range(200) if a.train[i][1] != ya][:10]
    d_same = torch.stack([(s - xa).pow(2).mean() for s in same[1:]]).mean()
    d_other = torch.stack([(o - xa).pow(2).mean() for o in other]).mean()
    assert d_same < d_other


def test_loader_order_is_seeded_and_resume_skips_whole_batches():
    ds = torch.utils.data.TensorDataset(torch.arange(50).float(), torch.arange(50))
    full = [b[1].tolist() for b in make_loader(ds, 8, train=True, seed=3, epoch=1)]
    again = [b[1].tolist() for b in make_loader(ds, 8, train=True, seed=3, epoch=1)]
    other = [b[1].tolist() for b in make_loader(ds, 8, train=True, seed=3, epoch=2)]
    skipped = [b[1].tolist() for b in make_loader(ds, 8, train=True, seed=3, epoch=1, skip_batches=2)]
    assert full == again and full != other
    assert skipped == full[2:]
    assert len(full) == batches_per_epoch(ds, 8) == 6  # the partial last batch is dropped


def test_loader_shards_are_disjoint():
    ds = torch.utils.data.TensorDataset(torch.arange(40).float(), torch.arange(40))
    shards = [
        [i for b in make_loader(ds, 4, train=True, seed=0, rank=r, world=2) for i in b[1].tolist()]
        for r in (0, 1)
    ]
    assert not set(shards[0]) & set(shards[1])
    assert len(shards[0]) == len(shards[1]) == 20
    assert batches_per_epoch(ds, 4, world=2) == 5


def test_image_folder_augmentation_never_crashes(tmp_path):
    """DeiT's RandAugment at magnitude 10 asks posterize for 0 bits, which Pillow refuses: about 1 image in 300
    would crash a training epoch. 3,000 augmented images (seeded draws) must all come out as tensors."""
    import random

    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            Image.new("RGB", (16, 16), (10, 120, 200)).save(folder / "x.png")
    program = compile_text(
        "backbone deit_tiny_patch16_224 { weights = none; image = 16; patch = 8; classes = 2 }\n", "aug.vit"
    )
    data = load_data(str(tmp_path), program.space.geometry)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(1500):
        for i in range(len(data.train)):
            x, _y = data.train[i]
            assert x.shape == (3, 16, 16)


def _noisy_folder(root, n: int = 6) -> str:
    import os

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for k in range(n):
                pixels = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{k}.png"))
    return str(root)


def test_image_folder_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    """A resumed epoch skips the batches already seen; every later image must be augmented exactly as in the
    uninterrupted epoch (RandAugment, random crops and erasing draw from (seed, epoch, index), not from whatever
    the loader drew before), and the caller's random streams are left untouched."""
    import random

    import numpy as np

    program = compile_text(SMALL, "small.vit")
    data = load_data(_noisy_folder(tmp_path / "imgs"), program.space.geometry)
    full = [x for x, _ in make_loader(data.train, 4, train=True, seed=3, epoch=1)]
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    resumed = [x for x, _ in make_loader(data.train, 4, train=True, seed=3, epoch=1, skip_batches=1)]
    assert len(resumed) == len(full) - 1 >= 1
    for a, b in zip(full[1:], resumed, strict=True):
        assert torch.equal(a, b)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
    other = [x for x, _ in make_loader(data.train, 4, train=True, seed=3, epoch=2)]
    assert not all(
        torch.equal(a, b) for a, b in zip(full, other, strict=False)
    )  # a new epoch, new augmentations
