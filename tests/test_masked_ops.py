"""The supernet's lean autograd functions against plain tensor ops: ``masked_linear`` and ``weighted_layer_norm``
give the same values as the formulas they implement, and gradients that ``torch.autograd.gradcheck`` accepts for
every input, the soft masks included (float64, every combination of masks)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from spvit_dsl.supernet._masked_ops import masked_linear, weighted_layer_norm

OUT, IN = 5, 4


def _soft(*shape: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (0.1 + 0.9 * torch.rand(*shape, generator=gen, dtype=torch.float64)).requires_grad_()


def _linear_inputs(bias: bool, row: bool, col: bool, elem: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, IN, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(OUT, IN, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(OUT, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    return (
        x,
        w,
        b,
        _soft(OUT, seed=1) if row else None,
        _soft(IN, seed=2) if col else None,
        _soft(OUT, IN, seed=3) if elem else None,
    )


def _reference_linear(x, w, b, row, col, elem):
    weight = w
    if elem is not None:
        weight = weight * elem
    if row is not None:
        weight = weight * row[:, None]
        b = b * row if b is not None else None
    if col is not None:
        weight = weight * col
    return F.linear(x, weight, b)


COMBOS = [c for c in itertools.product([False, True], repeat=4)]


@pytest.mark.parametrize(("bias", "row", "col", "elem"), COMBOS)
def test_masked_linear_matches_the_formula_and_passes_gradcheck(bias, row, col, elem):
    inputs = _linear_inputs(bias, row, col, elem)
    torch.testing.assert_close(masked_linear(*inputs), _reference_linear(*inputs), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(masked_linear, inputs)


@pytest.mark.parametrize("wanted", range(6))
def test_masked_linear_gives_only_the_gradient_asked_for(wanted):
    """Each input alone requiring a gradient (the backward's shortcuts per case) gets the reference gradient."""
    inputs = _linear_inputs(True, True, True, True)
    for i, t in enumerate(inputs):
        t.requires_grad_(i == wanted)
    g = torch.randn(2, 3, OUT, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (got,) = torch.autograd.grad(masked_linear(*inputs), inputs[wanted], g)
    (want,) = torch.autograd.grad(_reference_linear(*inputs), inputs[wanted], g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _reference_layer_norm(x, mask, weight, bias, eps):
    m = mask if mask.dim() == 1 else mask[:, None, :]
    mean = (x * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
    var = ((x - mean) ** 2 * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y * m


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_weighted_layer_norm_matches_the_formula_and_passes_gradcheck(per_sample, affine):
    gen = torch.Generator().manual_seed(0)
    B, T, C = 2, 3, 6
    x = torch.randn(B, T, C, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = _soft(B, C, seed=4) if per_sample else _soft(C, seed=4)
    weight = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True) if affine else None
    bias = torch.randn(C, generator=gen, dtype=torch.float64, requires_grad=True) if affine else None
    eps = 1e-2  # large enough that the eps terms of the mask's gradient are exercised
    got = weighted_layer_norm(x, mask, weight, bias, eps)
    torch.testing.assert_close(got, _reference_layer_norm(x, mask, weight, bias, eps), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: weighted_layer_norm(*a, eps), (x, mask, weight, bias))


def test_weighted_layer_norm_with_an_all_ones_mask_is_layer_norm():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, 16, generator=gen)
    w, b = torch.randn(16, generator=gen), torch.randn(16, generator=gen)
    torch.testing.assert_close(
        weighted_layer_norm(x, torch.ones(16), w, b, 1e-6), F.layer_norm(x, (16,), w, b, 1e-6)
    )
