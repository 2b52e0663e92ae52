"""benchmarks/testbed_plots.py draws docs/testbed.md's figures from popo's own output files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def write_eval(d: Path, shift: float) -> None:
    passk = {str(2**i): min(1.0, 0.2 + 0.1 * i + shift) for i in range(7)}
    (d / "summary.json").write_text(json.dumps([{"bench": "arith", "pass@k": passk}]))


def write_run(d: Path, shift: float) -> None:
    rows = [{"step": s, "reward/mean": s / 40 + shift, **({"eval/accuracy": s / 50} if s % 10 == 0 else {}),
             **({"entropy/mean": 1 - s / 40, "pos/delta_logp": 0.01, "implicit_neg/delta_logp": -0.01}
                if s % 5 == 0 else {})} for s in range(1, 31)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("testbed_plots", REPO / "benchmarks" / "testbed_plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_samples(d: Path, correct: dict[str, int], n: int = 8) -> None:
    d.mkdir()
    rows = [{"bench": "arith", "id": p, "sample": i, "correct": i < c} for p, c in correct.items() for i in range(n)]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("figure,write", [("passk", write_eval), ("curves", write_run)])
def test_draws_the_files_it_is_given(tmp_path, figure, write, mean):
    args = []
    for i, label in enumerate(["warm start", "GRPO, seed 0", "GRPO, seed 1", "POPO, seed 0"]):
        d = tmp_path / str(i)
        d.mkdir()
        write(d, 0.02 * i)
        args.append(f"{label}={d}")
    out = tmp_path / "figure.png"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "testbed_plots.py"), figure, "--out", str(out),
                           *(["--mean"] if mean else []), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 10_000


def test_table_against_a_direct_computation(tmp_path):
    """Means over seeds, paired differences and the bootstrap, recomputed from the counts with
    math.comb in float64 (the script uses popo_core.evaluation.metrics's product form)."""
    import math
    import random

    from popo_core.evaluation.metrics import bootstrap_interval

    plots = load_script()
    rng = random.Random(0)
    prompts = [f"{i}+{i}=" for i in range(30)]
    counts = {label: {p: rng.randint(0, 8) for p in prompts}
              for label in ["warm start", "POPO, seed 0", "POPO, seed 1", "PSR, seed 0", "PSR, seed 1", "NSR, seed 7"]}
    runs = []
    for i, (label, c) in enumerate(counts.items()):
        write_samples(tmp_path / str(i), c)
        runs.append((label, plots.per_prompt(tmp_path / str(i))))
    text = plots.table(runs, "POPO")
    cells = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in text.splitlines()]
    rows = {r[0]: r for r in cells[2:]}

    def pk(c, k):
        return 1 - math.comb(8 - c, k) / math.comb(8, k)

    def mean_pass(label, k):
        return sum(pk(c, k) for c in counts[label].values()) / len(prompts)

    assert cells[0][2:6] == ["pass@1", "pass@2", "pass@4", "pass@8"]
    psr = rows["PSR"]
    assert psr[1] == "2"
    for j, k in enumerate((1, 2, 4, 8)):
        assert float(psr[2 + j]) == pytest.approx((mean_pass("PSR, seed 0", k) + mean_pass("PSR, seed 1", k)) / 2, abs=6e-4)
    for col, k in ((7, 1), (8, 8)):
        per_seed = [[pk(counts[f"PSR, seed {s}"][p], k) - pk(counts[f"POPO, seed {s}"][p], k) for p in sorted(prompts)]
                    for s in (0, 1)]  # the script's prompt order: the bootstrap resamples positions
        diffs = [sum(d) / len(prompts) for d in per_seed]
        mean, interval, seeds = psr[col].replace("[", ";").replace("] (", ";").rstrip(")").split(";")
        assert float(mean) == pytest.approx(sum(diffs) / 2, abs=6e-4)
        assert seeds == f"0: {diffs[0]:+.3f}, 1: {diffs[1]:+.3f}"
        lo, hi = bootstrap_interval([(a + b) / 2 for a, b in zip(*per_seed)])
        assert interval == f"{lo:+.3f}, {hi:+.3f}"
        assert lo < float(mean) < hi
    # the warm start (no seed in its label) pairs with every POPO seed; NSR's seed 7 with none
    warm = [mean_pass("warm start", 1) - mean_pass(f"POPO, seed {s}", 1) for s in (0, 1)]
    assert float(rows["warm start"][7].split(" [")[0]) == pytest.approx(sum(warm) / 2, abs=6e-4)
    assert rows["NSR"][7] == "unpaired"
    assert rows["POPO"][7] == ""


def test_diagnostics_average_each_run_then_the_seeds(tmp_path):
    plots = load_script()
    runs = [("POPO, seed 0", [{"step": 1, "implicit_neg/delta_logp": -0.1, "time/step_s": 1.0},
                              {"step": 2, "implicit_neg/delta_logp": -0.3, "entropy/mean": 0.5, "time/step_s": 3.0}]),
            ("POPO, seed 1", [{"step": 1, "implicit_neg/delta_logp": -0.6, "entropy/mean": 0.9, "time/step_s": 2.0},
                              {"step": 2, "entropy/mean": 0.7, "time/step_s": 2.0}]),
            ("GRPO, seed 0", [{"step": 1, "time/step_s": 5.0}])]
    lines = plots.diagnostics(runs).splitlines()
    head = [c.strip() for c in lines[0].strip()[1:-1].split("|")]
    rows = {r[0]: dict(zip(head, r)) for r in ([c.strip() for c in x.strip()[1:-1].split("|")] for x in lines[2:])}
    popo = rows["POPO"]
    assert popo["seeds"] == "2"
    assert float(popo["implicit_neg/delta_logp, mean over steps"]) == pytest.approx((-0.2 - 0.6) / 2)
    assert float(popo["entropy, last step"]) == pytest.approx((0.5 + 0.7) / 2)
    assert float(popo["step s"]) == pytest.approx(2.0)
    assert rows["GRPO"]["implicit_neg/delta_logp, mean over steps"] == ""
    assert float(rows["GRPO"]["step s"]) == pytest.approx(5.0)


@pytest.mark.parametrize("other,match", [({"0+0=": 3}, "other prompts"), (None, "same seed")])
def test_table_refuses_runs_it_cannot_compare(tmp_path, other, match):
    plots = load_script()
    write_samples(tmp_path / "a", {"0+0=": 1, "1+1=": 2})
    write_samples(tmp_path / "b", other or {"0+0=": 4, "1+1=": 5})
    runs = [("POPO, seed 0", plots.per_prompt(tmp_path / "a")),
            ("POPO, seed 0" if other is None else "PSR, seed 0", plots.per_prompt(tmp_path / "b"))]
    with pytest.raises(SystemExit, match=match):
        plots.table(runs, "POPO")
