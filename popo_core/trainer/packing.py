"""Padding-free forwards and token-budget micro-batches, as pure functions of sequence lengths.

A micro-batch's distinct sequences (popo_core/trainer/logprobs.py) are either right-padded one a row
(today's layout) or packed: concatenated into rows by first-fit decreasing, each with position ids
restarting at 0 and attention that cannot cross a sequence boundary. How attention is kept inside a
sequence depends on the model's attention implementation:

- `mask` (sdpa) and `additive` (eager): rows of at most `trainer.max_tokens_per_row` tokens (null:
  the longest sequence of the micro-batch, so no row attends over more than a padded row would) with
  a block-diagonal causal 4D mask, boolean for SDPA, 0 / -inf-like for eager;
- `varlen` (flash_attention_2/3): every sequence in one row, no mask, position ids only; transformers
  derives the sequence boundaries (cu_seqlens) from where the position ids restart. Written for a GPU
  and tested for its layout on CPU (through SDPA, which reads the same position ids); unrun on a GPU.

With `trainer.packing` null, a micro-batch is packed only when that forwards fewer positions than
padding it would (so equal lengths, the tiny task's, stay padded); `true` packs every micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from popo_core.errors import ConfigError

# model.attn_implementation -> how a packed row keeps attention inside each sequence
PACKED_MODES = {None: "mask", "sdpa": "mask", "eager": "additive",
                "flash_attention_2": "varlen", "flash_attention_3": "varlen"}
MICRO_BATCH_SIZE = 256  # trainer.micro_batch_size when neither micro-batch setting is given


@dataclass(frozen=True)
class Packing:
    """How the forward lays out a micro-batch's distinct sequences."""

    mode: str = "padded"  # padded | mask | additive | varlen
    always: bool = False  # False: pack only when it forwards fewer positions than padding
    max_tokens_per_row: Optional[int] = None  # mask/additive rows (None: the micro-batch's longest sequence)


PADDED = Packing()


def packing_for(setting: Optional[bool], attn_implementation: Optional[str],
                max_tokens_per_row: Optional[int] = None) -> Packing:
    """The layout of `trainer.packing` under a model's attention implementation."""
    if setting is False:
        return PADDED
    mode = PACKED_MODES.get(attn_implementation)
    if mode is None:
        if setting:
            raise ConfigError(f"trainer.packing=true: attention implementation {attn_implementation!r} cannot pack "
                              f"(choose sdpa, eager, flash_attention_2 or flash_attention_3, or trainer.packing=false)")
        return PADDED  # null: pack where it can, and this one cannot
    return Packing(mode, bool(setting), max_tokens_per_row)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in rows whose lengths sum to at most `capacity`: longest first, each into
    the first row it fits."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


@dataclass(frozen=True)
class Placement:
    """Where each sequence sits in a packed layout: rows of `width` positions."""

    rows: int
    width: int
    at: list[tuple[int, int]]  # (row, offset) of each sequence


def place(lengths: Sequence[int], packing: Packing) -> Optional[Placement]:
    """The packed layout of sequences of these lengths, or None: pad them (one a row)."""
    if packing.mode == "padded" or not lengths:
        return None
    longest, padded = max(lengths), len(lengths) * max(lengths)
    if packing.mode == "varlen":  # one row, no padding at all
        total = sum(lengths)
        if not packing.always and total >= padded:
            return None
        offsets = [0]
        for n in lengths[:-1]:
            offsets.append(offsets[-1] + n)
        return Placement(1, total, [(0, o) for o in offsets])
    capacity = packing.max_tokens_per_row or longest
    if longest > capacity:
        raise ConfigError(f"trainer.max_tokens_per_row={capacity}: smaller than the longest sequence "
                          f"({longest} tokens, prompt + completion)")
    shortest = sorted(lengths)[:2]
    if not packing.always and (len(lengths) < 2 or sum(shortest) > capacity):
        return None  # no two sequences share a row: packing would be padding (equal lengths, the tiny task)
    rows = first_fit_decreasing(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)  # the fullest row
    if not packing.always and len(rows) * width >= padded:
        return None
    at: list[tuple[int, int]] = [(0, 0)] * len(lengths)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            at[i] = (r, offset)
            offset += lengths[i]
    return Placement(len(rows), width, at)


# ------------------------------------------------------------------- micro-batches by tokens
def token_chunks(costs: Sequence[int], budget: int, padded: bool) -> list[list[int]]:
    """Consecutive runs of indices of `costs` (each a sequence's tokens) whose cost is at most
    `budget`: their number times the longest when `padded`, else their sum (the tokens themselves:
    a run that `place` then pads, or the padding of packed rows, takes more positions)."""
    out: list[list[int]] = []
    run: list[int] = []
    total = longest = 0
    for i, c in enumerate(costs):
        if c > budget:
            raise ConfigError(f"trainer.max_tokens_per_micro_batch={budget}: smaller than the longest sequence "
                              f"({c} tokens, prompt + completion)")
        grown = max(longest, c) * (len(run) + 1) if padded else total + c
        if run and grown > budget:
            out.append(run)
            run, total, longest = [], 0, 0
        run.append(i)
        total += c
        longest = max(longest, c)
    if run:
        out.append(run)
    return out


def balance(costs: Sequence[int], world: int) -> list[list[int]]:
    """Indices of `costs` shared among `world` ranks so their token sums are close: longest first,
    each to the rank with the fewest tokens so far (each share in index order)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    load = [0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += costs[i]
    return [sorted(s) for s in shares]


def rank_token_chunks(costs: Sequence[int], budget: int, padded: bool, rank: int, world: int) -> list[list[int]]:
    """This rank's micro-batches (indices into `costs`) under a token budget, as many on every rank
    (the last ones of a smaller share are empty)."""
    if world == 1:
        return token_chunks(costs, budget, padded)
    per_rank = []
    for share in balance(costs, world):
        per_rank.append([[share[j] for j in run] for run in token_chunks([costs[i] for i in share], budget, padded)])
    count = max(len(c) for c in per_rank)
    mine = per_rank[rank]
    return mine + [[] for _ in range(count - len(mine))]
