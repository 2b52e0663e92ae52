"""Sampling as a pure function of (seed, step, prompt, sample index, position): Gumbel-max noise
from a counter-based hash, so a completion does not depend on the batch it was generated in, nor on
how many processes shared the prompts (the same seed gives the same run on 1 or N GPUs).

Gumbel-max: argmax_v (logits_v / T + g_v) with g_v = -log(-log u_v), u_v uniform, is an exact
sample from softmax(logits / T). Here u_v is a hash of (row key, position, v), computed with 32-bit
integer arithmetic held in int64 so that no product can overflow; decoding is then greedy over the
perturbed logits. The row key hashes (seed, step, prompt index, sample index). The only dependence
on the batch left is the logits' own float rounding (batched matrix products), which can flip a
near-tie: runs agree within float tolerance over a bounded number of steps, not forever.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # < 2**27: a 32-bit value times it stays below 2**59
_GOLDEN = 0x9E3779B1


def mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (int64 tensors holding values in [0, 2**32))."""
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def key(*parts: int) -> int:
    """A 32-bit key for a tuple of integers (seed, step, prompt, sample, ...)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def prompt_keys(seed: int, step: int, first: int, count: int, stream: int = 0) -> list[int]:
    """Keys of `count` prompts at global positions first.. of a step's batch. `stream` separates
    uses of the same step (0: training rollouts, 1: evaluation)."""
    return [key(seed, stream, step, first + i) for i in range(count)]


def row_keys(prompt_keys: Sequence[int], n: int, device=None) -> Tensor:
    """Keys of each prompt's n samples, prompt-major, as an int64 tensor."""
    return torch.tensor([key(k, j) for k in prompt_keys for j in range(n)], dtype=torch.int64, device=device)


def gumbel_noise(keys: Tensor, position: int, vocab: int) -> Tensor:
    """[B, V] float64 Gumbel(0, 1) noise for decode position `position` of rows with these keys."""
    device = keys.device
    v = mix32((torch.arange(vocab, device=device, dtype=torch.int64) * _GOLDEN) & _M32)
    k = mix32(keys ^ mix32(torch.full_like(keys, (position * _GOLDEN + 0x7F4A7C15) & _M32)))
    h = mix32(k[:, None] ^ v[None, :])
    u = (h.double() + 0.5) / 2.0**32  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(u))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (at least one); -inf elsewhere."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is full
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


class GumbelSampler:
    """A transformers logits processor that samples by Gumbel-max from per-row keys and records
    each sampled token's log-prob under softmax(logits / T) (the distribution it drew from; with
    top-p the record is still of the full tempered distribution, as during training top_p = 1).

    Use with greedy decoding (do_sample=False): the returned scores are the perturbed logits, whose
    argmax is the sample. With `keys=None` it is plain greedy decoding (and still records)."""

    def __init__(self, keys: Tensor | None, prompt_width: int, temperature: float = 1.0, top_p: float = 1.0):
        self.keys, self.prompt_width = keys, prompt_width
        self.temperature, self.top_p = temperature, top_p
        self.columns: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        position = input_ids.shape[1] - self.prompt_width
        logits = scores.float() / (self.temperature if self.keys is not None else 1.0)
        log_probs = logits.log_softmax(-1)
        if self.keys is None:
            chosen = logits.argmax(-1)
            out = scores
        else:
            perturbed = top_p_filter(logits, self.top_p).double() + gumbel_noise(self.keys, position, logits.shape[-1])
            chosen = perturbed.argmax(-1)
            # Only the sample survives: greedy decoding picks it whatever else HF adds later.
            out = torch.full_like(scores, float("-inf")).scatter(-1, chosen[:, None], 0.0)
        self.columns.append(log_probs.gather(-1, chosen[:, None]).squeeze(-1))
        return out

    def logprobs(self, batch: int) -> Tensor:
        """[B, generated] log-probs of the chosen tokens."""
        return torch.stack(self.columns, dim=1) if self.columns else torch.zeros(batch, 0)
