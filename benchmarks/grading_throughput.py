"""Grading throughput: math-verify in popo's process pool vs one answer at a time in the main thread.

Both graders see the same answers in the same run: for every math500 problem its gold answer in a
box and the same answer with every integer off by one (half right, half wrong). The in-process
integer shortcut is off, so every answer goes through math-verify. Caches are cold in each timed
pass: the main thread's math-verify/sympy caches are cleared first, and each pool is new (its
workers fork from the warmed-up forkserver, which has seen none of these answers). The passes
alternate, `--repeats` times; the median of each counts. Pool start-up is timed separately. The
verdicts of the two graders must agree.

    .venv/bin/python benchmarks/grading_throughput.py [--workers 4] [--repeats 3] [--limit 500]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from popo_core.evaluation import suite as bm  # noqa: E402
from popo_core.grading.math_grader import DEFAULT_WORKERS, MathVerifier, warm_up  # noqa: E402


def answer_pairs(data: str | None, limit: int | None) -> tuple[list[str], list[str]]:
    problems = bm.load(bm.BENCHMARKS["math500"], data)[:limit]
    responses, golds = [], []
    for p in problems:
        off = re.sub(r"\d+", lambda m: str(int(m.group()) + 1), p.answer)
        responses += [f"The answer is \\boxed{{{p.answer}}}.", f"The answer is \\boxed{{{off}}}."]
        golds += [p.answer, p.answer]
    return responses, golds


def clear_caches() -> None:
    """Forget parsed expressions, so the main thread starts as cold as a fresh pool worker."""
    from math_verify import parser
    from sympy.core.cache import clear_cache

    parser.parse_latex_cached.cache_clear()
    parser.parse_expr_cached.cache_clear()
    clear_cache()


def timed(verifier: MathVerifier, responses: list[str], golds: list[str]) -> tuple[float, list]:
    start = time.perf_counter()
    grades = verifier(responses, golds)
    return time.perf_counter() - start, grades


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="math500 JSONL (default: the copy packaged with popo, else the Hub)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="first N problems (2N answers)")
    parser.add_argument("--timeout", type=int, default=5)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()

    responses, golds = answer_pairs(args.data, args.limit)
    load_before = os.getloadavg()[0]
    warm_up()  # the main thread gets the same warm-up as the pool's forkserver
    seconds: dict[str, list[float]] = {"main thread": [], "pool": []}
    startups, verdicts = [], {}
    for _ in range(args.repeats):
        clear_caches()
        with MathVerifier(workers=0, timeout=args.timeout, fast_path=False) as inline:
            elapsed, grades = timed(inline, responses, golds)
        seconds["main thread"].append(elapsed)
        verdicts["main thread"] = [(g.correct, g.status) for g in grades]
        with MathVerifier(workers=args.workers, timeout=args.timeout, fast_path=False) as pool:
            startups.append(timed(pool, ["\\boxed{1}"] * args.workers, ["2"] * args.workers)[0])
            elapsed, grades = timed(pool, responses, golds)
        seconds["pool"].append(elapsed)
        verdicts["pool"] = [(g.correct, g.status) for g in grades]
    agree = sum(a == b for a, b in zip(verdicts["main thread"], verdicts["pool"]))
    rate = {name: len(responses) / statistics.median(times) for name, times in seconds.items()}
    result = {
        "answers": len(responses),
        "correct": sum(c for c, _ in verdicts["pool"]),
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "pool_startup_s": statistics.median(startups),
        "repeats": args.repeats,
        "main_thread_answers_per_s": rate["main thread"],
        "pool_answers_per_s": rate["pool"],
        "ratio": rate["pool"] / rate["main thread"],
        "verdicts_agree": f"{agree}/{len(responses)}",
        "timeout_s": args.timeout,
        # other processes share the CPUs: the 1-minute load average before and after the run
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(f"{len(responses)} math500 answers (gold and off by one), {os.cpu_count()} CPUs "
          f"(load average {result['load_average'][0]} -> {result['load_average'][1]}), median of {args.repeats}")
    print(f"  main thread, one by one : {rate['main thread']:8.1f} answers/s")
    print(f"  process pool, {args.workers} workers : {rate['pool']:8.1f} answers/s  (start-up {result['pool_startup_s']:.2f} s, not counted)")
    print(f"  ratio pool / main thread: {result['ratio']:.2f}x; verdicts agree on {agree}/{len(responses)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":  # the pool's forkserver re-imports this module in its workers
    main()
