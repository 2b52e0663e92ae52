"""benchmarks/testbed_plots.py draws docs/testbed.md's figures from popo's own output files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def write_eval(d: Path, shift: float) -> None:
    passk = {str(2**i): min(1.0, 0.2 + 0.1 * i + shift) for i in range(7)}
    (d / "summary.json").write_text(json.dumps([{"bench": "arith", "pass@k": passk}]))


def write_run(d: Path, shift: float) -> None:
    rows = [{"step": s, "reward/mean": s / 40 + shift, **({"eval/accuracy": s / 50} if s % 10 == 0 else {}),
             **({"entropy/mean": 1 - s / 40, "pos/delta_logp": 0.01, "implicit_neg/delta_logp": -0.01}
                if s % 5 == 0 else {})} for s in range(1, 31)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("figure,write", [("passk", write_eval), ("curves", write_run)])
def test_draws_the_files_it_is_given(tmp_path, figure, write):
    args = []
    for i, label in enumerate(["warm start", "GRPO, seed 0", "GRPO, seed 1"]):
        d = tmp_path / str(i)
        d.mkdir()
        write(d, 0.02 * i)
        args.append(f"{label}={d}")
    out = tmp_path / "figure.png"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "testbed_plots.py"), figure, "--out", str(out),
                           *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000
