"""SPViT's gates (search stage, torch): pure functions on tensors, two thin gate modules and :class:`SpvitGates`,
which turns the gates into the supernet's op choices and FFN masks.

Input: gate logits θ (and uniform noise); output: hard 0/1 decisions carrying straight-through gradients.
Implements SPViT §2 (He et al., "Pruning Self-attentions into Convolutional Layers in Single Path", TPAMI 2024):

* training — straight-through binary concrete at temperature 1: ``z = θ + s·logit(u)``, ``hard = 1[z > 0]``,
  ``gate = hard + (σ(z) − σ(z).detach())`` (forward value exactly ``hard``, gradient of σ(z)); SPViT's sampling is
  ``s = 1``, ours defaults to ``s = 0`` (the derived network itself, see :mod:`.spvit_price`);
* evaluation / derivation — ``1[θ > 0]``;
* cost term — deterministic indicators ``1[θ > 0] + (s − s.detach())`` with ``s = σ(σ(θ) − 0.5)``.

Everywhere θ stands for ``θ − shift``: the price controller's per-gate offset (:mod:`.spvit_price`, ours), a
non-persistent buffer recomputed from the logits every step.

Op gates are cumulative (a block's candidates are nested: skip ⊂ conv1x1 ⊂ conv3x3 ⊂ conv5x5 ⊂ msa): m candidates
have m − 1 logits, and level ``L`` is selected when the first ``L`` gates are on. FFN gates are either independent
(one per group of ``group`` neurons; SPViT's per-neuron gates are ``group = 1``) or cumulative over declared nested
widths (one per nested group of neurons, ranked by an importance order computed at lowering).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...space.cost import BlockCounts, Counts
from ...space.groups import block_path
from ...space.plan import BlockArch, Density, FfnChoice, FrozenArch
from ...supernet import Supernet

_EPS = 1e-6

__all__ = [
    "FfnGate",
    "OpGate",
    "SpvitGates",
    "binary_concrete",
    "decided",
    "effective",
    "indicator",
    "leading_ones",
    "level_weight",
]


# --- pure functions ------------------------------------------------------------------------------------------


def binary_concrete(
    logits: Tensor, noise: Tensor | None, temperature: float = 1.0, noise_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One straight-through binary-concrete sample per logit: ``(gate, hard)``.

    ``noise`` is uniform on (0, 1), its logistic value scaled by ``noise_scale`` (1: SPViT's sampling; 0 or
    ``noise=None``: no noise, ``hard = 1[θ > 0]``). The gate's forward value equals ``hard`` bit for bit
    (``soft − soft.detach()`` is exactly zero), its gradient is that of ``σ((θ + s·logit(u)) / τ)``.
    """
    z = logits
    if noise is not None and noise_scale != 0:
        u = noise.clamp(_EPS, 1.0 - _EPS)
        z = logits + noise_scale * (torch.log(u) - torch.log1p(-u))
    z = z / temperature
    soft = torch.sigmoid(z)
    hard = (z > 0).to(logits.dtype)
    return hard + (soft - soft.detach()), hard


def indicator(logits: Tensor) -> Tensor:
    """Deterministic indicator for the cost term: forward ``1[θ > 0]``, gradient of ``σ(σ(θ) − 0.5)``."""
    s = torch.sigmoid(torch.sigmoid(logits) - 0.5)
    return (logits > 0).to(logits.dtype) + (s - s.detach())


def leading_ones(hard: list[float]) -> int:
    """The selected level of cumulative gates: how many gates are on before the first off one."""
    level = 0
    for h in hard:
        if h <= 0.5:
            break
        level += 1
    return level


def effective(gate: OpGate | FfnGate) -> Tensor:
    """The logits the decisions read: ``θ − shift`` in the logits' dtype, differentiable in θ. ``shift`` is the
    price controller's offset (:mod:`.spvit_price`), zero until it sets one."""
    return gate.logits - gate.shift.to(gate.logits.dtype)


def decided(gate: OpGate | FfnGate) -> Tensor:
    """The deterministic on/off state of each gate, ``θ − shift > 0``, compared in float64 so that it agrees with
    the price controller's solve bit for bit."""
    return (gate.logits.detach().double() - gate.shift) > 0


def level_weight(gates: Tensor, level: int) -> Tensor:
    """Straight-through weight of ``level`` in SPViT's combination of nested candidates.

    With cumulative gates ``c = cumprod(gates)`` and ``c₀ = 1`` for the lowest candidate, candidate ``k`` is weighted
    ``c_k · Π_{j>k} (1 − c_j)`` (for three gates: g3·MSA + g2(1−g3)·conv3 + g1(1−g2)(1−g3)·conv1). Only the selected
    level's branch is computed, so only its weight is needed; its forward value is exactly 1 for the level the
    hard gates select. As in the official search, a cumulative gate is detached where the next one is on ("slow down
    the less complex gates"), done out of place.
    """
    c = torch.cumprod(gates, 0)
    if c.numel() > 1:
        on_next = c[1:].detach() > 0.5
        c = torch.cat([torch.where(on_next, c[:-1].detach(), c[:-1]), c[-1:]])
    ext = torch.cat([c.new_ones(1), c])
    return ext[level] * torch.prod(1.0 - ext[level + 1 :])


# --- modules -------------------------------------------------------------------------------------------------


class OpGate(nn.Module):
    """Cumulative gates over a block's nested attention candidates (m candidates → m − 1 logits)."""

    shift: Tensor  # the price controller's offset (float64, not saved), registered in __init__

    def __init__(self, decision: str, candidates: tuple[str, ...], init: float = 1.5) -> None:
        super().__init__()
        if len(candidates) < 2:
            raise ValueError(f"{decision}: a gate needs at least two candidates, got {candidates}")
        self.decision = decision
        self.candidates = tuple(candidates)
        self.logits = nn.Parameter(torch.full((len(candidates) - 1,), float(init)))
        self.register_buffer("shift", torch.zeros(len(candidates) - 1, dtype=torch.float64), persistent=False)

    @property
    def num_gates(self) -> int:
        return len(self.candidates) - 1

    def indicators(self) -> Tensor:
        """Cumulative deterministic indicators (cost term): entry j is 1 when level ≥ j + 1."""
        return torch.cumprod(indicator(effective(self)), 0)

    def level(self) -> int:
        """The deterministic level ``cumprod(1[θ − shift > 0])`` (one host sync)."""
        return leading_ones(decided(self).float().tolist())

    def extra_repr(self) -> str:
        return f"{self.decision}: {' < '.join(self.candidates)} ({self.num_gates} cumulative gates)"


class FfnGate(nn.Module):
    """Gates over the hidden neurons of one FFN.

    ``group_of[j]`` (a persistent buffer) is the gate group of neuron ``j``. Granular: group ``j // group``, one
    independent gate each. Nested widths ``w₀ < … < w_n``: neurons are ranked by ``importance`` (descending, stable);
    rank ``r`` belongs to group ``k`` = the first ``k`` with ``r < w_k``; group 0 is always kept, group ``k ≥ 1`` is
    kept when the first ``k`` cumulative gates are on, and neurons ranked beyond ``w_n`` (group n + 1) never are.
    """

    group_of: Tensor  # the buffer registered in __init__
    shift: Tensor  # the price controller's offset (float64, not saved), registered in __init__

    def __init__(
        self,
        decision: str,
        hidden: int,
        choice: FfnChoice,
        importance: Tensor | None = None,
        init: float = 1.5,
    ) -> None:
        super().__init__()
        self.decision = decision
        self.hidden = hidden
        self.choice = choice
        device = importance.device if importance is not None else None
        if choice.granular:
            n = math.ceil(hidden / choice.group)
            group_of = torch.arange(hidden, device=device) // choice.group
        else:
            widths = tuple(choice.widths or ())
            if len(widths) < 2:
                raise ValueError(f"{decision}: nested FFN gates need at least two widths, got {widths}")
            n = len(widths) - 1
            group_of = _nested_groups(widths, _ranks(importance, hidden, device))
        self.logits = nn.Parameter(torch.full((n,), float(init), device=device))
        self.register_buffer("group_of", group_of)
        self.register_buffer("shift", torch.zeros(n, dtype=torch.float64, device=device), persistent=False)

    @property
    def nested(self) -> bool:
        return not self.choice.granular

    @property
    def num_gates(self) -> int:
        return self.logits.numel()

    def group_values(self, gates: Tensor) -> Tensor:
        """Per-group keep values from the gate values (cumulative and padded for nested widths)."""
        if not self.nested:
            return gates
        c = torch.cumprod(gates, 0)
        return torch.cat([c.new_ones(1), c, c.new_zeros(1)])

    def neuron_mask(self, gates: Tensor) -> Tensor:
        """Per-neuron keep values (straight-through when ``gates`` are)."""
        return self.group_values(gates)[self.group_of]

    def kept(self) -> Tensor:
        """Deterministic keep mask over the hidden neurons (``θ − shift > 0``, cumulative for nested widths)."""
        return self.neuron_mask(decided(self).to(self.logits.dtype)) > 0.5

    def indicators(self) -> Tensor:
        """Deterministic indicators of the gates (cumulative for nested widths) for the cost term."""
        ind = indicator(effective(self))
        return torch.cumprod(ind, 0) if self.nested else ind

    def expected_width(self) -> Tensor:
        """The kept width as a differentiable function of the logits: Σ (neurons behind gate k) · indicator_k
        (cumulative for nested widths, whose first width is always kept)."""
        sizes = torch.tensor(self.group_sizes(), dtype=self.logits.dtype, device=self.logits.device)
        width = (self.indicators() * sizes).sum()
        if self.nested:
            width = width + (self.choice.widths or (0,))[0]
        return width

    def group_sizes(self) -> list[int]:
        """Neurons behind each gate (nested: the size of the group gate k adds)."""
        counts = torch.bincount(self.group_of.cpu(), minlength=self.num_gates + 2).tolist()
        return counts[1 : self.num_gates + 1] if self.nested else counts[: self.num_gates]

    def extra_repr(self) -> str:
        if self.nested:
            widths = ", ".join(str(w) for w in self.choice.widths or ())
            return f"{self.decision}: nested widths ({widths}) of {self.hidden} ({self.num_gates} cumulative gates)"
        return f"{self.decision}: {self.num_gates} gates of {self.choice.group} neuron(s) over {self.hidden}"


def _ranks(importance: Tensor | None, hidden: int, device: torch.device | None) -> Tensor:
    """Rank of every neuron in descending importance (stable; index order without an importance)."""
    if importance is None:
        return torch.arange(hidden, device=device)
    order = torch.sort(importance.detach().float(), descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(hidden, device=order.device)
    return ranks


def _nested_groups(widths: tuple[int, ...], ranks: Tensor) -> Tensor:
    bounds = torch.tensor(widths, device=ranks.device, dtype=ranks.dtype)
    return torch.searchsorted(bounds, ranks, right=True)


# --- the gate set of one supernet ------------------------------------------------------------------------------


class GateDict(nn.ModuleDict):
    """Group path → gate module. Module names may not contain '.', so ``blocks.3.ffn`` is stored under
    ``blocks_3_ffn`` (the state-dict key); indexing, ``in``, ``keys`` and ``items`` use group paths."""

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def __getitem__(self, name: str) -> nn.Module:
        return super().__getitem__(self._key(name))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(self._key(name), module)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(self._key(name))

    def keys(self) -> list[str]:  # type: ignore[override]
        return [m.decision for m in self.values()]  # type: ignore[misc]

    def items(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        return [(m.decision, m) for m in self.values()]  # type: ignore[misc]


class SpvitGates(nn.Module):
    """Every gate of a SPViT search over one supernet: cumulative op gates per block with several candidate ops,
    FFN gates per block with several widths. :meth:`draw` decides the next forward's ops and FFN masks;
    :meth:`derive` reads the network the gates select; :meth:`counts` gives the differentiable counts the budget
    term prices (deterministic indicators, cumulative for ops and nested widths)."""

    def __init__(self, net: Supernet, gate_init: float = 1.5, seed: int = 0, noise: float = 1.0) -> None:
        super().__init__()
        self.gates = GateDict()
        self.seed = seed
        self.noise = noise  # scale of the logistic noise of training draws (1: SPViT's binary concrete)
        self.__dict__["_generator"] = None
        device = next(net.model.parameters()).device
        for r in net.rows:
            p, i = r.plan, r.index
            if len(p.attention) > 1:
                self.gates[block_path(i, "attention")] = OpGate(
                    block_path(i, "attention"), p.attention, gate_init
                ).to(device)
            if len(p.ffn.candidates(p.geom.hidden)) > 1:
                importance = None if p.ffn.granular else r.mlp.importance()
                gate = FfnGate(block_path(i, "ffn"), p.geom.hidden, p.ffn, importance, gate_init)
                self.gates[block_path(i, "ffn")] = gate.to(device)

    # --- noise ---------------------------------------------------------------------------------------------

    @property
    def sample_generator(self) -> torch.Generator | None:
        """The generator of gate noise on the gates' device, seeded with :attr:`seed` when (re)created; data-parallel
        ranks with the same seed sample identical gates. ``None`` on the meta device or without gates."""
        params = list(self.parameters())
        if not params or params[0].device.type == "meta":
            return None
        device = params[0].device
        gen = self.__dict__["_generator"]
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self.__dict__["_generator"] = gen
        return gen

    def ordered(self) -> list[OpGate | FfnGate]:
        """Op gates by block, then FFN gates by block: the order of one training draw's noise."""
        gates = list(self.gates.values())
        return [g for g in gates if isinstance(g, OpGate)] + [g for g in gates if isinstance(g, FfnGate)]

    def num_gates(self) -> int:
        return sum(g.num_gates for g in self.ordered())

    # --- deciding the next forward -------------------------------------------------------------------------

    def draw(self, net: Supernet, training: bool, noise: Tensor | None = None) -> None:
        """Set every gated block's op and FFN mask for the next forward: one straight-through binary-concrete sample
        per gate when ``training`` (``noise``: uniform values in :meth:`ordered` order, default from
        :attr:`sample_generator`), the deterministic choice ``1[θ > 0]`` otherwise."""
        gates = self.ordered()
        if not gates:
            return
        flat = torch.cat([effective(g) for g in gates])
        if training:
            if noise is None and self.noise > 0:
                noise = torch.rand(
                    flat.shape, generator=self.sample_generator, device=flat.device, dtype=flat.dtype
                )
            if noise is not None:
                values, hard = binary_concrete(flat, noise, noise_scale=self.noise)
            else:  # no noise: the derived network itself, straight through σ(θ − shift)
                hard = torch.cat([decided(g) for g in gates]).to(flat.dtype)
                soft = torch.sigmoid(flat)
                values = hard + (soft - soft.detach())
        else:
            values = hard = torch.cat([decided(g) for g in gates]).to(flat.dtype)
        meta = flat.device.type == "meta"
        n_op = sum(g.num_gates for g in gates if isinstance(g, OpGate))
        hard_ops = hard[:n_op].tolist() if n_op and not meta else [1.0] * n_op  # one host sync
        offset = 0
        for g in gates:
            n = g.num_gates
            block = int(g.decision.split(".")[1])
            if isinstance(g, OpGate):
                level = leading_ones(hard_ops[offset : offset + n])
                net.set_op(
                    block, level, level_weight(values[offset : offset + n], level) if training else None
                )
            else:
                net.set_masks({g.decision: g.neuron_mask(values[offset : offset + n]) if not meta else None})
            offset += n

    # --- reading the gates ---------------------------------------------------------------------------------

    def levels(self) -> dict[str, int]:
        """Each op decision's deterministic level (index into the block's candidates)."""
        return {g.decision: g.level() for g in self.ordered() if isinstance(g, OpGate)}

    def kept_ffn(self) -> dict[str, Tensor]:
        """FFN decision → bool mask of the neurons ``1[θ > 0]`` keeps."""
        return {g.decision: g.kept() for g in self.ordered() if isinstance(g, FfnGate)}

    def derive(self, net: Supernet) -> FrozenArch:
        """The network the gates select; dimensions SPViT does not search take their declared (single) value."""
        kept = self.kept_ffn()
        return self.arch_at(net, self.levels(), {path: int(mask.sum()) for path, mask in kept.items()})

    @staticmethod
    def arch_at(net: Supernet, levels: dict[str, int], widths: dict[str, int]) -> FrozenArch:
        """The network with the given op levels and FFN widths (group path → value); a block missing from
        ``levels`` takes its first candidate (its only one when not gated), a missing FFN its full width."""
        blocks = []
        for r in net.rows:
            p, i = r.plan, r.index
            op = p.attention[levels.get(block_path(i, "attention"), 0)]
            width = widths.get(block_path(i, "ffn"), p.ffn.candidates(p.geom.hidden)[-1])
            d = p.density
            blocks.append(
                BlockArch(
                    op, width, p.heads[0], p.head_dim[0], Density(d.qkv[0], d.proj[0], d.fc1[0], d.fc2[0])
                )
            )
        return FrozenArch(tuple(blocks), tuple(w[0] for w in net.space.embed))

    def counts(self, net: Supernet) -> Counts:
        """Counts as differentiable functions of the gate logits: the op weights from cumulative indicators
        (``p_l = c_l · (1 − c_{l+1})``, c_0 = 1), the FFN width as the kept neurons' sum; exact at the derived
        network, so :meth:`Supernet.cost` of these counts equals the analytic cost of :meth:`derive`."""
        arch = self.derive(net)
        blocks = []
        for r, a in zip(net.rows, arch.blocks, strict=True):
            i = r.index
            op_gate = (
                self.gates[block_path(i, "attention")] if block_path(i, "attention") in self.gates else None
            )
            ffn_gate = self.gates[block_path(i, "ffn")] if block_path(i, "ffn") in self.gates else None
            ops: dict[str, object] = {a.op: 1}
            if isinstance(op_gate, OpGate):
                c = op_gate.indicators()
                ext = torch.cat([c.new_ones(1), c, c.new_zeros(1)])
                ops = {op: ext[level] * (1 - ext[level + 1]) for level, op in enumerate(r.plan.attention)}
            ffn: object = a.ffn
            if isinstance(ffn_gate, FfnGate):
                ffn = ffn_gate.expected_width()
            density = {layer: a.density.of(layer) for layer in ("qkv", "proj", "fc1", "fc2")}
            blocks.append(BlockCounts(ops, a.heads, a.head_dim, ffn, density))
        return Counts(arch.embed, blocks)
