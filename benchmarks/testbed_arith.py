"""The arith testbed's budgets and its acceptance numbers, measured through the real commands.

1. The warm start built anew (`popo_core.model.warmstart.ensure` on the arith preset with
   `model.name_or_path=warmstart`, not the shipped one) in a fresh cache (wall and CPU
   seconds), then its held-out pass@k at temperature 1.0 with 64 samples (`popo eval --bench arith`).
2. RL from it: `popo train arith algo=A trainer.seed=S model.name_or_path=<it>` for each algorithm and seed (wall and CPU
   seconds of the run), then `popo eval --bench arith --model RUN --samples 64` on the result.

CPU seconds (of the child processes) are printed beside wall seconds: on a shared machine wall time
says more about the neighbours than about popo; with one torch thread, CPU seconds are what the
run costs on an idle machine. Usage:

    .venv/bin/python benchmarks/testbed_arith.py                       # warm start + popo, grpo x 3 seeds
    .venv/bin/python benchmarks/testbed_arith.py --algos popo --seeds 1 --out /tmp/tb
    .venv/bin/python benchmarks/testbed_arith.py --reuse-cache         # the warm start from $POPO_CACHE
    .venv/bin/python benchmarks/testbed_arith.py --warmstart-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(args: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; (result, wall seconds, CPU seconds of the child)."""
    wall, cpu = time.perf_counter(), children_cpu()
    proc = subprocess.run(args, env=env, cwd=env["BENCH_CWD"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return proc, time.perf_counter() - wall, children_cpu() - cpu


def popo(*args: str) -> list[str]:
    return [sys.executable, "-m", "popo_cli.main", *args]


def evaluate(model: str, samples: int, env: dict, out: Path) -> dict:
    proc, wall, cpu = run(popo("eval", "--bench", "arith", "--model", model, "--samples", str(samples), "--threads", "1",
                               "--no-tracking", "--output", str(out)), env)
    (summary,) = json.loads((out / "summary.json").read_text())
    return {"pass@k": {int(k): v for k, v in summary["pass@k"].items()}, "eval_wall_s": wall, "eval_cpu_s": cpu,
            "protocol": summary["protocol"]}


def build_warmstart(overrides: list[str], env: dict) -> tuple[str, float, float]:
    code = ("import sys, json; from popo_core.config import compose; from popo_core.model import warmstart\n"
            "cfg = warmstart.ensure(compose('arith', ['model.name_or_path=warmstart', *sys.argv[1:]]))\n"
            "print(json.dumps({'path': cfg.model.name_or_path}))\n")
    proc, wall, cpu = run([sys.executable, "-c", code, *overrides], env)
    return json.loads(proc.stdout.strip().splitlines()[-1])["path"], wall, cpu


def fmt_curve(curve: dict[int, float]) -> str:
    return "  ".join(f"{k}:{v:.3f}" for k, v in sorted(curve.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="popo,grpo")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--out", default=None, help="Directory for runs, evals and results.json (default: a temp dir).")
    ap.add_argument("--reuse-cache", action="store_true", help="Use $POPO_CACHE (or ~/.cache/popo) instead of a fresh cache.")
    ap.add_argument("--warmstart-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. optim.lr=1e-3")
    a = ap.parse_args()

    out = Path(a.out or tempfile.mkdtemp(prefix="testbed-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BENCH_CWD": str(out), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    if not a.reuse_cache:
        env["POPO_CACHE"] = str(out / "cache")
    load = os.getloadavg()[0]
    results: dict = {"overrides": a.overrides, "load_average_at_start": load, "runs": []}

    path, wall, cpu = build_warmstart(a.overrides, env)
    ws = json.loads((Path(path) / "warmstart.json").read_text())
    ws_eval = evaluate(path, a.samples, env, out / "eval-warmstart")
    results["warmstart"] = {"path": path, "wall_s": wall, "cpu_s": cpu, "build_seconds": ws["build_seconds"],
                            "heldout_greedy_accuracy": ws["heldout_greedy_accuracy"], **ws_eval}
    print(f"warm start {path}: build wall {wall:.0f} s, CPU {cpu:.0f} s (load average {load:.1f})")
    print(f"  held-out greedy accuracy {ws['heldout_greedy_accuracy']:.3f}; pass@k (T=1, {a.samples} samples) "
          f"{fmt_curve(ws_eval['pass@k'])}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    if a.warmstart_only:
        return

    for algo in a.algos.split(","):
        for seed in range(a.seeds):
            run_dir = out / f"run-{algo}-seed{seed}"
            proc, wall, cpu = run(popo("train", "arith", f"algo={algo}", f"trainer.seed={seed}", f"model.name_or_path={path}",
                                       f"trainer.output_dir={run_dir}", "tracking.enabled=false", *a.overrides), env)
            result = json.loads((run_dir / "result.json").read_text())
            ev = evaluate(str(run_dir), a.samples, env, out / f"eval-{algo}-seed{seed}")
            row = {"algo": algo, "seed": seed, "train_wall_s": wall, "train_cpu_s": cpu,
                   "final_greedy_accuracy": result["final_accuracy"], **ev}
            results["runs"].append(row)
            gain = ev["pass@k"][1] - ws_eval["pass@k"][1]
            print(f"{algo} seed {seed}: train wall {wall:.0f} s, CPU {cpu:.0f} s; greedy {result['final_accuracy']:.3f}; "
                  f"pass@1 {ev['pass@k'][1]:.3f} ({gain:+.3f}); pass@{a.samples} {ev['pass@k'][a.samples]:.3f}", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\n{'run':<14} {'train CPU s':>11} {'train wall s':>12} {'greedy':>7}  pass@k (T=1.0, {a.samples} samples)")
    print(f"{'warm start':<14} {results['warmstart']['cpu_s']:>11.0f} {results['warmstart']['wall_s']:>12.0f} "
          f"{ws['heldout_greedy_accuracy']:>7.3f}  {fmt_curve(ws_eval['pass@k'])}")
    for row in results["runs"]:
        print(f"{row['algo'] + ' s' + str(row['seed']):<14} {row['train_cpu_s']:>11.0f} {row['train_wall_s']:>12.0f} "
              f"{row['final_greedy_accuracy']:>7.3f}  {fmt_curve(row['pass@k'])}")
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
