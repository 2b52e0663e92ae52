"""Generation over several ranks: each rank samples its share of the step's prompts and the shares
are gathered, so every rank holds the whole rollout batch.

With `hf` each rank samples with its own whole copy of the policy, loaded with the full weights at
each push. With `vllm` each rank (or each group of rollout.tensor_parallel_size ranks) runs its own
engine, colocated with the trainer (popo_core/rollout/colocate.py): a group's ranks give their
engine the group's prompts together, and each rank keeps its own share of the outputs. Pushes to
vLLM stream the FSDP2 shards one tensor at a time. A push that fails on any rank fails on every
rank (the flag is all-reduced), so no rank ever samples from a stale policy while the others go on.
"""

from __future__ import annotations

from typing import Sequence

import torch

from popo_core.rollout import Rollouts
from popo_core.trainer.distributed import Ranks, full_state_dict


class ShardedEngine:
    def __init__(self, inner, ranks: Ranks, tensor_parallel_size: int = 1):
        self.inner, self.ranks, self.tp = inner, ranks, tensor_parallel_size
        self.pad_id, self.suppress = inner.pad_id, inner.suppress
        self.streams = hasattr(inner, "spec")  # vLLM: gathered tensor by tensor, no whole copy
        self._model = None

    # ------------------------------------------------------------------------------ generation
    def _group_share(self, n: int) -> tuple[int, int]:
        """[lo, hi) of the prompts this rank's engine generates (its group's, the same on each of its ranks)."""
        return Ranks(self.ranks.rank // self.tp, self.ranks.world // self.tp).bounds(n)

    def _share(self, rank: int, n: int) -> tuple[int, int]:
        """[lo, hi) of the prompts whose rollouts `rank` contributes to the gathered batch."""
        glo, ghi = Ranks(rank // self.tp, self.ranks.world // self.tp).bounds(n)
        lo, hi = Ranks(rank % self.tp, self.tp).bounds(ghi - glo)
        return glo + lo, glo + hi

    def generate(self, prompt_ids: Sequence[Sequence[int]], *, seeds: Sequence[int] | None = None, **kwargs) -> Rollouts:
        self._agree_on_weights()
        glo, ghi = self._group_share(len(prompt_ids))
        if ghi > glo:
            if seeds is not None:
                kwargs["seeds"] = list(seeds)[glo:ghi]
            group = self.inner.generate(prompt_ids[glo:ghi], **kwargs)
            lo, hi = self._share(self.ranks.rank, len(prompt_ids))
            mine = select_prompts(group, lo - glo, hi - glo)
        else:  # more engines than prompts
            mine = Rollouts([], [], [], [], [], [])
        out = Rollouts([], [], [], [], [], [] if mine.logprobs is not None else None)
        for rank, part in enumerate(self.ranks.gather(mine)):
            lo_r, _ = self._share(rank, len(prompt_ids))
            out.prompt_ids += part.prompt_ids
            out.completion_ids += part.completion_ids
            out.texts += part.texts
            out.group_ids += [g + lo_r for g in part.group_ids]
            out.truncated += part.truncated
            if out.logprobs is not None:
                out.logprobs += part.logprobs
        return out

    # ----------------------------------------------------------------------------------- weights
    def sync_weights(self, model) -> None:
        """Push the policy's weights, gathered from its shards (a collective), to this rank's sampler."""
        self._model = model
        if not self.streams:
            self.inner.push_weights(full_state_dict(model).items())
            return
        self._push_everywhere()

    def _push_everywhere(self) -> None:
        from popo_core.rollout.vllm import WeightPushError

        error: Exception | None = None
        try:
            # DTensors in, gathered one at a time while vLLM loads them (VLLMEngine._push).
            self.inner.push_weights(list(self._model.state_dict().items()))
        except WeightPushError as err:
            error = err
        failed = int(self.ranks.sum_(torch.tensor([float(error is not None)])).item())
        if failed:
            where = f"here: {error}" if error is not None else "on another rank"
            raise WeightPushError(f"weight push failed on {failed} of {self.ranks.world} rank(s), so no rank samples "
                                  f"(failed {where})")

    def _agree_on_weights(self) -> None:
        """Before a generation: if any rank's engine dropped its weights (a level-2 sleep, on a rank
        that generated), every rank pushes again, so the collectives of the push stay matched."""
        if not self.streams:
            return
        stale = not getattr(self.inner, "_weights_ok", True)
        if int(self.ranks.sum_(torch.tensor([float(stale)])).item()):
            if self._model is None:
                from popo_core.rollout.vllm import WeightPushError

                raise WeightPushError("the engine holds no usable policy: sync_weights first")
            self._push_everywhere()

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()


def select_prompts(out: Rollouts, lo: int, hi: int) -> Rollouts:
    """The rollouts of prompts [lo, hi) of `out`, their group ids counted from lo."""
    keep = [i for i, g in enumerate(out.group_ids) if lo <= g < hi]
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return Rollouts(pick(out.prompt_ids), pick(out.completion_ids), pick(out.texts), [out.group_ids[i] - lo for i in keep],
                    pick(out.truncated), pick(out.logprobs) if out.logprobs is not None else None)
