"""Siamese momentum network and penalties (popo_core/algo/siamese.py) against float64 references.

References follow METHOD.md sections 2 and 3 with plain Python loops over completions and tokens
(vector arithmetic only inside one hidden state); the predictor reference is written out from the
module's weights (Linear, exact GELU, Linear).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn

from popo_core.algo.siamese import Predictor, kl_penalty, momentum_at, momentum_update_, similarity_penalty

F64 = torch.float64
SEEDS = [0, 1, 2, 3]
REPRESENTATIONS = ["mean", "token"]
GARBAGE = (1e30, -1e30, 3e4, -7.5)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def make_hidden(seed: int, *, dim: int = 6, drift: float = 0.7):
    """[N, T, H] online and momentum hidden states with random lengths and garbage padding."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, t_max = rnd.randint(3, 7), rnd.randint(4, 8)
    lengths = torch.tensor([rnd.randint(1, t_max) for _ in range(n)])
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    online = torch.randn(n, t_max, dim, generator=gen, dtype=F64) * 2.0
    momentum = online + drift * torch.randn(n, t_max, dim, generator=gen, dtype=F64)

    def garble(x):
        pick = torch.randint(len(GARBAGE), (n, t_max, dim), generator=gen)
        return torch.where(mask[..., None], x, torch.tensor(GARBAGE, dtype=F64)[pick])

    return garble(online), garble(momentum), mask


def make_predictor(seed: int, dim: int = 6, dtype=F64) -> Predictor:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Predictor(dim).to(dtype)


def positions(mask, i):
    return [t for t in range(mask.shape[1]) if bool(mask[i, t])]


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def ref_predictor(predictor: Predictor | None, v: torch.Tensor) -> torch.Tensor:
    if predictor is None:
        return v
    lin1, lin2 = [m for m in predictor.modules() if isinstance(m, nn.Linear)]
    z = lin1.weight @ v + lin1.bias
    z = z * 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))  # exact GELU
    return lin2.weight @ z + lin2.bias


def ref_cos(a, b):
    return (a * b).sum() / (torch.sqrt((a * a).sum()) * torch.sqrt((b * b).sum()))


def ref_similarity(h_on, h_mom, mask, *, representation, predictor=None, n_rows=None, wrong=None):
    """Section 3: mean over positives of D_i = 1 - cos(q(h_theta_i), stopgrad(h_xi_i))."""
    n = h_on.shape[0]
    total = torch.zeros((), dtype=F64)
    for i in range(n):
        pos = positions(mask, i)
        target = h_mom if wrong == "no_stopgrad" else h_mom.detach()
        if representation == "mean":
            if wrong == "predictor_before_pool":
                a = sum(ref_predictor(predictor, h_on[i, t]) for t in pos) / len(pos)
            else:
                a = ref_predictor(predictor, sum(h_on[i, t] for t in pos) / len(pos))
            b = sum(target[i, t] for t in pos) / len(pos)
            d = 1.0 - ref_cos(a, b)
        else:
            d = sum(1.0 - ref_cos(ref_predictor(predictor, h_on[i, t]), target[i, t]) for t in pos) / len(pos)
        total = total + d
    return total / (n if n_rows is None else n_rows)


def ref_kl(lp, mom_lp, mask, *, n_rows=None, reversed_=False):
    """k3 estimate of KL(pi_theta || pi_xi): per completion the token mean, then the mean."""
    n = lp.shape[0]
    total = torch.zeros((), dtype=F64)
    for i in range(n):
        pos = positions(mask, i)
        seq = torch.zeros((), dtype=F64)
        for t in pos:
            q = (lp[i, t] - mom_lp[i, t].detach()) if reversed_ else (mom_lp[i, t].detach() - lp[i, t])
            seq = seq + torch.exp(q) - q - 1.0
        total = total + seq / len(pos)
    return total / (n if n_rows is None else n_rows)


def close(a, b, rtol=1e-9, atol=1e-12):
    return torch.allclose(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=rtol, atol=atol)


def differs(a, b):
    return not close(a, b, rtol=1e-6, atol=1e-9)


def grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True)


# --------------------------------------------------------------------------------------------
# Momentum schedule and update (section 2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", [0.9, 0.99, 0.996])
@pytest.mark.parametrize("total", [1, 7, 100])
def test_momentum_schedules(base, total):
    for k in range(total + 1):
        assert momentum_at(k, total, base, "constant") == base
        # An independent form of the same schedule: 1 - (1 - m0)(cos x + 1)/2 = m0 + (1 - m0) sin^2(x/2).
        expected = base + (1.0 - base) * math.sin(math.pi * k / (2 * total)) ** 2
        assert momentum_at(k, total, base, "cosine") == pytest.approx(expected, rel=0, abs=1e-14)
    assert momentum_at(0, total, base, "cosine") == pytest.approx(base, rel=0, abs=1e-15)
    assert momentum_at(total, total, base, "cosine") == pytest.approx(1.0, rel=0, abs=1e-15)
    values = [momentum_at(k, total, base, "cosine") for k in range(total + 1)]
    assert all(a <= b + 1e-15 for a, b in zip(values, values[1:]))
    assert all(base - 1e-15 <= v <= 1.0 + 1e-15 for v in values)
    if total % 2 == 0:
        # Half way: cos(pi/2) = 0, so m = 1 - (1 - m_0)/2; not the constant schedule.
        mid = momentum_at(total // 2, total, base, "cosine")
        assert mid == pytest.approx(1.0 - (1.0 - base) / 2.0, abs=1e-15)
        assert mid != pytest.approx(base, abs=1e-6)
    assert momentum_at(3, total, base) == base  # constant is the default


def test_momentum_schedule_rejects_unknown():
    with pytest.raises(ValueError):
        momentum_at(0, 10, 0.99, "linear")


def _param_lists(seed, dtype=F64, online_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 3, 2), ()]
    xi = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    theta = [torch.randn(s, generator=gen, dtype=dtype).to(online_dtype or dtype) for s in shapes]
    return xi, theta


@pytest.mark.parametrize("m", [0.99, 0.9, 0.7, 0.0])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_momentum_update_matches_ema(m, seed):
    xi, theta = _param_lists(seed)
    xi0 = [x.clone() for x in xi]
    theta0 = [t.clone() for t in theta]
    ptrs = [x.data_ptr() for x in xi]
    momentum_update_(xi, theta, m)
    for x, x0, t, t0, p in zip(xi, xi0, theta, theta0, ptrs):
        expected = m * x0 + (1.0 - m) * t0
        assert torch.allclose(x, expected, rtol=1e-13, atol=1e-14)
        assert torch.equal(t, t0)  # the online network is untouched
        assert x.data_ptr() == p  # in place
        swapped = (1.0 - m) * x0 + m * t0  # a deliberately wrong EMA (m = 0.5 would equal it: not a case here)
        assert not torch.allclose(x, swapped, rtol=1e-6, atol=1e-9)


def test_momentum_update_repeated_and_identity():
    xi, theta = _param_lists(7)
    xi0 = [x.clone() for x in xi]
    m, k = 0.9, 5
    for _ in range(k):
        momentum_update_(xi, theta, m)
    for x, x0, t in zip(xi, xi0, theta):
        assert torch.allclose(x, m**k * x0 + (1 - m**k) * t, rtol=1e-12, atol=1e-13)
    before = [x.clone() for x in xi]
    momentum_update_(xi, theta, 1.0)  # m = 1: frozen (the 'momentum' ablation)
    assert all(torch.equal(a, b) for a, b in zip(xi, before))
    with pytest.raises(ValueError):
        momentum_update_(xi, theta[:-1], 0.9)


def test_momentum_update_on_modules_and_mixed_dtypes():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        online = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        momentum = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for p in momentum.parameters():
        p.requires_grad_(False)
    before = [p.detach().clone() for p in momentum.parameters()]
    momentum_update_(momentum.parameters(), online.parameters(), 0.99)
    for p, b, o in zip(momentum.parameters(), before, online.parameters()):
        assert torch.allclose(p, 0.99 * b + 0.01 * o.detach(), rtol=1e-6, atol=1e-7)
        assert p.grad_fn is None
    # Online parameters in bf16 (e.g. a bf16 policy) averaged into a float32 copy.
    xi, theta = _param_lists(3, dtype=torch.float32, online_dtype=torch.bfloat16)
    xi0 = [x.clone() for x in xi]
    momentum_update_(xi, theta, 0.95)
    for x, x0, t in zip(xi, xi0, theta):
        assert x.dtype == torch.float32
        assert torch.allclose(x, 0.95 * x0 + 0.05 * t.float(), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Predictor
# --------------------------------------------------------------------------------------------


def test_predictor_is_a_two_layer_mlp():
    p = make_predictor(0, dim=6)
    linears = [m for m in p.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    assert linears[0].in_features == 6 and linears[0].out_features == 12  # hidden defaults to 2 * dim
    assert linears[1].out_features == 6
    assert [m.out_features for m in Predictor(6, hidden=5).modules() if isinstance(m, nn.Linear)] == [5, 6]
    x = torch.randn(4, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    out = p(x)
    assert out.shape == x.shape
    for i in range(4):
        for t in range(3):
            assert torch.allclose(out[i, t], ref_predictor(p, x[i, t]), rtol=1e-12, atol=1e-13)
    # Input in another dtype is cast to the predictor's.
    p32 = make_predictor(0, dim=6, dtype=torch.float32)
    assert p32(x.to(torch.bfloat16)).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Similarity penalty (section 3)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("use_predictor", [False, True])
def test_similarity_matches_reference(seed, representation, use_predictor):
    h_on, h_mom, mask = make_hidden(seed)
    predictor = make_predictor(seed) if use_predictor else None
    params = list(predictor.parameters()) if predictor else []
    x = h_on.clone().requires_grad_(True)
    y = h_mom.clone().requires_grad_(True)
    loss, metrics = similarity_penalty(x, y, mask, representation=representation, predictor=predictor)
    g = grads(loss, [x, y, *params])
    x_ref = h_on.clone().requires_grad_(True)
    ref = ref_similarity(x_ref, h_mom, mask, representation=representation, predictor=predictor)
    g_ref = grads(ref, [x_ref, *params])
    assert torch.isfinite(loss)
    assert close(loss, ref), (loss, ref)
    assert metrics["penalty/similarity"] == pytest.approx(float(ref.detach()), rel=1e-9)
    assert torch.allclose(g[0], g_ref[0], rtol=1e-8, atol=1e-13)
    assert g[0].abs().sum() > 0
    assert (g[0][~mask] == 0).all()  # padding garbage gets no gradient
    assert g[1] is None or (g[1] == 0).all()  # stop-gradient on the momentum side
    for a, b in zip(g[2:], g_ref[1:]):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize(
    "representation, use_predictor, wrong",
    [
        ("mean", False, "other_representation"),
        ("token", False, "other_representation"),
        ("mean", True, "predictor_before_pool"),
        ("mean", False, "n_rows"),
        ("token", True, "no_stopgrad"),
    ],
)
def test_similarity_reference_rejects_wrong_variants(representation, use_predictor, wrong):
    h_on, h_mom, mask = make_hidden(11)
    predictor = make_predictor(11) if use_predictor else None
    y = h_mom.clone().requires_grad_(True)
    loss, _ = similarity_penalty(h_on, y, mask, representation=representation, predictor=predictor)
    assert close(loss, ref_similarity(h_on, h_mom, mask, representation=representation, predictor=predictor))
    if wrong == "no_stopgrad":
        y_ref = h_mom.clone().requires_grad_(True)
        wrong_loss = ref_similarity(h_on, y_ref, mask, representation=representation, predictor=predictor, wrong=wrong)
        (wrong_grad,) = grads(wrong_loss, [y_ref])
        assert wrong_grad.abs().sum() > 0
        (g,) = grads(loss, [y])  # the implementation sends nothing to the momentum side
        assert g is None or (g == 0).all()
        return
    kw = dict(representation=representation, predictor=predictor)
    if wrong == "other_representation":
        kw["representation"] = "token" if representation == "mean" else "mean"
    elif wrong == "n_rows":
        kw["n_rows"] = int(mask.sum())
    else:
        kw["wrong"] = wrong
    assert differs(loss, ref_similarity(h_on, h_mom, mask, **kw))


def _adversarial_pairs(dtype):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 4, 8, generator=gen, dtype=F64)
    pairs = []
    scales = [1e-3, 1.0, 1e3, 1e4] if dtype != F64 else [1e-30, 1e-3, 1.0, 1e3, 1e30]
    for s in scales:
        v = base * s
        pairs += [(v, -v), (v, v), (v, -3.7 * v), (v, 0.25 * v), (v, -v + 1e-7 * s * torch.randn_like(v))]
    # one coordinate of each vector huge, opposite signs elsewhere
    w = base.clone()
    w[..., 0] = 1e4
    pairs.append((w, -w))
    pairs.append((torch.randn(5, 4, 8, generator=gen, dtype=F64), torch.randn(5, 4, 8, generator=gen, dtype=F64)))
    pairs = [(a.to(dtype), b.to(dtype)) for a, b in pairs]
    # Inputs that overflow the dtype itself (float16 max is 65504) are not valid hidden states.
    return [(a, b) for a, b in pairs if torch.isfinite(a).all() and torch.isfinite(b).all()]


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_similarity_is_bounded(dtype, representation):
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 2:] = False
    for a, b in _adversarial_pairs(dtype):
        for i in range(a.shape[0]):
            d, _ = similarity_penalty(a[i : i + 1], b[i : i + 1], mask[i : i + 1], representation=representation)
            assert torch.isfinite(d)
            assert 0.0 <= float(d.detach()) <= 2.0, float(d.detach())
    # Opposite vectors are (within rounding) at the maximum, identical ones at the minimum.
    v = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(2), dtype=F64).to(dtype)
    d_opp, _ = similarity_penalty(v, -v, mask, representation=representation)
    d_same, _ = similarity_penalty(v, v.clone(), mask, representation=representation)
    tol = 1e-12 if dtype == F64 else 1e-5
    assert float(d_opp) == pytest.approx(2.0, abs=tol)
    assert float(d_same) == pytest.approx(0.0, abs=tol)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_similarity_with_predictor_is_bounded(seed, representation):
    h_on, h_mom, mask = make_hidden(seed, drift=5.0)
    predictor = make_predictor(seed)
    for i in range(h_on.shape[0]):
        d, _ = similarity_penalty(h_on[i : i + 1], h_mom[i : i + 1], mask[i : i + 1], representation=representation, predictor=predictor)
        assert 0.0 <= float(d.detach()) <= 2.0


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("representation", REPRESENTATIONS)
def test_similarity_zero_with_zero_gradient_when_copies_agree(dtype, tol, representation):
    h_on, _, mask = make_hidden(4)
    h_on = h_on.to(dtype)
    x = h_on.clone().requires_grad_(True)
    loss, _ = similarity_penalty(x, h_on.clone(), mask, representation=representation)
    (g,) = grads(loss, [x])
    assert abs(float(loss.detach())) <= tol
    assert float(g.abs().max()) <= tol
    # Not vacuous: once the copies drift the penalty and its gradient are clearly non-zero.
    _, h_mom, _ = make_hidden(4, drift=0.5)
    x = h_on.clone().requires_grad_(True)
    loss, _ = similarity_penalty(x, h_mom.to(dtype), mask, representation=representation)
    (g,) = grads(loss, [x])
    assert float(loss.detach()) > 1e-3 and float(g.abs().max()) > 1e-3


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("use_predictor", [False, True])
def test_similarity_micro_batches_match_whole_batch(representation, use_predictor):
    h_on, h_mom, mask = make_hidden(9)
    predictor = make_predictor(9) if use_predictor else None
    x = h_on.clone().requires_grad_(True)
    whole, _ = similarity_penalty(x, h_mom, mask, representation=representation, predictor=predictor)
    (g_whole,) = grads(whole, [x])
    x = h_on.clone().requires_grad_(True)
    n = h_on.shape[0]
    total = 0.0
    for idx in ([0, 2], list(range(3, n)), [1]):
        part, _ = similarity_penalty(x[idx], h_mom[idx], mask[idx], representation=representation, predictor=predictor, n_rows=n)
        part.backward()
        total += float(part.detach())
    assert close(total, whole)
    assert torch.allclose(x.grad, g_whole, rtol=1e-10, atol=1e-14)


def test_similarity_gradcheck_and_edge_cases():
    h_on, h_mom, mask = make_hidden(5, dim=4)
    predictor = make_predictor(5, dim=4)
    for representation in REPRESENTATIONS:
        for pred in (None, predictor):
            x = h_on.clone().requires_grad_(True)
            fn = lambda v: similarity_penalty(v, h_mom, mask, representation=representation, predictor=pred)[0]  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
    empty, metrics = similarity_penalty(h_on[:0], h_mom[:0], mask[:0])
    assert float(empty) == 0.0 and metrics["penalty/similarity"] == 0.0
    with pytest.raises(ValueError):
        similarity_penalty(h_on, h_mom, mask, representation="cls")
    # bf16 states (as a bf16 policy gives) with a float32 predictor: computed in float32.
    p32 = make_predictor(5, dim=4, dtype=torch.float32)
    loss, _ = similarity_penalty(h_on.to(torch.bfloat16), h_mom.to(torch.bfloat16), mask, predictor=p32)
    ref = ref_similarity(h_on.to(torch.bfloat16).to(F64), h_mom.to(torch.bfloat16).to(F64), mask, representation="mean", predictor=make_predictor(5, dim=4))
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), abs=1e-4)


# --------------------------------------------------------------------------------------------
# KL penalty (the 'similarity' ablation)
# --------------------------------------------------------------------------------------------


def make_logprobs(seed: int):
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, t_max = rnd.randint(3, 7), rnd.randint(4, 8)
    lengths = torch.tensor([rnd.randint(1, t_max) for _ in range(n)])
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    lp = -(torch.rand(n, t_max, generator=gen, dtype=F64) * 3 + 0.01)
    mom = lp + 0.4 * torch.randn(n, t_max, generator=gen, dtype=F64)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30], dtype=F64)
    lp = torch.where(mask, lp, bad[torch.randint(5, (n, t_max), generator=gen)])
    mom = torch.where(mask, mom, bad[torch.randint(5, (n, t_max), generator=gen)])
    return lp, mom, mask


@pytest.mark.parametrize("seed", SEEDS)
def test_kl_penalty_matches_reference(seed):
    lp, mom, mask = make_logprobs(seed)
    x = lp.clone().requires_grad_(True)
    y = mom.clone().requires_grad_(True)
    loss, metrics = kl_penalty(x, y, mask)
    gx, gy = grads(loss, [x, y])
    x_ref = lp.clone().requires_grad_(True)
    ref = ref_kl(x_ref, mom, mask)
    (gx_ref,) = grads(ref, [x_ref])
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    assert close(loss, ref)
    assert metrics["penalty/kl"] == pytest.approx(float(ref.detach()), rel=1e-9)
    assert torch.isfinite(gx).all()
    assert torch.allclose(gx, gx_ref, rtol=1e-9, atol=1e-13)
    assert (gx[~mask] == 0).all() and gx.abs().sum() > 0
    assert gy is None or (gy == 0).all()
    # Not vacuous: the reverse direction and another normaliser give other values.
    assert differs(loss, ref_kl(lp, mom, mask, reversed_=True))
    assert differs(loss, ref_kl(lp, mom, mask, n_rows=int(mask.sum())))
    # Zero, with zero gradient, when the copies agree.
    x = lp.clone().requires_grad_(True)
    same, _ = kl_penalty(x, lp.clone(), mask)
    (g,) = grads(same, [x])
    assert float(same.detach()) == 0.0 and (g == 0).all()


def test_kl_penalty_micro_batches_and_empty():
    lp, mom, mask = make_logprobs(8)
    x = lp.clone().requires_grad_(True)
    whole, _ = kl_penalty(x, mom, mask)
    (g_whole,) = grads(whole, [x])
    x = lp.clone().requires_grad_(True)
    n = lp.shape[0]
    total = 0.0
    for idx in ([0], list(range(1, n))):
        part, _ = kl_penalty(x[idx], mom[idx], mask[idx], n_rows=n)
        part.backward()
        total += float(part.detach())
    assert close(total, whole)
    assert torch.allclose(x.grad, g_whole, rtol=1e-10, atol=1e-14)
    empty, metrics = kl_penalty(lp[:0], mom[:0], mask[:0])
    assert float(empty) == 0.0 and metrics["penalty/kl"] == 0.0
