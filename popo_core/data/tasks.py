"""The task registry: a task name -> (train problems, held-out problems), graded by its verifier.

`popo train` asks `load_task(cfg)` for its prompts and `make_verifier(task)` for their grader
(the verifiers themselves live in popo_core.grading.verifiers and popo_core.grading.math_grader). Tasks:
- `tiny`: single-digit sums mod `data.modulus` (one-token answers), exact match.
- `arith`: a chain of single-digit additions; the completion writes a worked trace, every partial
  sum, then EOS ("3+7+5=" -> "3+7=10,10+5=15"), graded on its final answer. A hash of
  (`data.seed`, prompt) puts every prompt in one of three pools (held-out 10%, training 40%, the
  warm start's supervised examples 50%), so the sets are disjoint; each set is drawn from its pool
  by a stream seeded by `data.seed`, without repetition.
- `sums`: the arith prompts asked as a question ("What is 3 + 7 + 5?"), answered in words with a
  boxed final answer and graded by math-verify: for a chat model (SmolLM2-135M-Instruct starts at
  0.13 sampled pass@1 on two terms up to 49; docs/smol.md). Same pools, so held-out and training
  prompts are disjoint by construction.
- `math`: problems with boxed answers from a file or the Hub, graded by math-verify.
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Iterator

from popo_core.data.datasets import Problem, load_problems, tiny_split
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


# Every prompt belongs to one pool, by a hash of (data.seed, prompt): 1 in 10 to the held-out
# pool, 4 in 10 to the RL training pool, the other half to the warm start's supervised examples.
# The three sets are disjoint by construction, each holds about its share of every chain length
# (short chains have few prompts: 100 of two single digits), and the supervised examples do not
# depend on how many training or held-out prompts a run asks for.
POOL_SHARES = {"held_out": 0.1, "train": 0.4, "sft": 0.5}
_POOL_OF_BUCKET = ["held_out"] + ["train"] * 4 + ["sft"] * 5


def arith_pool(problem: str, seed: int) -> str:
    """The pool ("held_out", "train" or "sft") a prompt belongs to under data.seed."""
    return _POOL_OF_BUCKET[zlib.crc32(f"{seed}:{problem}".encode()) % 10]


def arith_capacity(d) -> tuple[int, int]:
    """The most held-out and training prompts drawn for a DataConfig: half of each pool's expected
    size, so that drawing distinct prompts stays quick."""
    space = sum((d.max_operand + 1) ** n for n in range(d.min_terms, d.max_terms + 1))
    return int(0.5 * POOL_SHARES["held_out"] * space), int(0.5 * POOL_SHARES["train"] * space)


def _draw(rng: random.Random, d) -> Problem:
    """A prompt with a uniformly drawn number of terms, each operand uniform in 0..max_operand."""
    n = rng.randint(d.min_terms, d.max_terms)
    return arith_problem([rng.randint(0, d.max_operand) for _ in range(n)])


def _distinct(d, pool: str, count: int) -> list[Problem]:
    """The first `count` distinct prompts of `pool` in the stream seeded by (data.seed, pool)."""
    rng = random.Random(f"arith-{pool}-{d.seed}")
    out: list[Problem] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < count:
        p = _draw(rng, d)
        tries += 1
        if p.problem not in seen and arith_pool(p.problem, d.seed) == pool:
            seen.add(p.problem)
            out.append(p)
        elif tries > 100 * count + 10_000:
            raise ConfigError(f"cannot draw {count} distinct {pool.replace('_', '-')} arith prompts: the space is too "
                              "small (raise data.max_terms or data.max_operand, or lower the sizes)")
    return out


def arith_split(d) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) arith prompts for a DataConfig: disjoint, fixed by `data.seed`, and each
    independent of the other's size."""
    return _distinct(d, "train", d.train_size), _distinct(d, "held_out", d.eval_size or ARITH_DEFAULT_EVAL_SIZE)


def arith_sft_examples(d, seed: int, run: int = 1) -> Iterator[tuple[str, str]]:
    """An endless stream of (prompt, worked completion) from the supervised pool, for the warm
    start. Every `run` consecutive examples share a uniformly drawn number of terms (one run per
    optimizer step: a batch of equal lengths pads nothing, which made SFT steps ~1.7x cheaper);
    operands are redrawn until the prompt is in the pool (about half of every length is).
    Repeats are allowed; `seed` is warmstart.seed."""
    rng = random.Random(f"arith-sft-{d.seed}-{seed}")
    while True:
        n = rng.randint(d.min_terms, d.max_terms)
        for _ in range(run):
            while True:
                p = arith_problem([rng.randint(0, d.max_operand) for _ in range(n)])
                if arith_pool(p.problem, d.seed) == "sft":
                    break
            yield p.problem, arith_trace(p.problem)


# ---------------------------------------------------------------------------------- the sums task
def as_question(p: Problem) -> Problem:
    """An arith prompt asked in words: "3+7+5=" -> "What is 3 + 7 + 5?" (same answer)."""
    text = "What is " + " + ".join(p.problem.rstrip("=").split("+")) + "?"
    return Problem(text, text, p.answer)


def sums_split(d) -> tuple[list[Problem], list[Problem]]:
    """(train, held-out) sums prompts: the arith split of the same settings, asked in words."""
    train, held_out = arith_split(d)
    return [as_question(p) for p in train], [as_question(p) for p in held_out]


# ---------------------------------------------------------------------------------- the registry
def _tiny(d) -> tuple[list[Problem], list[Problem]]:
    return tiny_split(d.modulus, d.operands, seed=d.seed)


def _math(d) -> tuple[list[Problem], list[Problem]]:
    train_set = load_problems(d.path, split=d.split, problem_key=d.problem_key, answer_key=d.answer_key)
    if not d.eval_path:
        return train_set, []
    return train_set, load_problems(d.eval_path, split=d.eval_split, limit=d.eval_size)


# name -> (DataConfig -> (train, held-out)); each name is also a `make_verifier` task.
TASKS: dict[str, Callable] = {"tiny": _tiny, "math": _math, "arith": arith_split, "sums": sums_split}
# Tasks whose held-out prompts `popo eval --bench NAME` generates (no file, no Hub).
SYNTHETIC = ("arith", "sums")
# Tasks whose prompts are drawn by the arith settings (data.min_terms, max_terms, max_operand, ...).
ARITH_LIKE = ("arith", "sums")
# Tasks that can write a supervised warm-up set: name -> (DataConfig, warmstart.seed, run) -> examples.
SFT_EXAMPLES: dict[str, Callable] = {"arith": arith_sft_examples}


def eval_normalizer(data) -> str | None:
    """The answer normaliser (a name in popo_core.grading.math_grader.NORMALIZERS) of a task's
    held-out check: a packaged benchmark's own when the math task is evaluated on one
    (`data.eval_path=math500`); None in every other case."""
    if data.task != "math":
        return None
    from popo_core.evaluation.suite import BENCHMARKS

    bench = BENCHMARKS.get(data.eval_path or "")
    return bench.normalize if bench is not None else None


def make_verifier(task: str, **kwargs):
    """`tiny` -> exact match; `arith` -> exact final answer; `math` and `sums` -> math-verify in a
    process pool (popo_core.grading.math_grader)."""
    from popo_core.grading.verifiers import ExactMatch, FinalAnswer

    if task == "tiny":
        return ExactMatch()
    if task == "arith":
        return FinalAnswer()
    if task in ("math", "sums"):
        from popo_core.grading.math_grader import MathVerifier

        return MathVerifier(**kwargs)
    raise ValueError(f"unknown task {task!r} (choose from: {', '.join(TASKS)})")


def load_task(cfg) -> tuple[list[Problem], list[Problem]]:
    """(train problems, held-out problems) for a Config's data section."""
    return TASKS[cfg.data.task](cfg.data)
