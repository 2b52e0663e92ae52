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
    rows = len(prompts)
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    comp_width = max(max(len(c) for c in completions), 1)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.zeros((rows, comp_width), dtype=torch.long)
    targets = torch.zeros((rows, comp_width), dtype=torch.long)
    mask = torch.zeros((rows, comp_width), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(list(p) + list(c))
        attention[i, :n] = 1
        positions[i, : len(c)] = torch.arange(len(p) - 1, n - 1)
        targets[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        mask[i, : len(c)] = True
    return Sequences(*(t.to(device) for t in (input_ids, attention, positions, targets, mask)))


def _backbone(model):
    """The decoder stack whose output feeds the LM head (after the final norm)."""
    return getattr(model, model.base_model_prefix)


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
    out = _backbone(model)(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, use_cache=False)
    states = out.last_hidden_state
    index = seqs.positions[..., None].expand(-1, -1, states.shape[-1])
    h = states.gather(1, index)  # [B, T, H]
    lp = None
    if logprobs:
        logits = model.get_output_embeddings()(h[seqs.mask]).float() / temperature
        if suppress_ids:
            logits[:, list(suppress_ids)] = float("-inf")
        token_lp = logits.log_softmax(-1).gather(-1, seqs.targets[seqs.mask][:, None]).squeeze(-1)
        lp = torch.zeros(seqs.mask.shape, dtype=token_lp.dtype, device=token_lp.device)
        lp = lp.masked_scatter(seqs.mask, token_lp)
    return lp, (h if hidden else None)
