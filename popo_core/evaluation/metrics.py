"""The benchmark pass: generate for a list of problems, grade, and summarise.

`popo train` calls `evaluate_problems` for its held-out checks; `popo eval` builds on it. The
metrics are pure functions of per-problem correctness, tested against independent computations.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

from popo_core.data.datasets import Problem, prompt_ids
from popo_core.grading.verifiers import Grade, Verifier, grade_counts

Z95 = 1.959963984540054  # two-sided 95% normal quantile


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
    normalize: str | None = None,
    grade_progress: Callable[[int], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> EvalReport:
    """Generate `samples` responses per problem (greedy by default) and grade them. `seeds` (one
    per problem) fix each problem's draws, whatever the batching; None: the engine's own."""
    responses: list[list[str]] = []
    for start in range(0, len(problems), batch_prompts):
        chunk = problems[start : start + batch_prompts]
        keys = {"seeds": list(seeds[start : start + batch_prompts])} if seeds is not None else {}
        out = engine.generate(
            prompt_ids(tokenizer, template, chunk), n=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, greedy=greedy,
            **keys,
        )
        responses.extend(out.texts[i * samples : (i + 1) * samples] for i in range(len(chunk)))
        if progress:
            progress(len(chunk))
    return grade_responses(problems, responses, verifier, normalize=normalize, progress=grade_progress)


def grade_responses(
    problems: Sequence[Problem],
    responses: Sequence[Sequence[str]],
    verifier: Verifier,
    *,
    normalize: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalReport:
    """Grade responses[i] (any number of samples) against problems[i].answer.

    `normalize` and `progress` are passed to verifiers that take them (MathVerifier)."""
    flat = [r for rs in responses for r in rs]
    golds = [p.answer for p, rs in zip(problems, responses, strict=True) for _ in rs]
    extra = {k: v for k, v in (("normalize", normalize), ("progress", progress)) if v is not None}
    grades_flat = verifier(flat, golds, **extra)
    grades, i = [], 0
    for rs in responses:
        grades.append(grades_flat[i : i + len(rs)])
        i += len(rs)
    per_problem = [sum(g.correct for g in gs) / len(gs) for gs in grades if gs]
    metrics = {"accuracy": sum(per_problem) / max(len(per_problem), 1)}
    return EvalReport(list(problems), [list(r) for r in responses], grades, metrics)


# --------------------------------------------------------------------------------- the metrics
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def k_values(samples: int) -> list[int]:
    """1, 2, 4, ... up to `samples`, and `samples` itself."""
    ks = [1 << j for j in range(samples.bit_length()) if 1 << j <= samples]
    return ks if ks[-1] == samples else ks + [samples]


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """maj@K for one problem: is the most frequent answer correct?

    Correct answers count as one answer (each equals the gold, so they equal each other); a wrong
    answer is identified by its extracted text with whitespace removed; unparsed answers (None) do
    not vote. A tie between the top answers counts as the chance that a uniform tie-break picks a
    correct one (1/2 for a correct answer tied with one wrong answer).
    """
    votes: Counter[str] = Counter()
    for answer, ok in zip(answers, correct, strict=True):
        if ok:
            votes["\0correct"] += 1
        elif answer is not None:
            votes["".join(answer.split())] += 1
    if not votes:
        return 0.0
    top = max(votes.values())
    leaders = [key for key, count in votes.items() if count == top]
    return float("\0correct" in leaders) / len(leaders)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: Sequence[float], *, rounds: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling `values` (one per problem)."""
    import numpy as np

    if len(values) == 0:
        return (0.0, 1.0)
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(rounds, len(data)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return (float(lo), float(hi))


@dataclass
class BenchmarkSummary:
    bench: str
    n: int  # problems the metrics are over: every one (after --limit), or with answered_only the answered ones
    missing: int  # benchmark problems with no response
    samples: int  # K: responses per problem (the most any problem has; with answered_only the fewest)
    accuracy: float  # mean over problems of the fraction of correct samples (pass@1)
    accuracy_ci: tuple[float, float]
    ci_method: str  # wilson (one sample per problem) | bootstrap (over problems)
    pass_at_k: dict[int, float]
    maj_at_k: float
    graded: int  # responses math-verify compared
    unparsed: int
    timeouts: int
    errors: int
    answered_only: bool = False  # missing problems left out of the metrics rather than graded wrong

    def to_json(self) -> dict:
        return {
            "bench": self.bench,
            "n": self.n,
            "missing": self.missing,
            "answered_only": self.answered_only,
            "samples": self.samples,
            "accuracy": self.accuracy,
            "accuracy_ci": list(self.accuracy_ci),
            "accuracy_ci_method": self.ci_method,
            "pass@k": {str(k): v for k, v in self.pass_at_k.items()},
            f"maj@{self.samples}": self.maj_at_k,
            "graded": self.graded,
            "unparsed": self.unparsed,
            "timeouts": self.timeouts,
            "errors": self.errors,
        }

    def mlflow_metrics(self) -> dict[str, float]:
        """MLflow metric names cannot hold `@`: <bench>/pass_at_<k>, <bench>/maj_at_<K>."""
        b = self.bench
        out = {f"{b}/accuracy": self.accuracy, f"{b}/accuracy_ci_low": self.accuracy_ci[0],
               f"{b}/accuracy_ci_high": self.accuracy_ci[1]}
        out |= {f"{b}/pass_at_{k}": v for k, v in self.pass_at_k.items()}
        out |= {f"{b}/maj_at_{self.samples}": self.maj_at_k, f"{b}/n": self.n, f"{b}/missing": self.missing,
                f"{b}/unparsed": self.unparsed, f"{b}/timeouts": self.timeouts, f"{b}/errors": self.errors}
        return out


def summarize(report: EvalReport, bench: str = "", *, missing: int = 0, answered_only: bool = False,
              seed: int = 0) -> BenchmarkSummary:
    """The benchmark's metrics from graded responses; `missing` more problems have none (and are not in `report`).

    By default the metrics are over every problem: K is the most responses any problem has, and an
    absent sample (all K of a missing problem's, the rest of a problem with fewer than K) counts as an
    unparsed response would: wrong, and no vote in maj@K. With `answered_only` they are over the
    answered problems only, each over the responses it has (K: the fewest).
    """
    grades = [gs for gs in report.grades if gs]
    counts = grade_counts([g for gs in grades for g in gs])
    # per problem: (correct per sample, extracted answer per sample)
    rows = [([g.correct for g in gs], [g.extracted for g in gs]) for gs in grades]
    if answered_only:
        samples = min((len(c) for c, _ in rows), default=0)
    else:
        samples = max((len(c) for c, _ in rows), default=0)
        rows = [(c + [False] * (samples - len(c)), e + [None] * (samples - len(e))) for c, e in rows]
        rows += [([False] * samples, [None] * samples) for _ in range(missing)]
    n = len(rows)
    per_problem = [sum(c) / len(c) if c else 0.0 for c, _ in rows]
    accuracy = sum(per_problem) / n if n else 0.0
    if all(p in (0.0, 1.0) for p in per_problem):
        # One sample per problem, or every problem all right or all wrong: a binomial over problems
        # (where a bootstrap would collapse to a point at 0% or 100%).
        ci, method = wilson_interval(sum(int(p) for p in per_problem), n), "wilson"
    else:
        ci, method = bootstrap_interval(per_problem, seed=seed), "bootstrap"
    ks = k_values(samples) if samples else []
    passes = {k: sum(pass_at_k(len(c), sum(c), k) for c, _ in rows) / n for k in ks}
    maj = sum(majority_correct(e, c) for c, e in rows) / n if n else 0.0
    return BenchmarkSummary(
        bench=bench, n=n, missing=missing, samples=samples, accuracy=accuracy, accuracy_ci=ci, ci_method=method,
        pass_at_k=passes, maj_at_k=maj, graded=counts["ok"], unparsed=counts["unparsed"], timeouts=counts["timeout"],
        errors=counts["error"], answered_only=answered_only,
    )
