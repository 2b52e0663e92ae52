"""Where one rollout step of each popo method goes, on the tiny preset's shape (96 x 8, 2 x 3 updates).

    .venv/bin/python benchmarks/profile_step.py [--positive 1.0] [--repeats 5] [--top 25] [key=value ...]

Builds the learner as `popo train` does, samples one real rollout batch, then grades it with a
chosen share of positives (--positive 1.0: every completion correct, the state POPO is in once it
has learnt; the update's cost depends only on which rows are positive). Times generation and
`update()` (median of --repeats, each from the same weights), then profiles one update of each
method with cProfile (Python-level: per-row work, collation, host syncs) and torch.profiler
(operator-level). Prints what dominates; ratios POPO / GRPO at the end.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import statistics
import time

import torch

from popo_core.config import compose
from popo_core.data.datasets import prompt_ids
from popo_core.rollout.sampling import prompt_keys
from popo_core.trainer.loop import build, load_task, prompt_batch
from popo_core.trainer.update import Batch, update


def setup(method: str, overrides: list[str]):
    cfg = compose("tiny", [f"algo={method}", "tracking.enabled=false", "trainer.diagnostics_every=0", *overrides])
    learner, tokenizer, engine = build(cfg)
    train_set, _ = load_task(cfg)
    return cfg, learner, tokenizer, engine, train_set


def rollout(cfg, engine, tokenizer, train_set, step: int = 1):
    r = cfg.rollout
    problems = prompt_batch(train_set, step, r.prompts_per_step, cfg.trainer.seed)
    return engine.generate(prompt_ids(tokenizer, cfg.model.template, problems), n=r.group_size,
                           temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                           seeds=prompt_keys(cfg.trainer.seed, step, 0, len(problems)))


def graded(n: int, positive: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) < positive).float()


def timed_update(learner, batch, cfg, repeats: int) -> float:
    """Median seconds of update() from the same starting weights and optimizer state."""
    state = copy.deepcopy((learner.model.state_dict(), learner.optimizer.state_dict()))
    mom = copy.deepcopy(learner.momentum.module.state_dict()) if learner.momentum is not None else None
    times = []
    for _ in range(repeats):
        learner.model.load_state_dict(state[0])
        learner.optimizer.load_state_dict(state[1])
        if mom is not None:
            learner.momentum.module.load_state_dict(mom)
        t0 = time.perf_counter()
        update(learner, batch, cfg, step=1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--positive", type=float, default=1.0, help="share of completions graded correct")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    medians = {}
    for method in ("popo", "grpo"):
        cfg, learner, tokenizer, engine, train_set = setup(method, args.overrides)
        t0 = time.perf_counter()
        rollouts = rollout(cfg, engine, tokenizer, train_set)
        gen = time.perf_counter() - t0
        batch = Batch.of(rollouts, graded(len(rollouts), args.positive))
        medians[method] = timed_update(learner, batch, cfg, args.repeats)
        print(f"\n=== {method}: {len(rollouts)} completions, {float(batch.rewards.mean()):.2f} positive; "
              f"generate {gen:.3f} s, update median {medians[method]:.3f} s over {args.repeats}")
        prof = cProfile.Profile()
        prof.enable()
        update(learner, batch, cfg, step=2)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print("--- cProfile, by own time:")
        print("\n".join(out.getvalue().splitlines()[:args.top + 12]))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            update(learner, batch, cfg, step=3)
        print("--- torch.profiler, by self CPU time:")
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(f"update time POPO / GRPO at {args.positive:.2f} positive: {medians['popo'] / medians['grpo']:.2f}x")


if __name__ == "__main__":
    main()
