"""Packed forwards (popo_core/trainer/packing.py) give exactly the numbers of padded ones, in float64.

Log-probs, hidden states and entropies of the tiny Qwen2 and of a tiny Llama, under each packed
layout (block-diagonal boolean mask for SDPA, additive for eager, position ids alone as the
flash-attention varlen path reads them); then, through the trainer, pi_old's and the reference's
recomputation, the loss and every gradient (the momentum network's forward in the penalty included)
for every method of the registry, with and without LoRA, with and without gradient checkpointing.
Counter-tests: position ids that do not restart, and attention across a boundary, are caught.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from popo_core.algo.choices import SPECS
from popo_core.config import ModelConfig, compose
from popo_core.errors import ConfigError
from popo_core.model.loading import load_model_and_tokenizer
from popo_core.model.lora import MOMENTUM, POLICY, adapter_params
from popo_core.trainer import packing as P
from popo_core.trainer.logprobs import collate, completion_forward, completion_logprobs_and_entropy
from popo_core.trainer.loop import build
from popo_core.trainer.update import StepInputs, backward, micro_batches, recompute
from popo_core.trainer.distributed import Ranks
from helpers import fixed_batch

TOL = dict(rtol=1e-10, atol=1e-10)
LAYOUTS = ("mask", "additive", "varlen")


# ----------------------------------------------------------------------------- pure functions
def test_first_fit_decreasing_fills_rows_under_their_capacity():
    rnd = random.Random(0)
    for _ in range(300):
        lengths = [rnd.randint(1, 20) for _ in range(rnd.randint(1, 30))]
        cap = max(lengths) + rnd.randint(0, 15)
        rows = P.first_fit_decreasing(lengths, cap)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in r) <= cap for r in rows)
        # First fit decreasing: no two rows could have been one (each row after the first
        # opened because its first sequence fitted no earlier row).
        assert len(rows) <= 2 * sum(lengths) / cap + 1


def test_place_pads_when_packing_cannot_win_and_packs_when_asked():
    auto, always = P.Packing("mask"), P.Packing("mask", always=True)
    assert P.place([6, 6, 6], auto) is None  # equal lengths: nothing to gain (the tiny task)
    assert P.place([6, 6, 6], always) == P.Placement(3, 6, [(0, 0), (1, 0), (2, 0)])
    placed = P.place([6, 2, 3, 1], auto)
    assert placed.rows == 2 and placed.width == 6 and placed.at[0] == (0, 0)
    assert P.place([3, 2], P.Packing("varlen")) == P.Placement(1, 5, [(0, 0), (0, 3)])
    assert P.place([3, 3], P.Packing("varlen")) is None
    with pytest.raises(ConfigError, match=r"max_tokens_per_row=4: smaller than the longest sequence \(6 tokens"):
        P.place([6, 2], P.Packing("mask", max_tokens_per_row=4))


def test_token_chunks_hold_at_most_the_budget_and_name_a_sequence_too_long():
    rnd = random.Random(1)
    for padded in (False, True):
        for _ in range(200):
            costs = [rnd.randint(1, 12) for _ in range(rnd.randint(1, 25))]
            budget = rnd.randint(12, 40)
            runs = P.token_chunks(costs, budget, padded)
            assert [i for r in runs for i in r] == list(range(len(costs)))
            cost = (lambda r: len(r) * max(costs[i] for i in r)) if padded else (lambda r: sum(costs[i] for i in r))
            assert all(cost(r) <= budget for r in runs)
            # greedy: each run but the last is full (the next sequence would not have fitted)
            assert all(cost(r + [runs[k + 1][0]]) > budget for k, r in enumerate(runs[:-1]))
    with pytest.raises(ConfigError, match=r"max_tokens_per_micro_batch=5: smaller than the longest sequence \(9 tokens"):
        P.token_chunks([3, 9], 5, False)


def test_ranks_share_tokens_evenly_and_run_as_many_micro_batches():
    costs = [30, 2, 2, 2, 2, 2, 2, 2, 2, 2, 20, 9]
    shares = P.balance(costs, 2)
    loads = [sum(costs[i] for i in s) for s in shares]
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    assert max(loads) - min(loads) <= max(costs)
    contiguous = [sum(costs[:6]), sum(costs[6:])]  # what splitting by count gives: 40 and 37 here
    assert max(loads) - min(loads) <= max(contiguous) - min(contiguous)
    per = [P.rank_token_chunks(costs, 32, False, r, 2) for r in range(2)]
    assert len(per[0]) == len(per[1])
    got = sorted(i for runs in per for run in runs for i in run)
    assert got == list(range(len(costs)))
    # the driver: placeholders (weight 0) where a rank's share ran out
    positions = torch.arange(len(costs))
    for r in range(2):
        mbs = list(micro_batches(Ranks(r, 2), positions, None, costs, 32, padded=False))
        assert len(mbs) == len(per[0]) and all(m.lockstep for m in mbs)


def test_packing_setting_and_attention_implementations():
    assert P.packing_for(False, "sdpa") == P.PADDED
    assert P.packing_for(None, None).mode == "mask" and not P.packing_for(None, None).always
    assert P.packing_for(True, "eager").mode == "additive"
    assert P.packing_for(True, "flash_attention_2").mode == "varlen"
    assert P.packing_for(None, "flex_attention") == P.PADDED  # null: pads where it cannot pack
    with pytest.raises(ConfigError, match="cannot pack"):
        P.packing_for(True, "flex_attention")


# ---------------------------------------------------------------------- forwards, model alone
def varied(seed: int, n: int = 10):
    """Prompts and completions of varied lengths, with a repeat and a prefix (folded rows)."""
    rnd = random.Random(seed)
    prompts = [[rnd.randint(3, 40) for _ in range(rnd.randint(2, 7))] for _ in range(n)]
    completions = [[rnd.randint(3, 40) for _ in range(rnd.randint(1, 11))] for _ in range(n)]
    prompts += [prompts[0], prompts[1]]
    completions += [list(completions[0]), completions[1][:1]]
    return prompts, completions


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).double()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    qwen, _ = load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"))
    return {"qwen2": qwen.double(), "llama": tiny_llama()}


def forward_and_gradient(model, seqs, seed):
    """(log-probs, hidden states, no-grad log-probs, entropies, gradients of a random functional)."""
    gen = torch.Generator().manual_seed(seed)
    w_lp = torch.randn(seqs.mask.shape, generator=gen, dtype=torch.float64)
    w_h = torch.randn(model.config.hidden_size, generator=gen, dtype=torch.float64)
    lp, h = completion_forward(model, seqs, temperature=0.7, suppress_ids=[0, 1], hidden=True)
    ((lp * w_lp).sum() + (h @ w_h).sum()).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    lp_ng, entropy = completion_logprobs_and_entropy(model, seqs, temperature=0.7, suppress_ids=[0, 1])
    return [lp.detach(), h.detach(), lp_ng, entropy], grads


def set_attention(model, name):
    model.config._attn_implementation = name
    for module in model.modules():
        if getattr(module, "config", None) is not None:
            module.config._attn_implementation = name


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_forward_and_gradient_equal_the_padded_ones(models, arch, layout):
    model = models[arch]
    set_attention(model, "eager" if layout == "additive" else "sdpa")
    try:
        for seed in (0, 1):
            prompts, completions = varied(seed)
            padded = collate(prompts, completions, 0, "cpu")
            packed = collate(prompts, completions, 0, "cpu", P.Packing(layout, always=True))
            assert packed.input_ids.numel() < padded.input_ids.numel()  # something was packed
            want, want_g = forward_and_gradient(model, padded, seed)
            got, got_g = forward_and_gradient(model, packed, seed)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, **TOL)
            for a, b in zip(got_g, want_g):
                torch.testing.assert_close(a, b, **TOL)
    finally:
        set_attention(model, "sdpa")


def test_eager_forwards_a_micro_batch_packing_does_not_win(models):
    """trainer.packing null under eager: equal lengths stay padded, and the 2D padding mask goes in as
    it is (made additive it was a masked_fill on a long tensor, a traceback on every step)."""
    model = models["qwen2"]
    set_attention(model, "eager")
    try:
        prompts, completions = [[3, 4], [5, 6], [7, 8]], [[9, 10], [11, 12], [13, 14]]
        seqs = collate(prompts, completions, 0, "cpu", P.packing_for(None, "eager"))
        assert seqs.position_ids is None and not seqs.additive  # padded
        got, _ = forward_and_gradient(model, seqs, 0)
        want, _ = forward_and_gradient(model, collate(prompts, completions, 0, "cpu"), 0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL)
    finally:
        set_attention(model, "sdpa")


def test_packed_rows_are_what_they_say(models):
    prompts, completions = varied(0)
    seqs = collate(prompts, completions, 0, "cpu", P.Packing("mask", always=True))
    assert seqs.input_ids.shape[0] < len(set(tuple(p) + tuple(c[:-1]) for p, c in zip(prompts, completions)))
    # position ids restart at 0 at every sequence, and the mask is causal inside each one only
    ids, pos, mask = seqs.input_ids, seqs.position_ids, seqs.attention_mask[:, 0]
    starts = (pos == 0)
    assert int(starts.sum()) >= seqs.input_ids.shape[0]
    for r in range(ids.shape[0]):
        segment = starts[r].cumsum(0)
        same = segment[:, None] == segment[None, :]
        assert torch.equal(mask[r], same & torch.ones_like(same).tril())  # (a padding position: itself alone)
    assert seqs.padded_tokens == seqs.input_ids.numel() - seqs.input_tokens


@pytest.mark.parametrize("layout,broken", [("mask", "positions-continue"), ("varlen", "positions-continue"),
                                           ("mask", "attention-crosses")])
def test_a_broken_layout_would_be_caught(models, layout, broken):
    """Not vacuous: position ids that run on across a row, or a mask that lets a sequence attend the
    one before it in its row, change the numbers. Under RoPE a sequence's positions shifted by a
    constant change attention only by rounding (q.k depends on m - n; cos/sin are fp32), so with a
    mask the shift shows at the 1e-10 of the equality tests; varlen reads the boundaries from the
    position ids, so there attention crosses and the numbers change outright."""
    model = models["qwen2"]
    prompts, completions = varied(0)
    padded = collate(prompts, completions, 0, "cpu")
    packed = collate(prompts, completions, 0, "cpu", P.Packing(layout, always=True))
    if broken == "positions-continue":
        packed = dataclasses.replace(packed, position_ids=torch.arange(packed.input_ids.shape[1]).expand_as(packed.input_ids))
    else:
        causal = torch.ones(packed.input_ids.shape[1], packed.input_ids.shape[1], dtype=torch.bool).tril()
        packed = dataclasses.replace(packed, attention_mask=causal.expand(packed.input_ids.shape[0], 1, -1, -1))
    with torch.no_grad():
        want, _ = completion_forward(model, padded)
        got, _ = completion_forward(model, packed)
    tol = TOL if (layout, broken) == ("mask", "positions-continue") else dict(rtol=1e-3, atol=1e-3)
    assert not torch.allclose(got, want, **tol)


# ------------------------------------------------------------------- through the trainer
# Every method of the registry (popo+negatives is algo.use_negatives), each with what it exercises:
# pi_old's recomputation (algo.epochs=2 gives old log-probs), the reference, the momentum's forward.
METHODS = {
    "popo": ["algo=popo", "algo.redistribution=self_normalized"],
    "popo+negatives": ["algo=popo", "algo.use_negatives=true"],
    "grpo": ["algo=grpo", "algo.kl_beta=0.04", "algo.siamese=true"],
    "dr_grpo": ["algo=dr_grpo", "algo.max_length=9"],
    "rft": ["algo=rft"],
    "raft_pp": ["algo=raft_pp"],
    "psr": ["algo=psr"],
    "nsr": ["algo=nsr", "algo.siamese=true", "algo.penalty=kl"],
    "w_reinforce": ["algo=w_reinforce"],
}
assert set(METHODS) == set(SPECS)


def trainer_learner(tmp_path, overrides):
    cfg = compose("tiny", [*overrides, f"trainer.output_dir={tmp_path}/run", "tracking.enabled=false"])
    learner, tokenizer, _ = build(cfg)
    learner.model.double()
    torch.manual_seed(1)
    with torch.no_grad():  # companions a little away from the policy: every term is live
        if cfg.model.lora.rank:
            for name in (POLICY, MOMENTUM):
                for _, p in adapter_params(learner.model, name):
                    p.add_(0.2 * torch.randn_like(p))
        else:
            for companion in (learner.momentum, learner.reference):
                if companion is not None:
                    companion.module.double()
                    for p in companion.module.parameters():
                        p.add_(0.05 * torch.randn_like(p))
    if learner.predictor is not None:
        learner.predictor.double()
    return cfg, learner, tokenizer


def one_step(learner, batch, packing):
    """pi_old's and the reference's recomputation, the entropies, the step's loss and gradients."""
    learner.packing = packing
    every = list(range(len(batch)))
    old, entropy = recompute(learner, learner.model, batch, every, 5, entropy=True)
    old = old + 0.1 * torch.sin(torch.arange(old.numel(), dtype=old.dtype)).reshape(old.shape) * (old != 0)
    ref = None
    if learner.reference is not None:
        with learner.reference.active() as reference:
            ref, _ = recompute(learner, reference, batch, every, 5)
    sums = backward(learner, batch, StepInputs(torch.arange(len(batch)), old, ref), micro_batch_size=7)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.params]
    learner.optimizer.zero_grad(set_to_none=True)
    return [old, entropy] + ([ref] if ref is not None else []), sums, grads


@pytest.mark.parametrize("variant", ["plain", "lora", "checkpointing", "lora+checkpointing"])
@pytest.mark.parametrize("method", list(METHODS))
def test_packed_step_equals_padded_step(tmp_path, method, variant):
    extra = (["model.lora.rank=4"] if "lora" in variant else []) + \
        (["model.gradient_checkpointing=true"] if "checkpointing" in variant else [])
    cfg, learner, tokenizer = trainer_learner(tmp_path, METHODS[method] + extra)
    batch = fixed_batch(tokenizer, learner.device)
    want, want_sums, want_g = one_step(learner, batch, P.PADDED)
    got, got_sums, got_g = one_step(learner, batch, P.Packing("mask", always=True, max_tokens_per_row=32))
    assert got_sums["padded_tokens"] != want_sums["padded_tokens"]  # another layout ran
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    for key in ("loss/policy", "penalty", "tokens"):
        assert got_sums[key] == pytest.approx(want_sums[key], rel=1e-10, abs=1e-12), key
    assert any(g.abs().sum() > 0 for g in want_g)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, **TOL)


def test_micro_batches_by_tokens_give_the_same_step(tmp_path):
    cfg, learner, tokenizer = trainer_learner(tmp_path, METHODS["popo"])
    batch = fixed_batch(tokenizer, learner.device)
    _, want_sums, want_g = one_step(learner, batch, P.Packing("mask", always=True))
    for budget in (14, 40, 1000):
        learner.max_tokens_per_micro_batch = budget
        for packing in (P.PADDED, P.Packing("mask", always=True)):
            _, sums, g = one_step(learner, batch, packing)
            assert sums["loss/policy"] + sums["penalty"] == pytest.approx(
                want_sums["loss/policy"] + want_sums["penalty"], rel=1e-9)
            for a, b in zip(g, want_g):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7 * float(b.abs().max()))


# ------------------------------------------------------------------------------ the settings
@pytest.mark.parametrize("overrides,message", [
    (["trainer.max_tokens_per_micro_batch=64", "trainer.micro_batch_size=8"], "set one of them"),
    (["rollout.max_new_tokens=12", "trainer.max_tokens_per_micro_batch=10"],
     r"max_tokens_per_micro_batch=10: smaller than the longest sequence \(15 tokens"),
    (["rollout.max_new_tokens=12", "trainer.max_tokens_per_row=10"], r"max_tokens_per_row=10: smaller than the longest"),
    (["trainer.packing=true", "model.attn_implementation=flex_attention"], "cannot pack"),
    (["trainer.packing=auto"], "trainer.packing"),
    (["trainer.packing=false", "trainer.max_tokens_per_row=64"], "needs trainer.packing true or null"),
])
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        compose("tiny", overrides)
    assert "\n" not in str(err.value)


def test_the_learner_packs_as_configured(tmp_path):
    cfg = compose("tiny", [f"trainer.output_dir={tmp_path}", "tracking.enabled=false",
                           "trainer.max_tokens_per_micro_batch=64"])
    learner, _, _ = build(cfg)
    assert learner.packing == P.Packing("mask") and learner.max_tokens_per_micro_batch == 64
