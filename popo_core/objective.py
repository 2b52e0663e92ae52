"""The one place where `algo.*` settings become loss functions (METHOD.md sections 1-3, Ablations).

Every variant and ablation is a choice made here, by name, so the training loop has no branch per
method: it asks the objective which completions to forward, which networks it needs, and calls
`policy_loss` and `penalty`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor

from popo_core.algos import grpo_loss, popo_loss
from popo_core.siamese import kl_penalty, similarity_penalty


@dataclass(frozen=True)
class Objective:
    kind: str  # "popo" (positive-only loss) | "grpo" (clipped surrogate over every completion)
    policy_loss: Callable[..., tuple[Tensor, dict[str, float]]]
    forward_negatives: bool  # do negatives go through forward/backward?
    penalty: Callable[..., tuple[Tensor, dict[str, float]]] | None  # over the positives, before weight
    penalty_weight: float
    penalty_input: str | None  # "hidden" (similarity) | "logprobs" (kl) | None
    needs_momentum: bool
    needs_reference: bool  # GRPO's frozen reference for kl_beta > 0

    def step_normalisers(self, rewards: Tensor, group_ids: Tensor, lengths: Tensor) -> dict[str, float]:
        """The whole optimizer step's normalisers, passed to every micro-batch (section 1)."""
        if self.kind == "grpo":
            return {"n_completions": len(rewards), "n_tokens": float(lengths.sum())}
        positive = rewards > 0.5
        if not bool(positive.any()):
            return {"n_groups": 1, "n_positives": 1, "mean_length": 1.0}
        return {
            "n_groups": int(torch.unique(group_ids[positive]).numel()),
            "n_positives": int(positive.sum()),
            "mean_length": float(lengths[positive].float().mean()),
        }


def build_objective(algo) -> Objective:
    """Map an AlgoConfig (or anything with its attributes) to an Objective."""
    negatives = algo.name == "grpo" or algo.use_negatives
    if negatives:
        # GRPO, or the `positive-only` ablation: every completion with its group-normalised
        # advantage in the clipped surrogate; the reference KL belongs to GRPO alone.
        kl_beta = algo.kl_beta if algo.name == "grpo" else 0.0
        loss = partial(
            grpo_loss,
            clip_eps=algo.clip_eps,
            scale_std=algo.scale_std,
            adv_eps=algo.adv_eps,
            aggregation=algo.aggregation,
            kl_beta=kl_beta,
        )
        kind = "grpo"
    else:
        loss = partial(
            popo_loss, clip_eps=algo.clip_eps, redistribution=algo.redistribution, aggregation=algo.aggregation
        )
        kind, kl_beta = "popo", 0.0
    penalty, penalty_input = None, None
    if algo.siamese and algo.penalty_weight > 0:
        if algo.penalty == "similarity":
            penalty, penalty_input = partial(similarity_penalty, representation=algo.representation), "hidden"
        else:
            penalty, penalty_input = kl_penalty, "logprobs"
    return Objective(
        kind=kind,
        policy_loss=loss,
        forward_negatives=negatives,
        penalty=penalty,
        penalty_weight=algo.penalty_weight if penalty else 0.0,
        penalty_input=penalty_input,
        needs_momentum=bool(algo.siamese),
        needs_reference=kl_beta > 0,
    )
