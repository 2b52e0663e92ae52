"""Rollouts with Hugging Face transformers' `generate`: batched sampling with the KV cache.

Sampling is Gumbel-max from per-row keys (popo_core/rollout/sampling.py): a completion is a function
of (prompt seed, sample index, position), not of the batch it was generated in or of how many ranks
shared the prompts. Greedy decoding is plain argmax."""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from popo_core.rollout import Rollouts, cut_at_eos, eos_ids, suppressed_ids
from popo_core.trainer.logprobs import backbone
from popo_core.rollout.sampling import GumbelSampler, row_keys


class HFEngine:
    def __init__(self, model, tokenizer, *, batch_size: int = 512, shared_prefill: bool = True):
        self.model = model
        self.shared_prefill = shared_prefill
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos = eos_ids(model, tokenizer)
        self.suppress = suppressed_ids(tokenizer, self.eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)

    def sync_weights(self, model) -> None:
        self.model = model  # generate() reads the live weights

    def push_weights(self, named_tensors) -> None:
        """Load whole tensors (under FSDP: gathered from the shards) into this engine's own copy."""
        self.model.load_state_dict(dict(named_tensors))

    @torch.no_grad()
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
        """`n` completions per prompt. `seeds` (one per prompt) fix each prompt's draws; without
        them the prompt seeds come from torch's global generator (so torch.manual_seed fixes a run)."""
        from transformers import LogitsProcessorList

        expanded = [list(p) for p in prompt_ids for _ in range(n)]
        groups = [i for i in range(len(prompt_ids)) for _ in range(n)]
        if seeds is None:
            seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        completions: list[list[int]] = []
        truncated: list[bool] = []
        logprobs: list[list[float]] = []
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        keys = row_keys(seeds, n, device=device)
        try:
            for start in range(0, len(expanded), self.batch_size):
                chunk = expanded[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=device)
                attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                sampler = GumbelSampler(None if greedy else keys[start : start + len(chunk)], prompt_width=width,
                                        temperature=temperature, top_p=top_p)
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    **self._shared_prefill(chunk, input_ids, attention),
                    do_sample=False,  # the sampler draws; decoding takes its choice
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    eos_token_id=sorted(self.eos),
                    pad_token_id=self.pad_id,
                    suppress_tokens=self.suppress or None,
                    logits_processor=LogitsProcessorList([sampler]),
                    use_cache=True,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
                new = out[:, width:]
                lp = sampler.logprobs(len(chunk))
                for row, row_lp in zip(new.tolist(), lp.tolist()):
                    toks, cut = cut_at_eos(row, self.eos)
                    completions.append(toks)
                    truncated.append(cut)
                    logprobs.append(row_lp[: len(toks)])
        finally:
            self.model.train(was_training)
        return Rollouts(expanded, completions, decode(self.tokenizer, completions), groups, truncated, logprobs)

    def _shared_prefill(self, chunk: list[list[int]], input_ids, attention) -> dict:
        """generate()'s cache argument holding the prompts' KV cache but for their last token, each
        distinct prompt computed once and the cache then copied to its rows (a group's n samples
        share one prompt; vLLM's prefix cache does the same); {} when no prompt repeats."""
        first = {tuple(p): i for i, p in reversed(list(enumerate(chunk)))}
        if len(first) == len(chunk) or input_ids.shape[1] < 2 or not self.shared_prefill:
            return {}
        from transformers import DynamicCache

        rows = torch.tensor(list(first.values()), device=input_ids.device)
        slot = {p: k for k, p in enumerate(first)}
        ids, mask = input_ids[rows, :-1], attention[rows, :-1]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate() derives them from the mask
        decoder = backbone(self.model)  # transformers 5.24 names the argument `cache`, earlier `past_key_values`
        name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
        cache = DynamicCache(config=self.model.config)
        decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
        cache.batch_select_indices(torch.tensor([slot[tuple(p)] for p in chunk], device=input_ids.device))
        return {name: cache}


def decode(tokenizer, completions: list[list[int]]) -> list[str]:
    """The completions' texts, each distinct completion decoded once (a group often repeats one)."""
    distinct = list(dict.fromkeys(map(tuple, completions)))
    text = dict(zip(distinct, tokenizer.batch_decode([list(c) for c in distinct], skip_special_tokens=True)))
    return [text[tuple(c)] for c in completions]
