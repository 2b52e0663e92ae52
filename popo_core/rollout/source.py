"""Where the trainer's rollout batches come from: one interface, two implementations.

The loop asks a `RolloutSource` for the batch of each step (`next`) and hands it the weights after
each update (`push`). With rollout.max_staleness = s the batch of step t is sampled from the
weights after step max(0, t - 1 - s): a fixed schedule, never "the latest weights", so a run is a
function of its seed (sampling is already a function of (seed, step, prompt, sample),
popo_core/rollout/sampling.py).

- `InlineSource` (s = 0, the default): the trainer's own engine generates the batch when it is
  asked for, from the weights pushed after the previous step: the synchronous loop.
- `popo_core.rollout.sampler.SamplerProcess` (s >= 1): a process of its own, with its own copy
  of the policy and its own threads, generates the next s batches while the trainer updates.

`held()` gives the batches sampled from weights a checkpoint at the current step does not hold;
the checkpoint stores them and `start` takes them back, so a resumed run continues exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from popo_core.rollout import Rollouts


@dataclass(frozen=True)
class Request:
    """What a step's batch is sampled from, apart from the weights."""

    prompt_ids: list[list[int]]
    seeds: list[int]


@dataclass(frozen=True)
class Sampling:
    """The generate() settings every training batch shares (from rollout.*)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int

    def kwargs(self) -> dict:
        return dict(n=self.n, temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)


def policy_version(step: int, staleness: int) -> int:
    """The update whose weights sample the batch of `step` (0: the initial weights)."""
    return max(0, step - 1 - staleness)


class RolloutSource(Protocol):
    staleness: int

    def start(self, step: int, model, held: dict[int, Rollouts]) -> None:
        """Begin after `step` updates, `model` holding their weights; `held`: a checkpoint's `held()`."""

    def next(self, step: int) -> Rollouts:
        """The batch of `step`; meta holds policy_version, generate_s (the sampler's) and wait_s (the trainer's)."""

    def push(self, step: int, model) -> None:
        """`model` holds the weights after update `step`."""

    def held(self) -> dict[int, Rollouts]:
        """The batches a checkpoint taken now must store (sampled from weights it does not hold)."""

    def close(self) -> None: ...


class InlineSource:
    """The synchronous loop: the engine samples each batch from the weights after the previous step."""

    staleness = 0

    def __init__(self, engine, requests: Callable[[int], Request], sampling: Sampling, autocast):
        self.engine, self.requests, self.sampling, self.autocast = engine, requests, sampling, autocast
        self.version = 0

    def start(self, step: int, model, held: dict[int, Rollouts]) -> None:
        self.engine.sync_weights(model)
        self.version = step

    def next(self, step: int) -> Rollouts:
        request = self.requests(step)
        begin = time.perf_counter()
        with self.autocast():  # sampling: a function of (seed, step, prompt, sample), whatever the batch
            out = self.engine.generate(request.prompt_ids, seeds=request.seeds, **self.sampling.kwargs())
        spent = time.perf_counter() - begin
        out.meta.update(policy_version=self.version, generate_s=spent, wait_s=spent)
        return out

    def push(self, step: int, model) -> None:
        self.engine.sync_weights(model)
        self.version = step

    def held(self) -> dict[int, Rollouts]:
        return {}

    def close(self) -> None:
        pass


def rollout_source(cfg, engine, learner, tokenizer, requests: Callable[[int], Request]) -> RolloutSource:
    """The source rollout.max_staleness asks for (config.validate has refused what neither runs)."""
    r = cfg.rollout
    sampling = Sampling(r.group_size, r.temperature, r.top_p, r.max_new_tokens)
    if r.max_staleness == 0:
        return InlineSource(engine, requests, sampling, learner.autocast)
    from popo_core.rollout.sampler import SamplerProcess

    return SamplerProcess(learner.model, tokenizer, requests, sampling, staleness=r.max_staleness,
                          threads=r.threads or cfg.trainer.threads, compute_dtype=learner.compute_dtype)


def to_json(held: dict[int, Rollouts]) -> dict[str, dict]:
    from dataclasses import asdict

    return {str(step): asdict(r) for step, r in held.items()}


def from_json(blob: dict[str, dict]) -> dict[int, Rollouts]:
    return {int(step): Rollouts(**r) for step, r in blob.items()}

