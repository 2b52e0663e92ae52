"""Helpers shared by several test files (a test file never imports another)."""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch

from popo_core.rollout import Rollouts
from popo_core.trainer.lifecycle import Callbacks
from popo_core.trainer.update import Batch


def load_study(tmp, name):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp}/optuna.db")


def states(study):
    from collections import Counter

    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


class StopAt(Callbacks):
    def __init__(self, step):
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            raise RuntimeError("simulated crash")


def fixed_batch(tokenizer, device, seed=0, prompts=5, group=4) -> Batch:
    """Prompts of several tokens, completions of 1 to 7 printable tokens, mixed rewards."""
    rnd = random.Random(seed)
    chars = [tokenizer.convert_tokens_to_ids(c) for c in "0123456789+=abcdefgh"]
    p_ids, c_ids, gids, rewards = [], [], [], []
    for g in range(prompts):
        prompt = [rnd.choice(chars) for _ in range(rnd.randint(3, 8))]
        group_rewards = [1.0, 0.0] + [float(rnd.random() < 0.5) for _ in range(group - 2)]
        if g == 0:
            group_rewards = [0.0] * group  # a group with no positive
        for k in range(group):
            p_ids.append(prompt)
            c_ids.append([rnd.choice(chars) for _ in range(rnd.randint(1, 7))])
            gids.append(g)
            rewards.append(group_rewards[k])
    texts = tokenizer.batch_decode(c_ids)
    rollouts = Rollouts(p_ids, c_ids, texts, gids, [True] * len(c_ids), None)
    return Batch.of(rollouts, torch.tensor(rewards, device=device))


# ------------------------------------------------------------------ random loss inputs (float64)
# The losses' tests (tests/algo) check popo_core.algo against references on these batches.
F64 = torch.float64
SEEDS = [0, 1, 2, 3]
# Garbage that padding may hold: log-probs of pad tokens, huge values, values whose exp overflows.
GARBAGE = (1e30, -1e30, 3e4, -3e4, 88.0, -700.0, float("inf"), -float("inf"), float("nan"))


@dataclass
class LossBatch:
    lp: torch.Tensor  # [N, T] log pi_theta (garbage where mask == 0)
    old: torch.Tensor  # [N, T] log pi_old
    ref: torch.Tensor  # [N, T] log pi_ref
    mask: torch.Tensor  # [N, T] bool
    rewards: torch.Tensor  # [N] float64 in {0, 1}
    gids: torch.Tensor  # [N] int64, arbitrary ids, rows of a group not contiguous

    def rows(self, idx: list[int]) -> "LossBatch":
        i = torch.tensor(idx, dtype=torch.long)
        return LossBatch(self.lp[i], self.old[i], self.ref[i], self.mask[i], self.rewards[i], self.gids[i])


def make_batch(seed: int, *, min_size: int = 1, spread: float = 0.35) -> LossBatch:
    """Random groups: one all-negative, one mixed, one all-positive, the rest random.

    Group ids are arbitrary integers and rows are shuffled; lengths vary from 1 to T; padding holds
    garbage (huge numbers, values whose exp overflows) in every log-prob tensor.
    """
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n_groups = rnd.randint(4, 6)
    ids = rnd.sample(range(1000), n_groups)
    rewards: list[int] = []
    groups: list[int] = []
    for g in range(n_groups):
        size = rnd.randint(max(2, min_size), 6) if g == 1 else rnd.randint(min_size, 6)
        if g == 0:
            r = [0] * size
        elif g == 1:
            r = [1, 0] + [rnd.randint(0, 1) for _ in range(size - 2)]
        elif g == 2:
            r = [1] * size
        else:
            r = [rnd.randint(0, 1) for _ in range(size)]
        rewards += r
        groups += [ids[g]] * size
    perm = rnd.sample(range(len(rewards)), len(rewards))
    n = len(rewards)
    t_max = rnd.randint(5, 9)
    lengths = torch.tensor([rnd.randint(1, t_max) for _ in range(n)])
    mask = torch.arange(t_max)[None, :] < lengths[:, None]
    lp = -(torch.rand(n, t_max, generator=gen, dtype=F64) * 2.5 + 0.01)
    old = lp + spread * torch.randn(n, t_max, generator=gen, dtype=F64)
    ref = lp + 0.3 * torch.randn(n, t_max, generator=gen, dtype=F64)

    def garble(x: torch.Tensor) -> torch.Tensor:
        pick = torch.randint(len(GARBAGE), (n, t_max), generator=gen)
        return torch.where(mask, x, torch.tensor(GARBAGE, dtype=F64)[pick])

    return LossBatch(
        lp=garble(lp),
        old=garble(old),
        ref=garble(ref),
        mask=mask,
        rewards=torch.tensor([float(rewards[p]) for p in perm], dtype=F64),
        gids=torch.tensor([groups[p] for p in perm], dtype=torch.long),
    )


def groups_of(gids: torch.Tensor) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(gids.tolist()):
        out.setdefault(g, []).append(i)
    return out


def masked_positions(mask: torch.Tensor, i: int) -> list[int]:
    return [t for t in range(mask.shape[1]) if bool(mask[i, t])]


def partition_rows(b: LossBatch, seed: int, n_parts: int) -> list[list[int]]:
    """Split the rows into micro-batches at random: groups are split across micro-batches."""
    rnd = random.Random(1000 + seed)
    rows = list(range(b.lp.shape[0]))
    rnd.shuffle(rows)
    return [rows[k::n_parts] for k in range(n_parts)]


def loss_and_grad(fn, lp: torch.Tensor):
    x = lp.clone().requires_grad_(True)
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


def close(a, b, rtol=1e-9, atol=1e-12):
    return torch.allclose(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=rtol, atol=atol)


def differs(a, b):
    return not close(a, b, rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------- the tiny policy
@functools.lru_cache(maxsize=8)
def tiny_config(*overrides: str):
    """The tiny preset, composed once per set of overrides (a Hydra compose takes tenths of a second)."""
    from popo_core.config import compose

    return compose("tiny", list(overrides))


def tiny_model(seed: int = 0, *overrides: str):
    """(model, tokenizer): the tiny preset's random-init policy on CPU in float32, as the trainer loads it."""
    from popo_core.model.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_config(*overrides).model, device=torch.device("cpu"), seed=seed,
                                    dtype=torch.float32)


def token_ids(seed: int = 0, rows: int = 3, length: int = 7, vocab: int = 20) -> torch.Tensor:
    """A seeded [rows, length] batch of token ids the tiny tokenizer has (its first `vocab`)."""
    return torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))


# A few seconds of training per step on SmolLM2-135M (tests/model/test_smol.py, tests/rollout/test_smol_vllm.py):
# 2 prompts x 2 samples of at most 12 tokens, a 2-prompt held-out check, single-digit sums (the
# model gets some right, so there is a positive).
SMOL_SHORT = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2", "trainer.diagnostics_every=1",
              "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=12",
              "rollout.eval_max_new_tokens=12", "data.max_operand=9", "data.train_size=8", "data.eval_size=2",
              "trainer.threads=1", "trainer.device=cpu", "tracking.enabled=false"]


def saved_bytes(model, seqs) -> int:
    """Bytes autograd saves for backward in the trainer's forward of `seqs` (parameters excluded),
    each storage once at its full size."""
    from popo_core.trainer.logprobs import completion_forward

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_forward(model, seqs)
    return sum(seen.values())
