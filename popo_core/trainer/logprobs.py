"""Per-token log-probs and last hidden states of completions, for the policy and its copies.

Sequences are prompt + completion, right-padded, each forwarded once however often it occurs: a
completion's states are those of its prompt and its tokens but the last (the last predicts nothing),
and causal attention makes the states of a sequence equal to those of any longer sequence that
starts with it. So the rows of a batch are folded onto the distinct sequences none of the others
extends (a group's repeated completions, or all of a group when completions are one token long),
and only the distinct positions that predict completion tokens go through the LM head, so a 150k
vocabulary costs [distinct completion tokens, V]. The result, and its gradient, is that of
forwarding every row on its own (with dropout in training, folded rows share one dropout mask).

The distinct inputs are laid out padded (one a row, right-padded) or packed (several a row, position
ids restarting at 0, attention kept inside each: popo_core/trainer/packing.py); every forward of the
trainer (the policy's, the momentum network's, the reference's, pi_old's) goes through `collate` and
`_flat_states`, so the layout is chosen in one place and nothing downstream depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from popo_core.trainer.packing import PADDED, Packing, place


@dataclass
class Sequences:
    """A batch of prompt + completion token sequences, folded onto the distinct inputs."""

    input_ids: Tensor  # [R, L] the distinct inputs (prompt + completion[:-1]), one a row or packed
    attention_mask: Tensor | None  # padded: [R, L]; mask/additive: [R, 1, L, L] bool block-diagonal causal; varlen: None
    position_ids: Tensor | None  # packed: [R, L], restarting at 0 at each sequence; padded: None (0..L-1)
    owner: Tensor  # [B] the distinct input whose states each completion reads
    index: Tensor  # [B, T] flat index (row * L + column) of the state predicting each completion token
    targets: Tensor  # [B, T] completion tokens (0 where padded)
    mask: Tensor  # [B, T] bool, True on completion tokens
    states: Tensor  # [K] distinct predicting positions, as flat indices row * L + column
    inverse: Tensor  # [completion tokens] each completion token's entry in `states`
    input_tokens: int = 0  # tokens of the distinct inputs (the rest of input_ids is padding)
    additive: bool = False  # eager attention: the 4D mask goes in as 0 / a large negative number

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def padded_tokens(self) -> int:
        """Positions the forward runs that hold no token."""
        return self.input_ids.numel() - self.input_tokens


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


def collate(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int, device,
            packing: Packing = PADDED) -> Sequences:
    """The completions' inputs folded onto the distinct ones and laid out as `packing` says."""
    # Built as Python lists and converted once: a tensor per row costs more than the model.
    if not all(prompts):
        raise ValueError("collate: an empty prompt (a completion's first token needs a position before it)")
    inputs = [tuple(p) + tuple(c[:-1]) for p, c in zip(prompts, completions)]
    kept, owner = fold(inputs)
    lengths = [len(s) for s in kept]
    placed = place(lengths, packing)
    if placed is None:  # padded: one a row
        rows, width, at = len(kept), max(max(lengths), 1), [(u, 0) for u in range(len(kept))]
    else:
        rows, width, at = placed.rows, placed.width, placed.at
    input_ids = [[pad_id] * width for _ in range(rows)]
    for s, (r, o) in zip(kept, at):
        input_ids[r][o:o + len(s)] = s
    comp_width = max(max(len(c) for c in completions), 1)
    index, targets, mask, flat = [], [], [], []
    for p, c, u in zip(prompts, completions, owner):
        pad = comp_width - len(c)
        r, o = at[u]
        at_flat = [r * width + o + a for a in range(len(p) - 1, len(p) + len(c) - 1)]
        index.append(at_flat + [0] * pad)
        targets.append(list(c) + [0] * pad)
        mask.append([True] * len(c) + [False] * pad)
        flat.extend(at_flat)
    as_tensor = lambda rows_, dtype: torch.tensor(rows_, dtype=dtype, device=device)  # noqa: E731
    states, inverse = as_tensor(flat, torch.long).unique(return_inverse=True)
    if placed is None:
        attention = as_tensor([[1] * n + [0] * (width - n) for n in lengths], torch.long)
        position_ids = None
    else:
        # Segment of each position (-1 - column on padding: a position of its own), its position id.
        segment = [[-1 - k for k in range(width)] for _ in range(rows)]
        pos = [[0] * width for _ in range(rows)]
        for u, ((r, o), n) in enumerate(zip(at, lengths)):
            segment[r][o:o + n] = [u] * n
            pos[r][o:o + n] = range(n)
        position_ids = as_tensor(pos, torch.long)
        attention = None if packing.mode == "varlen" else block_causal_mask(as_tensor(segment, torch.long))
    return Sequences(
        as_tensor(input_ids, torch.long),
        attention,
        position_ids,
        as_tensor(owner, torch.long),
        as_tensor(index, torch.long),
        as_tensor(targets, torch.long),
        as_tensor(mask, torch.bool),
        states,
        inverse,
        input_tokens=sum(lengths),
        additive=placed is not None and packing.mode == "additive",  # padded rows keep the 2D mask
    )


def block_causal_mask(segment: Tensor) -> Tensor:
    """[R, 1, L, L] bool, True where a query may attend a key: same segment, key not after it."""
    width = segment.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


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
    tokens removed (METHOD.md, Setting). Padded entries of both are 0.
    """
    flat = _flat_states(model, seqs)
    lp = None
    if logprobs:
        log_p = _sampler_log_probs(model, flat[seqs.states], temperature, suppress_ids)
        lp = _per_token(log_p[seqs.inverse, seqs.targets[seqs.mask]], seqs.mask)
    h = None
    if hidden:  # 0 where padded, as the log-probs
        h = torch.where(seqs.mask[..., None], flat[seqs.index], torch.zeros((), dtype=flat.dtype, device=flat.device))
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
    """[R * L, H] last hidden states (after the final norm) of the layout's positions, row-major."""
    mask = seqs.attention_mask
    if seqs.additive:  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=_compute_dtype(model), device=mask.device).masked_fill(
            ~mask, torch.finfo(_compute_dtype(model)).min)
    out = backbone(model)(input_ids=seqs.input_ids, attention_mask=mask, position_ids=seqs.position_ids,
                          use_cache=False)
    states = out.last_hidden_state
    return states.reshape(-1, states.shape[-1])


def _compute_dtype(model) -> torch.dtype:
    param = next(model.parameters())
    if torch.is_autocast_enabled(param.device.type):
        return torch.get_autocast_dtype(param.device.type)
    return param.dtype
