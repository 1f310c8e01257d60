"""timm glue of the lowering stage (torch): build the backbone, load its weights, find and patch its blocks.

Input: a :class:`~spvit_dsl.space.plan.Geometry` and a weights source; output: the timm model and its blocks in global
order (ViT ``blocks.i``; Swin ``layers.s.blocks.j`` numbered across stages).

Swin blocks (timm 1.0.31 ``SwinTransformerBlock``, ``SwinTransformerV2Block``, ``SwinTransformerV2CrBlock``) take
(B, H, W, C) maps and do their shift/partition inside ``_attn`` (SwinV2-CR: ``_shifted_window_attn``). Lowering swaps
such a block's class for :class:`GatedSwinBlock` (:class:`GatedSwinV2Block`, :class:`GatedSwinV2CrBlock`), a subclass
that runs timm's own windowed attention (cyclic shift, windows, mask) for the MSA level and hands the full, unshifted
map to the unified op for conv and skip levels. The swap keeps every
attribute, buffer and state-dict key of the block.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.swin_transformer_v2 import SwinTransformerV2Block
from timm.models.swin_transformer_v2_cr import SwinTransformerV2CrBlock
from timm.models.vision_transformer import Block as VitBlock
from torch import Tensor, nn

from .._io import checkpoint_kind
from ..lang.errors import UsageError
from ..space.plan import Geometry
from .attention import UnifiedAttention

__all__ = [
    "GatedSwinBlock",
    "GatedSwinV2Block",
    "GatedSwinV2CrBlock",
    "backbone_blocks",
    "create_backbone",
    "submodule",
    "swin_stages",
]

_M = TypeVar("_M", bound=nn.Module)


class GatedSwinBlock(SwinTransformerBlock):
    """A timm Swin block whose conv/skip levels see the full unshifted map (MSA level unchanged)."""

    def _attn(self, x: Tensor) -> Tensor:
        attn = self.attn  # lowering swaps the unified op in before the class (see patch_swin_block)
        assert isinstance(attn, UnifiedAttention)
        if attn.op == "msa":
            return super()._attn(x)
        return attn.forward_map(x)


def _post_norm_branch(attn: UnifiedAttention, branch: Tensor) -> Tensor:
    """A res-post-norm block's attention branch after its ``norm1``, times the selected level's straight-through
    weight when a search sets one (inside the branch, the LayerNorm would cancel it)."""
    weight = attn.level_weight
    return branch if weight is None else branch * weight.to(branch.dtype)


class GatedSwinV2Block(SwinTransformerV2Block):
    """A timm SwinV2 block (res-post-norm: ``x + norm1(attn(x))``) over the unified op: conv/skip levels see the
    full unshifted map; a ``skip`` level runs no branch at all (``norm1`` of a zero branch would add its bias); the
    level's straight-through weight multiplies the branch after ``norm1`` (inside, the LayerNorm would cancel it)."""

    def _attn(self, x: Tensor) -> Tensor:
        attn = self.attn
        assert isinstance(attn, UnifiedAttention)
        if attn.op == "msa":
            return super()._attn(x)
        return attn.forward_map(x)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        attn = self.attn
        assert isinstance(attn, UnifiedAttention)
        if attn.op != "skip":
            x = x + self.drop_path1(_post_norm_branch(attn, self.norm1(self._attn(x))))
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return x.reshape(B, H, W, C)


class GatedSwinV2CrBlock(SwinTransformerV2CrBlock):
    """A timm SwinV2-CR block over the unified op, as :class:`GatedSwinV2Block` (res-post-norm: no branch for
    ``skip``, the level weight after ``norm1``), with the block's main-branch ``norm3`` (an identity unless the
    block has one)."""

    def _shifted_window_attn(self, x: Tensor) -> Tensor:
        attn = self.attn
        assert isinstance(attn, UnifiedAttention)
        if attn.op == "msa":
            return super()._shifted_window_attn(x)
        return attn.forward_map(x)

    def forward(self, x: Tensor) -> Tensor:
        attn = self.attn
        assert isinstance(attn, UnifiedAttention)
        if attn.op != "skip":
            x = x + self.drop_path1(_post_norm_branch(attn, self.norm1(self._shifted_window_attn(x))))
        B, H, W, C = x.shape
        x = x.reshape(B, -1, C)
        x = x + self.drop_path2(self.norm2(self.mlp(x)))
        return self.norm3(x).reshape(B, H, W, C)


def swin_stages(model: nn.Module) -> list[nn.Module]:
    """A Swin model's stages: ``layers`` (Swin, SwinV2) or ``stages`` (SwinV2-CR)."""
    stages = model.get_submodule("stages" if hasattr(model, "stages") else "layers")
    return list(stages.children())


def create_backbone(
    geometry: Geometry, weights: str = "none", device: torch.device | str | None = None
) -> nn.Module:
    """``timm.create_model`` for the geometry; ``weights`` is ``none``, ``pretrained`` or a checkpoint path."""
    kwargs = geometry.kwargs()
    if weights == "pretrained":
        online = _hub_reachable()
        try:
            with _offline(not online):  # no network: the local cache only, at once (not a minute of retries)
                name = f"{geometry.model}.{geometry.tag}" if geometry.tag else geometry.model
                model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as e:  # network, hub or shape problems all end the same way for the user
            if not online:
                raise UsageError(
                    f"cannot load pretrained weights for {geometry.model}: the Hugging Face hub is unreachable and "
                    "they are not in the local cache; use `weights = none`, a local checkpoint "
                    '(`weights = "path.pth"`), or download them once where there is a network (timm caches them)'
                ) from e
            raise UsageError(f"cannot load pretrained weights for {geometry.model}: {_one_line(e)}") from e
        return model.to(device) if device is not None else model
    if weights not in ("none", "") and not os.path.isfile(weights):
        raise UsageError(f"checkpoint not found: {weights}")
    if device is not None:
        with torch.device(device):
            model = timm.create_model(geometry.model, pretrained=False, **kwargs)
    else:
        model = timm.create_model(geometry.model, pretrained=False, **kwargs)
    if weights not in ("none", ""):
        load_weights(model, weights)
    return model


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the weights hub answers a TCP connection within ``timeout`` seconds (HF_HUB_OFFLINE=1: never)."""
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline(offline: bool) -> Iterator[None]:
    """Make huggingface_hub (timm's downloader) use its cache only, for the duration."""
    if not offline:
        yield
        return
    from huggingface_hub import constants  # noqa: PLC0415

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def load_weights(model: nn.Module, path: str) -> None:
    """Load a timm-format checkpoint (state dict, ``{'model': ...}`` as DeiT ships, or ``.safetensors``) through
    timm's own loading and the model family's checkpoint filter; any mismatch is a one-line :class:`UsageError`."""
    filter_fn = _checkpoint_filter(model)
    kind = checkpoint_kind(path)
    if kind is None:
        raise UsageError(
            f"{path} is not a checkpoint (neither safetensors nor a torch file); pass a timm state dict, "
            "a search.ckpt or a built .safetensors"
        )
    try:
        timm.models.load_checkpoint(model, path, strict=True, filter_fn=filter_fn)
    except Exception as e:
        if kind == "torch" and "weights_only" in str(e):
            raise UsageError(
                f"{path} is a torch file holding Python objects, not a plain state dict; save "
                "model.state_dict() (or use safetensors)"
            ) from e
        raise UsageError(f"checkpoint {path} does not fit {type(model).__name__}: {_one_line(e)}") from e


def _checkpoint_filter(model: nn.Module) -> Callable[..., dict[str, Tensor]] | None:
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + " ...") if len(text) > 300 else (text or type(e).__name__)


def backbone_blocks(model: nn.Module, family: str) -> list[nn.Module]:
    """The transformer blocks in global order; raise NotImplementedError for layouts lowering does not know."""
    if family == "swin":
        blocks = [b for stage in swin_stages(model) for b in stage.get_submodule("blocks").children()]
        kinds = (SwinTransformerBlock, SwinTransformerV2Block, SwinTransformerV2CrBlock)
        bad = [type(b).__name__ for b in blocks if not isinstance(b, kinds)]
    else:
        blocks = list(model.blocks)  # type: ignore[arg-type]
        bad = [type(b).__name__ for b in blocks if not isinstance(b, VitBlock)]
    if bad:
        raise NotImplementedError(f"cannot lower {type(model).__name__}: unsupported block type {bad[0]}")
    return blocks


def submodule(owner: nn.Module, path: str, kind: type[_M]) -> _M:
    """``owner.get_submodule(path)``, which lowering needs to be a ``kind``; NotImplementedError if it is not."""
    module = owner.get_submodule(path)
    if not isinstance(module, kind):
        raise NotImplementedError(
            f"cannot lower {type(owner).__name__}.{path}: a {type(module).__name__}, not a {kind.__name__}"
        )
    return module


def patch_swin_block(block: nn.Module) -> None:
    """Route the block's conv/skip levels to the full map (class swap; keeps every attribute and key)."""
    if type(block) is SwinTransformerBlock:
        block.__class__ = GatedSwinBlock
    elif type(block) is SwinTransformerV2Block:
        block.__class__ = GatedSwinV2Block
    elif type(block) is SwinTransformerV2CrBlock:
        block.__class__ = GatedSwinV2CrBlock
    elif not isinstance(block, GatedSwinBlock | GatedSwinV2Block | GatedSwinV2CrBlock):
        raise NotImplementedError(f"cannot lower Swin block type {type(block).__name__}")
