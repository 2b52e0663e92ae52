"""Repeated and prefix rows are forwarded once (popo_core/trainer/logprobs.py): the log-probs, hidden states,
entropies and gradients are those of forwarding every row on its own, in float64."""

import copy
import random

import pytest
import torch

from popo_core.config import ModelConfig
from popo_core.model.loading import load_model_and_tokenizer
from popo_core.trainer.logprobs import collate, completion_forward, completion_logprobs_and_entropy, fold


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m, _ = load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"))
    return m.double()


def test_fold_keeps_the_sequences_nothing_extends_and_maps_each_onto_one_that_does():
    rnd = random.Random(0)
    for _ in range(200):
        pool = [tuple(rnd.choice("ab") for _ in range(rnd.randint(0, 5))) for _ in range(6)]
        inputs = [rnd.choice(pool)[: rnd.randint(0, 5)] for _ in range(rnd.randint(1, 12))]
        kept, owner = fold(inputs)
        maximal = {s for s in inputs if not any(t != s and t[: len(s)] == s for t in inputs)}
        assert sorted(kept) == sorted(maximal)
        assert all(kept[o][: len(s)] == s for s, o in zip(inputs, owner))


def test_one_token_completions_of_a_group_are_one_forward():
    prompts = [[5, 6, 7]] * 8 + [[5, 6]] * 8
    seqs = collate(prompts, [[10 + k] for k in range(16)], pad_id=0, device="cpu")
    # "5 6" starts "5 6 7": both groups read the states of one input row.
    assert seqs.input_ids.tolist() == [[5, 6, 7]] and seqs.owner.tolist() == [0] * 16
    assert seqs.states.tolist() == [1, 2] and seqs.mask.sum() == 16


def test_rows_of_different_prompts_fold_when_one_starts_the_other():
    # [1, 2] + [3, 4] reads the states of [1, 2, 3] + [4, 5]'s input; [1, 2, 9] stays its own row.
    seqs = collate([[1, 2], [1, 2, 3], [1, 2, 9]], [[3, 4], [4, 5], [6]], pad_id=0, device="cpu")
    assert sorted(map(tuple, seqs.input_ids.tolist())) == [(1, 2, 3, 4), (1, 2, 9, 0)]
    assert seqs.owner[0] == seqs.owner[1] != seqs.owner[2]


def test_an_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="empty prompt"):
        collate([[], [1]], [[2], [3]], pad_id=0, device="cpu")


def rows_with_repeats(seed: int):
    rnd = random.Random(seed)
    prompts, completions = [], []
    for _ in range(4):
        prompt = [rnd.randint(3, 40) for _ in range(rnd.randint(2, 6))]
        group = [[rnd.randint(3, 40) for _ in range(rnd.randint(1, 6))] for _ in range(3)]
        group += [list(group[0]), group[1][:1], group[2] + [7, 8]]  # a repeat, a prefix, an extension
        if prompts:  # a prompt that is another row's prompt + the start of its completion
            prompts.append(prompts[0] + completions[0][:1])
            completions.append([rnd.randint(3, 40) for _ in range(rnd.randint(1, 4))])
        for c in group:
            prompts.append(prompt)
            completions.append(c)
    order = list(range(len(prompts)))
    rnd.shuffle(order)
    return [prompts[i] for i in order], [completions[i] for i in order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folded_forward_and_gradient_equal_each_row_alone(model, seed):
    prompts, completions = rows_with_repeats(seed)
    seqs = collate(prompts, completions, pad_id=0, device="cpu")
    assert seqs.input_ids.shape[0] < len(prompts)  # something was folded
    gen = torch.Generator().manual_seed(seed)
    w_lp = torch.randn(seqs.mask.shape, generator=gen, dtype=torch.float64)
    w_h = torch.randn(model.config.hidden_size, generator=gen, dtype=torch.float64)
    suppress, temperature = [0, 1], 0.7

    lp, h = completion_forward(model, seqs, temperature=temperature, suppress_ids=suppress, hidden=True)
    ((lp * w_lp).sum() + ((h @ w_h) * seqs.mask).sum()).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        lp_ng, entropy = completion_logprobs_and_entropy(model, seqs, temperature=temperature, suppress_ids=suppress)

    # Independently: every row alone, its whole sequence through the causal LM, full-vocabulary logits.
    loss = 0.0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        out = model(torch.tensor([p + c]), output_hidden_states=True)
        at = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        logits = out.logits[0, at] / temperature
        logits[:, suppress] = float("-inf")
        log_p = logits.log_softmax(-1)
        ref_lp = log_p[torch.arange(len(c)), torch.tensor(c)]
        ref_h = out.hidden_states[-1][0, at]
        probs = log_p.exp()
        ref_entropy = -(probs * torch.where(probs > 0, log_p, torch.zeros_like(log_p))).sum(-1)
        torch.testing.assert_close(lp[i, : len(c)], ref_lp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(h[i, : len(c)], ref_h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lp_ng[i, : len(c)], ref_lp.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(entropy[i, : len(c)], ref_entropy.detach(), rtol=1e-6, atol=1e-6)
        assert torch.all(lp[i, len(c):] == 0)
        loss = loss + (ref_lp * w_lp[i, : len(c)]).sum() + (ref_h @ w_h).sum()
    loss.backward()
    for g, p in zip(got, model.parameters()):
        # Qwen2's RMSNorm rounds through fp32: folded rows' gradients meet before that rounding.
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7 * float(p.grad.abs().max()))
    model.zero_grad(set_to_none=True)


def test_a_wrong_fold_would_be_caught(model):
    """Not vacuous: the states one position off (the token itself, not the one before it) differ."""
    prompts, completions = rows_with_repeats(0)
    seqs = collate(prompts, completions, pad_id=0, device="cpu")
    with torch.no_grad():
        right, _ = completion_forward(model, seqs)
        wrong = copy.copy(seqs)
        wrong.states = (seqs.states + 1).clamp(max=seqs.input_ids.numel() - 1)
        assert not torch.allclose(completion_forward(model, wrong)[0], right)
