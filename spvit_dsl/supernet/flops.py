"""Measured multiply-adds of a torch forward (lowering/build stages, torch): the check on the analytic cost model.

Input: a module and its inputs; output: ``FlopCounterMode`` total ÷ 2 (MACs). PyTorch's counter covers matmuls,
convolutions and the CUDA attention kernels; on CPU, ``scaled_dot_product_attention`` runs
``_scaled_dot_product_flash_attention_for_cpu``, which the counter does not know, so this module maps it to the
counter's own SDPA formula (2 · b·h·s_q·s_k·d MACs). Everything else (norms, softmax, activations, biases, adds,
index/gather) is not counted, exactly like the ``matmul`` part of ``spvit_dsl.space.cost.breakdown``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_macs"]


def _cpu_sdpa_flop(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_formulas() -> dict[Any, Any]:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_sdpa_flop} if op is not None else {}


def count_macs(module: nn.Module, *inputs: Any) -> int:
    """Multiply-adds of one ``module(*inputs)`` forward (no grad), as FlopCounterMode counts them ÷ 2.

    The parameters are frozen for the count: FlopCounterMode's module tracker registers gradient hooks on every
    tensor a module receives that requires grad, and fails on one without a grad function (SigLIP's attention pool
    passes its learned query, expanded, to ``q``)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
            module(*inputs)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops() // 2
