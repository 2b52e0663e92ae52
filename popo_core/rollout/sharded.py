"""Generation over several ranks: each rank samples its share of the step's prompts with its own
whole copy of the policy (or its own vLLM), and the shares are gathered, so every rank holds the
whole rollout batch. Weights reach the copy as full tensors gathered from the FSDP shards at each
push (popo_core/trainer/distributed.py)."""

from __future__ import annotations

from typing import Sequence

from popo_core.trainer.distributed import Ranks, full_state_dict
from popo_core.rollout import Rollouts


class ShardedEngine:
    def __init__(self, inner, ranks: Ranks):
        self.inner, self.ranks = inner, ranks
        self.pad_id, self.suppress = inner.pad_id, inner.suppress

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, seeds: Sequence[int] | None = None, **kwargs) -> Rollouts:
        lo, hi = self.ranks.bounds(len(prompt_ids))
        if hi > lo:
            if seeds is not None:
                kwargs["seeds"] = list(seeds)[lo:hi]
            mine = self.inner.generate(prompt_ids[lo:hi], **kwargs)
        else:  # more ranks than prompts
            mine = Rollouts([], [], [], [], [], [])
        out = Rollouts([], [], [], [], [], [] if mine.logprobs is not None else None)
        offset = 0
        for (lo_r, hi_r), part in zip((self.ranks.__class__(r, self.ranks.world).bounds(len(prompt_ids))
                                       for r in range(self.ranks.world)), self.ranks.gather(mine)):
            out.prompt_ids += part.prompt_ids
            out.completion_ids += part.completion_ids
            out.texts += part.texts
            out.group_ids += [g + lo_r for g in part.group_ids]
            out.truncated += part.truncated
            if out.logprobs is not None:
                out.logprobs += part.logprobs
            offset = hi_r
        assert offset == len(prompt_ids)
        return out

    def sync_weights(self, model) -> None:
        """Push the policy's full weights (gathered from its shards: a collective) to this rank's sampler."""
        self.inner.push_weights(full_state_dict(model).items())
