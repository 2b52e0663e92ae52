"""The objective (popo_core/algo/objective.py): a registered method bound to `algo.*`.

Every registered method builds from its YAML; each knob it reads reaches its loss (the objective's
loss equals popo_core.algo.losses called directly with that knob, and differs from the loss with the
default); the group sizes it refuses are exactly those the method's step quantities cannot take;
the penalty's knobs are bound the same way. Which penalty each ablation picks is in
tests/test_ablate.py.
"""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import pytest
import torch

from popo_core.algo import losses
from popo_core.algo.losses import METHODS
from popo_core.algo.objective import build_objective
from popo_core.algo.siamese import PENALTIES, kl_penalty, similarity_penalty
from popo_core.config import compose
from popo_core.errors import ConfigError, UserError
from helpers import F64, loss_and_grad, make_batch

# The overrides that select each registered method (a `+negatives` entry is popo's ablation switch).
SELECT = {name: [f"algo={name}"] for name in METHODS if "+" not in name}
SELECT["popo+negatives"] = ["algo=popo", "algo.use_negatives=true"]

# For every knob a method reads: a value other than its YAML default that changes the loss on
# make_batch(seed, spread=0.5) (ratios far enough from 1 that a smaller clip_eps matters).
CHANGED = {
    "clip_eps": 0.1,
    "redistribution": "self_normalized",
    "aggregation": None,  # the other of the two
    "scale_std": False,
    "adv_eps": 0.3,
    "kl_beta": 0.04,
    "max_length": 9,
    "positive_weight": 0.5,
}
KNOBS = [(name, knob) for name in SELECT for knob in METHODS[name].knobs]


@functools.lru_cache(maxsize=None)
def yaml_algo(name: str):
    return compose("tiny", SELECT[name]).algo  # a Hydra compose takes a few tenths of a second: once per method


def algo_of(method: str, /, **changes):
    """The method's AlgoConfig as its YAML composes it, with `changes` (never mutated in place)."""
    return dataclasses.replace(yaml_algo(method), **changes)


def changed(algo, knob) -> dict:
    value = CHANGED[knob]
    if knob == "aggregation":
        value = "token_mean" if algo.aggregation == "seq_mean_token_mean" else "seq_mean_token_mean"
    return {knob: value}


def seq_log_ratio(b) -> torch.Tensor:
    return torch.where(b.mask, b.lp - b.old, torch.zeros_like(b.lp)).sum(-1) / b.mask.sum(-1)


def objective_loss(obj, b, lp):
    """The trainer's way: the step's quantities, then the bound loss over every row."""
    step = obj.quantities(b.rewards, b.gids, b.mask.sum(-1),
                          seq_log_ratio=seq_log_ratio(b) if obj.needs.seq_log_ratio else None)
    extra = {"ref_logprobs": b.ref} if obj.needs.reference else {}
    return obj.policy_loss(lp, b.old, b.mask, b.rewards, b.gids, step=step, **extra)


def direct_loss(name, knobs, b, lp):
    """The same through popo_core.algo.losses' own entry points, with the knobs given by hand."""
    step = losses.step_quantities(name, b.rewards, b.gids, b.mask.sum(-1), seq_log_ratio=seq_log_ratio(b), **knobs)
    extra = {"ref_logprobs": b.ref} if knobs.get("kl_beta", 0.0) > 0 else {}
    return losses.policy_loss(name, **knobs)(lp, b.old, b.mask, b.rewards, b.gids, step=step, **extra)


# ------------------------------------------------------------------------------------ building
@pytest.mark.parametrize("name", list(SELECT))
def test_every_registered_method_builds_from_its_yaml(name):
    algo = algo_of(name)
    obj = build_objective(algo, group_size=8)  # the tiny preset's rollout.group_size
    assert obj.method is METHODS[name] and obj.name == name
    assert obj.knobs == {k: getattr(algo, k) for k in METHODS[name].knobs}
    assert obj.needs == METHODS[name].needs(obj.knobs)
    assert obj.siamese == (name.startswith("popo"))  # the momentum network is POPO's alone by default
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.equal(obj.forwarded(rewards), METHODS[name].forwarded(rewards))
    assert torch.equal(obj.penalised(rewards), METHODS[name].penalised(rewards))


def test_every_method_is_selected_by_this_table():
    """A method registered later must be added to SELECT, or the tests above skip it."""
    assert set(SELECT) == set(METHODS)


def test_anything_with_the_attributes_builds_the_same_objective():
    algo = algo_of("popo", clip_eps=0.3, representation="token")
    assert build_objective(SimpleNamespace(**dataclasses.asdict(algo))) == build_objective(algo)


# -------------------------------------------------------------------------------------- knobs
@pytest.mark.parametrize("name, knob", KNOBS)
def test_each_knob_reaches_the_loss(name, knob):
    b = make_batch(1, min_size=2, spread=0.5)
    default = algo_of(name)
    algo = algo_of(name, **changed(default, knob))
    assert getattr(algo, knob) != getattr(default, knob)
    obj = build_objective(algo)
    assert obj.knobs[knob] == getattr(algo, knob)
    # popo_core.algo.losses with the knobs written out here, not read back from the objective.
    by_hand = {k: getattr(default, k) for k in METHODS[name].knobs} | {knob: getattr(algo, knob)}
    loss, grad = loss_and_grad(lambda x: objective_loss(obj, b, x), b.lp)
    want, want_grad = loss_and_grad(lambda x: direct_loss(name, by_hand, b, x), b.lp)
    assert loss.dtype == F64 and torch.equal(loss, want) and torch.equal(grad, want_grad)
    # The knob matters here, so an objective that dropped it (used the default) would be caught.
    without, _ = loss_and_grad(lambda x: objective_loss(build_objective(default), b, x), b.lp)
    assert not torch.allclose(loss, without, rtol=1e-6, atol=1e-9), (name, knob)


@pytest.mark.parametrize("name", list(SELECT))
def test_quantities_are_the_methods_own(name):
    b = make_batch(2, min_size=2, spread=0.5)
    obj = build_objective(algo_of(name))
    ratio = seq_log_ratio(b)
    got = obj.quantities(b.rewards, b.gids, b.mask.sum(-1), seq_log_ratio=ratio)
    want = losses.step_quantities(name, b.rewards, b.gids, b.mask.sum(-1), seq_log_ratio=ratio, **obj.knobs)
    assert got.totals == want.totals and got.rows.keys() == want.rows.keys()
    for k in got.rows:
        assert torch.equal(got.rows[k], want.rows[k]), k


def test_needs_follow_the_knobs():
    assert build_objective(algo_of("grpo", kl_beta=0.04)).needs.reference
    assert not build_objective(algo_of("grpo")).needs.reference
    assert build_objective(algo_of("popo", redistribution="self_normalized")).needs.seq_log_ratio
    assert not build_objective(algo_of("popo")).needs.seq_log_ratio


# ---------------------------------------------------------------------------------- group size
@pytest.mark.parametrize("name", list(SELECT))
@pytest.mark.parametrize("scale_std", [True, False])
def test_group_size_refused_exactly_where_the_method_cannot_compute(name, scale_std):
    """Groups of one: the objective refuses them (a UserError naming rollout.group_size) for just the
    methods whose step quantities fail on them, and builds for every other."""
    algo = algo_of(name, scale_std=scale_std)
    b = make_batch(0)
    singletons = torch.arange(len(b.rewards))
    try:
        build_objective(algo).quantities(b.rewards, singletons, b.mask.sum(-1), seq_log_ratio=seq_log_ratio(b))
        computes = True
    except ValueError:
        computes = False
    if computes:
        assert build_objective(algo, group_size=1).name == name
    else:
        with pytest.raises(UserError, match=rf"rollout.group_size=1: must be >= 2 for {name.replace('+', '.')}"):
            build_objective(algo, group_size=1)
        assert build_objective(algo, group_size=2).name == name
    assert computes == (not (scale_std and "scale_std" in METHODS[name].knobs))


# ---------------------------------------------------------------------------------------- names
def test_an_unregistered_name_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"algo.name=ppo: not a registered method \(choose from: popo, grpo") as err:
        build_objective(algo_of("popo", name="ppo"))
    assert "+" not in str(err.value)  # combinations are not names a user types


def test_use_negatives_without_a_registered_combination_is_refused():
    with pytest.raises(ConfigError, match="algo.use_negatives=true: psr has no positive-only ablation"):
        build_objective(algo_of("psr", use_negatives=True))


# ------------------------------------------------------------------------------------- penalty
def hidden_states(seed=0, n=5, t=6, h=8):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(t)[None, :] < torch.randint(1, t + 1, (n,), generator=gen)[:, None]
    return torch.randn(n, t, h, generator=gen, dtype=F64), torch.randn(n, t, h, generator=gen, dtype=F64), mask


@pytest.mark.parametrize("representation", ["mean", "token"])
def test_the_penalty_is_bound_to_its_knobs(representation):
    obj = build_objective(algo_of("popo", representation=representation, penalty_weight=0.3))
    assert obj.penalty is PENALTIES["similarity"] and obj.penalty_weight == 0.3
    assert obj.penalty_knobs == {"representation": representation}
    online, target, mask = hidden_states()
    got, _ = obj.penalty_fn()(online, target, mask)
    assert torch.equal(got, similarity_penalty(online, target, mask, representation=representation)[0])
    other = {"mean": "token", "token": "mean"}[representation]
    assert not torch.allclose(got, similarity_penalty(online, target, mask, representation=other)[0])


def test_kl_penalty_reads_no_knob():
    obj = build_objective(algo_of("popo", penalty="kl"))
    assert obj.penalty is PENALTIES["kl"] and obj.penalty_knobs == {}
    b = make_batch(3)
    assert torch.equal(obj.penalty_fn()(b.lp, b.ref, b.mask)[0], kl_penalty(b.lp, b.ref, b.mask)[0])


@pytest.mark.parametrize("name, changes", [("popo", {"penalty_weight": 0.0}), ("grpo", {}), ("psr", {})])
def test_no_penalty_without_a_weight_or_a_momentum_network(name, changes):
    algo = algo_of(name, **changes)
    obj = build_objective(algo)
    assert obj.penalty is None and obj.penalty_weight == 0.0 and obj.penalty_knobs == {} and obj.penalty_fn() is None
    assert obj.siamese == algo.siamese  # a zero weight keeps the momentum network (and its update)


def test_any_method_with_the_momentum_network_gets_the_penalty():
    obj = build_objective(algo_of("psr", siamese=True, penalty_weight=0.2))
    assert obj.siamese and obj.penalty is PENALTIES["similarity"] and obj.penalty_weight == 0.2
