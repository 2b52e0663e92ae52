"""The siamese momentum network and its penalties (METHOD.md sections 2 and 3).

The momentum network xi is a copy of the policy that receives no gradient and follows it by an
exponential moving average. The penalty compares the online network's last hidden states with
xi's (a bounded cosine distance), or, for the `similarity` ablation, their token distributions (KL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from popo_core.algo.choices import MOMENTUM_SCHEDULES, REPRESENTATIONS  # noqa: E402


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """Momentum m_k for optimizer step k of K (section 2); cosine rises from m_0 to 1 as in BYOL."""
    if schedule == "constant":
        return base
    if schedule == "cosine":
        # Section 2: m_k = 1 - (1 - m_0) * (cos(pi k / K) + 1) / 2.
        return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0
    raise ValueError(f"momentum schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")


@torch.no_grad()
def momentum_update_(momentum_params: Iterable[Tensor], online_params: Iterable[Tensor], m: float) -> None:
    """In place: xi <- m * xi + (1 - m) * theta (section 2), i.e. xi.lerp_(theta, 1 - m)."""
    targets, sources = list(momentum_params), list(online_params)
    if len(targets) != len(sources):
        raise ValueError("momentum and online networks have different parameter lists")
    if m >= 1.0 or not targets:
        return
    torch._foreach_lerp_(targets, [s.to(t.dtype) for t, s in zip(targets, sources)], 1.0 - m)


class Predictor(nn.Module):
    """BYOL's predictor q: a 2-layer MLP on the online side only (section 3)."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * dim
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.to(self.net[0].weight.dtype))


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Cosines of bf16 vectors lose digits: compute in at least float32.
    return torch.promote_types(t.dtype, torch.float32)


def similarity_penalty(
    h_online: Tensor,
    h_momentum: Tensor,
    mask: Tensor,
    *,
    representation: str = "mean",
    predictor: Callable[[Tensor], Tensor] | None = None,
    n_rows: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Bounded similarity penalty (section 3): mean over positives of D_i = 1 - cos(q(h), sg(h_xi)).

    ``h_online``, ``h_momentum``: ``[N, T, H]`` last hidden states at the positions that predict the
    N positive completions' tokens; ``mask`` ``[N, T]``. Returns the penalty before beta.
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    n = h_online.shape[0]
    if n == 0:
        return h_online.new_zeros(()), {"penalty/similarity": 0.0}
    dtype = _compute_dtype(h_online)
    fmask = mask.to(dtype)
    online, target = h_online.to(dtype), h_momentum.detach().to(dtype)
    lengths = fmask.sum(-1).clamp_min(1.0)
    if representation == "mean":
        online = (online * fmask[..., None]).sum(1) / lengths[:, None]
        target = (target * fmask[..., None]).sum(1) / lengths[:, None]
        if predictor is not None:
            online = predictor(online).to(dtype)
        # Section 3: D in [0, 2]; clamp the rounding of 1 - cos (it reaches 2 + 2e-7 in float32).
        distance = (1.0 - F.cosine_similarity(online, target, dim=-1)).clamp(0.0, 2.0)
    else:
        if predictor is not None:
            online = predictor(online).to(dtype)
        per_token = (1.0 - F.cosine_similarity(online, target, dim=-1)).clamp(0.0, 2.0)
        distance = (per_token * fmask).sum(-1) / lengths
    loss = distance.sum() / (n if n_rows is None else n_rows)
    return loss, {"penalty/similarity": float(distance.detach().mean())}


def kl_penalty(
    logprobs: Tensor,
    momentum_logprobs: Tensor,
    mask: Tensor,
    *,
    n_rows: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL(pi_theta || pi_xi) by the k3 estimator over the positives' tokens (the `similarity` ablation).

    Per completion the token mean of exp(q) - q - 1 with q = log pi_xi - log pi_theta, then the mean
    over completions, so it weighs completions as the similarity penalty does.
    """
    n = logprobs.shape[0]
    if n == 0:
        return logprobs.new_zeros(()), {"penalty/kl": 0.0}
    mask = mask.bool()
    fmask = mask.to(logprobs.dtype)
    q = torch.where(mask, momentum_logprobs.detach() - logprobs, torch.zeros_like(logprobs))
    per_seq = ((q.exp() - q - 1.0) * fmask).sum(-1) / fmask.sum(-1).clamp_min(1.0)
    loss = per_seq.sum() / (n if n_rows is None else n_rows)
    return loss, {"penalty/kl": float(per_seq.detach().mean())}


@dataclass(frozen=True)
class Penalty:
    """A registered penalty: its function and what it compares (`algo.penalty` picks one)."""

    fn: Callable[..., tuple[Tensor, dict[str, float]]]
    reads: str  # "hidden" (last hidden states) | "logprobs" (token log-probs)
    metric: str  # its metric's name
    knobs: tuple[str, ...] = ()  # algo.* settings it reads


PENALTIES = {
    "similarity": Penalty(similarity_penalty, "hidden", "penalty/similarity", ("representation",)),  # section 3
    "kl": Penalty(kl_penalty, "logprobs", "penalty/kl"),  # the `similarity` ablation
}
