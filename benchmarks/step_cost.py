"""POPO vs GRPO on the tiny preset: time per step and completion tokens through forward/backward.

Whole runs of the two methods alternate in one process (POPO seed 0, GRPO seed 0, POPO seed 1,
...), so machine noise hits both alike; the per-step times come from each run's metrics.jsonl.
Prints ratios GRPO / POPO (> 1: POPO cheaper).

    python benchmarks/step_cost.py [--seeds 2] [--steps 150] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from popo_core.config import compose
from popo_core.trainer.loop import train

METHODS = ("popo", "grpo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    rows: dict[str, list[list[dict]]] = {name: [] for name in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in METHODS:
                out = Path(tmp) / f"{name}-{seed}"
                train(compose(args.preset, [f"algo={name}", f"trainer.output_dir={out}", f"trainer.seed={seed}",
                                            "tracking.enabled=false", f"trainer.max_steps={args.steps}", *args.overrides]))
                lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                rows[name].append([r for r in lines if r["step"] > 0])

    def summary(name: str, lo: int, hi: int) -> dict[str, float]:
        part = [r for run in rows[name] for r in run[lo:hi]]
        return {
            "step_s": statistics.median(r["time/step_s"] for r in part),
            "update_s": statistics.median(r["time/update_s"] for r in part),
            "tokens": statistics.mean(r["train/forward_tokens"] for r in part),
            "reward": statistics.mean(r["reward/mean"] for r in part),
        }

    n = args.steps
    print(f"{args.preset} preset, {n} steps x {args.seeds} seed(s) per method, runs alternated; "
          "ratios are GRPO / POPO (> 1: POPO cheaper); medians over steps")
    print(f"{'phase':<16}{'reward popo':>12}{'reward grpo':>12}{'step time':>11}{'update time':>13}{'fwd/bwd tokens':>16}")
    for label, lo, hi in (("all steps", 0, n), ("first half", 0, n // 2), ("second half", n // 2, n)):
        p, g = summary("popo", lo, hi), summary("grpo", lo, hi)
        print(f"{label:<16}{p['reward']:>12.3f}{g['reward']:>12.3f}{g['step_s'] / p['step_s']:>10.2f}x"
              f"{g['update_s'] / p['update_s']:>12.2f}x{g['tokens'] / max(p['tokens'], 1e-9):>15.2f}x")
    print("POPO sends only positive completions through forward/backward, so its token ratio tracks 1 / reward;"
          " rollout and grading cost the same for both.")


if __name__ == "__main__":
    main()
