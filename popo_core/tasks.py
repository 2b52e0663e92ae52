"""The task registry: a task name -> (train problems, held-out problems), graded by its verifier.

`popo train` asks `load_task(cfg)` for its prompts and `popo_core.rewards.make_verifier(task)` for
their grader. Tasks:
- `tiny`: single-digit sums mod `data.modulus` (one-token answers), exact match.
- `arith`: a chain of single-digit additions; the completion writes a worked trace, every partial
  sum, then EOS ("3+7+5=" -> "3+7=10,10+5=15"), graded on its final answer. Prompts are drawn
  without repetition from a stream seeded by `data.seed`: the held-out prompts first, then the
  training prompts, so they are disjoint and the held-out set does not change with
  `data.train_size`; no chain length gives more than 10% of its prompts to the held-out set or
  40% to the training set. The warm start's supervised examples (popo_core.warmstart) are drawn
  from another stream over the rest, so they cover every length.
- `math`: problems with boxed answers from a file or the Hub, graded by math-verify.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

from popo_core.data import Problem, load_problems, tiny_split
from popo_core.errors import ConfigError

ARITH_DEFAULT_EVAL_SIZE = 200


# --------------------------------------------------------------------------------- the arith task
def arith_problem(terms: list[int]) -> Problem:
    text = "+".join(map(str, terms)) + "="
    return Problem(text, text, str(sum(terms)))


def arith_trace(problem: str) -> str:
    """The worked completion of an arith prompt: each partial sum in turn, the last one the answer.

    "3+7+5=" -> "3+7=10,10+5=15". A prompt of one term has the trace "3=3"."""
    terms = [int(t) for t in problem.rstrip("=").split("+")]
    total, steps = terms[0], []
    for t in terms[1:]:
        steps.append(f"{total}+{t}={total + t}")
        total += t
    return ",".join(steps) if steps else f"{total}={total}"


def _caps(d, share: float) -> dict[int, int]:
    return {n: max(1, int(share * (d.max_operand + 1) ** n)) for n in range(d.min_terms, d.max_terms + 1)}


def arith_capacity(d) -> tuple[int, int]:
    """The most held-out and training prompts a DataConfig's arith space allows (the shares below)."""
    return sum(_caps(d, HELD_OUT_SHARE).values()), sum(_caps(d, TRAIN_SHARE).values())


def _arith_draws(rng: random.Random, min_terms: int, max_terms: int, max_operand: int) -> Iterator[Problem]:
    """Prompts with a uniformly drawn number of terms, each operand uniform in 0..max_operand."""
    while True:
        n = rng.randint(min_terms, max_terms)
        yield arith_problem([rng.randint(0, max_operand) for _ in range(n)])


# Shares of each chain length's distinct prompts that the held-out and the training set may take.
# Short chains have few prompts (100 of two single digits): without a cap the RL sets would take
# all of them and the warm start's examples, which must avoid those sets, would never show one.
HELD_OUT_SHARE, TRAIN_SHARE = 0.1, 0.4


def _unique(draws: Iterator[Problem], count: int, taken: set[str], caps: dict[int, int], what: str) -> list[Problem]:
    """`count` distinct problems not in `taken` (which grows with them), at most caps[n] of n terms."""
    out: list[Problem] = []
    per_length: dict[int, int] = {}
    tries = 0
    while len(out) < count:
        p = next(draws)
        n = p.problem.count("+") + 1
        tries += 1
        if p.problem not in taken and per_length.get(n, 0) < caps[n]:
            taken.add(p.problem)
            per_length[n] = per_length.get(n, 0) + 1
            out.append(p)
        elif tries > 50 * count + 10_000:
            raise ConfigError(f"cannot draw {count} distinct {what} arith prompts: the space is too small "
                              "(raise data.max_terms or data.max_operand, or lower the sizes)")
    return out


def arith_split(d) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) arith prompts for a DataConfig, disjoint, fixed by `data.seed`."""
    draws = _arith_draws(random.Random(f"arith-{d.seed}"), d.min_terms, d.max_terms, d.max_operand)
    taken: set[str] = set()
    held_out = _unique(draws, d.eval_size or ARITH_DEFAULT_EVAL_SIZE, taken, _caps(d, HELD_OUT_SHARE), "held-out")
    train = _unique(draws, d.train_size, taken, _caps(d, TRAIN_SHARE), "training")
    return train, held_out


def arith_sft_examples(d, seed: int, exclude: set[str]) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, worked completion) for supervised warm-up: a uniformly drawn
    number of terms, then operands redrawn until the prompt is not in `exclude` (the RL training
    and held-out prompts, at most half of each length). Repeats are allowed."""
    rng = random.Random(f"arith-sft-{d.seed}-{seed}")
    while True:
        n = rng.randint(d.min_terms, d.max_terms)
        while True:
            p = arith_problem([rng.randint(0, d.max_operand) for _ in range(n)])
            if p.problem not in exclude:
                break
        yield p.problem, arith_trace(p.problem)


# ---------------------------------------------------------------------------------- the registry
def _tiny(d) -> tuple[list[Problem], list[Problem]]:
    return tiny_split(d.modulus, d.operands, seed=d.seed)


def _math(d) -> tuple[list[Problem], list[Problem]]:
    train_set = load_problems(d.path, split=d.split, problem_key=d.problem_key, answer_key=d.answer_key)
    if not d.eval_path:
        return train_set, []
    return train_set, load_problems(d.eval_path, split=d.eval_split, limit=d.eval_size)


# name -> (DataConfig -> (train, held-out)); each name is also a `make_verifier` task.
TASKS: dict[str, Callable] = {"tiny": _tiny, "math": _math, "arith": arith_split}
# Tasks whose held-out prompts `popo eval --bench NAME` generates (no file, no Hub).
SYNTHETIC = ("arith",)
# Tasks that can write a supervised warm-up set: name -> (DataConfig, seed, exclude) -> examples.
SFT_EXAMPLES: dict[str, Callable] = {"arith": arith_sft_examples}


def load_task(cfg) -> tuple[list[Problem], list[Problem]]:
    """(train problems, held-out problems) for a Config's data section."""
    return TASKS[cfg.data.task](cfg.data)
