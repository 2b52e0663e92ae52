"""The benchmark pass: generate for a list of problems, grade, and summarise.

`popo train` calls `evaluate_problems` for its held-out checks; `popo eval` builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from popo_core.data import Problem, render
from popo_core.rewards import Grade, Verifier


@dataclass
class EvalReport:
    problems: list[Problem]
    responses: list[list[str]]  # per problem, one per sample
    grades: list[list[Grade]]
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]


def evaluate_problems(
    engine,
    tokenizer,
    problems: Sequence[Problem],
    verifier: Verifier,
    *,
    template: str = "plain",
    samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    greedy: bool = True,
    batch_prompts: int = 64,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Generate `samples` responses per problem (greedy by default) and grade them."""
    responses: list[list[str]] = []
    for start in range(0, len(problems), batch_prompts):
        chunk = problems[start : start + batch_prompts]
        prompt_ids = [tokenizer(render(template, p.problem), add_special_tokens=False).input_ids for p in chunk]
        out = engine.generate(
            prompt_ids, n=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy
        )
        responses.extend(out.texts[i * samples : (i + 1) * samples] for i in range(len(chunk)))
        if progress:
            progress(len(chunk))
    return grade_responses(problems, responses, verifier)


def grade_responses(problems: Sequence[Problem], responses: Sequence[Sequence[str]], verifier: Verifier) -> EvalReport:
    flat = [r for rs in responses for r in rs]
    golds = [p.answer for p, rs in zip(problems, responses) for _ in rs]
    grades_flat = verifier(flat, golds)
    grades, i = [], 0
    for rs in responses:
        grades.append(grades_flat[i : i + len(rs)])
        i += len(rs)
    correct = [g.correct for gs in grades for g in gs]
    metrics = {"accuracy": sum(correct) / max(len(correct), 1)}
    return EvalReport(list(problems), [list(r) for r in responses], grades, metrics)
