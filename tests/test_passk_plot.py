"""benchmarks/passk_plot.py draws popo eval summaries (the testbed's pass@k figure)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_plots_the_summaries_it_is_given(tmp_path):
    args = []
    for name, shift in (("warm", 0.0), ("a-s0", 0.05), ("a-s1", 0.04)):
        d = tmp_path / name
        d.mkdir()
        passk = {str(2**i): min(1.0, 0.2 + 0.1 * i + shift) for i in range(7)}
        (d / "summary.json").write_text(json.dumps([{"bench": "arith", "pass@k": passk}]))
        args.append(f"{name.replace('-s', ', seed ')}={d}")
    out = tmp_path / "passk.png"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "passk_plot.py"), "--out", str(out), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000


def test_run_curves_draws_the_diagnostics(tmp_path):
    args = []
    for name in ("POPO, seed 0", "GRPO, seed 0"):
        d = tmp_path / name.replace(", ", "-").replace(" ", "")
        d.mkdir()
        rows = [{"step": s, "reward/mean": s / 40, **({"eval/accuracy": s / 50} if s % 10 == 0 else {}),
                 **({"entropy/mean": 1 - s / 40, "pos/delta_logp": 0.01, "implicit_neg/delta_logp": -0.01}
                    if s % 5 == 0 else {})} for s in range(1, 31)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        args.append(f"{name}={d}")
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_curves.py"), "--out", str(out), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000
