"""2:4 semi-structured sparsity on GPUs (our extension of DIMAP; compact stage, torch).

A network searched with ``search dimap { semi_structured = true }`` has linear layers whose weights keep 2 of every
4 consecutive weights of a row. NVIDIA's sparse tensor cores (Ampere and later) run such a layer at up to twice the
dense speed once its weight is stored as ``torch.sparse.to_sparse_semi_structured`` (fp16 / bf16, CUDA). On a
CPU, or stored dense, the zeros are ordinary weights: the network runs at dense speed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["is_two_of_four", "semi_structured_layers", "to_semi_structured"]


def is_two_of_four(weight: Tensor) -> bool:
    """Whether a 2-D weight ``(out, in)`` has at most 2 non-zeros in every group of 4 consecutive weights of a row
    (and ``in`` divisible by 4), with at least one zero somewhere (a dense layer is not a sparse one)."""
    if weight.dim() != 2 or weight.shape[1] % 4 or weight.numel() == 0:
        return False
    nonzero = (weight.detach() != 0).reshape(weight.shape[0], -1, 4).sum(-1)
    return bool((nonzero <= 2).all()) and bool((nonzero < 4).any())


def semi_structured_layers(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` whose weight follows the 2:4 pattern (:func:`is_two_of_four`)."""
    return [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and is_two_of_four(m.weight)
    ]


def to_semi_structured(model: nn.Module) -> dict[str, str]:
    """Store every 2:4 linear weight of ``model`` (on CUDA, in fp16 or bf16) as a semi-structured sparse tensor,
    in place, for inference. Returns layer name → "converted" or the reason it was left dense (the kernels have
    shape limits, e.g. a minimum of rows and columns). ValueError: the model is not on CUDA or not fp16 / bf16."""
    first = next(model.parameters())
    if first.device.type != "cuda" or first.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"2:4 sparse kernels need a CUDA model in fp16 or bf16, found {first.dtype} on {first.device.type}"
        )
    from torch.sparse import to_sparse_semi_structured

    out = {}
    for name in semi_structured_layers(model):
        layer = model.get_submodule(name)
        assert isinstance(layer, nn.Linear)
        try:
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
            out[name] = "converted"
        except (RuntimeError, ValueError) as exc:  # unsupported shape or device
            out[name] = str(exc).splitlines()[0]
    return out
