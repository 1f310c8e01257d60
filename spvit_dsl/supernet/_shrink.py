"""Physically shrinking one unit group of a supernet during a search (lowering stage, torch).

A strategy that has decided to drop units for good (OFB's progressive shrinking) asks the loop to shrink; the loop
calls :meth:`spvit_dsl.supernet.Supernet.shrink`, which lands here: every coupled parameter and buffer is sliced,
the optimizers' per-parameter state (Adam's moments) is sliced the same way and re-keyed to the new parameters, the
board's masks follow, module attributes (``in_features``, ``num_heads``, ...) are updated, and the supernet records
which original units remain (``kept_index``), so a checkpoint can rebuild the same shapes on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..space.groups import Slice

if TYPE_CHECKING:
    from .net import Supernet, _Coupled

__all__ = ["replace_parameter", "restore_shrunk", "shrink_group"]


def _positions(c: _Coupled, keep: Tensor, units: int) -> Tensor:
    slc = Slice("", c.axis, c.outer, c.inner)
    return torch.tensor(slc.positions(keep.tolist(), units), dtype=torch.long, device=c.tensor.device)


def replace_parameter(
    owner: nn.Module,
    name: str,
    new: Tensor,
    optimizers: list[torch.optim.Optimizer],
    axis: int,
    positions: Tensor,
) -> None:
    """Replace ``owner.name`` by ``new`` (``old`` sliced by ``positions`` along ``axis``) in the module and in every
    optimizer's parameter groups, slicing the per-parameter state (Adam's moments) the same way."""
    old = owner._parameters[name]
    assert old is not None
    param = nn.Parameter(new, requires_grad=old.requires_grad)
    for opt in optimizers:
        for group in opt.param_groups:
            group["params"] = [param if p is old else p for p in group["params"]]
        state = opt.state.pop(old, None)
        if state is not None:
            opt.state[param] = {
                k: v.index_select(axis, positions.to(v.device))
                if isinstance(v, Tensor) and v.shape == old.shape
                else v
                for k, v in state.items()
            }
    owner._parameters[name] = param


def _fix_attributes(module: nn.Module) -> None:
    """Shape attributes that timm and torch modules keep beside their tensors."""
    w = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and w is not None:
        module.out_features, module.in_features = w.shape
    elif isinstance(module, nn.LayerNorm) and w is not None:
        module.normalized_shape = (w.shape[0],)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and w is not None:
        module.num_features = w.shape[0]
    elif isinstance(module, nn.Conv2d) and w is not None:
        module.out_channels = w.shape[0]


@torch.no_grad()
def shrink_group(net: Supernet, path: str, keep: Tensor, optimizers: list[torch.optim.Optimizer]) -> None:
    group = net.groups.get(path)
    if group is None or not group.structured:
        raise ValueError(f"'{path}' is not a structured unit group that can shrink")
    units = net.size(path)
    keep = keep.to(torch.long).flatten().cpu()
    if (
        keep.numel() == 0
        or int(keep.min()) < 0
        or int(keep.max()) >= units
        or len(set(keep.tolist())) != keep.numel()
    ):
        raise ValueError(f"{path}: keep must list distinct units of 0..{units - 1}")
    layer_paths = net.layer_paths()
    for c in net.coupled(path):
        old = c.tensor
        positions = _positions(c, keep, units)
        new = old.detach().index_select(c.axis, positions).clone()
        if c.name in c.owner._parameters:
            replace_parameter(c.owner, c.name, new, optimizers, c.axis, positions)
        else:
            c.owner._buffers[c.name] = new
        _fix_attributes(c.owner)
        weights_path = layer_paths.get(id(c.owner)) if c.name == "weight" else None
        mask = net.board.get(weights_path)
        if weights_path is not None and mask is not None:  # a weights mask has the weight's shape
            net.board.set(weights_path, mask.index_select(c.axis, positions.to(mask.device)))
            fixed = net.fixed.get(weights_path)
            if fixed is not None:
                net.fixed.set(weights_path, fixed.index_select(c.axis, positions.to(fixed.device)))
    for masks in (net.board, net.fixed):
        mask = masks.get(path)
        if mask is not None:
            masks.set(path, mask.index_select(mask.dim() - 1, keep.to(mask.device)))
    if group.kind in ("heads", "head_dim") and group.block is not None:
        attn = net.rows[group.block].attn
        attn.num_heads, attn.head_dim = (
            (keep.numel(), attn.head_dim) if group.kind == "heads" else (attn.num_heads, keep.numel())
        )
    original = net.kept_index.get(path, torch.arange(group.size))
    net.kept_index[path] = original[keep]


def restore_shrunk(
    net: Supernet, shrunk: dict[str, list[int]], optimizers: list[torch.optim.Optimizer] | None = None
) -> None:
    """Re-apply recorded shrinks to a freshly lowered supernet (original unit indices per group, in the recorded
    order), so a checkpoint of a shrunk supernet loads into the same shapes; ``optimizers`` built over the unshrunk
    parameters are re-pointed at the new ones."""
    for kind in ("embed", "heads", "head_dim", "ffn"):
        for path, index in shrunk.items():
            if net.groups[path].kind == kind:
                shrink_group(net, path, torch.tensor(index, dtype=torch.long), optimizers or [])
