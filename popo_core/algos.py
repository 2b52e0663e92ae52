"""Policy losses as pure tensor functions: POPO (METHOD.md section 1) and the GRPO baseline.

Every loss takes per-token log-probs ``[N, T]`` of N completions, a completion mask ``[N, T]``,
binary rewards ``[N]`` and the prompt each completion belongs to (``group_ids`` ``[N]``), and
returns ``(loss, metrics)``. The normalisers default to the given batch's own; a trainer that
splits an optimizer step into micro-batches passes the whole step's (``n_groups``,
``n_positives``, ``mean_length``, ``n_completions``, ``n_tokens``) so the gradient does not depend
on the split. Micro-batches must hold whole groups.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

REDISTRIBUTIONS = ("uniform", "self_normalized", "none")
AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Map arbitrary group ids to 0..G-1; return (index per row, rows per group)."""
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return index, counts


def group_sum(values: Tensor, index: Tensor, n_groups: int) -> Tensor:
    return values.new_zeros(n_groups).index_add(0, index, values)


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    # Padding may hold garbage log-probs: zero them before exp so they cannot become inf * 0.
    return torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))


def popo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    clip_eps: float = 0.2,
    redistribution: str = "uniform",
    aggregation: str = "seq_mean_token_mean",
    n_groups: int | None = None,
    n_positives: int | None = None,
    mean_length: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Positive-only objective with bounded importance sampling (METHOD.md section 1).

    Negatives (reward 0) are dropped before any arithmetic, so no gradient can reach them.
    ``n_groups`` is |B+| (prompts with a positive), ``n_positives`` is |P| and ``mean_length`` is
    Lbar, all of the whole optimizer step.
    """
    if redistribution not in REDISTRIBUTIONS:
        raise ValueError(f"redistribution must be one of {REDISTRIBUTIONS}, got {redistribution!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    positive = rewards > 0.5
    if not bool(positive.any()):
        # Section 1: a batch with no positive has loss 0 and no gradient.
        return logprobs.new_zeros(()), {"clip/fraction": 0.0, "ratio/mean": 1.0, "positives": 0.0}

    mask = mask[positive].bool()
    log_ratio = _log_ratio(logprobs[positive], old_logprobs[positive], mask)
    fmask = mask.to(log_ratio.dtype)
    lengths = fmask.sum(-1).clamp_min(1.0)

    # Section 1: rhobar_it = min(rho_it, 1 + eps); no gradient above the bound.
    rho = log_ratio.exp()
    rho_bar = rho.clamp(max=1.0 + clip_eps)
    token_sum = (rho_bar * fmask).sum(-1)

    # Section 1: S_i per positive completion.
    if aggregation == "seq_mean_token_mean":
        score = token_sum / lengths
    else:
        lbar = lengths.mean() if mean_length is None else torch.as_tensor(mean_length, dtype=token_sum.dtype)
        score = token_sum / lbar

    if redistribution == "none":
        # Section 1: L_pos = -(1/|P|) sum_{i in P} S_i.
        denom = float(positive.sum()) if n_positives is None else float(n_positives)
        loss = -score.sum() / denom
    else:
        index, counts = group_index(group_ids[positive])
        if redistribution == "uniform":
            # Section 1: w_i = 1 / |P(x)|.
            weight = 1.0 / counts[index].to(score.dtype)
        else:
            # Section 1: w_i = s_i / sum_j s_j, s_i = stopgrad(min(exp(mean_t log rho_it), 1 + eps)).
            seq_ratio = ((log_ratio * fmask).sum(-1) / lengths).exp().clamp(max=1.0 + clip_eps).detach()
            weight = seq_ratio / group_sum(seq_ratio, index, len(counts))[index]
        denom = float(len(counts)) if n_groups is None else float(n_groups)
        # Section 1: L_pos = -(1/|B+|) sum_x sum_{i in P(x)} w_i S_i.
        loss = -(weight * score).sum() / denom

    with torch.no_grad():
        n_tok = fmask.sum().clamp_min(1.0)
        metrics = {
            "clip/fraction": float(((rho > 1.0 + clip_eps) & mask).sum() / n_tok),
            "ratio/mean": float((rho * fmask).sum() / n_tok),
            "positives": float(positive.sum()),
        }
    return loss, metrics


def group_advantages(rewards: Tensor, group_ids: Tensor, *, scale_std: bool = True, adv_eps: float = 1e-6) -> Tensor:
    """GRPO's group-normalised advantages (METHOD.md, Baseline); std is the unbiased sample std."""
    index, counts = group_index(group_ids)
    if bool((counts < 2).any()):
        raise ValueError("group-normalised advantages need at least 2 completions per prompt")
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    n = counts.to(rewards.dtype)
    mean = group_sum(rewards, index, len(counts)) / n
    centred = rewards - mean[index]
    if not scale_std:
        return centred
    std = (group_sum(centred**2, index, len(counts)) / (n - 1)).sqrt()
    # Baseline: A_i = (r_i - mean_g(r)) / (std_g(r) + adv_eps).
    return centred / (std[index] + adv_eps)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    clip_eps: float = 0.2,
    scale_std: bool = True,
    adv_eps: float = 1e-6,
    aggregation: str = "seq_mean_token_mean",
    ref_logprobs: Tensor | None = None,
    kl_beta: float = 0.0,
    n_completions: int | None = None,
    n_tokens: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with group-normalised advantages, plus an optional k3 KL term."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    mask = mask.bool()
    fmask = mask.to(logprobs.dtype)
    adv = group_advantages(rewards, group_ids, scale_std=scale_std, adv_eps=adv_eps).to(logprobs.dtype)[:, None]
    ratio = _log_ratio(logprobs, old_logprobs, mask).exp()
    # Baseline: -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) per token.
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv)
    kl = None
    if kl_beta > 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs")
        # Baseline: k3 = exp(q) - q - 1, q = log pi_ref - log pi_theta.
        q = torch.where(mask, ref_logprobs - logprobs, torch.zeros_like(logprobs))
        kl = q.exp() - q - 1.0
        per_token = per_token + kl_beta * kl

    if aggregation == "seq_mean_token_mean":
        per_seq = (per_token * fmask).sum(-1) / fmask.sum(-1).clamp_min(1.0)
        loss = per_seq.sum() / (per_seq.shape[0] if n_completions is None else n_completions)
    else:
        loss = (per_token * fmask).sum() / (fmask.sum().clamp_min(1.0) if n_tokens is None else n_tokens)

    with torch.no_grad():
        n_tok = fmask.sum().clamp_min(1.0)
        clipped = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
        metrics = {
            "clip/fraction": float((clipped & mask).sum() / n_tok),
            "ratio/mean": float((ratio * fmask).sum() / n_tok),
            "positives": float((rewards > 0.5).sum()),
        }
        if kl is not None:
            metrics["kl/ref"] = float((kl * fmask).sum() / n_tok)
    return loss, metrics


POLICY_LOSSES: dict[str, Callable[..., tuple[Tensor, dict[str, float]]]] = {
    "popo": popo_loss,
    "grpo": grpo_loss,
}
