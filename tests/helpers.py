"""Helpers shared by several test files (a test file never imports another)."""
from __future__ import annotations

import random

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
