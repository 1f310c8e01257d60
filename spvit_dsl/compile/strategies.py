"""The search-strategy registry (compile stage, pure Python): names, kinds, settings and the group kinds searched.

A user names a strategy in ``search NAME { ... }``; the checker validates its settings from this table without
importing torch. The implementation (a plug-in receiving the supernet's unit groups, the cost model, data and
the budget) is registered under the same name in :mod:`spvit_dsl.search.methods` (see docs/strategies.md).

Three kinds of strategy, each with the settings that make sense for it:

* ``train`` — trains a masked supernet (spvit, ofb): data, batches and optimisation settings;
* ``score`` — scores units with data but trains nothing (upvit): data and batch settings;
* ``data_free`` — needs no data at all (magnitude, random, dimap): only the seed.

The data settings mirror timm's ``train.py`` (``--dataset``, ``--data-dir``, ``--train-split``, ``--val-split``):
:func:`check_data` refuses what is wrong with them before any file is read (an unknown torchvision name, a
missing ``data_dir``, a streaming format); :mod:`spvit_dsl.runtime.data` reads the files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .._registry import Registry
from ..lang.errors import Span, SpecError, did_you_mean

StrategyKind = Literal["train", "score", "data_free"]
SettingValue = int | float | str | bool  # the value of a search setting


@dataclass(frozen=True)
class Param:
    type: type  # int, float, str or bool
    default: SettingValue
    doc: str
    choices: tuple[str, ...] = ()  # the accepted values of a str setting (empty: any)
    bounds: tuple[float, float] | None = None  # the accepted range of a number setting (inclusive)


@dataclass(frozen=True)
class StrategyInfo:
    name: str
    doc: str
    decisions: frozenset[str]  # group kinds it can search: embed, attention, heads, head_dim, ffn, weights
    params: dict[str, Param] = field(default_factory=dict)
    kind: StrategyKind = "train"
    ordered: tuple[tuple[str, str], ...] = ()  # pairs of settings where the first must not exceed the second

    def misordered(self, values: dict[str, SettingValue]) -> tuple[str, str] | None:
        """The first pair of :attr:`ordered` whose first setting exceeds the second in ``values``, or None."""
        return next(((a, b) for a, b in self.ordered if float(values[a]) > float(values[b])), None)

    def settings(self) -> dict[str, Param]:
        """Every setting this strategy accepts: those of its kind, then its own."""
        return SETTINGS[self.kind] | self.params


STRATEGIES: Registry[StrategyInfo] = Registry("strategy")

# Settings every strategy understands, and those of strategies that read data / that train (the loop's knobs).
RUN: dict[str, Param] = {"seed": Param(int, 0, "seed of data order, random draws and init")}
DATA: dict[str, Param] = {
    "data": Param(
        str,
        "digits",
        "digits | synthetic | a folder (train/ and val/ class folders or .tar files) | torch/NAME, hfds/NAME or "
        "wds/NAME with data_dir (timm's --dataset)",
    ),
    "data_dir": Param(
        str, "", "the root of a torch/, hfds/ (cache folder) or wds/ dataset (timm's --data-dir)"
    ),
    "train_split": Param(str, "train", "the training split (timm's --train-split)"),
    "val_split": Param(str, "validation", "the validation split (timm's --val-split)"),
    "batch_size": Param(int, 64, "images per step (per process under torchrun)"),
    "workers": Param(int, 0, "data-loader worker processes"),
}
TRAIN: dict[str, Param] = {
    "epochs": Param(int, 10, "passes over the training data"),
    "steps": Param(int, 0, "stop after this many optimizer steps (0: no limit)"),
    "lr": Param(float, 1e-4, "AdamW learning rate of the weights"),
    "weight_decay": Param(float, 0.05, "AdamW weight decay of the weights (none on 1-D params and biases)"),
    "precision": Param(
        str,
        "auto",
        "autocast of the forward: auto (bf16 on CUDA, fp32 on CPU), fp32, or bf16 (on CPU too)",
        choices=("auto", "fp32", "bf16"),
    ),
}
RETIRED: dict[str, str] = {  # settings earlier versions took → what replaced them
    "dual_lr": "SPViT no longer uses a Lagrange multiplier: a scheduled price meets the budget; "
    "'budget_reach' sets by when (a fraction of the gate-training steps)",
}
SETTINGS: dict[str, dict[str, Param]] = {"train": RUN | DATA | TRAIN, "score": RUN | DATA, "data_free": RUN}
COMMON = SETTINGS["train"]  # every setting of a training strategy


def register_strategy(info: StrategyInfo) -> StrategyInfo:
    return STRATEGIES.register(info.name, info)


register_strategy(
    StrategyInfo(
        name="spvit",
        doc="SPViT: single-path MSA/conv weight sharing, binary gates on ops and FFN units (He et al., 2024)",
        decisions=frozenset({"attention", "ffn"}),
        params={
            "gate_lr": Param(float, 1e-3, "AdamW learning rate of the gate logits (no weight decay)"),
            "gate_init": Param(float, 1.5, "initial gate logit (sigmoid(1.5) ~ 0.82)"),
            "alpha": Param(
                float, 0.0, "softmax temperature of the head-mixing matrix (0: 1e-2 ViT, 1e2 Swin)"
            ),
            "budget_reach": Param(
                float,
                0.5,
                "fraction of the gate-training steps by which the derived network reaches the budget",
                bounds=(0.0, 1.0),
            ),
            "warmup_epochs": Param(float, 0.0, "epochs of weight-only training before the gates learn"),
            "cost_weight": Param(
                float,
                1.0,
                "weight of the relative cost of the gates' counts in the loss (teaches each gate its cost)",
                bounds=(0.0, 1e6),
            ),
            "gate_noise": Param(
                float,
                0.0,
                "scale of the logistic noise on training draws (1: SPViT's binary concrete; 0: the derived network)",
                bounds=(0.0, 10.0),
            ),
        },
    )
)


ALL_KINDS = frozenset({"embed", "attention", "heads", "head_dim", "ffn", "weights"})

register_strategy(
    StrategyInfo(
        name="magnitude",
        doc="data-free baseline: L1 norm per unit, normalised within each group kind, cut to the budget",
        decisions=ALL_KINDS,
        kind="data_free",
    )
)

register_strategy(
    StrategyInfo(
        name="random",
        doc="control: kept units drawn uniformly at random under the budget (seeded)",
        decisions=ALL_KINDS,
        kind="data_free",
    )
)

register_strategy(
    StrategyInfo(
        name="dimap",
        doc="DIMAP: data-free LAMP scores of single weights, one threshold per module (qkv, proj, mlp), bisected to "
        "the budget (arXiv 2404.13648); on ffn / heads / head_dim: the same scores summed per row (our extension)",
        decisions=frozenset({"weights", "ffn", "heads", "head_dim"}),
        params={
            "scope": Param(
                str,
                "module",
                "module: one threshold per module, QKV-M, PRJ-M, MLP-M (the paper); global: one for all layers",
                choices=("module", "global"),
            ),
            "semi_structured": Param(
                bool,
                False,
                "2:4 sparsity (our extension): a layer stays dense or keeps the 2 largest of every 4 consecutive "
                "weights of a row, for GPU sparse kernels; needs 0.5 among the layer's sparsity values",
            ),
        },
        kind="data_free",
    )
)

register_strategy(
    StrategyInfo(
        name="upvit",
        doc="UP-ViT: leave-one-out KL importance of embedding channels, attention channels and FFN neurons on a "
        "proxy set, regrouped heads (Yu & Wu, arXiv 2111.15127); ranges under a budget: our extension",
        decisions=frozenset({"embed", "heads", "head_dim", "ffn"}),
        params={
            "proxy_per_class": Param(
                int, 5, "proxy images per class taken from the training data (labels unused)"
            ),
            "units_per_pass": Param(
                int, 32, "units ablated per forward pass (the proxy batch repeated per unit)"
            ),
            "groups": Param(str, "all", "what to score: all, or a comma list of embed, attention, ffn"),
        },
        kind="score",
    )
)

register_strategy(
    StrategyInfo(
        name="ofb",
        doc="OFB: bi-masks (importance σ(S) and candidate-size logits α) learned in one stage with a budget loss, "
        "progressive shrinking and masked-image modelling (Ye et al., CVPR 2024, arXiv 2403.15835)",
        decisions=frozenset({"embed", "heads", "head_dim", "ffn"}),
        params={
            "arch_lr": Param(
                float,
                0.05,
                "AdamW learning rate of the candidate logits α (betas 0.5, 0.999; short runs need it high)",
            ),
            "decoder_lr": Param(float, 0.0, "AdamW learning rate of the MIM decoder and mask token (0: lr)"),
            "warmup_fraction": Param(
                float,
                0.2,
                "share of the run over which λ falls 0.99 → 0.1 and the MIM ratio rises (OFB: 20/100)",
                bounds=(0.0, 1.0),
            ),
            "budget_weight": Param(
                float,
                50.0,
                "weight of the squared budget gap (F(E[k]) − F_target)/F_dense (OFB: 5 over 100 epochs)",
            ),
            "onehot_weight": Param(float, 0.5, "weight of each choice's adaptive one-hot loss"),
            "shrink_threshold": Param(
                float,
                0.2,
                "drop a candidate when p ≤ threshold / K (K: active candidates)",
                bounds=(0.0, 1.0),
            ),
            "shrinks_per_epoch": Param(int, 3, "progressive-shrinking checks per epoch", bounds=(1, 1000)),
            "mim": Param(bool, True, "progressive masked image modelling while groups are searched"),
            "mim_start": Param(
                float, 0.05, "share of patch tokens masked at the start of the warm-up", bounds=(0.0, 0.9)
            ),
            "mim_end": Param(
                float, 0.25, "share of patch tokens masked from the end of the warm-up on", bounds=(0.0, 0.9)
            ),
        },
        ordered=(("mim_start", "mim_end"),),
    )
)


# --------------------------------------------------------------------------------------------- data settings
BUILTIN_DATA = ("digits", "synthetic")
FORMATS = ("torch", "hfds", "wds")  # timm's dataset prefixes that spvit-dsl reads
STREAMING = {  # timm's prefixes for iterable datasets, refused: a search reads samples by index (resumable epochs)
    "hfids": "use hfds/ with the dataset in a local cache or folder",
    "tfds": "TensorFlow datasets are not supported; use hfds/, wds/ or a folder",
}
# torch/NAME as timm 1.0 reads it (timm.data.create_dataset): torchvision's class, and what data_dir must hold
TORCH_FILES: dict[str, tuple[str, str]] = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py/"),
    "cifar100": ("CIFAR100", "cifar-100-python/"),
    "mnist": ("MNIST", "MNIST/raw/"),
    "kmnist": ("KMNIST", "KMNIST/raw/"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw/"),
    "qmnist": ("QMNIST", "QMNIST/raw/"),
    "inaturalist": ("INaturalist", "2021_train/ and 2021_valid/"),
    "inat": ("INaturalist", "2021_train/ and 2021_valid/"),
    "places365": (
        "Places365",
        "categories_places365.txt, places365_train_standard.txt and the image folders",
    ),
    "imagenet": (
        "ImageNet",
        "ILSVRC2012_devkit_t12.tar.gz, ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
    ),
    "image_folder": ("ImageFolder", "one folder per split (train/, validation/ or val/) of class folders"),
    "folder": ("ImageFolder", "one folder per split (train/, validation/ or val/) of class folders"),
}


@dataclass(frozen=True)
class DataSource:
    """A ``data`` value read as timm reads ``--dataset``: ``kind`` is digits, synthetic, folder (a path), one of
    :data:`FORMATS` or of :data:`STREAMING`; ``name`` is what follows the prefix (the path, for a folder)."""

    kind: str
    name: str


@dataclass(frozen=True)
class DataProblem:
    key: str  # the setting to blame
    message: str
    hint: str


def data_source(value: str) -> DataSource:
    """Only timm's prefix is case-insensitive (``Torch/cifar10``); a value without a known prefix is a folder."""
    if value in BUILTIN_DATA:
        return DataSource(value, "")
    prefix, sep, rest = value.partition("/")
    if sep and prefix.lower() in (*FORMATS, *STREAMING):
        return DataSource(prefix.lower(), rest)
    return DataSource("folder", value)


def data_problem(values: Mapping[str, SettingValue]) -> DataProblem | None:
    """What is wrong with the data settings before any file is read, or None (also for data-free strategies)."""
    if "data" not in values:
        return None
    value, root = str(values["data"]), str(values.get("data_dir", ""))
    source = data_source(value)
    if not value.strip():
        return DataProblem("data", "'data' is empty", DATA["data"].doc)
    if source.kind in STREAMING:
        return DataProblem(
            "data",
            f"data '{value}' streams its samples; a search reads them by index",
            STREAMING[source.kind],
        )
    if source.kind == "torch" and source.name.lower() not in TORCH_FILES:
        hint = did_you_mean(source.name.lower(), TORCH_FILES) or "expected one of: " + ", ".join(TORCH_FILES)
        return DataProblem("data", f"unknown torchvision dataset '{source.name}' in '{value}'", hint)
    if source.kind == "hfds" and not source.name.strip("/"):
        return DataProblem(
            "data",
            "'hfds/' needs a dataset name",
            "hfds/<hub id> (read from the Hugging Face cache in data_dir) or hfds/<a local folder of parquet files>",
        )
    if source.kind in ("torch", "wds") and not root:
        holds, hint = _root_hint(source)
        return DataProblem("data", f"data '{value}' needs data_dir, the folder that holds {holds}", hint)
    if root and source.kind not in FORMATS:
        what = f"data = {value}" if source.kind in BUILTIN_DATA else f'the folder data = "{value}"'
        return DataProblem(
            "data_dir",
            f"'data_dir' is the root of a torch/, hfds/ or wds/ dataset; {what} takes none",
            'drop data_dir, or name a dataset: data = "torch/cifar10"',
        )
    for key in ("train_split", "val_split"):
        split = str(values.get(key, DATA[key].default))
        if not split.strip():
            return DataProblem(key, f"'{key}' is empty", DATA[key].doc)
        if source.kind in BUILTIN_DATA and split != DATA[key].default:
            return DataProblem(
                key, f"'{key}' does not apply to data = {value}", f"{value} has a fixed split; drop {key}"
            )
    return None


def _root_hint(source: DataSource) -> tuple[str, str]:
    """What ``data_dir`` holds for a torch/ or wds/ dataset, and how to fill it."""
    if source.kind == "wds":
        return "its .tar shards", 'e.g. data_dir = "~/data/shards", with timm\'s _info.json naming the splits'
    cls, files = TORCH_FILES[source.name.lower()]
    return (
        files,
        f"spvit-dsl never downloads: torchvision.datasets.{cls}(DIR, download=True) fetches the files",
    )


def with_data(
    values: Mapping[str, SettingValue], data: str | None, data_dir: str | None = None
) -> dict[str, SettingValue]:
    """Search settings with ``--data`` / ``--data-dir`` applied. Other data than the spec's resets ``data_dir`` and the
    splits to their defaults: they belong to the spec's data."""
    out = dict(values)
    if data is not None and data != out.get("data"):
        for key in ("data_dir", "train_split", "val_split"):
            if key in out:
                out[key] = DATA[key].default
        out["data"] = data
    if data_dir is not None:
        out["data_dir"] = data_dir
    return out


def check_data(values: Mapping[str, SettingValue], spans: Mapping[str, Span], fallback: Span | None) -> None:
    """:func:`data_problem` as a :class:`SpecError` at the setting to blame (``spans``: the settings the spec
    sets; ``fallback``: the search block, for a default value)."""
    problem = data_problem(values)
    if problem is not None:
        span = spans.get(problem.key) or spans.get("data") or fallback
        raise SpecError(problem.message, span, hint=problem.hint)
