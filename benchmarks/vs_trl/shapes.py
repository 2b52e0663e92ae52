"""The setups popo and TRL are compared on: one small entry per shape.

A shape fixes the popo preset and overrides, the rollout batch (prompts x completions), the
completion length, how a rollout batch is cut into optimizer steps (passes x mini-batches; TRL
`num_iterations` x `steps_per_generation`), the budget and the evaluation cadence. Everything else
(model, tokenizer, task, reward, held-out set) comes from popo's own config for the preset, so a new
testbed (e.g. the multi-token `arith` task) is one more entry here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Shape:
    name: str
    title: str
    preset: str
    prompts: int  # prompts per rollout batch
    group_size: int  # completions per prompt (TRL num_generations)
    max_new_tokens: int  # completion length limit (TRL max_completion_length)
    epochs: int  # passes over a rollout batch (TRL num_iterations)
    mini_batches: int  # optimizer steps per pass (TRL steps_per_generation)
    steps: int  # rollout steps
    eval_every: int  # rollout steps between held-out evaluations
    overrides: tuple[str, ...] = field(default=())  # further popo overrides (data, model)
    lrs: tuple[float, ...] | None = None  # this shape's learning rates, instead of the command's --lrs
    timing_only: bool = False  # too short to learn: no sample-efficiency table

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.epochs * self.mini_batches

    @property
    def completions_per_optimizer_step(self) -> int:  # TRL per_device_train_batch_size
        return self.prompts * self.group_size // self.mini_batches

    def popo_overrides(self, steps: int | None = None) -> list[str]:
        return [
            f"rollout.prompts_per_step={self.prompts}",
            f"rollout.group_size={self.group_size}",
            f"rollout.max_new_tokens={self.max_new_tokens}",
            f"algo.epochs={self.epochs}",
            f"algo.mini_batches={self.mini_batches}",
            f"trainer.max_steps={steps or self.steps}",
            f"trainer.eval_every={self.eval_every}",
            *self.overrides,
        ]


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("matched", "matched: 32 prompts x 8 one-token completions, one update per batch",
              preset="tiny", prompts=32, group_size=8, max_new_tokens=1, epochs=1, mini_batches=1, steps=300,
              eval_every=10),
        Shape("preset", "tiny preset: 96 x 8 per rollout, 2 passes x 3 mini-batches",
              preset="tiny", prompts=96, group_size=8, max_new_tokens=1, epochs=2, mini_batches=3, steps=150,
              eval_every=5),
        # The multi-token testbed (docs/testbed.md), from its warm start (the same weights for every
        # seed), at its preset's lr: 1e-3 and 3e-3 wreck the warm start within a few steps. Short:
        # it is here for the cost of multi-token steps (padding, generation length), not to learn.
        Shape("arith", "arith testbed: 64 x 8 completions of up to 48 tokens, 1 pass x 2 mini-batches",
              preset="arith", prompts=64, group_size=8, max_new_tokens=48, epochs=1, mini_batches=2, steps=10,
              eval_every=10, lrs=(1e-4,), timing_only=True),
    )
}
