"""vLLM vs HF rollouts on the tiny preset: step time as a ratio, and what each run learned.

Whole runs with the two engines alternate in one process (HF seed 0, vLLM seed 0, HF seed 1, ...),
so machine noise hits both alike and every vLLM engine after the first starts in a process that
already ran one (as in a sweep); the per-step times come from each run's metrics.jsonl. Prints
ratios vLLM / HF (< 1: vLLM faster) and each run's final held-out accuracy. Needs the vLLM
environment (make setup-vllm):

    .venv-vllm/bin/python benchmarks/vllm_vs_hf.py [--seeds 1] [--steps 150] [key=value ...]
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

ENGINES = ("hf", "vllm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    rows: dict[str, list[list[dict]]] = {name: [] for name in ENGINES}
    accuracy: dict[str, list[float]] = {name: [] for name in ENGINES}
    wall: dict[str, list[float]] = {name: [] for name in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in ENGINES:
                out = Path(tmp) / f"{name}-{seed}"
                start = time.perf_counter()
                result = train(compose(args.preset, [f"rollout.engine={name}", f"trainer.output_dir={out}", f"trainer.seed={seed}",
                                                     "tracking.enabled=false", f"trainer.max_steps={args.steps}", *args.overrides]))
                wall[name].append(time.perf_counter() - start)
                accuracy[name].append(result.final_accuracy)
                lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                rows[name].append([r for r in lines if r["step"] > 0])

    def median(name: str, key: str, lo: int, hi: int) -> float:
        return statistics.median(r[key] for run in rows[name] for r in run[lo:hi])

    n = args.steps
    print(f"{args.preset} preset, {n} steps x {args.seeds} seed(s) per engine, runs alternated; "
          "ratios are vLLM / HF (< 1: vLLM faster); medians over steps")
    print(f"{'phase':<14}{'step time':>11}{'generate':>10}{'update+push':>13}{'reward hf':>11}{'reward vllm':>13}")
    for label, lo, hi in (("all steps", 0, n), ("first half", 0, n // 2), ("second half", n // 2, n)):
        ratio = {k: median("vllm", k, lo, hi) / median("hf", k, lo, hi) for k in ("time/step_s", "time/generate_s", "time/update_s")}
        reward = {name: statistics.mean(r["reward/mean"] for run in rows[name] for r in run[lo:hi]) for name in ENGINES}
        print(f"{label:<14}{ratio['time/step_s']:>10.2f}x{ratio['time/generate_s']:>9.2f}x{ratio['time/update_s']:>12.2f}x"
              f"{reward['hf']:>11.3f}{reward['vllm']:>13.3f}")
    print(f"median step: hf {median('hf', 'time/step_s', 0, n) * 1e3:.0f} ms, vllm {median('vllm', 'time/step_s', 0, n) * 1e3:.0f} ms; "
          f"whole runs (start-up included): hf {statistics.mean(wall['hf']):.0f} s, vllm {statistics.mean(wall['vllm']):.0f} s")
    fmt = lambda xs: ", ".join(f"{x:.2f}" if x is not None else "-" for x in xs)  # noqa: E731
    print(f"final held-out accuracy by seed: hf {fmt(accuracy['hf'])}; vllm {fmt(accuracy['vllm'])}")


if __name__ == "__main__":
    main()
