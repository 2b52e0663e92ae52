"""popo side by side with TRL's GRPOTrainer on the same model, task, batch shape and optimizer.

    .venv/bin/python benchmarks/vs_trl                      # everything: 3 shapes x 3 methods x 3 seeds (2 lrs; arith 1)
    .venv/bin/python benchmarks/vs_trl --steps 4 --seeds 1 --lrs 1e-3 --out /tmp/vs_trl_smoke   # smoke test
    .venv/bin/python benchmarks/vs_trl --report-only         # tables and plots from the runs already made

1. Builds TRL in its own virtual environment (benchmarks/.venv-trl; TRL is not a popo dependency):
   the local CPU torch first, so pip never pulls a CUDA build, then trl==1.16.0.
2. Runs tests/algo/test_vs_trl.py there (popo's `grpo` loss against TRL's own loss code) and stops if it
   fails: the timings would compare different objectives.
3. Runs `popo train` (POPO and GRPO) and TRL's GRPOTrainer (benchmarks/vs_trl/trl_side.py) as
   separate commands, alternating the tools (and rotating their order with the seed), each on one
   CPU thread, on the same saved popo model (weights digest checked), task, held-out set and
   shape (benchmarks/vs_trl/shapes.py). Each command's wall clock starts when it is launched; its
   per-step lines are stamped as they appear; its peak resident memory comes from wait4.
4. Writes benchmarks/RESULTS.md and PNGs in benchmarks/img/ (report.py).

Runs are kept in --out (one JSON file each) and not redone, so an interrupted measurement resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from shapes import SHAPES, Shape  # noqa: E402

TRL_VERSION = "1.16.0"
TORCH_SPEC = "torch==2.13.0"  # the local CPU wheel (PITFALLS.md)
TRL_VENV = REPO / "benchmarks" / ".venv-trl"
POPO_BIN = Path(sys.executable).parent
METHODS = (("popo", "popo"), ("popo", "grpo"), ("trl", "grpo"))  # (tool, method)


def label(tool: str, method: str) -> str:
    return {"popo": "popo POPO", "grpo": "popo GRPO"}[method] if tool == "popo" else "TRL GRPO"


# ----------------------------------------------------------------------------------- TRL's venv
def trl_python() -> Path:
    return TRL_VENV / "bin" / "python"


def ensure_trl_venv() -> str:
    """Create benchmarks/.venv-trl with trl==TRL_VERSION unless it is there; return TRL's version."""
    py = trl_python()
    probe = [str(py), "-c", "import trl, torch; print(trl.__version__, torch.__version__)"]
    if py.exists():
        got = subprocess.run(probe, capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.split()[0] == TRL_VERSION:
            return got.stdout.strip()
    print(f"building {TRL_VENV} (torch first, then trl=={TRL_VERSION}; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, TORCH_SPEC], check=True)
    subprocess.run([*pip, f"trl=={TRL_VERSION}", "pytest"], check=True)
    return subprocess.run(probe, capture_output=True, text=True, check=True).stdout.strip()


def cross_check() -> str:
    """tests/algo/test_vs_trl.py inside TRL's venv, popo importable; the pytest summary line."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([str(trl_python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/algo/test_vs_trl.py"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    if proc.returncode != 0 or "skipped" in summary:
        sys.stdout.write(proc.stdout[-4000:] + proc.stderr[-2000:])
        raise SystemExit(f"cross-check failed ({summary}): popo's grpo loss and TRL's differ; not timing them")
    return summary


# --------------------------------------------------------------------------------- the runs
def compose_popo(shape: Shape, method: str, steps: int, extra: list[str] = ()):
    from popo_core.config import compose

    return compose(shape.preset, [f"algo={method}", *shape.popo_overrides(steps), *extra])


def popo_overrides(method: str) -> list[str]:
    # TRL's advantage epsilon is fixed at 1e-4: popo's GRPO gets the same (popo's default is 1e-6).
    return ["algo.adv_eps=1e-4"] if method == "grpo" else []


def save_model(shape: Shape, seed: int, where: Path) -> tuple[Path, str]:
    """popo's model for `seed`, built exactly as `popo train` builds it, saved with save_pretrained."""
    import torch

    from popo_core.model.loading import load_model_and_tokenizer, save_policy
    from trl_side import weights_digest

    from popo_core.model import warmstart

    cfg = warmstart.ensure(compose_popo(shape, "grpo", shape.steps))  # arith: the shipped warm start
    path = where / f"model-{shape.preset}-seed{seed}"
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=torch.device("cpu"), seed=seed, dtype=torch.float32)
    if not (path / "config.json").exists():
        save_policy(model, tokenizer, path)
    return path, weights_digest(model)


def task_spec(shape: Shape, steps: int) -> dict:
    from popo_core.trainer.loop import load_task

    cfg = compose_popo(shape, "grpo", steps)
    train_set, eval_set = load_task(cfg)
    return {"task": cfg.data.task, "train": [vars(p) for p in train_set], "eval": [vars(p) for p in eval_set]}


class LineStamper(threading.Thread):
    """Stamps each line a run appends to its metrics file with the time since the command started."""

    def __init__(self, path: Path, t0: float, period: float = 0.005):
        super().__init__(daemon=True)
        self.path, self.t0, self.period = path, t0, period
        self.rows: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        handle, buf = None, ""
        while True:
            finished = self.done.is_set()
            if handle is None and self.path.exists():
                handle = open(self.path)
            if handle is not None:
                buf += handle.read()
                stamp = time.perf_counter() - self.t0
                while "\n" in buf:
                    line, buf = buf.split("\n", 1)
                    if line.strip():
                        self.rows.append({**json.loads(line), "wall_s": stamp})
            if finished:
                return
            time.sleep(self.period)


def run_command(cmd: list[str], metrics: Path, log: Path, cwd: Path, env: dict) -> dict:
    """Run one command to its end; its stamped metric lines, wall time and peak resident memory."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        stamper = LineStamper(metrics, t0)
        stamper.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    stamper.done.set()
    stamper.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return {"rows": stamper.rows, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def child_env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHONPATH"))}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db", "COLUMNS": "120"}


def one_run(tool: str, method: str, shape: Shape, lr: float, seed: int, steps: int, out: Path, models: dict,
            tasks: dict) -> dict:
    name = f"{shape.name}-{tool}-{method}-lr{lr:g}-seed{seed}"
    work = out / "work" / name
    shutil.rmtree(work, ignore_errors=True)  # a run without its record was cut short: timed again from scratch
    work.mkdir(parents=True)
    env = child_env(out)
    if tool == "popo":
        cmd = [str(POPO_BIN / "popo"), "train", shape.preset, f"algo={method}", *shape.popo_overrides(steps),
               *popo_overrides(method), f"optim.lr={lr}", f"trainer.seed={seed}", "trainer.threads=1",
               f"trainer.save_every={steps}",  # TRL saves nothing during the run: popo checkpoints only at the end
               f"trainer.output_dir={work / 'run'}"]
        metrics = work / "run" / "metrics.jsonl"
    else:
        model_dir, digest = models[(shape.preset, seed)]
        spec = {**tasks[shape.name], "model_dir": str(model_dir), "weights_digest": digest, "shape": vars(shape),
                "lr": lr, "seed": seed, "steps": steps, "threads": 1, "suppress": True,
                "out": str(work / "metrics.jsonl"), "work_dir": str(work / "trainer")}
        (work / "spec.json").write_text(json.dumps(spec))
        cmd = [str(trl_python()), str(HERE / "trl_side.py"), str(work / "spec.json")]
        env = {**env, "PYTHONPATH": str(REPO)}
        metrics = work / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    print(f"  {name}", end=" ", flush=True)
    result = run_command(cmd, metrics, work / "log.txt", cwd=work, env=env)
    last = result["rows"][-1] if result["rows"] else {}
    print(f"{result['wall_s']:.0f} s, final accuracy {last.get('eval/accuracy', float('nan')):.2f}", flush=True)
    return {"tool": tool, "method": method, "shape": shape.name, "lr": lr, "seed": seed, "steps": steps,
            "command": cmd, **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", default="1e-3,3e-3", help="learning rates; the first is the one the timings use")
    p.add_argument("--steps", type=int, default=None, help="rollout steps per run (default: each shape's budget)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "vs_trl_runs", help="runs kept here (resumable)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--report-only", action="store_true", help="write the report from the runs in --out")
    args = p.parse_args()
    shapes = [SHAPES[s] for s in args.shapes.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    meta_file = args.out / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if not args.report_only:
        meta["trl"] = ensure_trl_venv()
        meta["cross_check"] = cross_check()
        print(f"cross-check (tests/algo/test_vs_trl.py in TRL's venv): {meta['cross_check']}", flush=True)
        meta["help_s"] = help_time()
        meta["command"] = " ".join([".venv/bin/python", "benchmarks/vs_trl", *sys.argv[1:]])
        meta_file.write_text(json.dumps(meta, indent=1))
        models, tasks = {}, {}
        for shape in shapes:
            tasks[shape.name] = task_spec(shape, args.steps or shape.steps)
            for seed in range(args.seeds):
                models[(shape.preset, seed)] = save_model(shape, seed, args.out)
        for lr in dict.fromkeys([*lrs, *(x for s in shapes for x in s.lrs or ())]):
            for seed in range(args.seeds):
                for shape in (s for s in shapes if lr in (s.lrs or lrs)):
                    order = METHODS[seed % 3:] + METHODS[:seed % 3]  # rotate which tool goes first
                    for tool, method in order:
                        steps = args.steps or shape.steps
                        record = args.out / f"{shape.name}-{tool}-{method}-lr{lr:g}-seed{seed}-steps{steps}.json"
                        if record.exists():
                            continue
                        result = one_run(tool, method, shape, lr, seed, steps, args.out, models, tasks)
                        record.write_text(json.dumps(result))
    from report import write_report

    write_report(args.out, args.results, shapes, lrs, meta)


def help_time() -> float:
    """`popo --help`, best of 5 (s)."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([str(POPO_BIN / "popo"), "--help"], capture_output=True, check=True)
        best = min(best, time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    main()
