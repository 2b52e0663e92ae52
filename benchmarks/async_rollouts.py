"""One-step off-policy rollouts (rollout.max_staleness=1) against the synchronous loop: the arith
testbed, POPO and GRPO, mean `time/step_s` side by side in one run.

For each seed and method a synchronous run and an off-policy run alternate in this process, so
machine noise hits both alike. The synchronous loop runs with trainer.threads=--sync-threads; the
off-policy run gives the trainer and its sampler process --threads each. Step 1 (the sampler's
start) is left out of the means. Printed per method: the synchronous step and its generate and
update parts, the off-policy step, the ratio off-policy / synchronous, and the goal ratio
1.1 x max(generate, update) / step of issue 21; with --eval also the final greedy held-out accuracy.

    python benchmarks/async_rollouts.py [--seeds 3] [--steps 100] [--threads 1] [--sync-threads 1] [--eval] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from popo_core.config import compose
from popo_core.trainer.loop import train

METHODS = ("popo", "grpo")


def run(out: Path, method: str, seed: int, args, staleness: int) -> dict[str, float]:
    threads = args.threads if staleness else args.sync_threads
    overrides = [f"algo={method}", f"trainer.output_dir={out}", f"trainer.seed={seed}", "tracking.enabled=false",
                 f"trainer.max_steps={args.steps}", f"trainer.threads={threads}", f"rollout.max_staleness={staleness}",
                 f"rollout.threads={args.threads}", "trainer.eval_every=0", f"trainer.save_every={args.steps}",
                 *([] if args.eval else ["data.eval_size=1"]), *args.overrides]
    begin = time.perf_counter()
    result = train(compose("arith", overrides))
    wall = time.perf_counter() - begin
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 1]
    mean = lambda key: statistics.mean(r[key] for r in steps)  # noqa: E731
    return {"step": mean("time/step_s"), "generate": mean("time/generate_s"), "update": mean("time/update_s"),
            "wait": mean("time/wait_s"), "wall": wall,
            "accuracy": result.final_accuracy if args.eval and result.final_accuracy is not None else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the sampler (off-policy)")
    parser.add_argument("--sync-threads", type=int, default=1, help="torch threads of the synchronous run")
    parser.add_argument("--eval", action="store_true", help="evaluate the 200 held-out prompts at the end")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is left out)")

    results: dict[tuple[str, int], list[dict]] = {(m, s): [] for m in METHODS for s in (0, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for method in METHODS:
                for staleness in (0, 1):
                    out = Path(tmp) / f"{method}-{seed}-{staleness}"
                    results[method, staleness].append(run(out, method, seed, args, staleness))

    avg = lambda runs, key: statistics.mean(r[key] for r in runs)  # noqa: E731
    print(f"arith preset, {args.steps} steps x {args.seeds} seed(s) per method and mode, runs alternated; "
          f"synchronous: {args.sync_threads} thread(s); off-policy: {args.threads} + {args.threads} thread(s); "
          "means over steps 2..N of time/step_s")
    print(f"{'method':<8}{'sync step':>10}{'generate':>10}{'update':>9}{'async step':>11}{'wait':>7}"
          f"{'async/sync':>11}{'goal':>7}{'acc sync':>10}{'acc async':>10}")
    for method in METHODS:
        sync, off = results[method, 0], results[method, 1]
        s, o = avg(sync, "step"), avg(off, "step")
        goal = 1.1 * max(avg(sync, "generate"), avg(sync, "update")) / s
        print(f"{method:<8}{s:>10.2f}{avg(sync, 'generate'):>10.2f}{avg(sync, 'update'):>9.2f}{o:>11.2f}"
              f"{avg(off, 'wait'):>7.2f}{o / s:>10.2f}x{goal:>6.2f}x{avg(sync, 'accuracy'):>10.3f}{avg(off, 'accuracy'):>10.3f}")
    print("async/sync < 1: the off-policy loop is faster; goal: 1.1 x max(generate, update) of the synchronous step, "
          "as a ratio to it (issue 21). Accuracy: greedy, held-out, final step (nan without --eval).")


if __name__ == "__main__":
    main()
