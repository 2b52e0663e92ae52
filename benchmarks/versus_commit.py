"""This checkout against an earlier commit: time per rollout step of the same preset, side by side.

The earlier commit is exported (`git archive`) to a temporary directory and both trees run
`popo train` in subprocesses, alternated run by run (base, this, base, this, ...), so machine noise
hits both alike. Per-step times come from each run's metrics.jsonl (step 1 left out: it warms
caches). Prints the ratio this / base (< 1: this checkout is faster) per round and its median.

    python benchmarks/versus_commit.py BASE [--preset tiny] [--steps 30] [--rounds 3] [key=value ...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export(commit: str, into: Path) -> Path:
    """The tree of `commit`, unpacked under `into`."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def step_times(tree: Path, out: Path, preset: str, steps: int, overrides: list[str]) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "popo_cli.main", "train", preset, f"trainer.max_steps={steps}", "tracking.enabled=false",
           f"trainer.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: popo train failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["time/step_s"] for r in rows if r["step"] > 1 and "time/step_s" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the commit to compare against (any git revision)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    base_sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.base], check=True,
                              capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        base = export(args.base, Path(tmp) / "base")
        ratios = []
        for k in range(args.rounds):
            medians = {}
            for name, tree in (("base", base), ("this", REPO)):
                times = step_times(tree, Path(tmp) / f"{name}-{k}", args.preset, args.steps, args.overrides)
                medians[name] = statistics.median(times)
            ratios.append(medians["this"] / medians["base"])
            print(f"round {k}: median step this / base ({base_sha}) = {ratios[-1]:.3f}", flush=True)
    print(f"{args.preset}, {args.steps} steps x {args.rounds} rounds: this / {base_sha} = "
          f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f}; < 1: this checkout is faster)")


if __name__ == "__main__":
    main()
