"""Per-row deterministic sampling (popo_core/rollout/sampling.py): exact in distribution, and a
function of the row's key and position only, not of the batch."""

from __future__ import annotations

import math

import torch

from popo_core.rollout.sampling import GumbelSampler, gumbel_noise, key, prompt_keys, row_keys, top_p_filter


def test_gumbel_max_samples_the_softmax():
    """40,000 rows with distinct keys sample one position: frequencies match softmax(logits / T)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0, float("-inf")])
    temperature = 0.7
    keys = row_keys(prompt_keys(seed=3, step=1, first=0, count=10_000), 4)
    noise = gumbel_noise(keys, position=5, vocab=len(logits))
    chosen = (logits.double() / temperature + noise).argmax(-1)
    freq = torch.bincount(chosen, minlength=len(logits)).double() / len(keys)
    p = (logits.double() / temperature).softmax(-1)
    se = (p * (1 - p) / len(keys)).sqrt()
    assert freq[-1] == 0  # a suppressed token is never sampled
    assert ((freq - p).abs() <= 4.5 * se + 1e-12).all(), (freq, p)


def test_noise_is_uniform_and_independent_across_positions():
    keys = row_keys(prompt_keys(0, 1, 0, 500), 8)
    a, b = gumbel_noise(keys, 0, 64), gumbel_noise(keys, 1, 64)
    u = torch.exp(-torch.exp(-a))  # back to uniforms
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.01
    assert abs(float(a.mean()) - 0.5772) < 0.01  # the Euler-Mascheroni constant


def test_a_rows_noise_does_not_depend_on_its_batch():
    keys = row_keys(prompt_keys(7, 4, 0, 6), 3)
    whole = gumbel_noise(keys, 2, 50)
    part = gumbel_noise(keys[5:9], 2, 50)
    assert torch.equal(whole[5:9], part)
    # ... but it does depend on the seed, the step, the prompt and the sample.
    assert not torch.equal(gumbel_noise(row_keys(prompt_keys(8, 4, 0, 6), 3), 2, 50), whole)
    assert not torch.equal(gumbel_noise(row_keys(prompt_keys(7, 5, 0, 6), 3), 2, 50), whole)
    assert key(1, 2) != key(2, 1) and len(set(keys.tolist())) == len(keys)


def test_prompt_keys_are_global_positions():
    """A rank that generates prompts 4.. of the step gets the keys the single process gives them."""
    assert prompt_keys(0, 3, 4, 4) == prompt_keys(0, 3, 0, 8)[4:]


def test_top_p_filter_matches_reference():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    out = top_p_filter(logits, 0.8)
    p = logits.softmax(-1)
    for row in range(2):
        order = sorted(range(4), key=lambda v: -float(p[row, v]))
        kept, mass = [], 0.0
        for v in order:  # the smallest prefix whose mass reaches top_p
            kept.append(v)
            mass += float(p[row, v])
            if mass >= 0.8:
                break
        assert {v for v in range(4) if math.isfinite(float(out[row, v]))} == set(kept)


def test_sampler_records_the_tempered_logprob_of_its_choice():
    scores = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    keys = row_keys([11], 2)
    sampler = GumbelSampler(keys, prompt_width=4, temperature=2.0)
    out = sampler(torch.zeros(2, 4, dtype=torch.long), scores)
    chosen = out.argmax(-1)
    expect = (scores / 2.0).log_softmax(-1).gather(-1, chosen[:, None]).squeeze(-1)
    assert torch.allclose(sampler.logprobs(2)[:, 0], expect)
    greedy = GumbelSampler(None, prompt_width=4)
    assert torch.equal(greedy(torch.zeros(2, 4, dtype=torch.long), scores).argmax(-1), scores.argmax(-1))
