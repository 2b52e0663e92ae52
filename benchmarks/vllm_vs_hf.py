"""vLLM vs HF rollouts on the tiny preset: step time as a ratio, and what each run learned.

Both trainers are built side by side in one process (so the vLLM engine starts after the HF
trainer, as in a sweep) and their steps are interleaved (HF step k, vLLM step k, ...), so machine
noise hits both alike. Prints ratios vLLM / HF (< 1: vLLM faster) and each engine's held-out
accuracy at the end. Needs the vLLM environment (make setup-vllm):

    .venv-vllm/bin/python benchmarks/vllm_vs_hf.py [--steps 150] [--seed 0] [key=value ...]
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        common = ["tracking.enabled=false", f"trainer.max_steps={args.steps}", f"trainer.seed={args.seed}", *args.overrides]
        trainers, start_s = {}, {}
        for engine in ("hf", "vllm"):
            t0 = time.perf_counter()
            trainers[engine] = Trainer(compose(args.preset, [f"rollout.engine={engine}", f"trainer.output_dir={tmp}/{engine}", *common]))
            trainers[engine].setup()
            start_s[engine] = time.perf_counter() - t0
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
        for step in range(1, args.steps + 1):
            for name, t in trainers.items():
                start = time.perf_counter()
                m = t.step(step)
                m["wall_s"] = time.perf_counter() - start
                rows[name].append(m)
        accuracy = {name: t._evaluate() for name, t in trainers.items()}

    def median(name: str, key: str, lo: int, hi: int) -> float:
        return statistics.median(r[key] for r in rows[name][lo:hi])

    n = args.steps
    print(f"{args.preset} preset, seed {args.seed}, {n} interleaved steps each; ratios are vLLM / HF (< 1: vLLM faster)")
    print(f"set-up (model + engine): hf {start_s['hf']:.1f} s, vllm {start_s['vllm']:.1f} s (the first vLLM import included)")
    print(f"{'phase':<14}{'step time':>11}{'generate':>10}{'update+push':>13}{'reward hf':>11}{'reward vllm':>13}")
    for label, lo, hi in (("all steps", 0, n), ("first half", 0, n // 2), ("second half", n // 2, n)):
        ratio = {k: median("vllm", k, lo, hi) / median("hf", k, lo, hi) for k in ("wall_s", "time/generate_s", "time/update_s")}
        reward = {name: statistics.mean(r["reward/mean"] for r in rows[name][lo:hi]) for name in rows}
        print(f"{label:<14}{ratio['wall_s']:>10.2f}x{ratio['time/generate_s']:>9.2f}x{ratio['time/update_s']:>12.2f}x"
              f"{reward['hf']:>11.3f}{reward['vllm']:>13.3f}")
    print(f"median step: hf {median('hf', 'wall_s', 0, n) * 1e3:.0f} ms, vllm {median('vllm', 'wall_s', 0, n) * 1e3:.0f} ms")
    print(f"held-out accuracy after {n} steps: hf {accuracy['hf']:.3f}, vllm {accuracy['vllm']:.3f}")


if __name__ == "__main__":
    main()
