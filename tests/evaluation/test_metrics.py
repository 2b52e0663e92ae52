"""pass@k, maj@K and the confidence intervals against independent computations."""

import itertools
import math
import random
from fractions import Fraction

import pytest

from popo_core.data.datasets import Problem
from popo_core.evaluation.metrics import (
    EvalReport,
    bootstrap_interval,
    k_values,
    majority_correct,
    pass_at_k,
    summarize,
    wilson_interval,
)
from popo_core.grading.verifiers import Grade


# --------------------------------------------------------------------------------------- pass@k
def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The fraction of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_matches_exact_binomials_for_large_n():
    for n, c, k in [(200, 3, 16), (256, 17, 64), (1000, 1, 1), (64, 0, 8), (64, 60, 8)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in [(4, 5, 1), (4, 1, 5), (4, 1, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(16) == [1, 2, 4, 8, 16]


# ---------------------------------------------------------------------------------------- maj@K
def brute_force_majority(answers, correct) -> float:
    """Every way to break ties, enumerated: the expected correctness of the winner."""
    keys = ["<correct>" if ok else "".join(a.split()) for a, ok in zip(answers, correct) if ok or a is not None]
    if not keys:
        return 0.0
    counts = {k: keys.count(k) for k in keys}
    top = max(counts.values())
    winners = sorted(k for k, v in counts.items() if v == top)
    return sum(w == "<correct>" for w in winners) / len(winners)


def test_majority_vote_cases():
    assert majority_correct(["3", "3", "5"], [False, False, True]) == 0.0
    assert majority_correct(["5", "5", "3"], [True, True, False]) == 1.0
    assert majority_correct(["1/2", "3"], [True, False]) == 0.5  # a tie, broken uniformly
    assert majority_correct(["1/2", "0.5", "3", "4"], [True, True, False, False]) == 1.0  # equivalent answers agree
    assert majority_correct(["3", "3 "], [False, False]) == 0.0
    assert majority_correct([None, None, "1"], [False, False, True]) == 1.0  # unparsed answers do not vote
    assert majority_correct([None, None], [False, False]) == 0.0


def test_majority_vote_matches_enumeration_on_random_cases():
    rng = random.Random(0)
    for _ in range(500):
        k = rng.randint(1, 8)
        correct = [rng.random() < 0.4 for _ in range(k)]
        answers = [None if rng.random() < 0.2 and not ok else rng.choice(["1", "2", "3"]) for ok in correct]
        assert majority_correct(answers, correct) == pytest.approx(brute_force_majority(answers, correct))


# ---------------------------------------------------------------------------------- intervals
def score_test_bounds(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Invert the score test by bisection: the p where |p_hat - p| = z * sqrt(p (1 - p) / n)."""
    p_hat = successes / n

    def gap(p):
        return abs(p_hat - p) - z * math.sqrt(p * (1 - p) / n)

    def root(lo, hi):  # gap(lo) and gap(hi) differ in sign
        for _ in range(200):
            mid = (lo + hi) / 2
            if (gap(lo) > 0) == (gap(mid) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = 0.0 if successes == 0 else root(0.0, p_hat)
    upper = 1.0 if successes == n else root(p_hat, 1.0)
    return lower, upper


@pytest.mark.parametrize("successes, n", [(11, 30), (9, 30), (0, 30), (30, 30), (1, 1), (250, 500), (3, 1319)])
def test_wilson_interval_inverts_the_score_test(successes, n):
    lo, hi = wilson_interval(successes, n)
    ref_lo, ref_hi = score_test_bounds(successes, n)
    assert lo == pytest.approx(ref_lo, abs=1e-9)
    assert hi == pytest.approx(ref_hi, abs=1e-9)


def test_wilson_on_the_papers_aime_numbers():
    # 11/30 (36.67%) vs 9/30 (30.00%): the intervals overlap widely.
    a, b = wilson_interval(11, 30), wilson_interval(9, 30)
    assert a[0] < 9 / 30 and b[1] > 11 / 30


def test_bootstrap_interval_against_the_normal_approximation():
    rng = random.Random(1)
    values = [rng.random() for _ in range(400)]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    half = 1.959963984540054 * sd / math.sqrt(len(values))
    lo, hi = bootstrap_interval(values, rounds=4000)
    assert lo == pytest.approx(mean - half, abs=0.006)
    assert hi == pytest.approx(mean + half, abs=0.006)
    assert bootstrap_interval(values, rounds=500, seed=3) == bootstrap_interval(values, rounds=500, seed=3)
    assert bootstrap_interval([0.25] * 10) == pytest.approx((0.25, 0.25))


# ------------------------------------------------------------------------------------ summarize
def _report(outcomes: list[list[bool]], extracted: list[list[str | None]] | None = None) -> EvalReport:
    problems = [Problem(str(i), "q", "1") for i in range(len(outcomes))]
    extracted = extracted or [["1" if ok else "0" for ok in row] for row in outcomes]
    grades = [[Grade(ok, e, "ok" if e is not None else "unparsed") for ok, e in zip(row, ex)] for row, ex in zip(outcomes, extracted)]
    return EvalReport(problems, [["r"] * len(row) for row in outcomes], grades)


def test_summarize_greedy_uses_wilson():
    s = summarize(_report([[True], [False], [True], [True]]), "b")
    assert (s.n, s.missing, s.samples, s.ci_method) == (4, 0, 1, "wilson")
    assert s.accuracy == 0.75 and s.pass_at_k == {1: 0.75} and s.maj_at_k == 0.75
    assert s.accuracy_ci == pytest.approx(wilson_interval(3, 4))
    assert s.to_json()["maj@1"] == 0.75 and s.to_json()["pass@k"] == {"1": 0.75}


def test_missing_problems_are_wrong_unless_answered_only():
    report = _report([[True], [False], [True], [True]])
    s = summarize(report, "b", missing=2)  # 3 right of 6 problems
    assert (s.n, s.missing, s.answered_only) == (6, 2, False)
    assert s.accuracy == 0.5 and s.pass_at_k == {1: 0.5} and s.maj_at_k == 0.5
    assert s.accuracy_ci == pytest.approx(wilson_interval(3, 6))
    assert s.graded == 4  # the counts are of responses, not of problems
    only = summarize(report, "b", missing=2, answered_only=True)  # 3 right of the 4 answered
    assert (only.n, only.missing, only.accuracy, only.maj_at_k) == (4, 2, 0.75, 0.75)
    assert only.to_json()["answered_only"] is True and s.to_json()["answered_only"] is False
    assert s.mlflow_metrics()["b/missing"] == 2


def test_absent_samples_are_wrong_and_do_not_vote():
    """K = 4 (the most of any problem); a problem with fewer has its absent samples graded wrong."""
    outcomes = [[True] * 4, [True, False], [True], [False, False, True, True]]
    extracted = [["1"] * 4, ["1", "0"], ["1"], ["0", "0", "1", "1"]]
    s = summarize(_report(outcomes, extracted), "b", missing=1, seed=0)
    padded = [row + [False] * (4 - len(row)) for row in outcomes] + [[False] * 4]  # the missing problem
    assert (s.n, s.samples) == (5, 4)
    assert s.accuracy == pytest.approx(sum(sum(row) / 4 for row in padded) / 5)
    for k in (1, 2, 4):
        assert s.pass_at_k[k] == pytest.approx(sum(brute_force_pass_at_k(row, k) for row in padded) / 5)
    # majority: 1; one right and one wrong vote tie (1/2); the single vote (1); a tie (1/2); none (0)
    assert s.maj_at_k == pytest.approx((1 + 0.5 + 1 + 0.5 + 0) / 5)
    assert s.graded == 11
    only = summarize(_report(outcomes, extracted), "b", missing=1, answered_only=True)
    assert (only.n, only.samples) == (4, 1)  # K: the fewest, each problem over the samples it has
    assert only.accuracy == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)


def test_nothing_answered_scores_zero():
    s = summarize(_report([]), "b", missing=3)
    assert (s.n, s.samples, s.accuracy, s.maj_at_k, s.pass_at_k) == (3, 0, 0.0, 0.0, {})


def test_summarize_samples():
    outcomes = [[True, False, False, False], [True, True, True, False], [False] * 4, [True] * 4]
    extracted = [["1", "7", "7", None], ["1", "1", "1", "2"], ["3", "4", None, None], ["1"] * 4]
    s = summarize(_report(outcomes, extracted), "b", seed=0)
    assert s.samples == 4 and s.ci_method == "bootstrap"
    assert s.accuracy == pytest.approx((0.25 + 0.75 + 0 + 1) / 4)
    for k in (1, 2, 4):
        expected = sum(brute_force_pass_at_k(row, k) for row in outcomes) / 4
        assert s.pass_at_k[k] == pytest.approx(expected)
    # problem 0: "7" twice beats the single correct; 1: correct; 2: tie of two wrong; 3: correct
    assert s.maj_at_k == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert s.unparsed == 3 and s.graded == 13 and s.timeouts == 0
    metrics = s.mlflow_metrics()
    assert {"b/accuracy", "b/pass_at_1", "b/pass_at_2", "b/pass_at_4", "b/maj_at_4"} <= set(metrics)
    assert not any("@" in name for name in metrics)


def test_summarize_all_or_nothing_samples_fall_back_to_wilson_over_problems():
    s = summarize(_report([[False] * 4] * 8), "b")
    assert s.ci_method == "wilson" and s.accuracy_ci == pytest.approx(wilson_interval(0, 8))
