"""Slicing the kept units out of a supernet (build stage, torch): supernet + point + kept units → compact tensors.

Input: a :class:`~spvit_dsl.supernet.Supernet` (timm-named tensors), a :class:`~spvit_dsl.space.plan.FrozenArch` and
the kept units of every group below its size (ordered indices: unit ``kept[k]`` becomes unit ``k``; a bool mask per
sparse layer). Output: the state dict of the compact network (:func:`~.skeleton.create_compact`), checked by a strict
``load_state_dict``:

1. every structured group's coupled slices (:func:`spvit_dsl.space.groups.slices`) are cut with ``index_select``,
   residual channels first, then heads, per-head channels and FFN neurons — the same declared slices the supernet's
   masks and :meth:`Supernet.shrink` use; regrouped heads (UP-ViT: a ``(heads, head_dim)`` index of attention
   channels) cut q, k, v rows and proj columns by channel;
2. a conv op is folded from the supernet's shared weights under the point's masks into
   ``Conv2d → BN → ReLU → Conv2d`` (SPViT §4), then cut the same way;
3. a sparse layer keeps its dense shape with zeros in place: the weight times its kept mask, cut like the weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..space.groups import Slice, slices
from ..space.ops import OPS
from ..space.plan import FrozenArch
from ..supernet import Supernet

__all__ = ["compact_state"]

_MASK = "#mask"  # suffix of a sparse layer's kept mask while it is cut beside its weight


def _cut(state: dict[str, Tensor], s: Slice, keep: Tensor, units: int) -> None:
    for key in (s.tensor, s.tensor + _MASK):
        t = state.get(key)
        if t is not None:
            positions = torch.tensor(s.positions(keep.tolist(), units), dtype=torch.long, device=t.device)
            state[key] = t.index_select(s.axis, positions)


def _structured(net: Supernet, state: dict[str, Tensor], kept: Mapping[str, Tensor]) -> None:
    """Step 1: cut every structured group, residual widths first, then heads, per-head channels, FFN neurons."""
    g = net.geometry
    heads = {r.index: r.attn.num_heads for r in net.rows}  # current counts: a search may have shrunk them
    dims = {r.index: r.attn.head_dim for r in net.rows}
    for kind in ("embed", "heads", "head_dim", "ffn"):
        for path, group in net.groups.items():
            if group.kind != kind or path not in kept:
                continue
            keep = kept[path].cpu()
            i = group.block
            if keep.dim() == 2:  # regrouped heads (UP-ViT): new head h = the channels keep[h] of q, k, v
                assert i is not None and kind == "head_dim"
                _regroup(state, g.blocks[i].module, keep, heads[i] * dims[i])
                heads[i], dims[i] = keep.shape
                continue
            if kind in ("heads", "head_dim"):
                assert i is not None  # heads and per-head channels are groups of one block
                units = {"heads": heads, "head_dim": dims}[kind][i]
            else:
                units = net.size(path)
            for s in slices(
                g,
                group,
                heads=heads.get(i) if i is not None else None,
                head_dim=dims.get(i) if i is not None else None,
            ):
                _cut(state, s, keep, units)
            if kind == "heads" and i is not None:
                heads[i] = keep.numel()
            elif kind == "head_dim" and i is not None:
                dims[i] = keep.numel()


def _regroup(state: dict[str, Tensor], module: str, keep: Tensor, attn_dim: int) -> None:
    """Cut a block's q, k, v rows and proj columns to the regrouped channels ``keep`` (new heads × head_dim)."""
    flat = keep.flatten().to(torch.long)
    rows = torch.cat([flat + t * attn_dim for t in range(3)])
    for name, axis, index in (("qkv.weight", 0, rows), ("qkv.bias", 0, rows), ("proj.weight", 1, flat)):
        for key in (f"{module}.attn.{name}", f"{module}.attn.{name}{_MASK}"):
            t = state.get(key)
            if t is not None:
                state[key] = t.index_select(axis, index.to(t.device))


def _conv_state(net: Supernet, block: int, op: str, kept: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Step 2: the folded conv of one block (under the masks :meth:`Supernet.set_arch` set), cut to the kept units."""
    attn = net.rows[block].attn
    k = OPS.get(op).kernel
    assert k is not None
    kernel, bias, expand = attn.conv_weights(k)
    expand = attn.expansion(expand)
    d, dim = kernel.shape[0], expand.shape[0]
    out = {
        "conv.weight": kernel,
        "conv.bias": bias if bias is not None else kernel.new_zeros(d),
        "proj.weight": expand[:, :, None, None],
        "proj.bias": attn.proj.bias if attn.proj.bias is not None else expand.new_zeros(dim),
    }
    out |= {f"bn.{n}": v for n, v in attn.bns[op].state_dict().items()}
    rows = kept.get(f"blocks.{block}.head_dim")
    embed = kept.get(net._embed_path(net.geometry.blocks[block].stage))
    for name, t in list(out.items()):
        if rows is not None and (name.startswith("bn.") and t.dim() == 1 or name.startswith("conv.")):
            t = t.index_select(0, rows.to(t.device))
        if rows is not None and name == "proj.weight":
            t = t.index_select(1, rows.to(t.device))
        if embed is not None and name in ("conv.weight",):
            t = t.index_select(1, embed.to(t.device))
        if embed is not None and name in ("proj.weight", "proj.bias"):
            t = t.index_select(0, embed.to(t.device))
        out[name] = t
    return out


@torch.no_grad()
def compact_state(net: Supernet, arch: FrozenArch, kept: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The compact network's tensors (timm names) for ``arch`` with ``kept`` units (see the module docstring).

    ``net`` must have the point's masks set (:meth:`Supernet.set_arch`), which folding a conv op reads.
    """
    g = net.geometry
    state = {k: v.detach() for k, v in net.model.state_dict().items()}
    for path, mask in kept.items():
        group = net.groups[path]
        if group.kind == "weights":
            assert group.block is not None and group.layer is not None
            key = f"{g.blocks[group.block].module}.{_layer(group.layer)}.weight"
            state[key + _MASK] = mask.to(state[key].device)
    _structured(net, state, kept)
    for key in [k for k in state if k.endswith(_MASK)]:
        weight_key = key[: -len(_MASK)]
        state[weight_key] = state[weight_key] * state.pop(key).to(state[weight_key].dtype)
    for b, a in zip(g.blocks, arch.blocks, strict=True):
        m = b.module
        attn_keys = [k for k in state if k.startswith(f"{m}.attn.")]
        if a.op == "skip":
            for key in attn_keys + [f"{m}.norm1.weight", f"{m}.norm1.bias", f"{m}.ls1.gamma"]:
                state.pop(key, None)
        elif a.op != "msa":
            for key in attn_keys:
                del state[key]
            state |= {f"{m}.attn.{n}": t for n, t in _conv_state(net, b.index, a.op, kept).items()}
        else:
            for key in [k for k in attn_keys if ".mix" in k or ".bns." in k]:
                del state[key]
        if a.ffn == 0:
            bias = state.pop(f"{m}.mlp.fc2.bias", None)
            for key in [k for k in state if k.startswith(f"{m}.mlp.")]:
                del state[key]
            state[f"{m}.mlp.bias"] = bias if bias is not None else torch.zeros(arch.embed[b.stage])
    return state


def _layer(layer: str) -> str:
    from ..space.groups import layer_module  # noqa: PLC0415

    return layer_module(layer)
