"""Per-token log-probs and last hidden states of completions, for the policy and its copies.

Sequences are prompt + completion, right-padded, each forwarded once however often it occurs: a
completion's states are those of its prompt and its tokens but the last (the last predicts nothing),
and causal attention makes the states of a sequence equal to those of any longer sequence that
starts with it. So the rows of a batch are folded onto the distinct sequences none of the others
extends (a group's repeated completions, or all of a group when completions are one token long),
and only the distinct positions that predict completion tokens go through the LM head, so a 150k
vocabulary costs [distinct completion tokens, V]. The result, and its gradient, is that of
forwarding every row on its own (with dropout in training, folded rows share one dropout mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class Sequences:
    """A batch of prompt + completion token sequences, folded onto the distinct inputs."""

    input_ids: Tensor  # [U, L] right-padded distinct inputs (prompt + completion[:-1])
    attention_mask: Tensor  # [U, L]
    owner: Tensor  # [B] the input row whose states each completion reads
    positions: Tensor  # [B, T] position (in its owner's row) that predicts each completion token
    targets: Tensor  # [B, T] completion tokens (0 where padded)
    mask: Tensor  # [B, T] bool, True on completion tokens
    states: Tensor  # [K] distinct predicting positions, as flat indices owner * L + position
    inverse: Tensor  # [completion tokens] each completion token's entry in `states`

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())


def fold(inputs: Sequence[tuple[int, ...]]) -> tuple[list[tuple[int, ...]], list[int]]:
    """(the inputs no other input extends, the index of the one each input is a prefix of)."""
    distinct = sorted(set(inputs))
    kept, row_of = [], {}
    # In sorted order, a sequence that starts another one starts the one right after it.
    for i in range(len(distinct) - 1, -1, -1):
        s = distinct[i]
        after = distinct[i + 1] if i + 1 < len(distinct) else None
        if after is not None and after[: len(s)] == s:
            row_of[s] = row_of[after]
        else:
            row_of[s] = len(kept)
            kept.append(s)
    return kept, [row_of[s] for s in inputs]


def collate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device) -> Sequences:
    # Built as padded Python lists and converted once: a tensor per row costs more than the model.
    if not all(prompts):
        raise ValueError("collate: an empty prompt (a completion's first token needs a position before it)")
    inputs = [tuple(p) + tuple(c[:-1]) for p, c in zip(prompts, completions)]
    kept, owner = fold(inputs)
    width = max(max(len(s) for s in kept), 1)
    comp_width = max(max(len(c) for c in completions), 1)
    input_ids = [list(s) + [pad_id] * (width - len(s)) for s in kept]
    attention = [[1] * len(s) + [0] * (width - len(s)) for s in kept]
    positions, targets, mask, flat = [], [], [], []
    for p, c, o in zip(prompts, completions, owner):
        pad = comp_width - len(c)
        at = list(range(len(p) - 1, len(p) + len(c) - 1))
        positions.append(at + [0] * pad)
        targets.append(list(c) + [0] * pad)
        mask.append([True] * len(c) + [False] * pad)
        flat.extend(o * width + a for a in at)
    as_tensor = lambda rows, dtype: torch.tensor(rows, dtype=dtype, device=device)  # noqa: E731
    states, inverse = as_tensor(flat, torch.long).unique(return_inverse=True)
    return Sequences(
        as_tensor(input_ids, torch.long),
        as_tensor(attention, torch.long),
        as_tensor(owner, torch.long),
        as_tensor(positions, torch.long),
        as_tensor(targets, torch.long),
        as_tensor(mask, torch.bool),
        states,
        inverse,
    )


def _base(model):
    """The causal LM itself (a peft model's, with its LoRA layers in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model):
    """The decoder stack whose output feeds the LM head (after the final norm)."""
    base = _base(model)
    return getattr(base, base.base_model_prefix)


def _sampler_log_probs(model, h: Tensor, temperature: float, suppress_ids: Sequence[int]) -> Tensor:
    """[positions, V] log-probs of the distribution the sampler drew from (METHOD.md, Setting) at
    the hidden states `h` [positions, H]: logits / temperature with suppressed tokens removed."""
    base = _base(model)
    if getattr(base.config, "tie_word_embeddings", False):
        # The input embedding as it is now: under FSDP2, gathered with the backbone's parameters.
        logits = torch.nn.functional.linear(h, backbone(model).get_input_embeddings().weight)
    else:
        logits = base.get_output_embeddings()(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # bf16 logits lose digits
    if suppress_ids:
        logits[:, list(suppress_ids)] = float("-inf")
    return logits.log_softmax(-1)


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
    flat = _flat_states(model, seqs)
    lp = None
    if logprobs:
        log_p = _sampler_log_probs(model, flat[seqs.states], temperature, suppress_ids)
        lp = _per_token(log_p[seqs.inverse, seqs.targets[seqs.mask]], seqs.mask)
    h = flat[seqs.owner[:, None] * seqs.input_ids.shape[1] + seqs.positions] if hidden else None
    return lp, h


@torch.no_grad()
def completion_logprobs_and_entropy(
    model, seqs: Sequences, *, temperature: float = 1.0, suppress_ids: Sequence[int] = ()
) -> tuple[Tensor, Tensor]:
    """(log-probs [B, T], entropy [B, T]) of the sampled tokens' distributions, no gradient."""
    log_p = _sampler_log_probs(model, _flat_states(model, seqs)[seqs.states], temperature, suppress_ids)
    # -sum p log p, with 0 * log 0 = 0 for suppressed tokens.
    entropy = -(log_p.exp() * torch.where(log_p.isfinite(), log_p, torch.zeros_like(log_p))).sum(-1)
    token_lp = log_p[seqs.inverse, seqs.targets[seqs.mask]]
    return _per_token(token_lp, seqs.mask), _per_token(entropy[seqs.inverse], seqs.mask)


def _flat_states(model, seqs: Sequences) -> Tensor:
    """[U * L, H] last hidden states (after the final norm) of the distinct inputs, row-major."""
    out = backbone(model)(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, use_cache=False)
    states = out.last_hidden_state
    return states.reshape(-1, states.shape[-1])
