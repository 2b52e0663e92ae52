"""POPO and GRPO losses (popo_core/algo/losses.py) against independent float64 references.

The references below are written from METHOD.md (section 1 and "Baseline: GRPO") with plain
Python loops over groups, completions and tokens; they share no helper with the implementation.
Gradients of the references come from autograd through those loops, so bounded / clipped tokens
are modelled by explicit Python branches that replace the token's ratio by a constant.
"""

from __future__ import annotations

import math

import pytest
import torch

from popo_core.algo.losses import StepQuantities, grpo_loss, grpo_step, group_advantages, popo_loss, popo_step
from helpers import F64, SEEDS, LossBatch, close, differs, groups_of, loss_and_grad, make_batch, masked_positions, partition_rows

REDISTRIBUTIONS = ["uniform", "self_normalized", "none"]
AGGREGATIONS = ["seq_mean_token_mean", "token_mean"]
EPSILONS = [0.2, float("inf")]


# --------------------------------------------------------------------------------------------
# Independent references (METHOD.md)
# --------------------------------------------------------------------------------------------


def ref_popo(
    lp,
    old,
    mask,
    rewards,
    gids,
    *,
    eps,
    redistribution,
    aggregation,
    n_groups=None,
    n_positives=None,
    mean_length=None,
    wrong=None,
):
    """Section 1, token by token. Returns None when the batch has no positive."""
    positives = [i for i in range(lp.shape[0]) if float(rewards[i]) == 1.0]
    if not positives:
        return None
    length = {i: len(masked_positions(mask, i)) for i in positives}
    if mean_length is None:
        mean_length = sum(length.values()) / len(positives)
    bound = torch.tensor(1.0 + eps, dtype=F64)
    score = {}
    for i in positives:
        total = torch.zeros((), dtype=F64)
        for t in masked_positions(mask, i):
            rho = torch.exp(lp[i, t] - old[i, t])
            if rho.item() > 1.0 + eps:
                rho = bound  # rhobar = 1 + eps: a constant, so no gradient through this token
            total = total + rho
        score[i] = total / (length[i] if aggregation == "seq_mean_token_mean" else mean_length)
    if redistribution == "none":
        return -sum(score.values()) / (len(positives) if n_positives is None else n_positives)

    by_group: dict[int, list[int]] = {}
    for i in positives:
        by_group.setdefault(int(gids[i]), []).append(i)
    all_groups = groups_of(gids)
    total = torch.zeros((), dtype=F64)
    for g, members in by_group.items():
        if redistribution == "uniform":
            size = len(all_groups[g]) if wrong == "weights_include_negatives" else len(members)
            weight = {i: 1.0 / size for i in members}
        else:
            s = {}
            for i in members:
                if wrong == "no_stopgrad":
                    mean_log = sum(lp[i, t] - old[i, t] for t in masked_positions(mask, i)) / length[i]
                    s[i] = torch.clamp(torch.exp(mean_log), max=1.0 + eps)
                else:
                    mean_log = sum(float((lp[i, t] - old[i, t]).detach()) for t in masked_positions(mask, i)) / length[i]
                    s[i] = min(math.exp(mean_log), 1.0 + eps)
            z = sum(s.values())
            weight = {i: s[i] / z for i in members}
        for i in members:
            total = total + weight[i] * score[i]
    return -total / (len(by_group) if n_groups is None else n_groups)


def ref_advantages(rewards, gids, *, scale_std=True, adv_eps=1e-6, biased_std=False):
    adv = [0.0] * rewards.shape[0]
    for members in groups_of(gids).values():
        r = [float(rewards[i]) for i in members]
        mean = sum(r) / len(r)
        var = sum((x - mean) ** 2 for x in r) / (len(r) - (0 if biased_std else 1))
        for i in members:
            centred = float(rewards[i]) - mean
            adv[i] = centred / (math.sqrt(var) + adv_eps) if scale_std else centred
    return adv


def ref_grpo(
    lp,
    old,
    mask,
    rewards,
    gids,
    *,
    eps,
    scale_std,
    adv_eps,
    aggregation,
    ref=None,
    kl_beta=0.0,
    n_completions=None,
    n_tokens=None,
    biased_std=False,
    kl_reversed=False,
):
    adv = ref_advantages(rewards, gids, scale_std=scale_std, adv_eps=adv_eps, biased_std=biased_std)
    total = torch.zeros((), dtype=F64)
    tokens = 0
    for i in range(lp.shape[0]):
        a = adv[i]
        seq = torch.zeros((), dtype=F64)
        positions = masked_positions(mask, i)
        for t in positions:
            rho = torch.exp(lp[i, t] - old[i, t])
            unclipped = rho * a
            r = rho.item()
            if r > 1.0 + eps:
                clipped = torch.tensor((1.0 + eps) * a, dtype=F64)
            elif r < 1.0 - eps:
                clipped = torch.tensor((1.0 - eps) * a, dtype=F64)
            else:
                clipped = rho * a
            term = -(unclipped if unclipped.item() <= clipped.item() else clipped)
            if kl_beta > 0.0:
                q = (lp[i, t] - ref[i, t]) if kl_reversed else (ref[i, t] - lp[i, t])
                term = term + kl_beta * (torch.exp(q) - q - 1.0)
            seq = seq + term
        if aggregation == "seq_mean_token_mean":
            total = total + seq / len(positions)
        else:
            total = total + seq
            tokens += len(positions)
    if aggregation == "seq_mean_token_mean":
        return total / (lp.shape[0] if n_completions is None else n_completions)
    return total / (tokens if n_tokens is None else n_tokens)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def popo_kwargs(b: LossBatch, eps, redistribution, aggregation, **kw):
    return dict(clip_eps=eps, redistribution=redistribution, aggregation=aggregation, **kw)


def seq_log_ratio(b: LossBatch) -> torch.Tensor:
    """mean_t (log pi - log pi_old) per row: what the trainer computes before a step."""
    diff = torch.where(b.mask, b.lp - b.old, torch.zeros_like(b.lp))
    return diff.sum(-1) / b.mask.sum(-1)


# --------------------------------------------------------------------------------------------
# POPO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("redistribution", REDISTRIBUTIONS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("eps", EPSILONS)
def test_popo_matches_reference(seed, redistribution, aggregation, eps):
    b = make_batch(seed)
    kw = popo_kwargs(b, eps, redistribution, aggregation)
    loss, grad = loss_and_grad(lambda x: popo_loss(x, b.old, b.mask, b.rewards, b.gids, **kw), b.lp)
    ref_loss, ref_grad = loss_and_grad(
        lambda x: ref_popo(x, b.old, b.mask, b.rewards, b.gids, eps=eps, redistribution=redistribution, aggregation=aggregation),
        b.lp,
    )
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert close(loss, ref_loss), (loss, ref_loss)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-13)
    assert grad.abs().sum() > 0  # not vacuous
    # Padding never gets gradient, whatever garbage it holds.
    assert (grad[~b.mask] == 0).all()


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_popo_accepts_groups_of_one_and_float32(seed):
    b = make_batch(seed, min_size=1)
    for redistribution in REDISTRIBUTIONS:
        kw = popo_kwargs(b, 0.2, redistribution, "seq_mean_token_mean")
        loss32, _ = popo_loss(b.lp.float(), b.old.float(), b.mask, b.rewards.float(), b.gids, **kw)
        ref = ref_popo(b.lp, b.old, b.mask, b.rewards, b.gids, eps=0.2, redistribution=redistribution, aggregation="seq_mean_token_mean")
        assert loss32.dtype == torch.float32
        assert close(loss32, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "redistribution, aggregation, eps, wrong",
    [
        # |B+| replaced by the number of all prompts (groups without positive counted too)
        ("uniform", "seq_mean_token_mean", 0.2, "n_groups_all"),
        # w_i = 1 / |group| instead of 1 / |P(x)|
        ("uniform", "seq_mean_token_mean", 0.2, "weights_include_negatives"),
        # Lbar over every completion of the batch instead of the positives'
        ("uniform", "token_mean", 0.2, "mean_length_all"),
        ("none", "token_mean", 0.2, "mean_length_all"),
        # |P| replaced by the number of completions
        ("none", "seq_mean_token_mean", 0.2, "n_positives_all"),
        # no bound although eps is finite
        ("uniform", "seq_mean_token_mean", 0.2, "unbounded"),
        ("self_normalized", "seq_mean_token_mean", 0.2, "unbounded"),
        # self-normalised weights not detached: same loss, different gradient
        ("self_normalized", "seq_mean_token_mean", 0.2, "no_stopgrad"),
        # the wrong aggregation
        ("uniform", "seq_mean_token_mean", 0.2, "other_aggregation"),
        # the wrong redistribution
        ("self_normalized", "token_mean", float("inf"), "uniform_instead"),
    ],
)
def test_popo_reference_rejects_wrong_variants(redistribution, aggregation, eps, wrong):
    """The comparisons above are not vacuous: a deliberately wrong reference disagrees."""
    b = make_batch(0)
    kw = popo_kwargs(b, eps, redistribution, aggregation)
    loss, grad = loss_and_grad(lambda x: popo_loss(x, b.old, b.mask, b.rewards, b.gids, **kw), b.lp)
    rkw = dict(eps=eps, redistribution=redistribution, aggregation=aggregation)
    if wrong == "n_groups_all":
        rkw["n_groups"] = len(groups_of(b.gids))
    elif wrong == "mean_length_all":
        rkw["mean_length"] = float(b.mask.sum()) / b.mask.shape[0]
    elif wrong == "n_positives_all":
        rkw["n_positives"] = b.mask.shape[0]
    elif wrong == "unbounded":
        rkw["eps"] = float("inf")
    elif wrong == "other_aggregation":
        rkw["aggregation"] = "token_mean"
    elif wrong == "uniform_instead":
        rkw["redistribution"] = "uniform"
    else:
        rkw["wrong"] = wrong
    wrong_loss, wrong_grad = loss_and_grad(lambda x: ref_popo(x, b.old, b.mask, b.rewards, b.gids, **rkw), b.lp)
    if wrong == "no_stopgrad":
        assert close(loss, wrong_loss)
        assert differs(grad, wrong_grad)
    else:
        assert differs(loss, wrong_loss) or differs(grad, wrong_grad)
        assert differs(loss, wrong_loss)
    # ... while the right reference agrees.
    rkw_right = dict(eps=eps, redistribution=redistribution, aggregation=aggregation)
    assert close(loss, ref_popo(b.lp, b.old, b.mask, b.rewards, b.gids, **rkw_right))


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("redistribution", REDISTRIBUTIONS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_popo_no_gradient_reaches_negatives(seed, redistribution, aggregation, poison):
    b = make_batch(seed)
    negative = b.rewards == 0
    lp = b.lp.clone()
    old = b.old.clone()
    lp[negative] = poison
    old[negative] = -poison if poison == poison else poison
    kw = popo_kwargs(b, 0.2, redistribution, aggregation)
    loss, grad = loss_and_grad(lambda x: popo_loss(x, old, b.mask, b.rewards, b.gids, **kw), lp)
    clean_loss, clean_grad = loss_and_grad(lambda x: popo_loss(x, b.old, b.mask, b.rewards, b.gids, **kw), b.lp)
    assert torch.isfinite(loss)
    assert (grad[negative] == 0).all()  # exactly zero, no NaN
    assert torch.isfinite(grad).all()
    assert grad[~negative].abs().sum() > 0
    assert close(loss, clean_loss) and torch.allclose(grad, clean_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("redistribution", REDISTRIBUTIONS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_popo_tokens_above_bound_get_zero_gradient(seed, redistribution, aggregation):
    eps = 0.2
    b = make_batch(seed, spread=0.5)
    kw = popo_kwargs(b, eps, redistribution, aggregation)
    _, grad = loss_and_grad(lambda x: popo_loss(x, b.old, b.mask, b.rewards, b.gids, **kw), b.lp)
    rho = torch.exp(torch.where(b.mask, b.lp - b.old, torch.zeros_like(b.lp)))
    positive_tok = b.mask & (b.rewards == 1)[:, None]
    above = positive_tok & (rho > 1 + eps)
    below = positive_tok & (rho <= 1 + eps)
    assert above.any() and below.any()
    assert (grad[above] == 0).all()
    assert (grad[below] < 0).all()  # raising a bounded positive token lowers the loss
    # With eps = inf those tokens do get gradient.
    kw_inf = popo_kwargs(b, float("inf"), redistribution, aggregation)
    _, grad_inf = loss_and_grad(lambda x: popo_loss(x, b.old, b.mask, b.rewards, b.gids, **kw_inf), b.lp)
    assert (grad_inf[positive_tok] < 0).all()


@pytest.mark.parametrize("redistribution", REDISTRIBUTIONS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_popo_batch_without_positive_has_zero_loss_and_no_gradient(redistribution, aggregation):
    b = make_batch(1)
    rewards = torch.zeros_like(b.rewards)
    lp = b.lp.clone().requires_grad_(True)
    loss, metrics = popo_loss(lp, b.old, b.mask, rewards, b.gids, **popo_kwargs(b, 0.2, redistribution, aggregation))
    assert float(loss) == 0.0
    assert not loss.requires_grad
    assert loss.grad_fn is None
    # A micro-batch with no positive in a step that has some: same, with the step's quantities.
    step = popo_step(b.rewards, b.gids, b.mask.sum(-1), redistribution=redistribution, seq_log_ratio=seq_log_ratio(b))
    loss, _ = popo_loss(lp, b.old, b.mask, rewards, b.gids, **popo_kwargs(b, 0.2, redistribution, aggregation), step=step)
    assert float(loss) == 0.0 and not loss.requires_grad


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("redistribution", REDISTRIBUTIONS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("eps", EPSILONS)
def test_popo_micro_batches_match_whole_batch(seed, redistribution, aggregation, eps):
    b = make_batch(seed)
    kw = popo_kwargs(b, eps, redistribution, aggregation)
    whole_loss, whole_grad = loss_and_grad(lambda x: popo_loss(x, b.old, b.mask, b.rewards, b.gids, **kw), b.lp)

    step = popo_step(b.rewards, b.gids, b.mask.sum(-1), redistribution=redistribution, clip_eps=eps,
                     seq_log_ratio=seq_log_ratio(b))
    lp = b.lp.clone().requires_grad_(True)
    total = 0.0
    naive_total = 0.0
    for part in partition_rows(b, seed, n_parts=3):
        idx = torch.tensor(part)
        m = b.rows(part)
        loss, _ = popo_loss(lp[idx], m.old, m.mask, m.rewards, m.gids, **kw, step=step.take(idx))
        if loss.requires_grad:
            loss.backward()  # gradient accumulation, one micro-batch at a time
        total += float(loss.detach())
        naive_total += float(popo_loss(m.lp, m.old, m.mask, m.rewards, m.gids, **kw)[0])
    assert close(total, whole_loss)
    assert torch.allclose(lp.grad, whole_grad, rtol=1e-9, atol=1e-14)
    # Without the step's normalisers each micro-batch normalises by its own: a different loss.
    assert differs(naive_total, whole_loss)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("redistribution", REDISTRIBUTIONS)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("eps", [0.2, float("inf")])
def test_popo_on_policy_gradient_is_weighted_log_likelihood(seed, redistribution, aggregation, eps):
    """With old == logprobs (detached), rho = 1: grad L_pos = grad of -(1/|B+|) sum w_i S_i(log pi)."""
    b = make_batch(seed)
    old = b.lp.detach().clone()
    kw = popo_kwargs(b, eps, redistribution, aggregation)
    loss, grad = loss_and_grad(lambda x: popo_loss(x, old, b.mask, b.rewards, b.gids, **kw), b.lp)

    positives = [i for i in range(b.lp.shape[0]) if float(b.rewards[i]) == 1.0]
    lengths = {i: len(masked_positions(b.mask, i)) for i in positives}
    lbar = sum(lengths.values()) / len(positives)
    by_group: dict[int, list[int]] = {}
    for i in positives:
        by_group.setdefault(int(b.gids[i]), []).append(i)

    def log_likelihood(x):
        total = torch.zeros((), dtype=F64)
        for members in by_group.values():
            for i in members:
                # On policy every s_i = 1, so self-normalised weights are uniform too.
                w = 1.0 if redistribution == "none" else 1.0 / len(members)
                denom = lengths[i] if aggregation == "seq_mean_token_mean" else lbar
                total = total + w * sum(x[i, t] for t in masked_positions(b.mask, i)) / denom
        return -total / (len(positives) if redistribution == "none" else len(by_group))

    _, ll_grad = loss_and_grad(log_likelihood, b.lp)
    assert torch.allclose(grad, ll_grad, rtol=1e-10, atol=1e-14)
    if aggregation == "seq_mean_token_mean":
        assert close(loss, -1.0)  # every S_i = 1 and the weights sum to one unit of mass per group
    if redistribution == "none" and aggregation == "token_mean":
        # The 'redistribution' ablation: one mean over every positive token of the batch.
        n_tok = sum(lengths.values())
        _, tok_grad = loss_and_grad(lambda x: -sum(x[i, t] for i in positives for t in masked_positions(b.mask, i)) / n_tok, b.lp)
        assert torch.allclose(grad, tok_grad, rtol=1e-10, atol=1e-14)


# Not "self_normalized": its weights are stop-gradient, so finite differences (which see the
# weights move) and autograd disagree by design; that case is checked against the autograd
# reference above and by the "no_stopgrad" variant.
@pytest.mark.parametrize("redistribution", ["uniform", "none"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_popo_gradcheck(redistribution, aggregation):
    b = make_batch(5, spread=0.4)
    kw = popo_kwargs(b, 0.2, redistribution, aggregation)
    lp = b.lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: popo_loss(x, b.old, b.mask, b.rewards, b.gids, **kw)[0], (lp,), fast_mode=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_popo_metrics(seed):
    eps = 0.2
    b = make_batch(seed)
    _, metrics = popo_loss(b.lp, b.old, b.mask, b.rewards, b.gids, clip_eps=eps)
    above = n_tok = 0
    ratio_sum = 0.0
    for i in range(b.lp.shape[0]):
        if float(b.rewards[i]) != 1.0:
            continue
        for t in masked_positions(b.mask, i):
            rho = math.exp(float(b.lp[i, t] - b.old[i, t]))
            above += rho > 1 + eps
            ratio_sum += rho
            n_tok += 1
    assert above > 0
    assert metrics["clip/fraction"] > 0
    assert metrics["clip/fraction"] == pytest.approx(above / n_tok, rel=1e-12)
    assert metrics["ratio/mean"] == pytest.approx(ratio_sum / n_tok, rel=1e-9)
    _, metrics_inf = popo_loss(b.lp, b.old, b.mask, b.rewards, b.gids, clip_eps=float("inf"))
    assert metrics_inf["clip/fraction"] == 0.0


def test_popo_rejects_unknown_options():
    b = make_batch(0)
    with pytest.raises(ValueError):
        popo_loss(b.lp, b.old, b.mask, b.rewards, b.gids, redistribution="softmax")
    with pytest.raises(ValueError):
        popo_loss(b.lp, b.old, b.mask, b.rewards, b.gids, aggregation="token_sum")


# --------------------------------------------------------------------------------------------
# GRPO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale_std", [True, False])
@pytest.mark.parametrize("adv_eps", [1e-6, 0.3])
def test_group_advantages_match_reference(seed, scale_std, adv_eps):
    b = make_batch(seed, min_size=2)
    adv = group_advantages(b.rewards, b.gids, scale_std=scale_std, adv_eps=adv_eps)
    ref = torch.tensor(ref_advantages(b.rewards, b.gids, scale_std=scale_std, adv_eps=adv_eps), dtype=F64)
    assert torch.allclose(adv.to(F64), ref, rtol=1e-12, atol=1e-12)
    # Groups whose rewards are all equal get zero advantage.
    for members in groups_of(b.gids).values():
        if len({float(b.rewards[i]) for i in members}) == 1:
            assert (adv[members] == 0).all()
    # Not vacuous: the biased std gives other advantages.
    if scale_std:
        biased = torch.tensor(ref_advantages(b.rewards, b.gids, adv_eps=adv_eps, biased_std=True), dtype=F64)
        assert differs(adv, biased)


def test_group_advantages_known_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=F64)
    gids = torch.tensor([7, 7, 7, 7, 3, 3])
    adv = group_advantages(rewards, gids, adv_eps=1e-12)
    # Group 7: mean 1/4, unbiased std sqrt(((3/4)^2 + 3 (1/4)^2) / 3) = 1/2.
    assert torch.allclose(adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.0, 0.0], dtype=F64), rtol=1e-9, atol=0)
    assert torch.allclose(group_advantages(rewards, gids, scale_std=False), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0], dtype=F64))


def test_group_advantages_reject_group_of_one():
    rewards = torch.tensor([1.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        group_advantages(rewards, torch.tensor([0, 0, 1]))
    b = make_batch(0, min_size=2)
    with pytest.raises(ValueError):
        grpo_loss(b.lp[:1], b.old[:1], b.mask[:1], b.rewards[:1], b.gids[:1])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale_std", [True, False])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
@pytest.mark.parametrize("adv_eps", [1e-6, 0.25])
def test_grpo_matches_reference(seed, scale_std, aggregation, kl_beta, adv_eps):
    eps = 0.2
    b = make_batch(seed, min_size=2)
    kw = dict(clip_eps=eps, scale_std=scale_std, adv_eps=adv_eps, aggregation=aggregation, kl_beta=kl_beta)
    ref_lp = b.ref if kl_beta > 0 else None
    loss, grad = loss_and_grad(lambda x: grpo_loss(x, b.old, b.mask, b.rewards, b.gids, ref_logprobs=ref_lp, **kw), b.lp)
    rkw = dict(eps=eps, scale_std=scale_std, adv_eps=adv_eps, aggregation=aggregation, kl_beta=kl_beta, ref=b.ref)
    ref_loss, ref_grad = loss_and_grad(lambda x: ref_grpo(x, b.old, b.mask, b.rewards, b.gids, **rkw), b.lp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert close(loss, ref_loss), (loss, ref_loss)
    assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-13)
    assert (grad[~b.mask] == 0).all()
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(
    "aggregation, kl_beta, adv_eps, wrong",
    [
        ("seq_mean_token_mean", 0.0, 1e-6, "biased_std"),
        ("seq_mean_token_mean", 0.0, 0.25, "adv_eps_ignored"),
        ("seq_mean_token_mean", 0.0, 1e-6, "other_aggregation"),
        ("token_mean", 0.0, 1e-6, "other_aggregation"),
        ("seq_mean_token_mean", 0.0, 1e-6, "unclipped"),
        ("token_mean", 0.1, 1e-6, "kl_reversed"),
        ("token_mean", 0.1, 1e-6, "no_kl"),
        ("seq_mean_token_mean", 0.0, 1e-6, "n_completions_wrong"),
    ],
)
def test_grpo_reference_rejects_wrong_variants(aggregation, kl_beta, adv_eps, wrong):
    b = make_batch(2, min_size=2, spread=0.5)
    kw = dict(clip_eps=0.2, adv_eps=adv_eps, aggregation=aggregation, kl_beta=kl_beta)
    loss, grad = loss_and_grad(lambda x: grpo_loss(x, b.old, b.mask, b.rewards, b.gids, ref_logprobs=b.ref, **kw), b.lp)
    rkw = dict(eps=0.2, scale_std=True, adv_eps=adv_eps, aggregation=aggregation, kl_beta=kl_beta, ref=b.ref)
    right = ref_grpo(b.lp, b.old, b.mask, b.rewards, b.gids, **rkw)
    assert close(loss, right)
    if wrong == "biased_std":
        rkw["biased_std"] = True
    elif wrong == "adv_eps_ignored":
        rkw["adv_eps"] = 1e-6
    elif wrong == "other_aggregation":
        rkw["aggregation"] = "token_mean" if aggregation == "seq_mean_token_mean" else "seq_mean_token_mean"
    elif wrong == "unclipped":
        rkw["eps"] = float("inf")
    elif wrong == "kl_reversed":
        rkw["kl_reversed"] = True
    elif wrong == "no_kl":
        rkw["kl_beta"] = 0.0
    elif wrong == "n_completions_wrong":
        rkw["n_completions"] = int(b.mask.sum())
    wrong_loss, wrong_grad = loss_and_grad(lambda x: ref_grpo(x, b.old, b.mask, b.rewards, b.gids, **rkw), b.lp)
    assert differs(loss, wrong_loss) or differs(grad, wrong_grad)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale_std", [True, False])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
def test_grpo_micro_batches_match_whole_batch(seed, scale_std, aggregation, kl_beta):
    b = make_batch(seed, min_size=2)
    kw = dict(clip_eps=0.2, scale_std=scale_std, aggregation=aggregation, kl_beta=kl_beta)
    whole_loss, whole_grad = loss_and_grad(
        lambda x: grpo_loss(x, b.old, b.mask, b.rewards, b.gids, ref_logprobs=b.ref, **kw), b.lp
    )
    step = grpo_step(b.rewards, b.gids, b.mask.sum(-1), scale_std=scale_std)
    lp = b.lp.clone().requires_grad_(True)
    total = naive_total = 0.0
    for part in partition_rows(b, seed, n_parts=3):
        idx = torch.tensor(part)
        m = b.rows(part)
        loss, _ = grpo_loss(lp[idx], m.old, m.mask, m.rewards, m.gids, ref_logprobs=m.ref, **kw, step=step.take(idx))
        loss.backward()
        total += float(loss.detach())
        # The step's advantages but this micro-batch's own denominators.
        own = StepQuantities({"advantage": step.rows["advantage"][idx]}, {"n_completions": len(part), "n_tokens": float(m.mask.sum())})
        naive_total += float(grpo_loss(m.lp, m.old, m.mask, m.rewards, m.gids, ref_logprobs=m.ref, **kw, step=own)[0])
    assert close(total, whole_loss)
    assert torch.allclose(lp.grad, whole_grad, rtol=1e-9, atol=1e-14)
    assert differs(naive_total, whole_loss)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_grpo_gradcheck(aggregation):
    b = make_batch(6, min_size=2, spread=0.4)
    lp = b.lp.clone().requires_grad_(True)
    fn = lambda x: grpo_loss(x, b.old, b.mask, b.rewards, b.gids, aggregation=aggregation, ref_logprobs=b.ref, kl_beta=0.05)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (lp,), fast_mode=True)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_grpo_metrics_and_kl_needs_reference(seed):
    eps = 0.2
    b = make_batch(seed, min_size=2, spread=0.5)
    _, metrics = grpo_loss(b.lp, b.old, b.mask, b.rewards, b.gids, clip_eps=eps, ref_logprobs=b.ref, kl_beta=0.1)
    adv = ref_advantages(b.rewards, b.gids)
    clipped = n_tok = 0
    kl = 0.0
    for i in range(b.lp.shape[0]):
        for t in masked_positions(b.mask, i):
            rho = math.exp(float(b.lp[i, t] - b.old[i, t]))
            clipped += (rho > 1 + eps and adv[i] > 0) or (rho < 1 - eps and adv[i] < 0)
            q = float(b.ref[i, t] - b.lp[i, t])
            kl += math.exp(q) - q - 1
            n_tok += 1
    assert clipped > 0 and metrics["clip/fraction"] > 0
    assert metrics["clip/fraction"] == pytest.approx(clipped / n_tok, rel=1e-12)
    assert metrics["kl/ref"] == pytest.approx(kl / n_tok, rel=1e-9)
    with pytest.raises(ValueError):
        grpo_loss(b.lp, b.old, b.mask, b.rewards, b.gids, kl_beta=0.1)
    with pytest.raises(ValueError):
        grpo_loss(b.lp, b.old, b.mask, b.rewards, b.gids, aggregation="seq_sum")
