"""POPO vs GRPO on the tiny preset: time per step and completion tokens through forward/backward.

Both trainers are built side by side in one process and their steps are interleaved
(POPO step k, GRPO step k, POPO step k+1, ...), so machine noise hits both alike. Prints ratios.

    python benchmarks/step_cost.py [--steps 150] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from popo_core.config import compose
from popo_core.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        common = ["tracking.enabled=false", f"trainer.max_steps={args.steps}", *args.overrides]
        trainers = {
            name: Trainer(compose(args.preset, [f"algo={name}", f"trainer.output_dir={tmp}/{name}", *common]))
            for name in ("popo", "grpo")
        }
        for t in trainers.values():
            t.setup()
        rows = {name: [] for name in trainers}
        for step in range(1, args.steps + 1):
            for name, t in trainers.items():
                start = time.perf_counter()
                m = t.step(step)
                m["wall_s"] = time.perf_counter() - start
                rows[name].append(m)

    def summary(name: str, lo: int, hi: int) -> dict[str, float]:
        part = rows[name][lo:hi]
        return {
            "step_s": statistics.median(r["wall_s"] for r in part),
            "update_s": statistics.median(r["time/update_s"] for r in part),
            "tokens": statistics.mean(r["train/forward_tokens"] for r in part),
            "reward": statistics.mean(r["reward/mean"] for r in part),
        }

    n = args.steps
    print(f"tiny preset, {n} interleaved steps each; ratios are GRPO / POPO (> 1: POPO cheaper)")
    print(f"{'phase':<16}{'reward popo':>12}{'reward grpo':>12}{'step time':>11}{'update time':>13}{'fwd/bwd tokens':>16}")
    for label, lo, hi in (("all steps", 0, n), ("first half", 0, n // 2), ("second half", n // 2, n)):
        p, g = summary("popo", lo, hi), summary("grpo", lo, hi)
        print(f"{label:<16}{p['reward']:>12.3f}{g['reward']:>12.3f}{g['step_s'] / p['step_s']:>10.2f}x"
              f"{g['update_s'] / p['update_s']:>12.2f}x{g['tokens'] / max(p['tokens'], 1e-9):>15.2f}x")
    print("POPO sends only positive completions through forward/backward, so its token ratio tracks 1 / reward;"
          " rollout and grading cost the same for both.")


if __name__ == "__main__":
    main()
