"""The sign-separated family (METHOD.md, "The sign-separated family") and the registry.

Each loss is checked against an independent float64 reference written from METHOD.md with Python
loops (sharing nothing with popo_core.algo.losses), with its gradient, a gradcheck, its micro-batch
invariance through the registry's public entry points, the identities METHOD.md states, and which
completions can receive gradient. Then the registry itself, and the rollout correction.
"""

from __future__ import annotations

import math

import pytest
import torch

from popo_core.algo import losses
from popo_core.algo.losses import METHODS, policy_loss, rollout_divergence, rollout_weights, step_quantities
from popo_core.config import compose, methods
from helpers import F64, SEEDS, close, differs, loss_and_grad, make_batch, masked_positions, partition_rows

FAMILY = ["dr_grpo", "rft", "raft_pp", "psr", "nsr", "w_reinforce"]
AGGREGATIONS = ["seq_mean_token_mean", "token_mean"]


# ------------------------------------------------------------------------------ references
def ref_surr(rho, a, eps):
    """-min(rho A, clip(rho, 1-eps, 1+eps) A), the clipped branch a constant."""
    r = rho.item()
    clipped = torch.tensor(min(max(r, 1 - eps), 1 + eps) * a, dtype=F64) if (r > 1 + eps or r < 1 - eps) else rho * a
    unclipped = rho * a
    return -(unclipped if unclipped.item() <= clipped.item() else clipped)


def ref_aggregate(terms, n, aggregation, *, max_length=None):
    """terms: {row: [token terms]} over all n completions (missing rows count as zero terms)."""
    if aggregation == "seq_mean_token_mean":
        return sum(sum(ts) / len(ts) for ts in terms.values() if ts) / n
    if aggregation == "token_mean":
        return sum(sum(ts) for ts in terms.values()) / sum(len(ts) for ts in terms.values())
    return sum(sum(ts) for ts in terms.values()) / (n * max_length)  # Dr. GRPO's constant L


def token_terms(lp, old, mask, adv, eps):
    out = {}
    for i in range(lp.shape[0]):
        out[i] = [ref_surr(torch.exp(lp[i, t] - old[i, t]), adv[i], eps) for t in masked_positions(mask, i)]
    return out


def ref_loss(name, lp, old, mask, rewards, gids, *, eps=0.2, aggregation="token_mean", positive_weight=0.1,
             max_length=7):
    n = lp.shape[0]
    r = [float(x) for x in rewards]
    if name == "dr_grpo":
        mean = {}
        for g in set(gids.tolist()):
            members = [i for i in range(n) if int(gids[i]) == g]
            mean[g] = sum(r[i] for i in members) / len(members)
        adv = [r[i] - mean[int(gids[i])] for i in range(n)]
        return ref_aggregate(token_terms(lp, old, mask, adv, eps), n, "L", max_length=max_length)
    if name == "rft":
        pos = [i for i in range(n) if r[i] == 1.0]
        per = {i: [lp[i, t] for t in masked_positions(mask, i)] for i in pos}
        if aggregation == "seq_mean_token_mean":
            return -sum(sum(v) / len(v) for v in per.values()) / len(pos)
        return -sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values())
    if name == "raft_pp":
        total = torch.zeros((), dtype=F64)
        for i in range(n):
            if r[i] != 1.0:
                continue
            terms = []
            for t in masked_positions(mask, i):
                rho = torch.exp(lp[i, t] - old[i, t])
                clipped = torch.clamp(rho, 1 - eps, 1 + eps).detach() if not (1 - eps <= rho.item() <= 1 + eps) else rho
                terms.append(rho if rho.item() <= clipped.item() else clipped)  # min(rho, clip(rho))
            total = total + sum(terms) / len(terms)
        return -total / n
    a_pos, a_neg = {"psr": (1.0, 0.0), "nsr": (0.0, -1.0), "w_reinforce": (positive_weight, -1.0)}[name]
    adv = [a_pos if x == 1.0 else a_neg for x in r]
    return ref_aggregate(token_terms(lp, old, mask, adv, eps), n, aggregation)


def knobs(name, aggregation="token_mean"):
    return dict(clip_eps=0.2, aggregation=aggregation, positive_weight=0.1, max_length=7)


def fam_loss(name, b, lp=None, aggregation="token_mean", **extra):
    fn = policy_loss(name, **knobs(name, aggregation))
    return fn(b.lp if lp is None else lp, b.old, b.mask, b.rewards, b.gids, **extra)


def aggregations_of(name):
    return ["L"] if name in ("dr_grpo", "raft_pp") else AGGREGATIONS


# --------------------------------------------------------------------------------- the math
@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("seed", SEEDS)
def test_family_matches_reference_with_gradient(name, seed):
    b = make_batch(seed, spread=0.5)
    for agg in aggregations_of(name):
        agg_kw = "token_mean" if agg == "L" else agg
        loss, grad = loss_and_grad(lambda x: fam_loss(name, b, x, agg_kw), b.lp)
        ref, ref_grad = loss_and_grad(lambda x: ref_loss(name, x, b.old, b.mask, b.rewards, b.gids, aggregation=agg_kw), b.lp)
        assert close(loss, ref), (name, agg, loss, ref)
        assert torch.allclose(grad, ref_grad, rtol=1e-9, atol=1e-13), (name, agg)
        assert (grad[~b.mask] == 0).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", FAMILY)
def test_family_reference_is_not_vacuous(name):
    """A deliberately wrong reference disagrees: another method's formula, or the other aggregation."""
    b = make_batch(1, spread=0.5)
    loss, _ = fam_loss(name, b)
    others = [o for o in FAMILY if o != name]
    for other in others:
        wrong = ref_loss(other, b.lp, b.old, b.mask, b.rewards, b.gids)
        if {name, other} != {"rft", "raft_pp"}:
            assert differs(loss, wrong), (name, other)
    if name in ("rft", "psr", "nsr", "w_reinforce"):
        assert differs(loss, ref_loss(name, b.lp, b.old, b.mask, b.rewards, b.gids, aggregation="seq_mean_token_mean"))
    if name == "w_reinforce":
        assert differs(loss, ref_loss(name, b.lp, b.old, b.mask, b.rewards, b.gids, positive_weight=0.5))
    if name == "dr_grpo":
        assert differs(loss, ref_loss(name, b.lp, b.old, b.mask, b.rewards, b.gids, max_length=8))


@pytest.mark.parametrize("name", FAMILY)
def test_family_gradcheck(name):
    b = make_batch(5, spread=0.4)
    lp = b.lp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fam_loss(name, b, x)[0], (lp,), fast_mode=True)


@pytest.mark.parametrize("name", FAMILY + ["popo", "grpo"])
@pytest.mark.parametrize("seed", SEEDS[:3])
def test_micro_batches_of_the_forwarded_rows_give_the_whole_batch(name, seed):
    """The trainer's way: step quantities over the whole step, then any split of the rows the method
    forwards (groups split across micro-batches): the same loss and gradient as the whole batch."""
    b = make_batch(seed, min_size=2, spread=0.5)
    kn = knobs(name) | {"redistribution": "uniform", "scale_std": True, "adv_eps": 1e-6, "kl_beta": 0.0}
    fn = policy_loss(name, **kn)
    whole, whole_grad = loss_and_grad(lambda x: fn(x, b.old, b.mask, b.rewards, b.gids), b.lp)
    step = step_quantities(name, b.rewards, b.gids, b.mask.sum(-1), **kn)
    forwarded = METHODS[name].forwarded(b.rewards)
    lp = b.lp.clone().requires_grad_(True)
    total = 0.0
    for part in partition_rows(b, seed, 3):
        part = [i for i in part if forwarded[i]]
        if not part:
            continue
        idx = torch.tensor(part)
        m = b.rows(part)
        loss, _ = fn(lp[idx], m.old, m.mask, m.rewards, m.gids, step=step.take(idx))
        if loss.requires_grad:
            loss.backward()
        total += float(loss.detach())
    assert close(total, whole)
    assert torch.allclose(lp.grad, whole_grad, rtol=1e-9, atol=1e-14)
    # Rows the method does not forward get no gradient in the whole-batch loss either.
    assert (whole_grad[~forwarded] == 0).all()


@pytest.mark.parametrize("name, receives", [("rft", "positives"), ("raft_pp", "positives"), ("psr", "positives"),
                                            ("nsr", "negatives"), ("popo", "positives")])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_no_gradient_reaches_the_other_sign(name, receives, poison):
    b = make_batch(2, spread=0.5)
    other = (b.rewards == 0) if receives == "positives" else (b.rewards == 1)
    lp = b.lp.clone()
    lp[other] = poison
    fn = policy_loss(name, **knobs(name) | {"redistribution": "uniform"})
    loss, grad = loss_and_grad(lambda x: fn(x, b.old, b.mask, b.rewards, b.gids), lp)
    clean, clean_grad = loss_and_grad(lambda x: fn(x, b.old, b.mask, b.rewards, b.gids), b.lp)
    # NaN * 0 would poison a masked sum: the loss must not depend on the other sign's values at all.
    assert torch.isfinite(loss) and close(loss, clean)
    assert (grad[other] == 0).all() and torch.isfinite(grad).all()
    assert grad[~other[:, None] & b.mask].abs().sum() > 0
    assert torch.allclose(grad, clean_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_identities_in_method_md(seed):
    b = make_batch(seed, spread=0.5)
    raft = fam_loss("raft_pp", b)[0]
    # psr with seq_mean_token_mean equals raft_pp ...
    assert close(policy_loss("psr", clip_eps=0.2, aggregation="seq_mean_token_mean")(b.lp, b.old, b.mask, b.rewards, b.gids)[0], raft)
    # ... and |P|/N times POPO with redistribution none, aggregation seq_mean_token_mean.
    popo = policy_loss("popo", clip_eps=0.2, redistribution="none", aggregation="seq_mean_token_mean")
    p, n = float((b.rewards == 1).sum()), b.rewards.shape[0]
    assert close(raft, p / n * popo(b.lp, b.old, b.mask, b.rewards, b.gids)[0])
    _, g_raft = loss_and_grad(lambda x: fam_loss("raft_pp", b, x), b.lp)
    _, g_popo = loss_and_grad(lambda x: p / n * popo(x, b.old, b.mask, b.rewards, b.gids)[0], b.lp)
    assert torch.allclose(g_raft, g_popo, rtol=1e-10, atol=1e-14)
    # W-REINFORCE is lambda * PSR + NSR with a shared token-mean denominator.
    w = fam_loss("w_reinforce", b)[0]
    assert close(w, 0.1 * fam_loss("psr", b)[0] + fam_loss("nsr", b)[0])


def test_rft_ignores_the_ratio():
    b = make_batch(3, spread=0.8)
    same = fam_loss("rft", b)[0]
    b.old = b.old + 5.0
    assert close(fam_loss("rft", b)[0], same)


def test_batch_without_the_forwarded_sign_gives_zero():
    b = make_batch(0)
    zeros = torch.zeros_like(b.rewards)
    for name in ("rft", "raft_pp", "psr", "popo"):
        lp = b.lp.clone().requires_grad_(True)
        loss, _ = policy_loss(name, **knobs(name) | {"redistribution": "uniform"})(lp, b.old, b.mask, zeros, b.gids)
        assert float(loss.detach()) == 0.0


# ------------------------------------------------------------------------------- the registry
def test_every_yaml_is_a_registered_method_and_back():
    registered = {n for n in METHODS if "+" not in n}
    assert set(methods()) == registered
    for name in registered:
        cfg = compose("tiny", [f"algo={name}"])
        assert cfg.algo.name == name
        assert cfg.algo.siamese == (name == "popo")  # the momentum network is POPO's alone by default


def test_family_yaml_defaults():
    assert compose("tiny", ["algo=w_reinforce"]).algo.positive_weight == 0.1
    for name in ("psr", "nsr", "w_reinforce"):
        assert compose("tiny", [f"algo={name}"]).algo.aggregation == "token_mean"  # the authors' code
    cfg = compose("tiny", ["algo=dr_grpo", "rollout.max_new_tokens=17"])
    assert cfg.algo.max_length == 17  # null: rollout.max_new_tokens
    assert compose("tiny", ["algo=dr_grpo", "algo.max_length=9"]).algo.max_length == 9


def test_methods_declare_what_they_forward():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    expect = {"popo": [1, 0, 1, 0], "rft": [1, 0, 1, 0], "raft_pp": [1, 0, 1, 0], "psr": [1, 0, 1, 0],
              "nsr": [0, 1, 0, 1], "w_reinforce": [1, 1, 1, 1], "grpo": [1, 1, 1, 1], "dr_grpo": [1, 1, 1, 1],
              "popo+negatives": [1, 1, 1, 1]}
    for name, rows in expect.items():
        assert METHODS[name].forwarded(rewards).int().tolist() == rows, name
    assert METHODS["popo+negatives"].penalised(rewards).int().tolist() == [1, 0, 1, 0]
    assert METHODS["grpo"].needs({"kl_beta": 0.1}).reference and not METHODS["grpo"].needs({"kl_beta": 0.0}).reference
    assert METHODS["popo"].needs({"redistribution": "self_normalized"}).seq_log_ratio


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="unknown method"):
        policy_loss("ppo")


# ------------------------------------------------------------------------- rollout correction
def ref_weights(old, mu, mask, mode, cap):
    n, t = old.shape
    out = torch.zeros(n, t, dtype=F64)
    for i in range(n):
        pos = masked_positions(mask, i)
        if mode == "tis":
            for j in pos:
                out[i, j] = min(math.exp(float(old[i, j] - mu[i, j])), cap)
        else:
            g = math.exp(sum(float(old[i, j] - mu[i, j]) for j in pos) / len(pos))
            for j in pos:
                out[i, j] = 1.0 if 1 / cap <= g <= cap else 0.0
    return out


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("cap", [1.2, 2.0])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_rollout_weights_match_reference(mode, cap, seed):
    b = make_batch(seed, spread=0.6)
    mu = torch.where(b.mask, b.old + 1.5 * torch.randn(b.old.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)),
                     torch.zeros_like(b.old))
    w = rollout_weights(b.old, mu, b.mask, mode=mode, cap=cap)
    ref = ref_weights(b.old, mu, b.mask, mode, cap)
    assert torch.allclose(w.double(), ref, rtol=1e-6, atol=1e-7)
    if mode == "tis":
        assert (w <= cap + 1e-6).all() and (w[b.mask] < cap).any()
    else:
        assert set(w[b.mask].tolist()) <= {0.0, 1.0} and 0 < float(w[b.mask].sum()) < float(b.mask.sum())
    assert rollout_weights(b.old, mu, b.mask, mode="none") is None


@pytest.mark.parametrize("name", ["popo", "grpo", "psr", "rft", "dr_grpo"])
def test_rollout_correction_multiplies_every_token_term(name):
    """With token weights w, every method's gradient equals the reference built with w per token;
    mis keeps the dropped rows in the denominators."""
    b = make_batch(4, min_size=2, spread=0.3)
    weights = torch.where(b.mask, torch.rand(b.lp.shape, dtype=F64, generator=torch.Generator().manual_seed(0)) + 0.5,
                          torch.zeros_like(b.lp))
    kn = knobs(name) | {"redistribution": "none", "aggregation": "seq_mean_token_mean", "scale_std": True}
    fn = policy_loss(name, **kn)
    # A method's loss is linear in its per-token terms, so a per-token weight on row i, token t
    # multiplies d loss / d term_it: check d loss / d logprob against the unweighted gradient.
    old = b.lp.detach().clone()  # on policy: the terms are smooth in the log-prob here
    _, g = loss_and_grad(lambda x: fn(x, old, b.mask, b.rewards, b.gids), b.lp)
    _, g_w = loss_and_grad(lambda x: fn(x, old, b.mask, b.rewards, b.gids, token_weight=weights), b.lp)
    assert torch.allclose(g_w, g * weights, rtol=1e-9, atol=1e-14)
    dropped = weights.clone()
    dropped[0] = 0.0
    _, g_d = loss_and_grad(lambda x: fn(x, old, b.mask, b.rewards, b.gids, token_weight=dropped), b.lp)
    assert (g_d[0] == 0).all() and torch.allclose(g_d[1:], g_w[1:], rtol=1e-9, atol=1e-14)


def test_rollout_divergence_is_mean_abs_and_k3():
    old = torch.tensor([[-1.0, -2.0, 0.0]], dtype=F64)
    mu = torch.tensor([[-1.5, -1.0, 9.0]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    d = rollout_divergence(old, mu, mask)
    q = [0.5, -1.0]
    assert d["sampled_tokens"] == 2
    assert d["mismatch"] == pytest.approx(1.5)
    assert d["kl"] == pytest.approx(sum(math.exp(x) - x - 1 for x in q))
    with pytest.raises(ValueError):
        rollout_weights(old, None, mask, mode="tis")
    assert losses.ROLLOUT_CORRECTIONS == ("none", "tis", "mis")
