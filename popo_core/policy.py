"""Per-token log-probs and last hidden states of completions, for the policy and its copies.

Sequences are prompt + completion, right-padded. Only the positions that predict completion tokens
go through the LM head, so a 150k vocabulary costs [completion tokens, V], not [all tokens, V].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Sequences:
    """A batch of prompt + completion token sequences with their layout."""

    input_ids: Tensor  # [B, L] right-padded
    attention_mask: Tensor  # [B, L]
    positions: Tensor  # [B, T] index of the position that predicts each completion token
    targets: Tensor  # [B, T] completion tokens (0 where padded)
    mask: Tensor  # [B, T] bool, True on completion tokens

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def collate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device) -> Sequences:
    # Built as padded Python lists and converted once: a tensor per row costs more than the model.
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    comp_width = max(max(len(c) for c in completions), 1)
    input_ids = [s + [pad_id] * (width - len(s)) for s in seqs]
    attention = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
    positions, targets, mask = [], [], []
    for p, c in zip(prompts, completions):
        pad = comp_width - len(c)
        positions.append(list(range(len(p) - 1, len(p) + len(c) - 1)) + [0] * pad)
        targets.append(list(c) + [0] * pad)
        mask.append([True] * len(c) + [False] * pad)
    as_tensor = lambda rows, dtype: torch.tensor(rows, dtype=dtype, device=device)  # noqa: E731
    return Sequences(
        as_tensor(input_ids, torch.long),
        as_tensor(attention, torch.long),
        as_tensor(positions, torch.long),
        as_tensor(targets, torch.long),
        as_tensor(mask, torch.bool),
    )


def _base(model):
    """The causal LM itself (a peft model's, with its LoRA layers in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _backbone(model):
    """The decoder stack whose output feeds the LM head (after the final norm)."""
    base = _base(model)
    return getattr(base, base.base_model_prefix)


def _sampler_logits(model, h: Tensor, seqs: Sequences, temperature: float, suppress_ids: Sequence[int]) -> Tensor:
    """[completion tokens, V] logits of the distribution the sampler drew from (METHOD.md, Setting):
    logits / temperature with suppressed tokens removed."""
    base = _base(model)
    if getattr(base.config, "tie_word_embeddings", False):
        # The input embedding as it is now: under FSDP2, gathered with the backbone's parameters.
        logits = torch.nn.functional.linear(h[seqs.mask], _backbone(model).get_input_embeddings().weight)
    else:
        logits = base.get_output_embeddings()(h[seqs.mask])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 logits lose digits
    if suppress_ids:
        logits[:, list(suppress_ids)] = float("-inf")
    return logits


def _per_token(values: Tensor, mask: Tensor) -> Tensor:
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)


def completion_forward(
    model,
    seqs: Sequences,
    *,
    temperature: float = 1.0,
    suppress_ids: Sequence[int] = (),
    logprobs: bool = True,
    hidden: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """(log-probs [B, T], last hidden states [B, T, H]) at the completion tokens.

    Log-probs are of the distribution the sampler drew from: logits / temperature with suppressed
    tokens removed (METHOD.md, Setting). Padded entries are 0.
    """
    h = _completion_states(model, seqs)
    lp = None
    if logprobs:
        logits = _sampler_logits(model, h, seqs, temperature, suppress_ids)
        token_lp = logits.log_softmax(-1).gather(-1, seqs.targets[seqs.mask][:, None]).squeeze(-1)
        lp = _per_token(token_lp, seqs.mask)
    return lp, (h if hidden else None)


@torch.no_grad()
def completion_logprobs_and_entropy(
    model, seqs: Sequences, *, temperature: float = 1.0, suppress_ids: Sequence[int] = ()
) -> tuple[Tensor, Tensor]:
    """(log-probs [B, T], entropy [B, T]) of the sampled tokens' distributions, no gradient."""
    logits = _sampler_logits(model, _completion_states(model, seqs), seqs, temperature, suppress_ids)
    log_p = logits.log_softmax(-1)
    token_lp = log_p.gather(-1, seqs.targets[seqs.mask][:, None]).squeeze(-1)
    # -sum p log p, with 0 * log 0 = 0 for suppressed tokens.
    entropy = -(log_p.exp() * torch.where(log_p.isfinite(), log_p, torch.zeros_like(log_p))).sum(-1)
    return _per_token(token_lp, seqs.mask), _per_token(entropy, seqs.mask)


def _completion_states(model, seqs: Sequences) -> Tensor:
    """Last hidden states (after the final norm) at the positions that predict completion tokens."""
    out = _backbone(model)(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, use_cache=False)
    states = out.last_hidden_state
    index = seqs.positions[..., None].expand(-1, -1, states.shape[-1])
    return states.gather(1, index)  # [B, T, H]
