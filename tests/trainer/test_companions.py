"""The policy's companions (popo_core/trainer/companions.py) on the tiny model, directly.

The momentum copy follows xi <- m xi + (1 - m) theta (METHOD.md section 2), checked against the
same average computed here in float64; m = 1 freezes it; the tied embedding is averaged once and
stays tied; the frozen reference never moves while the policy trains; both checkpoint through
safetensors. With LoRA the momentum network is a second adapter and the reference is the base
with adapters disabled. (Through the trainer's optimizer step: tests/trainer/test_lora_precision.py.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from popo_core.model.lora import MOMENTUM, POLICY, adapter_params
from popo_core.trainer.companions import (AdaptersDisabled, FullCopy, MomentumAdapter, autocast, momentum_network,
                                          reference_network)
from helpers import tiny_config, tiny_model, token_ids

F64 = torch.float64


def perturb_(params, seed: int, scale: float = 0.05) -> None:
    """Move weights by seeded noise: the policy drifts away from its companions."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- the momentum copy
@pytest.mark.parametrize("m", [0.5, 0.9, 0.99])
def test_momentum_copy_is_the_ema_computed_in_float64(m):
    model, _ = tiny_model()
    xi = momentum_network(model)
    assert isinstance(xi, FullCopy)
    start = {n: p.detach().to(F64).clone() for n, p in xi.module.named_parameters()}
    expect, swapped = dict(start), dict(start)
    for k in range(3):
        perturb_(model.parameters(), seed=k)
        theta = {n: p.detach().to(F64) for n, p in model.named_parameters()}
        xi.update_(model, m)
        expect = {n: m * expect[n] + (1 - m) * theta[n] for n in expect}  # METHOD.md section 2
        swapped = {n: (1 - m) * swapped[n] + m * theta[n] for n in swapped}
    got = {n: p.detach().to(F64) for n, p in xi.module.named_parameters()}
    assert got.keys() == expect.keys()

    def gap(other):
        return max(float((got[n] - other[n]).abs().max()) for n in got)

    assert gap(expect) < 1e-6  # float32 rounding of three averages
    # The tolerance catches a wrong update: none at all, a plain copy, or m and 1 - m swapped.
    for wrong in (start, theta) + ((swapped,) if m != 0.5 else ()):
        assert gap(wrong) > 1e-3
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in xi.module.parameters())


def test_the_tied_embedding_is_averaged_once_and_stays_tied():
    model, _ = tiny_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny preset ties them
    xi = FullCopy(model)
    assert xi.module.lm_head.weight is xi.module.model.embed_tokens.weight
    e0 = xi.module.model.embed_tokens.weight.detach().to(F64).clone()
    perturb_(model.parameters(), seed=3)
    theta = model.model.embed_tokens.weight.detach().to(F64)
    xi.update_(model, 0.9)
    got = xi.module.lm_head.weight.detach().to(F64)
    assert xi.module.lm_head.weight is xi.module.model.embed_tokens.weight
    assert float((got - (0.9 * e0 + 0.1 * theta)).abs().max()) < 1e-7
    twice = 0.81 * e0 + 0.19 * theta  # what averaging it under both names would give
    assert float((got - twice).abs().max()) > 1e-4


def test_momentum_one_leaves_the_copy_frozen_and_zero_copies_the_policy():
    model, _ = tiny_model()
    xi = FullCopy(model)
    before = state(xi.module)
    perturb_(model.parameters(), seed=1)
    xi.update_(model, 1.0)
    assert all(torch.equal(v, before[k]) for k, v in xi.module.state_dict().items())
    xi.update_(model, 0.0)
    policy = model.state_dict()
    assert all(torch.equal(v, policy[k]) for k, v in xi.module.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in xi.module.state_dict().items())


def test_the_copy_shares_no_storage_and_takes_no_gradient():
    model, _ = tiny_model()
    xi = FullCopy(model)
    ours = {t.data_ptr() for t in model.state_dict().values()}
    assert not ours & {t.data_ptr() for t in xi.module.state_dict().values()}
    with xi.active() as module:
        assert module is xi.module and not module.training
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in xi.module.parameters())


# ----------------------------------------------------------------------------------- reference
def test_the_reference_never_moves_while_the_policy_trains():
    model, _ = tiny_model()
    reference, momentum = reference_network(model, torch.float32), momentum_network(model)
    before = state(reference.module)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = token_ids()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        momentum.update_(model, 0.5)
    assert all(torch.equal(v, before[k]) for k, v in reference.module.state_dict().items())
    # The policy and the momentum copy did move: a reference that followed them would be caught.
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in momentum.module.state_dict().items())


def test_the_reference_may_hold_the_compute_dtype():
    model, _ = tiny_model()
    reference = reference_network(model, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in reference.module.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the policy's masters stay fp32
    for k, v in reference.module.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, model.state_dict()[k].to(v.dtype)), k


# ---------------------------------------------------------------------------------- checkpoints
def test_the_copy_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = tiny_model()
    xi = FullCopy(model)
    perturb_(model.parameters(), seed=2)
    xi.update_(model, 0.5)
    save_file(xi.state_dict(), tmp_path / "momentum.safetensors")
    other = FullCopy(tiny_model(seed=1)[0])
    assert any(not torch.equal(v, xi.module.state_dict()[k]) for k, v in other.module.state_dict().items())
    other.load_state_dict(load_file(str(tmp_path / "momentum.safetensors")))
    for k, v in xi.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v), k
    assert other.module.lm_head.weight is other.module.model.embed_tokens.weight
    # Why state_dict() clones: safetensors refuses the tied tensors as the module holds them.
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(dict(xi.module.state_dict()), tmp_path / "raw.safetensors")


# ----------------------------------------------------------------------------------- precision
def test_autocast_runs_bf16_over_fp32_and_nothing_for_fp32():
    a = torch.randn(4, 4)
    with autocast(torch.device("cpu"), torch.float32):
        assert (a @ a).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    assert a.dtype == torch.float32


# ----------------------------------------------------------------------------------------- LoRA
def lora_policy():
    pytest.importorskip("peft")
    from popo_core.model.lora import add_lora

    model, _ = tiny_model()
    ids = token_ids()
    with torch.no_grad():
        base_logits = model(ids).logits
    model = add_lora(model, dataclasses.replace(tiny_config().model.lora, rank=4))
    perturb_([p for _, p in adapter_params(model, POLICY)], seed=4, scale=0.3)  # B starts at 0: make the adapter act
    return model, ids, base_logits


def test_lora_companions_are_an_adapter_and_the_base():
    model, _, _ = lora_policy()
    assert isinstance(momentum_network(model), MomentumAdapter)
    assert isinstance(reference_network(model, torch.float32), AdaptersDisabled)


@pytest.mark.parametrize("m", [0.9, 1.0])
def test_momentum_adapter_is_the_ema_of_the_policy_adapter(m):
    model, ids, _ = lora_policy()
    xi = MomentumAdapter(model)
    policy, momentum = dict(adapter_params(model, POLICY)), dict(adapter_params(model, MOMENTUM))
    assert len(policy) == len(momentum) > 0
    twin = {n: policy[n.replace(f".{MOMENTUM}.", f".{POLICY}.")] for n in momentum}
    assert all(torch.equal(p, twin[n]) and not p.requires_grad for n, p in momentum.items())
    assert all(p.requires_grad for p in policy.values())
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    start = {n: p.detach().to(F64).clone() for n, p in momentum.items()}
    perturb_(policy.values(), seed=5)
    xi.update_(model, m)
    for n, p in momentum.items():
        want = m * start[n] + (1 - m) * twin[n].detach().to(F64)  # A and B each (METHOD.md section 2)
        assert float((p.detach().to(F64) - want).abs().max()) < 1e-7, n
    if m == 1.0:
        assert all(torch.equal(p.detach().to(F64), start[n]) for n, p in momentum.items())
    else:
        assert any(not torch.equal(p.detach().to(F64), start[n]) for n, p in momentum.items())
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if "lora_" not in k)
    assert xi.held() == sum(p.numel() for p in momentum.values())


def test_momentum_adapter_is_active_only_inside_and_checkpoints():
    model, ids, _ = lora_policy()
    xi = MomentumAdapter(model)
    perturb_([p for _, p in adapter_params(model, MOMENTUM)], seed=6, scale=0.3)
    with torch.no_grad():
        outside = model(ids).logits
        with xi.active() as module:
            assert model.active_adapter == MOMENTUM
            inside = module(ids).logits
    assert model.active_adapter == POLICY and not torch.allclose(inside, outside)
    with pytest.raises(KeyError), xi.active():
        raise KeyError("a failing forward")
    assert model.active_adapter == POLICY  # the policy's adapter is back even after an error
    saved = xi.state_dict()
    perturb_([p for _, p in adapter_params(model, MOMENTUM)], seed=7)
    xi.load_state_dict(saved)
    assert all(torch.equal(p, saved[n]) for n, p in adapter_params(model, MOMENTUM))
    with pytest.raises(RuntimeError, match="does not match the momentum adapter"):
        xi.load_state_dict({k: v for k, v in list(saved.items())[1:]})


def test_lora_reference_is_the_base_with_adapters_disabled():
    model, ids, base_logits = lora_policy()
    reference = AdaptersDisabled(model)
    with torch.no_grad():
        with reference.active() as module:
            frozen = module(ids).logits
        policy = model(ids).logits
    torch.testing.assert_close(frozen, base_logits, rtol=0, atol=1e-6)
    assert not torch.allclose(policy, base_logits, atol=1e-4)  # the adapter acts outside
    with pytest.raises(TypeError, match="frozen"):
        reference.update_(model, 0.9)
    assert reference.state_dict() == {} and reference.held() == 0
