"""One-step off-policy rollouts (rollout.max_staleness=1) against the synchronous loop: the arith
testbed, POPO and GRPO, mean `time/step_s` side by side in one run.

For each seed and method a synchronous run and an off-policy run alternate in this process, so
machine noise hits both alike. The synchronous loop runs with trainer.threads=--sync-threads; the
off-policy run gives the trainer and its sampler process --threads each. Step 1 (the sampler's
start) is left out of the means. Printed per method: the synchronous step and its generate and
update parts, the off-policy step, the ratio off-policy / synchronous, and the goal ratio
1.1 x max(generate, update) / step (the target: the overlap hides the shorter phase). With --eval, each run's final policy is evaluated
on the 200 held-out prompts (`popo eval --bench arith --samples N`, after its steps, so it is not in the
step times): the sampled pass@1 per mode with a 95% percentile bootstrap over prompts (of the mean over
seeds), the paired difference off-policy - synchronous, and the greedy accuracy of the run's last step.
Everything measured goes to --results as JSON (docs/testbed/async-rollouts.json by default).

    python benchmarks/async_rollouts.py [--seeds 3] [--steps 100] [--threads 1] [--sampler-threads N] [--sync-threads 1] [--eval] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from popo_core.config import compose
from popo_core.trainer.loop import train

METHODS = ("popo", "grpo")
REPO = Path(__file__).resolve().parents[1]


def held_out(out: Path, samples: int, threads: int) -> dict[str, float]:
    """Correct samples / samples per held-out prompt id, by `popo eval` of the run's final policy."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "popo_cli.main", "eval", "--bench", "arith", "--model", str(out), "--samples",
           str(samples), "--threads", str(threads), "--no-tracking", "--output", str(out / "eval")]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[2:])}")
    correct: dict[str, float] = {}
    for line in (out / "eval" / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        correct[row["id"]] = correct.get(row["id"], 0.0) + bool(row["correct"]) / samples
    return correct


def seed_mean(runs: list[dict]) -> dict[str, float]:
    """Per prompt: the pass@1 averaged over the runs (seeds)."""
    ids = runs[0]["correct"].keys()
    return {i: statistics.mean(r["correct"][i] for r in runs) for i in ids}


def bootstrap(values: list[float], draws: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean, resampling prompts."""
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def run(out: Path, method: str, seed: int, args, staleness: int) -> dict[str, float]:
    threads = args.threads if staleness else args.sync_threads
    overrides = [f"algo={method}", f"trainer.output_dir={out}", f"trainer.seed={seed}", "tracking.enabled=false",
                 f"trainer.max_steps={args.steps}", f"trainer.threads={threads}", f"rollout.max_staleness={staleness}",
                 f"rollout.threads={args.sampler_threads or args.threads}", "trainer.eval_every=0", f"trainer.save_every={args.steps}",
                 *([] if args.eval else ["data.eval_size=1"]), *args.overrides]
    begin = time.perf_counter()
    result = train(compose("arith", overrides))
    wall = time.perf_counter() - begin
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 1 and "time/step_s" in r]
    mean = lambda key: statistics.mean(r[key] for r in steps)  # noqa: E731
    record = {"method": method, "seed": seed, "max_staleness": staleness, "threads": threads,
              "sampler_threads": (args.sampler_threads or args.threads) if staleness else None,
              "step": mean("time/step_s"), "generate": mean("time/generate_s"), "update": mean("time/update_s"),
              "wait": mean("time/wait_s"), "wall": wall, "load_average": os.getloadavg()[0],
              "accuracy": result.final_accuracy if args.eval and result.final_accuracy is not None else float("nan")}
    if args.eval:
        record["correct"] = held_out(out, args.samples, args.sync_threads)
        record["pass@1"] = statistics.mean(record["correct"].values())
    print(json.dumps({k: v for k, v in record.items() if k != "correct"}), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from: " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the trainer and of the sampler (off-policy)")
    parser.add_argument("--sampler-threads", type=int, default=None,
                        help="torch threads of the sampler process (off-policy; default: --threads)")
    parser.add_argument("--sync-threads", type=int, default=1, help="torch threads of the synchronous run")
    parser.add_argument("--eval", action="store_true", help="evaluate the 200 held-out prompts at the end")
    parser.add_argument("--samples", type=int, default=16, help="samples per held-out prompt of the pass@1 (--eval)")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "testbed" / "async-rollouts.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is left out)")
    methods = [m for m in args.methods.split(",") if m]
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"--methods: unknown {unknown[0]!r} (choose from {', '.join(METHODS)})")

    results: dict[tuple[str, int], list[dict]] = {(m, s): [] for m in methods for s in (0, 1)}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for method in methods:
                for staleness in (0, 1):
                    out = Path(tmp) / f"{method}-{seed}-{staleness}"
                    results[method, staleness].append(run(out, method, seed, args, staleness))

    avg = lambda runs, key: statistics.mean(r[key] for r in runs)  # noqa: E731
    print(f"arith preset, {args.steps} steps x {args.seeds} seed(s) per method and mode, runs alternated; "
          f"synchronous: {args.sync_threads} thread(s); off-policy: {args.threads} trainer + "
          f"{args.sampler_threads or args.threads} sampler thread(s); "
          "means over steps 2..N of time/step_s")
    print(f"{'method':<8}{'sync step':>10}{'generate':>10}{'update':>9}{'async step':>11}{'wait':>7}"
          f"{'async/sync':>11}{'goal':>7}{'acc sync':>10}{'acc async':>10}")
    summary = {}
    for method in methods:
        sync, off = results[method, 0], results[method, 1]
        s, o = avg(sync, "step"), avg(off, "step")
        goal = 1.1 * max(avg(sync, "generate"), avg(sync, "update")) / s
        summary[method] = {"sync_step": s, "sync_generate": avg(sync, "generate"), "sync_update": avg(sync, "update"),
                           "async_step": o, "async_wait": avg(off, "wait"), "ratio": o / s, "goal_ratio": goal}
        print(f"{method:<8}{s:>10.2f}{avg(sync, 'generate'):>10.2f}{avg(sync, 'update'):>9.2f}{o:>11.2f}"
              f"{avg(off, 'wait'):>7.2f}{o / s:>10.2f}x{goal:>6.2f}x{avg(sync, 'accuracy'):>10.3f}{avg(off, 'accuracy'):>10.3f}")
    print("async/sync < 1: the off-policy loop is faster; goal: 1.1 x max(generate, update) of the synchronous step, "
          "as a ratio to it. Accuracy: greedy, held-out, final step (nan without --eval).")
    if args.eval:
        print(f"held-out sampled pass@1 ({args.samples} samples per prompt, 200 prompts; mean over seeds; "
              "95% percentile bootstrap over prompts):")
        for method in methods:
            sync, off = seed_mean(results[method, 0]), seed_mean(results[method, 1])
            diff = [off[i] - sync[i] for i in sync]
            rows = {"sync": list(sync.values()), "async": list(off.values())}
            for mode, values in rows.items():
                low, high = bootstrap(values)
                summary[method][f"pass@1_{mode}"] = {"mean": statistics.mean(values), "ci95": [low, high],
                                                     "seeds": [r["pass@1"] for r in results[method, mode == "async"]]}
            low, high = bootstrap(diff)
            summary[method]["pass@1_async_minus_sync"] = {"mean": statistics.mean(diff), "ci95": [low, high]}
            p = summary[method]
            print(f"  {method}: sync {p['pass@1_sync']['mean']:.3f} [{p['pass@1_sync']['ci95'][0]:.3f}, "
                  f"{p['pass@1_sync']['ci95'][1]:.3f}], off-policy {p['pass@1_async']['mean']:.3f} "
                  f"[{p['pass@1_async']['ci95'][0]:.3f}, {p['pass@1_async']['ci95'][1]:.3f}], difference "
                  f"{statistics.mean(diff):+.3f} [{low:+.3f}, {high:+.3f}]")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    runs = [{k: v for k, v in r.items() if k != "correct"} for rs in results.values() for r in rs]
    setup = {"steps": args.steps, "seeds": args.seeds, "threads": args.threads, "sync_threads": args.sync_threads,
             "sampler_threads": args.sampler_threads or args.threads, "load_average_end": os.getloadavg()[0],
             "samples": args.samples if args.eval else None, "overrides": args.overrides}
    args.results.write_text(json.dumps({"setup": setup, "summary": summary, "runs": runs}, indent=1) + "\n")
    print(f"written: {args.results}")

if __name__ == "__main__":
    main()
