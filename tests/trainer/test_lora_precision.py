"""Mixed precision that learns, and LoRA with an adapter-sized momentum network (popo_core/trainer/companions.py).

All on CPU with the tiny model: a bf16 run keeps fp32 masters that move at lr 1e-6; the momentum
network is a second peft adapter averaged A and B each; POPO's extra memory over LoRA GRPO is the
adapter; gradients do not change with gradient checkpointing (a momentum-adapter forward cannot leak
into the policy's gradient); a LoRA run resumes bit for bit and `popo eval` loads it.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import tiny_overrides
from popo_core.config import compose
from popo_core.model.loading import load_model_and_tokenizer
from popo_core.model.lora import MOMENTUM, POLICY, adapter_params, merged_state_dict
from popo_core.trainer.loop import build, train
from popo_core.trainer.update import StepInputs, backward, optimizer_step, recompute
from helpers import fixed_batch

pytest.importorskip("peft")


def learner(tmp_path, *overrides):
    cfg = compose("tiny", [f"trainer.output_dir={tmp_path}/run", "tracking.enabled=false", *overrides])
    return (cfg, *build(cfg))


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- mixed precision
def test_bf16_keeps_fp32_masters_that_move_at_a_tiny_learning_rate(tmp_path):
    """The issue's measurement: a bf16 AdamW step at lr 1e-6 rounds away; fp32 masters move."""
    cfg, lrn, tok, _ = learner(tmp_path, "model.dtype=bfloat16", "optim.lr=1e-6", "algo.momentum=0.99")
    assert all(p.dtype == torch.float32 for p in lrn.params)
    assert all(p.dtype == torch.float32 for p in lrn.momentum.module.parameters())
    assert lrn.compute_dtype == torch.bfloat16
    batch = fixed_batch(tok, lrn.device)
    before, mom_before = snapshot(lrn.model), snapshot(lrn.momentum.module)
    stepped = optimizer_step(lrn, batch, StepInputs(torch.arange(len(batch)), None, None), cfg)
    assert stepped is not None
    changed = [k for k, v in lrn.model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    weights = [k for k in before if "weight" in k]
    assert len(changed) >= 0.9 * len(weights)  # AdamW's first step moves (nearly) every weight by ~lr
    moved = sum(int((lrn.momentum.module.state_dict()[k] != mom_before[k]).sum()) for k in mom_before)
    total = sum(v.numel() for v in mom_before.values())
    assert moved > 0.5 * total  # and the momentum network follows, in fp32

    # The same step with bf16 weights (no masters) loses most of the update: the test can fail.
    bf16 = copy.deepcopy(before)
    lost = 0
    for k in changed:
        new = lrn.model.state_dict()[k].to(torch.bfloat16)
        lost += int((new == bf16[k].to(torch.bfloat16)).sum())
    assert lost > 0.5 * sum(lrn.model.state_dict()[k].numel() for k in changed)


def test_bf16_run_matches_fp32_within_bf16_tolerance(tmp_path):
    def one_step(dtype):
        cfg, lrn, tok, _ = learner(tmp_path / dtype, f"model.dtype={dtype}", "optim.lr=1e-3")
        batch = fixed_batch(tok, lrn.device)
        old, _ = recompute(lrn, lrn.model, batch, list(range(len(batch))), 256)
        backward(lrn, batch, StepInputs(torch.arange(len(batch)), old, None), micro_batch_size=256)
        return [p.grad.detach().clone() for p in lrn.params]

    g32, g16 = one_step("float32"), one_step("bfloat16")
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g32]),
                                                torch.cat([g.flatten() for g in g16]), dim=0)
    assert cos > 0.98  # same direction; bf16 compute costs a few digits
    rel = torch.cat([(a - b).flatten() for a, b in zip(g32, g16)]).norm() / torch.cat([a.flatten() for a in g32]).norm()
    assert 0 < rel < 0.1


# ---------------------------------------------------------------------------------------- LoRA
def test_lora_momentum_is_a_second_adapter_averaged_a_and_b_each(tmp_path):
    cfg, lrn, tok, _ = learner(tmp_path, "model.lora.rank=4", "optim.lr=1e-2", "algo.momentum=0.9")
    model = lrn.model
    policy, momentum = dict(adapter_params(model, POLICY)), dict(adapter_params(model, MOMENTUM))
    assert len(policy) == len(momentum) > 0
    assert {id(p) for p in lrn.params} == {id(p) for p in policy.values()}  # only the policy adapter trains
    base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    mom_before = {k: v.detach().clone() for k, v in momentum.items()}
    batch = fixed_batch(tok, lrn.device)
    assert optimizer_step(lrn, batch, StepInputs(torch.arange(len(batch)), None, None), cfg) is not None
    for name, xi in momentum.items():
        theta = policy[name.replace(f".{MOMENTUM}.", f".{POLICY}.")]
        # METHOD.md section 2: xi <- m xi + (1 - m) theta, on A and on B (not on their product).
        torch.testing.assert_close(xi, 0.9 * mom_before[name] + 0.1 * theta.detach(), rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(xi, mom_before[n]) for n, xi in momentum.items())
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_before[k]), k  # the base never moves


def held(lrn) -> int:
    """Elements of every parameter and buffer the run holds: model, companions, optimizer."""
    seen, total = set(), 0
    tensors = list(lrn.model.parameters()) + list(lrn.model.buffers())
    for companion in (lrn.momentum, lrn.reference):
        module = getattr(companion, "module", None)
        if module is not None:
            tensors += list(module.parameters()) + list(module.buffers())
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel()
    return total


def test_popo_costs_one_adapter_more_than_lora_grpo(tmp_path):
    _, popo, _, _ = learner(tmp_path / "p", "model.lora.rank=8")
    _, grpo, _, _ = learner(tmp_path / "g", "algo=grpo", "model.lora.rank=8", "algo.kl_beta=0.04")
    adapter = sum(p.numel() for _, p in adapter_params(popo.model, POLICY))
    assert held(popo) - held(grpo) == adapter == popo.momentum.held()
    assert grpo.reference.held() == 0  # the reference is the base with adapters disabled
    _, full, _, _ = learner(tmp_path / "f")
    assert full.momentum.held() == sum(p.numel() for p in full.model.parameters())  # a whole copy, tied weights once


def test_lora_gradients_do_not_change_with_gradient_checkpointing(tmp_path):
    """The penalty runs the momentum adapter between the policy's forward and its backward; a
    checkpointed backward recomputes the forward, which must be the policy's again."""
    def grads(checkpointing):
        cfg, lrn, tok, _ = learner(tmp_path / str(checkpointing), "model.lora.rank=4",
                                   f"model.gradient_checkpointing={checkpointing}")
        torch.manual_seed(5)
        with torch.no_grad():  # a momentum adapter away from the policy's: the penalty and its leak are live
            for _, p in adapter_params(lrn.model, MOMENTUM):
                p.add_(0.3 * torch.randn_like(p))
        batch = fixed_batch(tok, lrn.device)
        backward(lrn, batch, StepInputs(torch.arange(len(batch)), None, None), micro_batch_size=7)
        return [p.grad.detach().clone() for p in lrn.params]

    plain, checkpointed = grads(False), grads(True)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in plain)


def test_merged_weights_equal_peft_merge(tmp_path):
    _, lrn, _, _ = learner(tmp_path, "model.lora.rank=4")
    with torch.no_grad():
        for _, p in adapter_params(lrn.model, POLICY):
            p.add_(0.1)
    merged = merged_state_dict(lrn.model)
    reference = copy.deepcopy(lrn.model)
    reference.delete_adapter(MOMENTUM)
    expect = reference.merge_and_unload().state_dict()
    assert set(merged) == set(expect)
    for k in expect:
        torch.testing.assert_close(merged[k], expect[k], rtol=1e-6, atol=1e-7)


def test_lora_run_resumes_bit_for_bit_and_popo_eval_loads_it(tmp_path):
    from helpers import StopAt

    over = {"model.lora.rank": 8, "optim.lr": 1e-2}
    train(compose("tiny", tiny_overrides(tmp_path / "a", **over)))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(compose("tiny", tiny_overrides(tmp_path / "b", **over)), StopAt(5))
    train(compose("tiny", tiny_overrides(tmp_path / "b", **over)))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "run" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = load_file(str(tmp_path / "a" / "run" / "checkpoint" / "momentum.safetensors"))
    mb = load_file(str(tmp_path / "b" / "run" / "checkpoint" / "momentum.safetensors"))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    rows = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6

    # popo eval's loader: the base (saved beside a random tiny base's adapter), the adapter merged.
    from popo_core.evaluation.runner import resolve_model

    cfg = resolve_model(str(tmp_path / "a" / "run"))
    model, tok = load_model_and_tokenizer(cfg, device=torch.device("cpu"))
    assert not hasattr(model, "peft_config")
    _, lrn, _, _ = learner(tmp_path / "c", "model.lora.rank=8")
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(lrn.model, a, adapter_name=POLICY)
    expect = merged_state_dict(lrn.model)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expect[k], rtol=1e-6, atol=1e-7)
