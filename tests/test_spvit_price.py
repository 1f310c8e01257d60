"""SPViT's price controller: the solve is exact and maximal on every tiny space, ties follow weight magnitude, the
schedule, and searches on digits_tiny that bring the derived network to the budget by themselves (issue 9 §1)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _spaces import SPACES, net_for, random_logits

from spvit_dsl.compile.program import compile_file
from spvit_dsl.search import run_search
from spvit_dsl.search.budget import Target
from spvit_dsl.search.methods.spvit_gates import FfnGate, SpvitGates
from spvit_dsl.search.methods.spvit_price import apply_price, gate_costs, reach_target, solve_price
from spvit_dsl.space import cost
from spvit_dsl.space.units import parse_budget_flag

SPEC = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_tiny.vit")


def _pricer(net, convention):
    def price(arch):
        c = cost.arch_cost(net.space.geometry, arch, convention)
        return {"flops": float(c.macs), "params": float(c.params)}

    return price


@pytest.mark.parametrize("name", SPACES)
@pytest.mark.parametrize("convention", ["exact", "paper"])
def test_the_solved_network_costs_what_the_solver_predicts_and_nothing_more_fits(name, convention):
    """Costs add up in SPViT's space, so the solve is exact: the derived network's analytic cost equals the
    prediction, meets the target whenever the cheapest network does, and no gate left off could be turned on
    (its chain predecessor on) without breaking a budget."""
    net = net_for(name)
    gates = SpvitGates(net)
    price = _pricer(net, convention)
    dense = price(gates.derive(net))
    targets = [Target("flops", dense["flops"] * 0.5), Target("params", dense["params"] * 0.7)]
    costs = gate_costs(gates, net, targets, price)
    cheapest = (costs.full - costs.cost.sum(0)).max().item()
    for seed in range(6):
        random_logits(gates, seed)
        for target in (1.0, 1.25):
            ordered = gates.ordered()
            logits = torch.cat([g.logits.detach() for g in ordered])
            sol = solve_price(logits, costs, target)
            apply_price(ordered, sol, costs)
            true = price(gates.derive(net))
            ratios = [true[t.metric] / t.limit for t in targets]
            assert ratios == pytest.approx(list(sol.ratios), abs=1e-9)
            if cheapest <= target:
                assert max(ratios) <= target + 1e-9
            on = torch.cat([(g.logits.detach().double() - g.shift) > 0 for g in ordered])
            for a, b in costs.chains:  # a cumulative gate counts only when every gate before it is on
                on[a:b] = torch.cumprod(on[a:b].long(), 0).bool()
            chain_start = {i: a for a, b in costs.chains for i in range(a, b)}
            now = torch.tensor(ratios, dtype=torch.float64)
            for i in torch.nonzero(~on).flatten().tolist():
                if i in chain_start and i > chain_start[i] and not on[i - 1]:
                    continue  # a later level whose earlier one is off cannot be turned on alone
                assert bool(((now + costs.cost[i]) > target + 1e-9).any()), (seed, target, i)


@pytest.mark.parametrize("seed", range(4))
def test_a_class_token_vit_keeps_the_msa_block_its_gates_value_most(seed):
    """A DeiT classifies from its class token, which reads the patches only through msa: with every op gate's logit
    below the FFN gates' (the gates drifting off attention, as they did on digits under a latency budget), the
    price would turn every block to a cheaper op and the search would train a network blind to its input. The
    solver keeps the msa chain whose msa level the gates value most and cuts the rest; without ``attend`` (the
    same costs) no msa survives, so the test can tell. A Swin (it reads its patches) has nothing to keep."""
    from dataclasses import replace

    from spvit_dsl.search.methods.spvit_gates import OpGate
    from spvit_dsl.space.plan import reads_image

    net = net_for("deit")
    gates = SpvitGates(net)
    price = _pricer(net, "paper")
    targets = [Target("flops", price(gates.derive(net))["flops"] * 0.6)]
    costs = gate_costs(gates, net, targets, price)
    assert costs.attend and len(costs.attend) == sum(isinstance(g, OpGate) for g in gates.ordered())
    random_logits(gates, seed)
    ordered = gates.ordered()
    with torch.no_grad():  # every op gate under every FFN gate
        for g in ordered:
            if isinstance(g, OpGate):
                g.logits.sub_(10.0)
    logits = torch.cat([g.logits.detach() for g in ordered])
    blind = solve_price(logits, replace(costs, attend=()), 1.0)
    apply_price(ordered, blind, replace(costs, attend=()))
    assert not reads_image(net.space.geometry, gates.derive(net))
    sol = solve_price(logits, costs, 1.0)
    apply_price(ordered, sol, costs)
    arch = gates.derive(net)
    assert reads_image(net.space.geometry, arch) and max(sol.ratios) <= 1.0 + 1e-9
    ops = [g for g in ordered if isinstance(g, OpGate)]
    # the msa level's kill price is the chain's running minimum: its smallest logit (ties are far smaller)
    valued = max(range(len(ops)), key=lambda k: float(ops[k].logits.detach().min()))
    assert [b.op == "msa" for b in arch.blocks].count(True) >= 1
    assert arch.blocks[int(ops[valued].decision.split(".")[1])].op == "msa"
    assert sol.ratios == pytest.approx([price(arch)["flops"] / targets[0].limit], abs=1e-9)
    # a target only a network without msa meets (none does: 0) is missed with the msa chain kept, as the projection
    # would miss it; without the rule every gate goes
    apply_price(ordered, solve_price(logits, costs, 0.0), costs)
    unreachable = gates.derive(net)
    assert unreachable.blocks[int(ops[valued].decision.split(".")[1])].op == "msa"
    assert [b.op for b in unreachable.blocks].count("msa") == 1  # everything else cut
    apply_price(ordered, solve_price(logits, replace(costs, attend=()), 0.0), replace(costs, attend=()))
    assert not reads_image(net.space.geometry, gates.derive(net))


def test_nothing_is_kept_for_attention_where_the_network_reads_its_patches_or_a_block_always_attends():
    """Swin classifies from its patch tokens, and a DeiT whose first block is fixed to msa (not gated) attends
    whatever the gates do: neither gets an msa chain to keep."""
    from _spaces import ALL_OPS, tiny_vit_space

    from spvit_dsl.supernet.lower import lower

    torch.manual_seed(0)
    fixed = lower(tiny_vit_space(ops=lambda i: ("msa",) if i == 0 else ALL_OPS))
    for net, kept in ((net_for("swin"), False), (fixed, False), (net_for("deit"), True)):
        gates = SpvitGates(net)
        price = _pricer(net, "paper")
        targets = [Target("flops", price(gates.derive(net))["flops"] * 0.6)]
        assert bool(gate_costs(gates, net, targets, price).attend) == kept, net.space.geometry.model


def test_a_higher_logit_never_loses_to_a_lower_one_among_independent_gates():
    """Per-neuron FFN gates: everything kept has a higher logit (plus tie-break) than everything cut."""
    net = net_for("deit")
    gates = SpvitGates(net)
    price = _pricer(net, "paper")
    targets = [Target("flops", price(gates.derive(net))["flops"] * 0.6)]
    costs = gate_costs(gates, net, targets, price)
    random_logits(gates, 3)
    ordered = gates.ordered()
    sol = solve_price(torch.cat([g.logits.detach() for g in ordered]), costs, 1.0)
    apply_price(ordered, sol, costs)
    offset = sum(g.num_gates for g in ordered if not isinstance(g, FfnGate))
    for g in ordered:
        if not isinstance(g, FfnGate):
            continue
        tie = costs.tie[offset : offset + g.num_gates]
        key = g.logits.detach().double() + tie
        on = (g.logits.detach().double() - g.shift) > 0
        if on.any() and (~on).any():
            assert key[on].min() > key[~on].max()
        offset += g.num_gates


def test_equal_logits_are_cut_weakest_neuron_first():
    """At the start every logit is equal: the first neurons the price cuts are those with the smallest
    ‖fc1 row‖·‖fc2 column‖ of their block (weights from a dense start are meaningful)."""
    net = net_for("deit")
    gates = SpvitGates(net)
    price = _pricer(net, "paper")
    full = price(gates.derive(net))["flops"]
    ffn = next(g for g in gates.ordered() if isinstance(g, FfnGate))
    block = int(ffn.decision.split(".")[1])
    levels = gates.levels()  # every gate on: the top candidate everywhere
    per_neuron = full - price(SpvitGates.arch_at(net, levels, {ffn.decision: ffn.hidden - 1}))["flops"]
    targets = [Target("flops", full - 3.5 * per_neuron)]  # room for cutting 4 neurons
    costs = gate_costs(gates, net, [Target("flops", targets[0].limit)], price)
    ordered = gates.ordered()
    only_ffn = torch.cat([torch.full((g.num_gates,), 5.0 if g is not ffn else 1.5) for g in ordered])
    sol = solve_price(only_ffn, costs, 1.0)
    apply_price(ordered, sol, costs)
    cut = torch.nonzero(~ffn.kept()).flatten()
    assert cut.numel() == 4
    importance = net.rows[block].mlp.importance()
    assert set(cut.tolist()) == set(torch.argsort(importance)[:4].tolist())


def test_reach_target_schedule():
    assert reach_target(2.0, 0.0, 0.5) == 2.0
    assert reach_target(2.0, 0.25, 0.5) == pytest.approx(1.5)
    assert reach_target(2.0, 0.5, 0.5) == 1.0
    assert reach_target(2.0, 0.9, 0.5) == 1.0
    assert reach_target(0.8, 0.1, 0.5) == 1.0  # a budget above the dense cost: nothing to cut
    assert reach_target(3.0, 0.0, 0.0) == 1.0  # budget_reach 0: at the budget from the first step


# --- searches on digits_tiny: the derived network reaches the budget during the search -----------------------


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    """A dense digits_tiny trained for a few epochs (a timm state dict), the start a user fine-tunes from."""
    from spvit_dsl.train.finetune import FinetuneSettings
    from spvit_dsl.train.recipe import train_dense

    program = compile_file(SPEC)
    settings = FinetuneSettings(epochs=6, batch_size=64, lr=2e-3, warmup_epochs=1, seed=0)
    trained = train_dense(program, str(tmp_path_factory.mktemp("dense")), settings)
    assert trained.metrics.top1 > 60  # a real start: far from chance (10%)
    return trained.timm_state


def _search(tmp_path, budget, epochs, init=None):
    program = compile_file(SPEC, budgets=[parse_budget_flag(budget)])
    result = run_search(
        program,
        out=str(tmp_path / f"{budget[:-1]}-{epochs}"),
        epochs=epochs,
        quiet=True,
        init_checkpoint=init,
    )
    limit = result.budgets[0]["limit"]
    steps = [json.loads(line) for line in open(result.metrics_path) if '"kind": "step"' in line]
    first = next(r["step"] for r in steps if abs(r["cost"]["flops"] / limit - 1) <= 0.02)
    return result, result.info["derived_cost"]["flops"] / limit, first, steps


@pytest.mark.parametrize("budget", ["40%", "50%", "60%"])
def test_one_epoch_from_random_init_reaches_the_budget_without_the_projection(tmp_path, budget):
    result, ratio, first, steps = _search(tmp_path, budget, 1)
    assert abs(ratio - 1) <= 0.02
    assert "notice" not in result.info  # the projection only rounded
    assert first <= len(steps) // 2 + 1
    assert all("target" in r["strategy"] and "price" in r["strategy"] for r in steps)
    assert steps[0]["strategy"]["target"] > steps[-1]["strategy"]["target"] == 1.0


@pytest.mark.parametrize("epochs", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2 epochs: `make test-slow`
def test_from_dense_weights_the_search_reaches_the_budget_and_keeps_a_working_network(
    tmp_path, dense_checkpoint, epochs
):
    """The failure this replaces: from dense weights the gates never moved, the projection set every block to
    skip and the frozen network answered the same class for every image. Now the derived network is at the
    budget by half the run and still classifies (measured: ~90% after one epoch at 50%)."""
    result, ratio, first, steps = _search(tmp_path, "50%", epochs, dense_checkpoint)
    assert abs(ratio - 1) <= 0.02 and "notice" not in result.info
    assert first <= len(steps) // 2 + 1
    assert result.val_accuracy is not None and result.val_accuracy > 0.5
    assert any(b.op == "msa" for b in result.arch.blocks)


@pytest.mark.slow
@pytest.mark.parametrize("budget", ["40%", "50%", "60%"])
@pytest.mark.parametrize("epochs", [1, 2, 6])
@pytest.mark.parametrize("init", ["random", "dense"])
def test_the_whole_controller_matrix(tmp_path, dense_checkpoint, budget, epochs, init):
    """Issue 9 §1's acceptance matrix: 40/50/60% × 1/2/6 epochs × random/dense start."""
    result, ratio, first, steps = _search(
        tmp_path, budget, epochs, dense_checkpoint if init == "dense" else None
    )
    assert abs(ratio - 1) <= 0.02 and "notice" not in result.info
    assert first <= len(steps) // 2 + 1


def test_the_retired_dual_lr_setting_says_what_replaced_it():
    from spvit_dsl.compile.program import compile_text
    from spvit_dsl.lang.errors import SpecError

    text = open(SPEC, encoding="utf-8").read().replace("batch_size = 64", "batch_size = 64\n  dual_lr = 0.1")
    with pytest.raises(SpecError) as err:
        compile_text(text, "digits_tiny.vit")
    shown = err.value.render()
    assert "unknown setting 'dual_lr'" in shown and "retired" in shown and "budget_reach" in shown
    assert "digits_tiny.vit:" in shown  # located at the key
