"""What every method is, without torch: the choices of the `algo.*` keys and each registered
method's metadata (which completions it forwards, the knobs it reads, what the trainer must give it).

Config validation, the dry-run plan and the loss registry (`popo_core.algo.losses`) all read this
one table, so composing a config and `popo --help` never import torch, and nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

REDISTRIBUTIONS = ("uniform", "self_normalized", "none")  # algo.redistribution (METHOD.md section 1)
AGGREGATIONS = ("seq_mean_token_mean", "token_mean")  # algo.aggregation
FORWARDS = ("positives", "negatives", "all")  # which completions a method sends through forward and backward
ROLLOUT_CORRECTIONS = ("none", "tis", "mis")  # algo.rollout_correction (METHOD.md, "Rollout correction")
MOMENTUM_SCHEDULES = ("constant", "cosine")  # algo.momentum_schedule (METHOD.md section 2)
REPRESENTATIONS = ("mean", "token")  # algo.representation (METHOD.md section 3)
PENALTIES = ("similarity", "kl")  # algo.penalty: section 3, and the `similarity` ablation's KL


@dataclass(frozen=True)
class Needs:
    """What the trainer must provide for a method with given knobs."""

    reference: bool = False  # log-probs of the frozen initial policy (GRPO's KL term)
    seq_log_ratio: bool = False  # each step's sequence log-ratios at the current policy (self-normalised weights)
    min_group_size: int = 1  # completions per prompt the advantages need


def _no_needs(knobs: dict) -> Needs:
    return Needs()


def _group_normalised(knobs: dict) -> int:
    return 2 if knobs.get("scale_std", True) else 1


@dataclass(frozen=True)
class MethodSpec:
    name: str
    forwards: str  # positives | negatives | all
    knobs: tuple[str, ...]  # the algo.* settings the loss and step read
    needs: Callable[[dict], Needs] = _no_needs
    penalty_rows: str | None = None  # where the siamese penalty runs; None: the forwarded completions
    summary: str = ""  # one line, for the README and `--help`


_GRPO_KNOBS = ("clip_eps", "scale_std", "adv_eps", "aggregation")
SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("popo", "positives", ("clip_eps", "redistribution", "aggregation"),
               needs=lambda k: Needs(seq_log_ratio=k.get("redistribution") == "self_normalized"),
               summary="POPO: positives only, bounded IS min(rho, 1+eps), each group's mass redistributed over its positives"),
    MethodSpec("popo+negatives", "all", _GRPO_KNOBS,
               needs=lambda k: Needs(min_group_size=_group_normalised(k)), penalty_rows="positives",
               summary="POPO's `positive-only` ablation: GRPO's surrogate on every completion, stabilisers kept"),
    MethodSpec("grpo", "all", (*_GRPO_KNOBS, "kl_beta"),
               needs=lambda k: Needs(reference=k.get("kl_beta", 0.0) > 0, min_group_size=_group_normalised(k)),
               summary="GRPO: group-normalised advantages, clipped surrogate on every completion, optional k3 KL to a reference"),
    MethodSpec("dr_grpo", "all", ("clip_eps", "max_length"),
               summary="Dr. GRPO: A = r - mean(r), every completion, token sums over a constant length L"),
    MethodSpec("rft", "positives", ("aggregation",), summary="RFT: supervised fine-tuning on the positives, no ratio"),
    MethodSpec("raft_pp", "positives", ("clip_eps",),
               summary="RAFT++: clipped surrogate with A = 1 on the positives, sequence mean over all completions"),
    MethodSpec("psr", "positives", ("clip_eps", "aggregation"),
               summary="PSR: positive sample reinforcement, A = +1 on positives only"),
    MethodSpec("nsr", "negatives", ("clip_eps", "aggregation"),
               summary="NSR: negative sample reinforcement, A = -1 on negatives only"),
    MethodSpec("w_reinforce", "all", ("clip_eps", "aggregation", "positive_weight"),
               summary="W-REINFORCE: A = lambda (algo.positive_weight) on positives, -1 on negatives"),
)}
assert all(s.forwards in FORWARDS for s in SPECS.values())


def method_name(algo) -> str:
    """The registry entry for an algo config: `algo.name`, or its `+negatives` combination when
    `algo.use_negatives` is set (METHOD.md, Ablations: "positive-only")."""
    return f"{algo.name}+negatives" if algo.use_negatives else algo.name


def needs_of(algo) -> Needs:
    """What the method of an algo config (anything with its attributes) needs from the trainer."""
    spec = SPECS[method_name(algo)]
    return spec.needs({k: getattr(algo, k) for k in spec.knobs})
