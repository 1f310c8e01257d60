"""The gated SPViT supernet (lowering stage output, torch): a timm backbone whose blocks carry gated candidates.

Input (from :func:`spvit_dsl.supernet.lower.lower`): the :class:`~spvit_dsl.space.plan.Space`, the patched timm model and one
:class:`BlockRow` per block (its unified attention op, gated MLP and gates). Output: a module the search trains
(``forward`` → logits; :meth:`Supernet.expected_cost` → the differentiable cost F(gates)) and reads
(:meth:`Supernet.derive` → :class:`~spvit_dsl.space.plan.FrozenArch`). SPViT §2 (He et al., TPAMI 2024).

Per forward, the supernet first decides every block's choice, then runs the timm model once:

* ``train()`` — one straight-through binary-concrete sample per gate from :attr:`Supernet.sample_generator`
  (one noise draw for all gates, one host sync to learn the sampled op levels);
* ``eval()`` — the deterministic choice ``1[θ > 0]`` (cumulative for ops and nested widths);
* :meth:`Supernet.fix` — a given architecture in every mode, until released with ``fix(None)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..space import cost as cost_model
from ..space.plan import BlockArch, BlockPlan, Convention, FrozenArch, Space
from ._costs import CostTable, build_table
from .attention import UnifiedAttention
from .ffn import GatedMlp
from .gates import FfnGate, OpGate, binary_concrete, leading_ones, level_weight

__all__ = ["BlockRow", "GateDict", "Supernet", "Unit"]


@dataclass(frozen=True)
class Unit:
    """One prunable unit for budget repair: one gate of a decision.

    ``on``: the unit is kept by :meth:`Supernet.derive`. ``nested``: the decision's gates are cumulative (ops and
    nested FFN widths): unit ``index`` only counts when every lower unit is on, so the one unit that can be dropped
    alone is the highest unit that is on (dropping it steps the decision down one level). ``macs``/``params`` are what
    dropping that one step saves; ``neurons`` the hidden neurons behind an FFN unit (0 for ops).
    """

    decision: str
    index: int
    logit: float
    macs: float
    params: float
    on: bool
    nested: bool
    neurons: int = 0


class GateDict(nn.ModuleDict):
    """Decision name → gate module. Module names may not contain '.', so ``blocks.3.ffn`` is stored under
    ``blocks_3_ffn`` (the state-dict key); indexing, ``in``, ``keys`` and ``items`` use decision names."""

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "_")

    def __getitem__(self, name: str) -> nn.Module:  # type: ignore[override]
        return super().__getitem__(self._key(name))

    def __setitem__(self, name: str, module: nn.Module) -> None:
        super().__setitem__(self._key(name), module)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(self._key(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:  # type: ignore[override]
        return [m.decision for m in self.values()]  # type: ignore[misc]

    def items(self) -> list[tuple[str, nn.Module]]:  # type: ignore[override]
        return [(m.decision, m) for m in self.values()]  # type: ignore[misc]


@dataclass
class BlockRow:
    """One block of the supernet: its plan, its two gated modules and their gates (None when fixed)."""

    plan: BlockPlan
    attn: UnifiedAttention
    mlp: GatedMlp
    op_gate: OpGate | None
    ffn_gate: FfnGate | None

    @property
    def index(self) -> int:
        return self.plan.geom.index

    @property
    def hidden(self) -> int:
        return self.plan.geom.hidden


class Supernet(nn.Module):
    """The gated supernet over a timm backbone (see the module docstring and docs/supernet.md)."""

    def __init__(
        self,
        space: Space,
        model: nn.Module,
        rows: list[BlockRow],
        gates: GateDict,
        *,
        convention: Convention = "exact",
        seed: int = 0,
        alpha: float = 0.0,
    ) -> None:
        super().__init__()
        self.space = space
        self.model = model
        self.gates = gates
        self.convention: Convention = convention
        self.alpha = alpha
        self.seed = seed
        self.__dict__["_rows"] = rows  # modules already registered inside `model`
        self.__dict__["_generator"] = None
        self._fixed: FrozenArch | None = None
        self._tables: dict[tuple[str, str], CostTable] = {}

    @property
    def rows(self) -> list[BlockRow]:
        return self.__dict__["_rows"]  # type: ignore[no-any-return]

    # --- parameters ------------------------------------------------------------------------------------------

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gate logits (one tensor per decision)."""
        return [g.logits for g in self.gates.values()]  # type: ignore[misc]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every other parameter: the backbone's, the mixing matrices and the BatchNorms."""
        gate_ids = {id(p) for p in self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in gate_ids]

    # --- gate noise ------------------------------------------------------------------------------------------

    @property
    def sample_generator(self) -> torch.Generator | None:
        """The generator of gate noise, on the gates' device, seeded with :attr:`seed` when (re)created.

        Data-parallel ranks that build the supernet with the same seed sample identical gates. ``None`` on the meta
        device (no random numbers there).
        """
        device = self._gate_device()
        gen = self.__dict__["_generator"]
        if device.type == "meta":
            return None
        if gen is None or gen.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self.__dict__["_generator"] = gen
        return gen  # type: ignore[no-any-return]

    def manual_seed(self, seed: int) -> None:
        """Restart the gate noise from ``seed``."""
        self.seed = seed
        self.__dict__["_generator"] = None

    def _gate_device(self) -> torch.device:
        params = self.gate_parameters()
        return params[0].device if params else next(self.model.parameters()).device

    # --- forward ---------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        self.draw()
        try:
            return self.model(x)
        finally:
            self._release_samples()

    def _release_samples(self) -> None:
        """Drop this forward's straight-through tensors (the autograd graph keeps what backward needs), so the
        modules hold no graph between steps and stay deep-copyable."""
        for r in self.rows:
            if r.op_gate is not None:
                r.attn.choose(r.attn._level)
            if r.ffn_gate is not None and r.mlp._mask is not None:
                r.mlp.choose()

    def draw(self, noise: Tensor | None = None) -> None:
        """Decide every block's choice for the next model forward (``forward`` calls this first).

        ``noise`` (training only): uniform (0, 1) values for every gate logit, in :meth:`num_gates` order (op gates
        by block, then FFN gates by block); default: drawn from :attr:`sample_generator`.
        """
        if self._fixed is not None:
            return
        if self.training:
            self._draw_sampled(noise)
        else:
            self._draw_deterministic()

    def num_gates(self) -> int:
        """The number of gate logits (the length of the noise one training draw uses)."""
        return sum(g.num_gates for g in self._ordered_gates())

    def _draw_sampled(self, noise: Tensor | None) -> None:
        op_rows = [r for r in self.rows if r.op_gate is not None]
        ffn_rows = [r for r in self.rows if r.ffn_gate is not None]
        logits = [r.op_gate.logits for r in op_rows] + [r.ffn_gate.logits for r in ffn_rows]  # type: ignore[union-attr]
        self._choose_constant()
        if not logits:
            return
        flat = torch.cat(logits)
        if noise is None:
            noise = torch.rand(
                flat.shape, generator=self.sample_generator, device=flat.device, dtype=flat.dtype
            )
        gates, hard = binary_concrete(flat, noise)
        n_op = sum(r.op_gate.num_gates for r in op_rows)  # type: ignore[union-attr]
        hard_ops = hard[:n_op].tolist() if n_op and flat.device.type != "meta" else [1.0] * n_op  # one sync
        offset = 0
        for r in op_rows:
            n = r.op_gate.num_gates  # type: ignore[union-attr]
            level = leading_ones(hard_ops[offset : offset + n])
            r.attn.choose(level, level_weight(gates[offset : offset + n], level))
            offset += n
        for r in ffn_rows:
            n = r.ffn_gate.num_gates  # type: ignore[union-attr]
            r.mlp.choose(mask=r.ffn_gate.neuron_mask(gates[offset : offset + n]))  # type: ignore[union-attr]
            offset += n

    def _draw_deterministic(self) -> None:
        self._choose_constant()
        op_rows = [r for r in self.rows if r.op_gate is not None]
        if op_rows:
            flat = torch.cat([r.op_gate.logits.detach() for r in op_rows]) > 0  # type: ignore[union-attr]
            on = flat.tolist() if flat.device.type != "meta" else [True] * flat.numel()  # one sync
            offset = 0
            for r in op_rows:
                n = r.op_gate.num_gates  # type: ignore[union-attr]
                r.attn.choose(leading_ones([float(v) for v in on[offset : offset + n]]))
                offset += n
        for r in self.rows:
            if r.ffn_gate is not None:
                r.mlp.choose(kept=r.ffn_gate.kept() if r.ffn_gate.logits.device.type != "meta" else None)

    def _choose_constant(self) -> None:
        """Blocks without a gate: their single candidate (and a fixed FFN width, if declared)."""
        for r in self.rows:
            if r.op_gate is None:
                r.attn.choose(0)
            if r.ffn_gate is None:
                r.mlp.choose(kept=r.mlp.fixed_keep())

    # --- fixing an architecture ------------------------------------------------------------------------------

    def fix(self, arch: FrozenArch | None, kept: dict[str, Tensor] | None = None) -> None:
        """Force every block to ``arch`` in all modes (``kept``: FFN neuron masks by decision; by default the
        masks :meth:`width_mask` picks); ``fix(None)`` releases the gates."""
        if arch is None:
            self._fixed = None
            return
        if len(arch.blocks) != len(self.rows):
            raise ValueError(f"the architecture has {len(arch.blocks)} blocks, the supernet {len(self.rows)}")
        kept = kept or {}
        for r, b in zip(self.rows, arch.blocks, strict=True):
            if b.op not in r.plan.attention:
                raise ValueError(
                    f"blocks.{r.index}.attention: '{b.op}' is not a candidate {r.plan.attention}"
                )
            mask = kept.get(f"blocks.{r.index}.ffn")
            mask = self.width_mask(r.index, b.ffn) if mask is None else mask.to(torch.bool)
            if int(mask.sum()) != b.ffn:
                raise ValueError(
                    f"blocks.{r.index}.ffn: the kept mask has {int(mask.sum())} neurons, not {b.ffn}"
                )
            r.attn.choose(r.plan.attention.index(b.op))
            r.mlp.choose(kept=mask)
        self._fixed = arch

    @property
    def fixed(self) -> FrozenArch | None:
        return self._fixed

    def width_mask(self, block: int, width: int) -> Tensor:
        """The neurons a block keeps at FFN ``width``: nested widths by the importance order, granular gates by
        descending gate logit (whole groups), a fixed width by its declared mask."""
        r = self.rows[block]
        device = r.mlp.fc1.weight.device
        if width == r.hidden:
            return torch.ones(r.hidden, dtype=torch.bool, device=device)
        g = r.ffn_gate
        if g is None:
            keep = r.mlp.fixed_keep()
            if keep is None or int(keep.sum()) != width:
                raise ValueError(f"blocks.{block}.ffn: width {width} is not the block's fixed width")
            return keep
        if g.nested:
            widths = g.choice.widths or ()
            if width not in widths:
                raise ValueError(f"blocks.{block}.ffn: width {width} is not one of {widths}")
            level = widths.index(width)
            gates = torch.tensor([1.0] * level + [0.0] * (g.num_gates - level), device=device)
            return g.neuron_mask(gates) > 0.5
        return _granular_mask(g, width, block)

    # --- reading the gates -----------------------------------------------------------------------------------

    def levels(self) -> list[int]:
        """Each block's deterministic op level (index into its plan's candidates)."""
        return [r.op_gate.level() if r.op_gate is not None else 0 for r in self.rows]

    def kept_units(self) -> dict[str, Tensor]:
        """``blocks.i.ffn`` → bool mask over the block's hidden neurons: what :meth:`derive` keeps (every block)."""
        if self._fixed is not None:
            return {f"blocks.{r.index}.ffn": _kept_of(r.mlp) for r in self.rows}
        out = {}
        for r in self.rows:
            if r.ffn_gate is not None:
                out[f"blocks.{r.index}.ffn"] = r.ffn_gate.kept()
            else:
                keep = r.mlp.fixed_keep()
                out[f"blocks.{r.index}.ffn"] = (
                    keep
                    if keep is not None
                    else torch.ones(r.hidden, dtype=torch.bool, device=r.mlp.fc1.weight.device)
                )
        return out

    def derive(self) -> FrozenArch:
        """The architecture the gates select: ops by ``cumprod(1[θ > 0])``, FFN width = kept neurons."""
        if self._fixed is not None:
            return self._fixed
        kept = self.kept_units()
        blocks = []
        for r, level in zip(self.rows, self.levels(), strict=True):
            p = r.plan
            n = int(kept[f"blocks.{r.index}.ffn"].sum())
            blocks.append(BlockArch(p.attention[level], n, p.heads[0], p.head_dim[0], p.density[0]))
        embed = self.space.embed[0] if self.space.embed else self.space.geometry.embed_dim
        return FrozenArch(tuple(blocks), embed)

    # --- cost ------------------------------------------------------------------------------------------------

    def expected_cost(self, convention: Convention | None = None, metric: str = "macs") -> Tensor:
        """Differentiable F(gates) (SPViT §2–3), float64: ``macs`` (multiply-adds) or ``params``.

        Deterministic indicators (forward ``1[θ > 0]``, cumulative for ops and nested widths; gradient of
        ``σ(σ(θ) − 0.5)``) weight each gate's cost increment from :mod:`spvit_dsl.space.cost`; the constant part (stem,
        head, norms, ungated choices) is included, so the value equals ``cost.arch_cost(derive())`` exactly.
        With a fixed architecture it is that architecture's cost, a constant.
        """
        convention = convention or self.convention
        if metric not in ("macs", "params"):
            raise ValueError(f"unknown cost metric '{metric}'; expected 'macs' or 'params'")
        device = self._gate_device()
        if self._fixed is not None:
            c = cost_model.arch_cost(self.space.geometry, self._fixed, convention)
            return torch.tensor(
                float(c.macs if metric == "macs" else c.params), dtype=torch.float64, device=device
            )
        table = self._table(convention, metric)
        total = torch.tensor(table.constant, dtype=torch.float64, device=device)
        inds = [g.indicators() for g in self._ordered_gates()]
        if not inds:
            return total
        incr = torch.tensor(table.increments, dtype=torch.float64, device=device)
        return total + (torch.cat(inds).to(torch.float64) * incr).sum()

    def _ordered_gates(self) -> list[OpGate | FfnGate]:
        out: list[OpGate | FfnGate] = [r.op_gate for r in self.rows if r.op_gate is not None]
        return out + [r.ffn_gate for r in self.rows if r.ffn_gate is not None]

    def _table(self, convention: str, metric: str) -> CostTable:
        key = (convention, metric)
        if key not in self._tables:
            self._tables[key] = build_table(self.space, self.rows, convention, metric)
        return self._tables[key]

    def unit_table(self, convention: Convention | None = None) -> list[Unit]:
        """Every prunable unit (gate) with its logit, cost saving and whether :meth:`derive` keeps it (see
        :class:`Unit`); op gates first (block order), then FFN gates."""
        convention = convention or self.convention
        macs, params = self._table(convention, "macs"), self._table(convention, "params")
        units: list[Unit] = []
        offset = 0
        for g in self._ordered_gates():
            logits = g.logits.detach().cpu().tolist()
            on = _units_on(g, logits)
            sizes = g.group_sizes() if isinstance(g, FfnGate) else [0] * g.num_gates
            nested = isinstance(g, OpGate) or g.nested
            for j, logit in enumerate(logits):
                units.append(
                    Unit(
                        g.decision,
                        j,
                        logit,
                        macs.increments[offset + j],
                        params.increments[offset + j],
                        on[j],
                        nested,
                        sizes[j],
                    )
                )
            offset += g.num_gates
        return units

    def set_unit(self, decision: str, index: int, on: bool) -> None:
        """Force the sign of one gate logit (keeps its magnitude, at least 1e-3): used by budget repair."""
        gate = self.gates[decision]
        with torch.no_grad():
            value = max(abs(float(gate.logits[index])), 1e-3)
            gate.logits[index] = value if on else -value

    # --- saving ----------------------------------------------------------------------------------------------

    def save(self, path: str, spec_text: str = "") -> None:
        """Write the supernet to ``path`` (safetensors; see :func:`spvit_dsl.supernet.save_supernet`)."""
        from .io import save_supernet

        save_supernet(self, path, spec_text)

    def extra_repr(self) -> str:
        g = self.space.geometry
        return (
            f"backbone={g.model}, family={g.family}, blocks={g.depth}, decisions={len(self.gates)}, "
            f"convention={self.convention}, seed={self.seed}"
        )


# --- helpers -------------------------------------------------------------------------------------------------


def _kept_of(mlp: GatedMlp) -> Tensor:
    mask = torch.zeros(mlp.hidden, dtype=torch.bool, device=mlp.fc1.weight.device)
    index = mlp.kept_index()
    if index is None:
        mask[:] = True
    else:
        mask[index] = True
    return mask


def _granular_mask(g: FfnGate, width: int, block: int) -> Tensor:
    """Whole groups by descending logit until ``width`` neurons are kept (exactly, or a ValueError)."""
    sizes = torch.bincount(g.group_of, minlength=g.num_gates)
    order = torch.sort(g.logits.detach(), descending=True, stable=True).indices.tolist()
    chosen, total = [], 0
    for j in order:
        if total >= width:
            break
        chosen.append(j)
        total += int(sizes[j])
    if total != width:
        raise ValueError(f"blocks.{block}.ffn: width {width} is not a sum of whole gate groups")
    keep_groups = torch.zeros(g.num_gates, dtype=torch.bool, device=g.group_of.device)
    keep_groups[chosen] = True
    return keep_groups[g.group_of]


def _units_on(g: OpGate | FfnGate, logits: list[float]) -> list[bool]:
    on = [v > 0 for v in logits]
    if isinstance(g, OpGate) or g.nested:
        level = leading_ones([1.0 if v else 0.0 for v in on])
        return [j < level for j in range(len(on))]
    return on
