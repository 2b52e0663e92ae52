"""Rollouts with Hugging Face transformers' `generate`: batched sampling with the KV cache."""

from __future__ import annotations

from typing import Sequence

import torch

from popo_core.rollout import Rollouts, cut_at_eos, eos_ids, suppressed_ids


class _RecordLogprobs:
    """Logits processor that records the log-prob of each sampled token under softmax(logits / T).

    At step t+1 it sees the token sampled at step t as the last input id, so it keeps only one
    [B, V] matrix alive rather than all of them (output_scores would, which is gigabytes at 150k
    vocabulary). It runs before transformers' temperature/top-p warpers, so it divides by T itself.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.columns: list[torch.Tensor] = []

    def _flush(self, last_tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.columns.append(self.pending.gather(-1, last_tokens[:, None]).squeeze(-1))
            self.pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._flush(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        self._flush(sequences[:, -1])
        return torch.stack(self.columns, dim=1) if self.columns else sequences.new_zeros((len(sequences), 0), dtype=torch.float)


class HFEngine:
    def __init__(self, model, tokenizer, *, batch_size: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos = eos_ids(model, tokenizer)
        self.suppress = suppressed_ids(tokenizer, self.eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)

    def sync_weights(self, model) -> None:
        self.model = model  # generate() reads the live weights

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
    ) -> Rollouts:
        from transformers import LogitsProcessorList

        expanded = [list(p) for p in prompt_ids for _ in range(n)]
        groups = [i for i in range(len(prompt_ids)) for _ in range(n)]
        completions: list[list[int]] = []
        truncated: list[bool] = []
        logprobs: list[list[float]] = []
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            for start in range(0, len(expanded), self.batch_size):
                chunk = expanded[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=device)
                attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
                recorder = _RecordLogprobs(1.0 if greedy else temperature)
                sampling = {} if greedy else {"temperature": temperature, "top_p": top_p, "top_k": 0}
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    do_sample=not greedy,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    eos_token_id=sorted(self.eos),
                    pad_token_id=self.pad_id,
                    suppress_tokens=self.suppress or None,
                    logits_processor=LogitsProcessorList([recorder]),
                    use_cache=True,
                    **sampling,
                )
                new = out[:, width:]
                lp = recorder.finish(out)
                for row, row_lp in zip(new.tolist(), lp.tolist()):
                    toks, cut = cut_at_eos(row, self.eos)
                    completions.append(toks)
                    truncated.append(cut)
                    logprobs.append(row_lp[: len(toks)])
        finally:
            self.model.train(was_training)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rollouts(expanded, completions, texts, groups, truncated, logprobs)
