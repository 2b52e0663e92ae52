"""The update through the real trainer (popo_core/trainer/update.py) on a fixed rollout batch.

For every registered method: one optimizer step's backward, split into micro-batches that cut
groups apart, gives the gradient of the method's loss (plus the siamese penalty where it is on)
computed directly on the whole batch with the registry's public `policy_loss`. So the rows the
trainer forwards and the denominators that count completions it never forwards are right.
"""

from __future__ import annotations

import random

import pytest
import torch

from popo_core.algo.losses import policy_loss
from popo_core.config import compose
from popo_core.algo.objective import method_name
from popo_core.trainer.logprobs import collate, completion_forward
from popo_core.rollout import Rollouts
from popo_core.algo.siamese import PENALTIES
from popo_core.trainer.loop import build
from popo_core.trainer.update import Batch, StepInputs, backward, recompute, update
from helpers import fixed_batch

CASES = {
    "popo": ["algo=popo"],
    "popo-self-normalized-token-mean": ["algo=popo", "algo.redistribution=self_normalized", "algo.aggregation=token_mean"],
    "popo-kl-penalty": ["algo=popo", "algo.penalty=kl"],
    "popo-positive-only-ablation": ["algo=popo", "algo.use_negatives=true"],
    "popo-predictor-token": ["algo=popo", "algo.predictor=true", "algo.representation=token"],
    "grpo-kl": ["algo=grpo", "algo.kl_beta=0.04"],
    "grpo-token-mean": ["algo=grpo", "algo.aggregation=token_mean"],
    "dr_grpo": ["algo=dr_grpo", "algo.max_length=9"],
    "rft": ["algo=rft"],
    "rft-token-mean": ["algo=rft", "algo.aggregation=token_mean"],
    "raft_pp": ["algo=raft_pp"],
    "psr": ["algo=psr"],
    "nsr-siamese": ["algo=nsr", "algo.siamese=true"],
    "w_reinforce": ["algo=w_reinforce"],
    "grpo-siamese": ["algo=grpo", "algo.siamese=true"],
}


def learner_for(overrides, tmp_path):
    cfg = compose("tiny", [*overrides, f"trainer.output_dir={tmp_path}/run", "tracking.enabled=false"])
    learner, tokenizer, _ = build(cfg)
    learner.model.double()
    torch.manual_seed(1)
    for companion in (learner.momentum, learner.reference):  # a little away from the policy: live terms
        if companion is not None:
            companion.module.double()
            with torch.no_grad():
                for p in companion.module.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    if learner.predictor is not None:
        learner.predictor.double()
    return cfg, learner, tokenizer


def grads(learner):
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in learner.params]
    learner.optimizer.zero_grad(set_to_none=True)
    return out


def direct_gradient(cfg, learner, batch, old, ref):
    """The method's loss on the whole batch, straight from the registry, and its gradient."""
    obj = learner.objective
    rows = list(range(len(batch)))
    seqs = collate(batch.rollouts.prompt_ids, batch.rollouts.completion_ids, learner.pad_id, "cpu")
    lp, h = completion_forward(learner.model, seqs, temperature=learner.temperature, suppress_ids=learner.suppress,
                               hidden=True)
    width = seqs.mask.shape[1]
    knobs = vars(cfg.algo)
    extra = {"ref_logprobs": ref[rows, :width]} if obj.needs.reference else {}
    loss, _ = policy_loss(method_name(cfg.algo), **knobs)(lp, old[rows, :width], seqs.mask, batch.rewards,
                                                          batch.group_ids, **extra)
    if obj.penalty is not None:
        pen = obj.forwarded(batch.rewards) & obj.penalised(batch.rewards)
        penalty = PENALTIES[cfg.algo.penalty]
        with torch.no_grad():
            mom_lp, mom_h = completion_forward(learner.momentum.module, seqs, temperature=learner.temperature,
                                               suppress_ids=learner.suppress, hidden=True)
        if penalty.reads == "hidden":
            p_loss, _ = penalty.fn(h[pen], mom_h[pen], seqs.mask[pen], representation=cfg.algo.representation,
                                   predictor=learner.predictor)
        else:
            p_loss, _ = penalty.fn(lp[pen], mom_lp[pen], seqs.mask[pen])
        loss = loss + cfg.algo.penalty_weight * p_loss
    loss.backward()
    return float(loss.detach()), grads(learner)


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_through_the_trainer_is_the_methods_gradient(case, tmp_path):
    cfg, learner, tokenizer = learner_for(CASES[case], tmp_path)
    batch = fixed_batch(tokenizer, learner.device)
    every = list(range(len(batch)))
    current, _ = recompute(learner, learner.model, batch, every, 256)
    gen = torch.Generator().manual_seed(3)
    mask = torch.arange(current.shape[1])[None, :] < batch.lengths[:, None]
    old = torch.where(mask, current + 0.3 * torch.randn(current.shape, generator=gen, dtype=current.dtype), 0.0)
    ref = recompute(learner, learner.reference.module, batch, every, 256)[0] if learner.reference is not None else None
    expected_loss, expected = direct_gradient(cfg, learner, batch, old, ref)
    assert any(g.abs().sum() > 0 for g in expected)
    inputs = StepInputs(torch.arange(len(batch)), old, ref)
    for micro in (1, 3, 256):  # 3 splits every group of 4 across micro-batches
        sums = backward(learner, batch, inputs, micro_batch_size=micro)
        got = grads(learner)
        total = sums["loss/policy"] + cfg.algo.penalty_weight * sums["penalty"]
        assert total == pytest.approx(expected_loss, rel=1e-9, abs=1e-12), micro
        # Float64, but Qwen2's RMSNorm computes in fp32: the micro-batches fold repeated rows
        # differently (popo_core/trainer/logprobs.py), so their gradients meet before or after that rounding.
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7 * float(e.abs().max()))


def test_wrong_denominator_would_be_caught(tmp_path):
    """Not vacuous: psr normalised by the forwarded tokens only (not all N completions') differs."""
    cfg, learner, tokenizer = learner_for(CASES["psr"], tmp_path)
    batch = fixed_batch(tokenizer, learner.device)
    old, _ = recompute(learner, learner.model, batch, list(range(len(batch))), 256)
    _, expected = direct_gradient(cfg, learner, batch, old, None)
    positives = batch.rewards > 0.5
    only = Batch(batch.rollouts, batch.rewards, batch.group_ids, torch.where(positives, batch.lengths, 0), None)
    backward(learner, only, StepInputs(torch.arange(len(batch)), old, None), micro_batch_size=256)
    got = grads(learner)
    assert any(not torch.allclose(g, e, rtol=1e-4, atol=1e-9) for g, e in zip(got, expected))


def test_update_metrics_and_diagnostics(tmp_path):
    cfg, learner, tokenizer = learner_for(["algo=popo", "trainer.diagnostics_every=1", "algo.epochs=2",
                                           "algo.mini_batches=2"], tmp_path)
    batch = fixed_batch(tokenizer, learner.device)
    metrics = update(learner, batch, cfg, step=1)
    for key in ("loss/policy", "grad/norm", "clip/fraction", "ratio/mean", "penalty/similarity", "entropy/mean",
                "pos/delta_logp", "implicit_neg/delta_logp", "train/forward_tokens"):
        assert key in metrics, key
    assert metrics["pos/delta_logp"] > 0  # POPO raised its positives
    assert learner.counters.updates == 4
    positives = batch.rewards > 0.5
    assert metrics["train/forward_tokens"] == 2 * int(batch.lengths[positives].sum())


def test_every_loss_metric_is_token_averaged_whatever_its_name():
    """The step's sums keep each metric the loss returned, named with or without a slash, as its
    token mean over the micro-batches (a name without "/" was once dropped)."""
    from popo_core.trainer.update import TOKEN_MEAN, reduce_sums

    sums = {"loss/policy": 0.5, "tokens": 4.0, "penalty": 0.25, "mismatch": 0.0, "kl": 0.0, "sampled_tokens": 0.0,
            "nonfinite": 0.0, TOKEN_MEAN + "clip/fraction": 1.0, TOKEN_MEAN + "plainname": 3.0}
    out = reduce_sums(sums, "penalty/similarity")
    assert out == {"loss/policy": 0.5, "clip/fraction": 0.25, "plainname": 0.75, "penalty/similarity": 0.25}
