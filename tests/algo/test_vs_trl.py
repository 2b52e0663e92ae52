"""popo's `grpo` loss against TRL's own GRPO loss code (TRL 1.16 GRPOTrainer), settings aligned.

TRL is not a popo dependency: these tests run where TRL is importable (benchmarks/.venv-trl, built
and used by `benchmarks/vs_trl`, which runs this file before every measurement) and are skipped
with the reason elsewhere. TRL is called for real: its `_generate_and_score_completions` gives the
advantages and its `compute_loss` the loss; popo's side is `popo_core.algos.policy_loss("grpo", ...)`
on log-probs from `popo_core.trainer.logprobs.completion_forward`. Aligned: loss_type="grpo" with
seq_mean_token_mean, beta=0 with kl_beta=0, scale_rewards="group" with scale_std, TRL's fixed
advantage epsilon 1e-4 with algo.adv_eps=1e-4, epsilon=0.2 with clip_eps=0.2, temperature 1, and no
token suppression in the log-probs (TRL's softmax is over the whole vocabulary).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

# A skip mark, not a module-level importorskip: `pytest -m vllm` deselects these without a skip.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None,
    reason="TRL is not installed here (it is no popo dependency): "
           "`.venv/bin/python benchmarks/vs_trl` builds it in benchmarks/.venv-trl and runs this file")

from popo_core.algos import group_advantages, policy_loss  # noqa: E402
from popo_core.model.loading import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from popo_core.trainer.logprobs import collate, completion_forward  # noqa: E402

ADV_EPS = 1e-4  # hard-coded in TRL's advantage
GROUP = 4
PROMPTS = ["1+2=", "3+4=", "5+6=", "7+8=", "9+0=", "2+2="]
# Rewards per completion, prompt-major: mixed groups, an all-negative and an all-positive group.
REWARDS = [1, 0, 0, 1,  0, 0, 0, 0,  1, 1, 1, 1,  1, 0, 1, 1,  0, 1, 0, 0,  0, 0, 1, 0]


def make_trainer(tmp_path, max_len: int = 5, dtype=torch.float64):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=0).to(dtype)
    rewards = iter(REWARDS * 100)

    def fixed_rewards(prompts, completions, **_):
        return [float(next(rewards)) for _ in completions]

    args = GRPOConfig(output_dir=str(tmp_path), loss_type="grpo", beta=0.0, scale_rewards="group", epsilon=0.2,
                      per_device_train_batch_size=len(REWARDS), num_generations=GROUP, max_completion_length=max_len,
                      temperature=1.0, top_k=0, top_p=1.0, bf16=False, fp16=False, use_cpu=True, use_vllm=False,
                      gradient_checkpointing=False, activation_checkpointing=False, report_to="none",
                      learning_rate=1e-3, max_steps=1, seed=0)
    dataset = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = GRPOTrainer(model=model, reward_funcs=fixed_rewards, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-batch per step here
    return trainer


def rollout(trainer):
    """TRL's own generation, scoring and advantages for the prompts, each repeated GROUP times."""
    trainer.model.train()
    batch = [{"prompt": p} for p in PROMPTS for _ in range(GROUP)]
    with torch.no_grad():
        return trainer._generate_and_score_completions(batch)


def popo_rows(inputs):
    """TRL's left-padded prompts and right-padded completions as popo's unpadded token lists."""
    prompts = [ids[m.bool()].tolist() for ids, m in zip(inputs["prompt_ids"], inputs["prompt_mask"])]
    completions = [ids[m.bool()].tolist() for ids, m in zip(inputs["completion_ids"], inputs["completion_mask"])]
    return prompts, completions


def test_advantages_match_trl(tmp_path):
    inputs = rollout(make_trainer(tmp_path))
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    groups = torch.arange(len(PROMPTS)).repeat_interleave(GROUP)
    ours = group_advantages(rewards, groups, scale_std=True, adv_eps=ADV_EPS)
    torch.testing.assert_close(inputs["advantages"].double(), ours, atol=1e-6, rtol=0)
    assert inputs["advantages"].abs().sum() > 0  # the groups are not all uniform


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_loss_and_gradient_match_trl(tmp_path, shift):
    """One GRPO loss on the same completions through the same model: TRL's compute_loss vs popo's
    policy_loss("grpo") on popo's log-probs; loss and every parameter's gradient within 1e-6.
    `shift` perturbs pi_old (as after earlier updates) so the ratios leave 1 and the clip acts."""
    trainer = make_trainer(tmp_path)
    inputs = rollout(trainer)
    model = trainer.model
    prompts, completions = popo_rows(inputs)
    assert len(set(inputs["completion_mask"].sum(-1).tolist())) > 1  # ragged lengths: the aggregation matters
    g = torch.Generator().manual_seed(1)
    width = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        seqs = collate(prompts, completions, pad_id=trainer.processing_class.pad_token_id, device="cpu")
        now, _ = completion_forward(model, seqs)
    old = now + shift * torch.randn(now.shape, generator=g, dtype=now.dtype)
    old = torch.nn.functional.pad(old, (0, width - old.shape[1]))
    inputs = {**inputs, "old_per_token_logps": old}  # TRL reads pi_old from here when it has several updates

    model.zero_grad()
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    seqs = collate(prompts, completions, pad_id=trainer.processing_class.pad_token_id, device="cpu")
    lp, _ = completion_forward(model, seqs)  # temperature 1, no suppression: TRL's softmax over the whole vocabulary
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    groups = torch.arange(len(PROMPTS)).repeat_interleave(GROUP)
    loss_fn = policy_loss("grpo", clip_eps=0.2, scale_std=True, adv_eps=ADV_EPS, aggregation="seq_mean_token_mean",
                          kl_beta=0.0)
    popo_loss, metrics = loss_fn(lp, old[:, : lp.shape[1]], seqs.mask, rewards, groups)
    popo_loss.backward()

    assert abs(float(trl_loss) - float(popo_loss)) < 1e-6, (float(trl_loss), float(popo_loss))
    assert trl_grads, "TRL's loss reached no parameter"
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, trl_grads[name], atol=1e-6, rtol=0, msg=name)
    assert max(float(v.abs().max()) for v in trl_grads.values()) > 1e-4  # a real gradient, not zeros
    if shift:
        assert metrics["clip/fraction"] > 0  # the clip was live


def test_random_logprobs_loss_and_gradient(tmp_path):
    """The loss formula alone, away from any model: TRL's compute_loss fed random per-token log-probs
    (its log-prob function replaced by one returning them), ragged completion lengths, ratios on both
    sides of the clip; popo's grpo loss on the same tensors. Loss and d loss / d log-probs within 1e-6."""
    trainer = make_trainer(tmp_path)
    inputs = rollout(trainer)
    n, width = len(REWARDS), 6
    g = torch.Generator().manual_seed(2)
    lengths = torch.randint(1, width + 1, (n,), generator=g)
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    logps = (-3 * torch.rand(n, width, generator=g, dtype=torch.float64)).requires_grad_(True)
    old = logps.detach() + 0.4 * torch.randn(n, width, generator=g, dtype=torch.float64)
    fake = {**inputs, "completion_ids": torch.zeros(n, width, dtype=torch.long), "completion_mask": mask,
            "old_per_token_logps": old}
    fake["prompt_ids"], fake["prompt_mask"] = inputs["prompt_ids"], inputs["prompt_mask"]
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps * mask, torch.zeros_like(logps), None)
    trl_loss = trainer.compute_loss(trainer.model, fake)
    (trl_grad,) = torch.autograd.grad(trl_loss, logps)

    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    groups = torch.arange(len(PROMPTS)).repeat_interleave(GROUP)
    loss_fn = policy_loss("grpo", clip_eps=0.2, scale_std=True, adv_eps=ADV_EPS, aggregation="seq_mean_token_mean")
    popo_loss, metrics = loss_fn(logps, old, mask.bool(), rewards, groups)
    (popo_grad,) = torch.autograd.grad(popo_loss, logps)
    assert abs(float(trl_loss) - float(popo_loss)) < 1e-6, (float(trl_loss), float(popo_loss))
    torch.testing.assert_close(popo_grad, trl_grad, atol=1e-6, rtol=0)
    assert float(trl_grad.abs().max()) > 1e-3 and 0 < metrics["clip/fraction"] < 1
