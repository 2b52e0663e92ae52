"""Policy losses as pure tensor functions, and the registry the trainer reads (METHOD.md).

A method is one loss function, one `register(Method(...))` saying what the trainer must do for it,
and one YAML in `experiments/algo/`. The trainer never branches on a method's name.

Every loss takes per-token log-probs ``[N, T]`` of the completions it is given, their pi_old
log-probs, the completion mask ``[N, T]``, binary rewards ``[N]`` and the prompt each completion
belongs to (``group_ids`` ``[N]``), and returns ``(loss, metrics)``. ``step`` holds the quantities
of the whole optimizer step (advantages, weights, normalisers) for exactly those rows, computed once
per optimizer step by the method's ``step`` function over every completion of the step, including
those the trainer never forwards (they count in denominators); without it the given rows are the
step. So a step may be split into micro-batches anywhere, a group across several, and the gradient
does not change. ``token_weight`` (``[N, T]``, no gradient) multiplies every token's loss term: the
rollout correction (METHOD.md, "Rollout correction").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from popo_core.algo.choices import (AGGREGATIONS, FORWARDS, REDISTRIBUTIONS, ROLLOUT_CORRECTIONS, SPECS,
                                    MethodSpec, Needs)

__all__ = [
    "StepQuantities",
    "group_index",
    "group_sum",
    "popo_step",
    "popo_loss",
    "group_advantages",
    "sign_advantages",
    "surrogate_step",
    "aggregate",
    "surrogate_loss",
    "grpo_step",
    "grpo_loss",
    "dr_grpo_step",
    "dr_grpo_loss",
    "rft_step",
    "rft_loss",
    "sign_step",
    "sign_loss",
    "raft_pp_loss",
    "rollout_divergence",
    "rollout_weights",
    "Needs",
    "MethodSpec",
    "SPECS",
    "Method",
    "register",
    "method",
    "policy_loss",
    "step_quantities",
    "METHODS",
    "REDISTRIBUTIONS",
    "AGGREGATIONS",
    "FORWARDS",
    "ROLLOUT_CORRECTIONS",
]



# ----------------------------------------------------------------------------- step quantities
@dataclass
class StepQuantities:
    """An optimizer step's quantities: per-row tensors (``rows``, sliced with the rows) and
    scalars of the whole step (``totals``: counts and normalisers)."""

    rows: dict[str, Tensor] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)

    def take(self, index: Tensor) -> "StepQuantities":
        return StepQuantities({k: v[index] for k, v in self.rows.items()}, self.totals)

    def __getitem__(self, key: str):
        return self.rows[key] if key in self.rows else self.totals[key]


def group_index(group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Map arbitrary group ids to 0..G-1; return (index per row, rows per group)."""
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return index, counts


def group_sum(values: Tensor, index: Tensor, n_groups: int) -> Tensor:
    return values.new_zeros(n_groups).index_add(0, index, values)


def _log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    # Padding may hold garbage log-probs: zero them before exp so they cannot become inf * 0.
    return torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))


def _float(t: Tensor) -> Tensor:
    # Per-row step quantities are a few numbers per completion: keep them in float64.
    return t.to(torch.float64)


def _weighted(per_token: Tensor, token_weight: Tensor | None) -> Tensor:
    return per_token if token_weight is None else per_token * token_weight.detach().to(per_token.dtype)


def _ratio_metrics(rho: Tensor, mask: Tensor, clipped: Tensor) -> dict[str, float]:
    with torch.no_grad():
        fmask = mask.to(rho.dtype)
        n_tok = fmask.sum().clamp_min(1.0)
        return {"clip/fraction": float((clipped & mask).sum() / n_tok), "ratio/mean": float((rho * fmask).sum() / n_tok)}


# ------------------------------------------------------------------------------------- POPO
def popo_step(
    rewards: Tensor,
    group_ids: Tensor,
    lengths: Tensor,
    *,
    redistribution: str = "uniform",
    clip_eps: float = 0.2,
    seq_log_ratio: Tensor | None = None,
    **_,
) -> StepQuantities:
    """POPO's step quantities (METHOD.md section 1): each positive's redistribution weight w_i, the
    denominator (|B+| with groups, |P| without) and Lbar, the mean length of the step's positives.

    ``seq_log_ratio`` (mean_t log rho_it per row, at the current policy) is needed only for
    self-normalised weights."""
    if redistribution not in REDISTRIBUTIONS:
        raise ValueError(f"redistribution must be one of {REDISTRIBUTIONS}, got {redistribution!r}")
    positive = rewards > 0.5
    dtype = torch.float64  # per-row step quantities: a few numbers per completion
    weight = torch.zeros(len(rewards), dtype=dtype, device=rewards.device)
    totals = {"denominator": 1.0, "mean_length": 1.0, "n_positives": float(positive.sum())}
    if not bool(positive.any()):
        return StepQuantities({"weight": weight}, totals)
    totals["mean_length"] = float(lengths[positive].double().mean())
    if redistribution == "none":
        weight[positive] = 1.0
        totals["denominator"] = float(positive.sum())
        return StepQuantities({"weight": weight}, totals)
    index, counts = group_index(group_ids[positive])
    if redistribution == "uniform":
        # Section 1: w_i = 1 / |P(x)|.
        w = 1.0 / counts[index].to(dtype)
    else:
        if seq_log_ratio is None:
            raise ValueError("self-normalised weights need the step's sequence log-ratios")
        # Section 1: w_i = s_i / sum_{j in P(x)} s_j, s_i = stopgrad(min(exp(mean_t log rho_it), 1 + eps)).
        s = seq_log_ratio[positive].detach().to(dtype).exp().clamp(max=1.0 + clip_eps)
        w = s / group_sum(s, index, len(counts))[index]
    weight[positive] = w.to(weight.dtype)
    totals["denominator"] = float(len(counts))  # |B+|
    return StepQuantities({"weight": weight}, totals)


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
    step: StepQuantities | None = None,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Positive-only objective with bounded importance sampling (METHOD.md section 1).

    Negatives (reward 0) are dropped before any arithmetic, so no gradient can reach them.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    mask = mask.bool()
    if step is None:
        seq = (_log_ratio(logprobs, old_logprobs, mask).sum(-1) / mask.sum(-1).clamp_min(1)).detach()
        step = popo_step(rewards, group_ids, mask.sum(-1), redistribution=redistribution, clip_eps=clip_eps,
                         seq_log_ratio=seq)
    positive = rewards > 0.5
    if not bool(positive.any()):
        # Section 1: a batch with no positive has loss 0 and no gradient.
        return logprobs.new_zeros(()), {"clip/fraction": 0.0, "ratio/mean": 1.0}
    mask = mask[positive]
    log_ratio = _log_ratio(logprobs[positive], old_logprobs[positive], mask)
    fmask = mask.to(log_ratio.dtype)
    # Section 1: rhobar_it = min(rho_it, 1 + eps); no gradient above the bound.
    rho = log_ratio.exp()
    rho_bar = rho.clamp(max=1.0 + clip_eps)
    tw = None if token_weight is None else token_weight[positive]
    token_sum = (_weighted(rho_bar, tw) * fmask).sum(-1)
    # Section 1: S_i = (1/|y_i|) sum_t rhobar_it, or (1/Lbar) sum_t rhobar_it.
    if aggregation == "seq_mean_token_mean":
        score = token_sum / fmask.sum(-1).clamp_min(1.0)
    else:
        score = token_sum / step["mean_length"]
    weight = step["weight"][positive].to(score.dtype)
    # Section 1: L_pos = -(1/|B+|) sum_x sum_{i in P(x)} w_i S_i (with "none": -(1/|P|) sum_i S_i).
    loss = -(weight * score).sum() / step["denominator"]
    return loss, _ratio_metrics(rho, mask, rho > 1.0 + clip_eps)


# ----------------------------------------------------------------------- the clipped surrogate
def group_advantages(rewards: Tensor, group_ids: Tensor, *, scale_std: bool = True, adv_eps: float = 1e-6) -> Tensor:
    """GRPO's group-normalised advantages (METHOD.md, Baseline); std is the unbiased sample std."""
    index, counts = group_index(group_ids)
    rewards = _float(rewards)
    n = counts.to(rewards.dtype)
    mean = group_sum(rewards, index, len(counts)) / n
    centred = rewards - mean[index]
    if not scale_std:
        return centred
    if bool((counts < 2).any()):
        raise ValueError("group-normalised advantages need at least 2 completions per prompt")
    std = (group_sum(centred**2, index, len(counts)) / (n - 1)).sqrt()
    # Baseline: A_i = (r_i - mean_g(r)) / (std_g(r) + adv_eps).
    return centred / (std[index] + adv_eps)


def sign_advantages(rewards: Tensor, *, positive: float, negative: float) -> Tensor:
    """A_i = a+ for a positive, a- for a negative (METHOD.md, the sign-separated family)."""
    r = _float(rewards)
    return torch.where(r > 0.5, torch.full_like(r, positive), torch.full_like(r, negative))


def surrogate_step(advantages: Tensor, lengths: Tensor) -> StepQuantities:
    """Per-row advantages; N completions and their tokens, the denominators of the aggregations."""
    return StepQuantities({"advantage": advantages}, {"n_completions": float(len(advantages)), "n_tokens": float(lengths.sum())})


def aggregate(per_token: Tensor, mask: Tensor, aggregation: str, step: StepQuantities, max_length: float | None = None) -> Tensor:
    """One loss from per-token terms, with the step's denominators (verl's `agg_loss`):
    seq_mean_token_mean: (1/N) sum_i (1/|y_i|) sum_t; token_mean: sum_{i,t} / (tokens of all N);
    seq_sum_max_length (Dr. GRPO): (1/N) sum_i (sum_t) / L with L a constant."""
    fmask = mask.to(per_token.dtype)
    if aggregation == "seq_mean_token_mean":
        return ((per_token * fmask).sum(-1) / fmask.sum(-1).clamp_min(1.0)).sum() / step["n_completions"]
    if aggregation == "token_mean":
        return (per_token * fmask).sum() / max(step["n_tokens"], 1.0)
    if aggregation == "seq_sum_max_length":
        return (per_token * fmask).sum() / (step["n_completions"] * float(max_length))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def surrogate_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    clip_eps: float,
    aggregation: str,
    step: StepQuantities,
    max_length: float | None = None,
    token_weight: Tensor | None = None,
    extra: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate surr(A) = -min(rho A, clip(rho, 1-eps, 1+eps) A) per token, aggregated.
    ``extra`` (per token) is added before aggregation (GRPO's KL term)."""
    mask = mask.bool()
    adv = advantages.to(logprobs.dtype)[:, None]
    # A completion with A = 0 adds nothing (it still counts in the denominators): leave its tokens
    # out of the arithmetic, so no value of its log-probs can reach the loss or the gradient.
    live = mask & (adv != 0)
    rho = _log_ratio(logprobs, old_logprobs, live).exp()
    per_token = torch.where(live, -torch.minimum(rho * adv, rho.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv), 0.0)
    if extra is not None:
        per_token = per_token + extra
    loss = aggregate(_weighted(per_token, token_weight), mask, aggregation, step, max_length)
    with torch.no_grad():
        rho_all = _log_ratio(logprobs, old_logprobs, mask).exp()
        clipped = ((rho_all > 1.0 + clip_eps) & (adv > 0)) | ((rho_all < 1.0 - clip_eps) & (adv < 0))
    return loss, _ratio_metrics(rho_all, mask, clipped)


# ------------------------------------------------------------------------------------- GRPO
def grpo_step(rewards, group_ids, lengths, *, scale_std: bool = True, adv_eps: float = 1e-6, **_) -> StepQuantities:
    return surrogate_step(group_advantages(rewards, group_ids, scale_std=scale_std, adv_eps=adv_eps), lengths)


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
    kl_beta: float = 0.0,
    ref_logprobs: Tensor | None = None,
    step: StepQuantities | None = None,
    token_weight: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO (METHOD.md, Baseline): group-normalised advantages in the clipped surrogate on every
    completion, plus beta_kl times the k3 KL estimate to a frozen reference."""
    mask = mask.bool()
    step = step or grpo_step(rewards, group_ids, mask.sum(-1), scale_std=scale_std, adv_eps=adv_eps)
    kl = None
    if kl_beta > 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_beta > 0 needs ref_logprobs")
        # Baseline: k3 = exp(q) - q - 1, q = log pi_ref - log pi_theta.
        q = torch.where(mask, ref_logprobs - logprobs, torch.zeros_like(logprobs))
        kl = q.exp() - q - 1.0
    loss, metrics = surrogate_loss(logprobs, old_logprobs, mask, step["advantage"], clip_eps=clip_eps,
                                   aggregation=aggregation, step=step, token_weight=token_weight,
                                   extra=None if kl is None else kl_beta * kl)
    if kl is not None:
        fmask = mask.to(kl.dtype)
        metrics["kl/ref"] = float((kl.detach() * fmask).sum() / fmask.sum().clamp_min(1.0))
    return loss, metrics


# ------------------------------------------------------------------------- the family (baselines)
def dr_grpo_step(rewards, group_ids, lengths, **_) -> StepQuantities:
    # Dr. GRPO: A_i = r_i - mean_group(r), no division by the std.
    return surrogate_step(group_advantages(rewards, group_ids, scale_std=False), lengths)


def dr_grpo_loss(logprobs, old_logprobs, mask, rewards, group_ids, *, clip_eps: float = 0.2, max_length: int = 1,
                 step: StepQuantities | None = None, token_weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"; METHOD.md, the family):
    loss = (1/N) sum_i (sum_t surr(A_i)) / L, L = algo.max_length, a constant, not |y_i|."""
    mask = mask.bool()
    step = step or dr_grpo_step(rewards, group_ids, mask.sum(-1))
    return surrogate_loss(logprobs, old_logprobs, mask, step["advantage"], clip_eps=clip_eps,
                          aggregation="seq_sum_max_length", step=step, max_length=max_length, token_weight=token_weight)


def rft_step(rewards, group_ids, lengths, **_) -> StepQuantities:
    positive = rewards > 0.5
    return StepQuantities({}, {"n_positives": float(positive.sum()), "n_positive_tokens": float(lengths[positive].sum())})


def rft_loss(logprobs, old_logprobs, mask, rewards, group_ids, *, aggregation: str = "seq_mean_token_mean",
             step: StepQuantities | None = None, token_weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Rejection-sampling fine-tuning (RFT; RAFT, Dong et al. 2023; METHOD.md, the family): SFT on
    the positives, no ratio: -(1/|P|) sum_{i in P} (1/|y_i|) sum_t log pi(y_it), or with token_mean
    the sum over all positive tokens over their count."""
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    mask = mask.bool()
    step = step or rft_step(rewards, group_ids, mask.sum(-1))
    positive = rewards > 0.5
    rho = _log_ratio(logprobs, old_logprobs, mask).exp()
    metrics = _ratio_metrics(rho, mask, torch.zeros_like(mask))
    if not bool(positive.any()):
        return logprobs.new_zeros(()), metrics
    m = mask[positive]
    fmask = m.to(logprobs.dtype)
    tw = None if token_weight is None else token_weight[positive]
    nll = _weighted(-torch.where(m, logprobs[positive], torch.zeros_like(fmask)), tw) * fmask
    if aggregation == "seq_mean_token_mean":
        loss = (nll.sum(-1) / fmask.sum(-1).clamp_min(1.0)).sum() / step["n_positives"]
    else:
        loss = nll.sum() / step["n_positive_tokens"]
    return loss, metrics


def sign_step(rewards, group_ids, lengths, *, positive: float, negative: float, **_) -> StepQuantities:
    return surrogate_step(sign_advantages(rewards, positive=positive, negative=negative), lengths)


def sign_loss(logprobs, old_logprobs, mask, rewards, group_ids, *, positive: float, negative: float, clip_eps: float = 0.2,
              aggregation: str = "token_mean", step: StepQuantities | None = None,
              token_weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """surr(A_i) with A_i = a+ on positives and a- on negatives, aggregated over all N completions."""
    mask = mask.bool()
    step = step or sign_step(rewards, group_ids, mask.sum(-1), positive=positive, negative=negative)
    return surrogate_loss(logprobs, old_logprobs, mask, step["advantage"], clip_eps=clip_eps, aggregation=aggregation,
                          step=step, token_weight=token_weight)


def raft_pp_loss(logprobs, old_logprobs, mask, rewards, group_ids, *, clip_eps: float = 0.2, step: StepQuantities | None = None,
                 token_weight: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """RAFT++ (Xiong et al. 2025, "A Minimalist Approach to LLM Reasoning"; METHOD.md, the family):
    -(1/N) sum_{i in P} (1/|y_i|) sum_t min(rho_it, clip(rho_it, 1-eps, 1+eps)): the clipped
    surrogate with A = 1 on positives, 0 on negatives, sequence-mean over all N completions."""
    return sign_loss(logprobs, old_logprobs, mask, rewards, group_ids, positive=1.0, negative=0.0, clip_eps=clip_eps,
                     aggregation="seq_mean_token_mean", step=step, token_weight=token_weight)


# ------------------------------------------------------------------------ rollout correction
def rollout_divergence(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """Sums over sampled tokens (METHOD.md, "Rollout correction"): |log mu - log pi_old| ("mismatch"),
    the k3 estimate of KL(mu || pi_old) with q = log pi_old - log mu ("kl"), and the token count."""
    mask = mask.bool()
    q = torch.where(mask, old_logprobs.detach().double() - sampler_logprobs.double(), torch.zeros_like(old_logprobs, dtype=torch.float64))
    return {"mismatch": float(q.abs().sum()), "kl": float((q.exp() - q - 1.0).sum()), "sampled_tokens": float(mask.sum())}


def rollout_weights(old_logprobs: Tensor, sampler_logprobs: Tensor | None, mask: Tensor, *, mode: str = "none",
                    cap: float = 2.0) -> Tensor | None:
    """Per-token constants that multiply every token's loss term (METHOD.md, "Rollout correction"):
    `tis` min(pi_old / mu, C); `mis` 0 for a completion whose exp(mean_t (log pi_old - log mu)) is
    outside [1/C, C], else 1 (still counted in the denominators); `none` None."""
    if mode == "none":
        return None
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"rollout correction must be one of {ROLLOUT_CORRECTIONS}, got {mode!r}")
    if sampler_logprobs is None:
        raise ValueError(f"rollout correction {mode!r} needs the sampler's log-probs")
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logprobs.detach().float() - sampler_logprobs.float(), torch.zeros_like(old_logprobs, dtype=torch.float32))
    if mode == "tis":
        return log_ratio.exp().clamp(max=cap) * mask
    seq = (log_ratio.sum(-1) / mask.sum(-1).clamp_min(1)).exp()
    keep = (seq >= 1.0 / cap) & (seq <= cap)
    return (keep[:, None] & mask).float()


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    """A registered method: its loss, its step quantities, and what the trainer must do for it."""

    name: str
    loss: Callable[..., tuple[Tensor, dict[str, float]]]
    quantities: Callable[..., StepQuantities]  # (rewards, group_ids, lengths, **knobs) -> StepQuantities, once per optimizer step
    forwards: str  # which completions go through forward and backward: positives | negatives | all
    knobs: tuple[str, ...]  # the algo.* settings the loss and step read
    needs: Callable[[dict], Needs] = lambda knobs: Needs()
    penalty_rows: str | None = None  # where the siamese penalty runs; None: the forwarded completions
    summary: str = ""  # one line, for the README and `--help`

    def forwarded(self, rewards: Tensor) -> Tensor:
        """Bool [N]: the completions this method sends through forward and backward."""
        return _select(self.forwards, rewards)

    def penalised(self, rewards: Tensor) -> Tensor:
        return _select(self.penalty_rows or self.forwards, rewards)


def _select(which: str, rewards: Tensor) -> Tensor:
    positive = rewards > 0.5
    return {"positives": positive, "negatives": ~positive, "all": torch.ones_like(positive)}[which]


METHODS: dict[str, Method] = {}


def register(spec: MethodSpec, loss: Callable[..., tuple[Tensor, dict[str, float]]],
             quantities: Callable[..., StepQuantities]) -> Method:
    """A method of popo_core.algo.choices.SPECS (its torch-free metadata) with its loss and step quantities."""
    if spec.forwards not in FORWARDS:
        raise ValueError(f"{spec.name}: forwards must be one of {FORWARDS}")
    method = Method(spec.name, loss, quantities, spec.forwards, spec.knobs, spec.needs, spec.penalty_rows, spec.summary)
    METHODS[spec.name] = method
    return method


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (choose from: {', '.join(METHODS)})")
    return METHODS[name]


def policy_loss(name: str, /, **knobs) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """The registered method's loss bound to its knobs (unknown knobs are ignored, so a whole
    `algo` config can be passed): `(logprobs, old_logprobs, mask, rewards, group_ids, *, step=None,
    token_weight=None, ref_logprobs=None) -> (loss, metrics)`."""
    m = method(name)
    bound = {k: knobs[k] for k in m.knobs if k in knobs}
    return partial(m.loss, **bound)


def step_quantities(name: str, rewards: Tensor, group_ids: Tensor, lengths: Tensor, /, *,
                    seq_log_ratio: Tensor | None = None, **knobs) -> StepQuantities:
    """The registered method's quantities of one optimizer step, over every completion of the step."""
    m = method(name)
    return m.quantities(rewards, group_ids, lengths, seq_log_ratio=seq_log_ratio, **{k: knobs[k] for k in m.knobs if k in knobs})


# METHOD.md sections 1-3: learn from the positives alone, bounded importance sampling.
register(SPECS["popo"], popo_loss, popo_step)
# METHOD.md, Ablations, "positive-only": negatives enter with GRPO's advantages in the clipped
# surrogate; POPO's stabilisers (momentum network, penalty over the positives) are kept.
register(SPECS["popo+negatives"], partial(grpo_loss, kl_beta=0.0), grpo_step)
# METHOD.md, Baseline: GRPO.
register(SPECS["grpo"], grpo_loss, grpo_step)
# Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective".
register(SPECS["dr_grpo"], dr_grpo_loss, dr_grpo_step)
# Rejection-sampling fine-tuning: RAFT (Dong et al. 2023), RFT (Yuan et al. 2023).
register(SPECS["rft"], rft_loss, rft_step)
# Xiong et al. 2025, "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce".
register(SPECS["raft_pp"], raft_pp_loss, partial(sign_step, positive=1.0, negative=0.0))
# Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning".
register(SPECS["psr"], partial(sign_loss, positive=1.0, negative=0.0), partial(sign_step, positive=1.0, negative=0.0))
register(SPECS["nsr"], partial(sign_loss, positive=0.0, negative=-1.0), partial(sign_step, positive=0.0, negative=-1.0))


def _w_reinforce_loss(*args, positive_weight: float = 0.1, **kwargs):
    return sign_loss(*args, positive=positive_weight, negative=-1.0, **kwargs)


def _w_reinforce_step(rewards, group_ids, lengths, *, positive_weight: float = 0.1, **_):
    return sign_step(rewards, group_ids, lengths, positive=positive_weight, negative=-1.0)


register(SPECS["w_reinforce"], _w_reinforce_loss, _w_reinforce_step)
