"""Does tuned POPO beat tuned GRPO? The whole experiment on the arith testbed, one command.

1. Two Optuna studies through `popo sweep`, at equal budgets (the same trials, steps per trial,
   objective, pruner and sampler seed): POPO over its three knobs and the learning rate
   (`all` + `--param optim.lr=...`), GRPO over the learning rate and the clip bound (`lr` +
   `--param ...`). The objective is the held-out sampled pass@1 at the last step
   (`--metric eval/pass_at_1`, `trainer.eval_samples` samples per prompt), reported at each
   evaluation to the median pruner.
2. Each study's best configuration trained again on fresh seeds (`trainer.seed` 1, 2, 3; the
   studies train with seed 0) at the preset's 250 steps, then `popo eval --bench arith --samples 64`.

It resumes where it stopped: rerun the same command (the studies continue, a training run resumes
from its checkpoint, a finished evaluation is kept). It writes, from what is done so far:
  RESULTS/arith-study-<method>.csv    one row per trial: number, state, value, each parameter
  RESULTS/arith-confirm-<method>.json {"seeds": {"<seed>": {"pass@k": {...}, "greedy": ..., "correct": {...}}}, ...}
("greedy": the run's held-out greedy accuracy at its last step; "correct": correct samples of the
64 per held-out prompt, by id, for paired intervals). The estimated CPU-hours are printed first.

    .venv/bin/python benchmarks/tuned_vs_grpo.py --dry-run         # the plan and its estimated cost
    .venv/bin/python benchmarks/tuned_vs_grpo.py                   # the experiment (RESULTS = docs/testbed)
    .venv/bin/python benchmarks/tuned_vs_grpo.py --workers 2       # two sweep workers per study (cores permitting)
    .venv/bin/python benchmarks/tuned_vs_grpo.py --smoke --out /tmp/s --results /tmp/s   # 2 trials, 2 steps, 1 seed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LR = "optim.lr=1e-5:3e-4:log"  # arith's 1e-4 at the middle (5e-4 made the warm start worse within steps)
METHODS = {
    "popo": {"knob": "all", "params": [LR], "algo": "popo"},
    "grpo": {"knob": "lr", "params": [LR, "algo.clip_eps=0.05:0.5"], "algo": "grpo"},
}
# CPU seconds, one torch thread, measured on the arith preset (docs/testbed.md, "What a run costs",
# "A longer budget"): a rollout step of each method, and one held-out completion (a step's 512 in ~2.9 s).
STEP_S = {"popo": 5.0, "grpo": 8.6}
COMPLETION_S = 2.9 / 512
HELD_OUT = 200  # data.eval_size of the arith preset
# --smoke: the same pipeline at a size that runs in about a minute (from the shipped warm start).
SMOKE = ["rollout.prompts_per_step=4", "rollout.group_size=4", "trainer.save_every=1",
         "data.eval_size=24"]


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def popo(*args: str) -> list[str]:
    return [sys.executable, "-m", "popo_cli.main", *args]


def run(cmd: list[str], env: dict) -> None:
    print("$ " + " ".join(cmd[2:]), flush=True)
    if subprocess.run(cmd, env=env).returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[2:])}")


def estimate(a) -> dict[str, float]:
    """CPU-hours of what is left to run, before pruning (an upper bound: pruned trials stop early)."""
    evals = a.steps // a.eval_every + 1 + (a.steps % a.eval_every != 0)
    trial_eval = evals * HELD_OUT * (1 + a.eval_samples) * COMPLETION_S
    confirm_eval = (a.confirm_steps // 25 + 1) * HELD_OUT * COMPLETION_S + HELD_OUT * a.samples * COMPLETION_S
    out = {}
    for m in a.methods:
        out[f"study {m}"] = a.trials * (a.steps * STEP_S[m] + trial_eval) / 3600
        out[f"confirm {m}"] = len(a.seeds) * (a.confirm_steps * STEP_S[m] + confirm_eval) / 3600
    return out


def study_overrides(a) -> list[str]:
    return [f"trainer.max_steps={a.steps}", f"trainer.eval_every={a.eval_every}", f"trainer.eval_samples={a.eval_samples}",
            *a.extra]


def sweep(method: str, a, env: dict) -> None:
    spec = METHODS[method]
    cmd = popo("sweep", spec["knob"], "arith", *(x for p in spec["params"] for x in ("--param", p)),
               "--trials", str(a.trials), "--study", f"arith-{method}", "--storage", a.storage,
               "--metric", "eval/pass_at_1", f"algo={spec['algo']}", *study_overrides(a),
               f"trainer.output_dir={a.out / 'sweeps' / f'arith-{method}'}", *a.tracking)
    if a.workers == 1:
        run([*cmd, "--seed", "0"], env)
        return
    print(f"$ {a.workers} x " + " ".join(cmd[2:]), flush=True)
    procs = [subprocess.Popen([*cmd, "--seed", str(i)], env=env) for i in range(a.workers)]
    if any(p.wait() != 0 for p in procs):
        sys.exit(f"a worker of study arith-{method} failed")


def confirm_one(method: str, seed: int, best: dict, a, env: dict) -> dict:
    """One confirmation run of a method's best configuration and its `popo eval`, each kept once done."""
    run_dir = a.out / "confirm" / f"{method}-s{seed}"
    eval_dir = a.out / "confirm" / f"{method}-s{seed}-eval"
    done = run_dir / "result.json"
    if not (done.exists() and json.loads(done.read_text())["step"] >= a.confirm_steps):
        run(popo("train", "arith", f"algo={METHODS[method]['algo']}", *best["overrides"], f"trainer.seed={seed}",
                 f"trainer.max_steps={a.confirm_steps}", *a.extra, f"trainer.output_dir={run_dir}", *a.tracking), env)
    if not (eval_dir / "summary.json").exists():
        run(popo("eval", "--bench", "arith", "--model", str(run_dir), "--samples", str(a.samples), "--threads", "1",
                 "--no-tracking", "--output", str(eval_dir)), env)
    (summary,) = json.loads((eval_dir / "summary.json").read_text())
    correct: dict[str, int] = {}
    for line in (eval_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        correct[row["id"]] = correct.get(row["id"], 0) + bool(row["correct"])
    return {"pass@k": summary["pass@k"], "greedy": json.loads(done.read_text())["final_accuracy"],
            "samples": a.samples, "correct": correct}


def confirm(bests: dict[str, dict], a, env: dict) -> dict[str, dict]:
    """Every method's confirmation runs, --workers at a time, the costliest method's first."""
    jobs = sorted(((m, seed) for m in bests for seed in a.seeds), key=lambda j: -STEP_S[j[0]])
    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        futures = {job: pool.submit(confirm_one, *job, bests[job[0]], a, env) for job in jobs}
    return {m: {str(seed): futures[(m, seed)].result() for seed in a.seeds} for m in bests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="popo,grpo")
    ap.add_argument("--trials", type=int, default=16, help="Finished trials per study (the same for each).")
    ap.add_argument("--steps", type=int, default=250, help="Rollout steps per trial (the same for each).")
    ap.add_argument("--eval-every", type=int, default=25, help="Steps between a trial's evaluations (the pruner's reports).")
    ap.add_argument("--eval-samples", type=int, default=16, help="Held-out samples per prompt of the objective.")
    ap.add_argument("--seeds", default="1,2,3", help="Confirmation seeds (the studies use trainer.seed=0).")
    ap.add_argument("--confirm-steps", type=int, default=250, help="Steps of a confirmation run (the preset's).")
    ap.add_argument("--samples", type=int, default=64, help="popo eval --samples of a confirmation run.")
    ap.add_argument("--workers", type=int, default=1, help="Processes side by side: sweep workers per study, then confirmation runs.")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "tuned-vs-grpo", help="Runs, studies and MLflow store.")
    ap.add_argument("--results", type=Path, default=REPO / "docs" / "testbed", help="Where the CSV and JSON go.")
    ap.add_argument("--smoke", action="store_true", help="2 trials, 2 steps, 1 seed, 4 samples: the pipeline only.")
    ap.add_argument("--dry-run", action="store_true", help="Print the plan and its cost, run nothing.")
    a = ap.parse_args()
    a.methods = [m for m in a.methods.split(",") if m]
    if unknown := [m for m in a.methods if m not in METHODS]:
        ap.error(f"--methods: unknown {unknown[0]!r} (choose from {', '.join(METHODS)})")
    a.extra = []
    if a.smoke:
        a.trials, a.steps, a.confirm_steps, a.seeds, a.samples, a.eval_samples = 2, 2, 2, "1", 4, 2
        a.extra, a.eval_every = SMOKE, 1
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    a.out = a.out.resolve()
    a.storage = f"sqlite:///{a.out / 'optuna.db'}"
    a.tracking = ["tracking.enabled=false"] if a.smoke else [f"tracking.uri=sqlite:///{a.out / 'mlflow.db'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if a.smoke:
        env.setdefault("POPO_CACHE", str(a.out / "cache"))  # anything it caches stays out of the user's cache

    cost = estimate(a)
    print(f"tuned POPO vs tuned GRPO on arith: {a.trials} trials x {a.steps} steps per study "
          f"(objective eval/pass_at_1, {a.eval_samples} samples per held-out prompt, median pruner), "
          f"then the best of each on seeds {','.join(map(str, a.seeds))} at {a.confirm_steps} steps, "
          f"popo eval --samples {a.samples}")
    print("estimated CPU-hours before pruning (one thread each; wall time about this divided by --workers): "
          + ", ".join(f"{k} {v:.1f}" for k, v in cost.items()) + f"; total {sum(cost.values()):.1f}", flush=True)
    if a.dry_run:
        return
    a.out.mkdir(parents=True, exist_ok=True)
    a.results.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from popo_core.sweep import export

    start, cpu = time.time(), children_cpu()
    for method in a.methods:
        sweep(method, a, env)
        (a.results / f"arith-study-{method}.csv").write_text(export.study_csv(a.storage, f"arith-{method}"))
    bests = {m: export.best(a.storage, f"arith-{m}") for m in a.methods}
    budget = {"trials": a.trials, "steps": a.steps, "eval_every": a.eval_every, "eval_samples": a.eval_samples,
              "confirm_steps": a.confirm_steps, "overrides": a.extra}
    for method, seeds in confirm(bests, a, env).items():
        record = {"study": f"arith-{method}", "finished_trials": export.finished(a.storage, f"arith-{method}"),
                  "best": bests[method], "budget": budget, "seeds": seeds}
        (a.results / f"arith-confirm-{method}.json").write_text(json.dumps(record, indent=1) + "\n")
    used = children_cpu() - cpu
    print(f"done in {time.time() - start:.0f} s wall, {used / 3600:.2f} CPU-hours this invocation; "
          f"results in {a.results}/arith-{{study,confirm}}-<method>.{{csv,json}}; plots in {a.out}/sweeps/*/plots")


if __name__ == "__main__":
    main()
