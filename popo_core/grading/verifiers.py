"""Verifiers: reward functions as plain callables over (responses, gold answers).

A verifier returns one Grade per response; reward = float(grade.correct). A timeout or a crash
while grading is reward 0 and is counted (status), never a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

STATUSES = ("ok", "unparsed", "timeout", "error")


@dataclass(frozen=True)
class Grade:
    correct: bool
    extracted: str | None = None
    status: str = "ok"  # ok | unparsed (no answer found) | timeout | error


class Verifier(Protocol):
    def __call__(self, responses: Sequence[str], golds: Sequence[str]) -> list[Grade]: ...


class ExactMatch:
    """The tiny task's verifier: the completion, stripped of whitespace, equals the answer."""

    def __call__(self, responses: Sequence[str], golds: Sequence[str]) -> list[Grade]:
        out = []
        for response, gold in zip(responses, golds, strict=True):
            text = response.strip()
            out.append(Grade(text == gold.strip(), text or None, "ok" if text else "unparsed"))
        return out

    def close(self) -> None:
        pass


class FinalAnswer:
    """The arith task's verifier: the final answer of a worked trace, exactly.

    The final answer is the text after the completion's last "=" (the whole completion if it has
    none), stripped of whitespace; "3+7=10,10+5=15" answers 15. Only the final answer is graded,
    not the partial sums before it. `normalize` and `progress` (which popo eval passes to every
    verifier) are accepted and unused.
    """

    def __call__(self, responses: Sequence[str], golds: Sequence[str], *, normalize=None, progress=None) -> list[Grade]:
        out = []
        for response, gold in zip(responses, golds, strict=True):
            text = response.rpartition("=")[2].strip()
            out.append(Grade(text == gold.strip(), text or None, "ok" if text else "unparsed"))
        if progress:
            progress(len(out))
        return out

    def close(self) -> None:
        pass


def grade_counts(grades: Sequence[Grade]) -> dict[str, int]:
    counts = {s: 0 for s in STATUSES}
    for g in grades:
        counts[g.status] += 1
    return counts
