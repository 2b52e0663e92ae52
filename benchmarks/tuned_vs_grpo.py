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


def evaluation(eval_dir: Path) -> dict:
    """pass@k and the correct samples per held-out prompt (by id) of a `popo eval` output."""
    (summary,) = json.loads((eval_dir / "summary.json").read_text())
    correct: dict[str, int] = {}
    for line in (eval_dir / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        correct[row["id"]] = correct.get(row["id"], 0) + bool(row["correct"])
    return {"pass@k": summary["pass@k"], "samples": summary["samples"], "correct": correct}


def evaluate(model: str, eval_dir: Path, a, env: dict) -> dict:
    if not (eval_dir / "summary.json").exists():
        run(popo("eval", "--bench", "arith", "--model", model, "--samples", str(a.samples), "--threads", "1",
                 "--no-tracking", "--output", str(eval_dir), *(["--limit", "24"] if a.smoke else [])), env)
    return evaluation(eval_dir)


def confirm_one(method: str, variant: str, seed: int, overrides: list[str], a, env: dict) -> dict:
    """One confirmation run (a method's best configuration, or the preset's with variant "-preset")
    and its `popo eval`, each kept once done."""
    run_dir = a.out / "confirm" / f"{method}{variant}-s{seed}"
    done = run_dir / "result.json"
    if not (done.exists() and json.loads(done.read_text())["step"] >= a.confirm_steps):
        run(popo("train", "arith", f"algo={METHODS[method]['algo']}", *overrides, f"trainer.seed={seed}",
                 f"trainer.max_steps={a.confirm_steps}", *a.extra, f"trainer.output_dir={run_dir}", *a.tracking), env)
    return {**evaluate(str(run_dir), run_dir.with_name(run_dir.name + "-eval"), a, env),
            "greedy": json.loads(done.read_text())["final_accuracy"]}


def confirm(bests: dict[str, dict], a, env: dict) -> dict[str, dict]:
    """Every confirmation run and the warm start's evaluation, --workers at a time, the costliest first:
    {"<method><variant>": {"<seed>": record}, "warmstart": record}."""
    variants = [("", "overrides"), *([("-preset", None)] if a.untuned else [])]
    jobs = sorted(((m, v, seed) for m in bests for v, _ in variants for seed in a.seeds), key=lambda j: -STEP_S[j[0]])
    with ThreadPoolExecutor(max_workers=a.workers) as pool:
        futures = {(m, v, seed): pool.submit(confirm_one, m, v, seed, bests[m]["overrides"] if v == "" else [], a, env)
                   for m, v, seed in jobs}
        start = pool.submit(evaluate, "popo:arith-warmstart", a.out / "confirm" / "warmstart-eval", a, env)
    out = {f"{m}{v}": {str(seed): futures[(m, v, seed)].result() for seed in a.seeds} for m in bests for v, _ in variants}
    return {**out, "warmstart": start.result()}


def report(a) -> str:
    """The studies' figures (history, slice, contour, fANOVA importances) redrawn from the committed
    CSVs, the pass@k figure of the confirmation runs, and the markdown the docs quote: each study's
    best trial and importances, and pass@k with paired differences from tuned GRPO."""
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
    import testbed_plots as tp

    from popo_core import plots
    from popo_core.sweep import export
    from popo_core.sweep.space import load_space

    lines, passk, counts = [], [], []
    records = sorted(a.results.glob("arith-confirm-*.json"))
    budget = json.loads(records[0].read_text())["budget"] if records else vars(a)  # what the studies ran with
    trials, steps, confirm_steps = budget["trials"], budget["steps"], budget["confirm_steps"]

    def add(label: str, rec: dict) -> None:
        passk.append((label, {int(k): v for k, v in rec["pass@k"].items()}))
        counts.append((label, {("arith", i): (rec["samples"], c) for i, c in rec["correct"].items()}))

    if (start := a.results / "arith-warmstart.json").exists():
        add("warm start", json.loads(start.read_text()))
    for m in a.methods:
        if (table := a.results / f"arith-study-{m}.csv").exists():
            space = load_space(METHODS[m]["knob"], METHODS[m]["params"])
            study = export.study_from_csv(table.read_text(), space, f"arith-{m}")
            names = [p.name for p in space]
            plots.sweep_plots(study, a.img / f"arith-study-{m}", names, "eval/pass_at_1", "arith", steps)
            states = [t.state.name for t in study.trials]
            best = study.best_trial
            weights = export.importances(study)
            lines.append(f"- {m.upper()} study: {len(states)} finished trials ({states.count('COMPLETE')} complete, "
                         f"{states.count('PRUNED')} pruned) of {steps} steps; best eval/pass_at_1 {best.value:.4f} "
                         f"with {' '.join(f'{k}={export.override_value(v)}' for k, v in best.params.items())}; "
                         "fANOVA importances: " + (", ".join(f"{k} {v:.2f}" for k, v in weights.items()) if weights
                                                    else "undefined (fewer than 2 different complete values)"))
        for variant, label in (("", f"tuned {m.upper()}"), ("-preset", f"{m.upper()} preset")):
            if (record := a.results / f"arith-confirm-{m}{variant}.json").exists():
                for seed, rec in json.loads(record.read_text())["seeds"].items():
                    add(f"{label}, seed {seed}", rec)
    if counts and any(label.startswith("tuned GRPO") for label, _ in counts):
        lines += ["", tp.table(counts, "tuned GRPO")]
    groups, samples = tp.by_family(counts), max((n for _, c in counts for n, _ in c.values()), default=a.samples)
    for m in a.methods:  # what tuning bought each method, on the same seeds
        tuned, preset = groups.get(f"tuned {m.upper()}"), groups.get(f"{m.upper()} preset")
        if tuned and preset:
            prompts = sorted(tuned[0][1])
            lines.append(f"\ntuned {m.upper()} minus {m.upper()} preset: pass@1 "
                         f"{tp.paired_difference(tuned, preset, prompts, 1)}, pass@{samples} "
                         f"{tp.paired_difference(tuned, preset, prompts, samples)}")
    if passk:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = tp.passk_figure(plt, passk, tp.styler(plt, [label for label, _ in passk], reference=True), mean=True)
        seeds = len({tp.seed_of(label) for label, _ in passk} - {None})
        fig.suptitle(f"arith: each method's best of {trials} trials x {steps} steps, trained again on {seeds} seeds "
                     f"x {confirm_steps} steps\nheld-out pass@k (T = 1.0, {samples} samples, unbiased), mean over "
                     "seeds, band: lowest to highest seed", fontsize=10)
        fig.tight_layout()
        a.img.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.img / "arith-tuned-passk.png", dpi=115)
        plt.close(fig)
        lines.append(f"\nfigures in {a.img}")
    return "\n".join(lines)


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
    ap.add_argument("--untuned", action="store_true",
                    help="Also run each method at the preset's settings on the confirmation seeds (arith-confirm-<method>-preset.json).")
    ap.add_argument("--img", type=Path, default=REPO / "docs" / "img" / "testbed", help="Where --report's figures go.")
    ap.add_argument("--report", action="store_true", help="Figures and tables from RESULTS alone (nothing trained).")
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
    if a.report:
        print(report(a))
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
    done = confirm(bests, a, env)
    (a.results / "arith-warmstart.json").write_text(json.dumps(done.pop("warmstart"), indent=1) + "\n")
    for name, seeds in done.items():
        method = name.removesuffix("-preset")
        record = {"study": f"arith-{method}", "finished_trials": export.finished(a.storage, f"arith-{method}"),
                  "best": bests[method] if name == method else None, "budget": budget, "seeds": seeds}
        (a.results / f"arith-confirm-{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(report(a), flush=True)
    used = children_cpu() - cpu
    print(f"done in {time.time() - start:.0f} s wall, {used / 3600:.2f} CPU-hours this invocation; "
          f"results in {a.results}/arith-{{study,confirm}}-<method>.{{csv,json}}; plots in {a.out}/sweeps/*/plots")


if __name__ == "__main__":
    main()
