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


@pytest.mark.parametrize("figure,write", [("passk", write_eval), ("curves", write_run)])
def test_the_script_writes_the_figure(tmp_path, figure, write):
    args = []
    for i, label in enumerate(["warm start", "GRPO, seed 0", "POPO, seed 0"]):
        d = tmp_path / str(i)
        d.mkdir()
        write(d, 0.02 * i)
        args.append(f"{label}={d}")
    out = tmp_path / "figure.png"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "testbed_plots.py"), figure, "--out", str(out),
                           "--mean", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _style():
    labelled = set()

    def style(label, lw):
        f = label.split(",")[0]
        first, _ = f not in labelled, labelled.add(f)
        return {"color": "C0", "lw": lw, "label": f if first else None}

    return style


PASSK = {"warm start": {1: 0.20, 2: 0.30, 4: 0.40}, "GRPO, seed 0": {1: 0.30, 2: 0.35, 4: 0.45},
         "GRPO, seed 1": {1: 0.40, 2: 0.45, 4: 0.47}, "POPO, seed 0": {1: 0.25, 2: 0.40, 4: 0.50}}


def test_passk_figure_draws_each_run_and_its_difference_to_the_reference():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = load_script()
    fig = plots.passk_figure(plt, list(PASSK.items()), _style())
    ax, dx = fig.axes
    assert [list(line.get_ydata()) for line in ax.lines] == [[c[k] for k in (1, 2, 4)] for c in PASSK.values()]
    ref = PASSK["warm start"]
    drawn = [list(line.get_ydata()) for line in dx.lines if len(line.get_xdata()) == 3]
    expected = [[c[k] - ref[k] for k in (1, 2, 4)] for label, c in PASSK.items() if label != "warm start"]
    assert sum(drawn, []) == pytest.approx(sum(expected, [])) and len(drawn) == len(expected)
    plt.close(fig)


def test_passk_mean_figure_draws_the_seed_mean_and_its_range():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = load_script()
    fig = plots.passk_figure(plt, list(PASSK.items()), _style(), mean=True)
    ax = fig.axes[0]
    grpo = [0.5 * (PASSK["GRPO, seed 0"][k] + PASSK["GRPO, seed 1"][k]) for k in (1, 2, 4)]
    means = [list(line.get_ydata()) for line in ax.lines]
    assert means[1] == pytest.approx(grpo) and len(means) == 3  # warm start, GRPO's mean, POPO
    (band,) = ax.collections  # only GRPO has several seeds
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(0.30) and max(ys) == pytest.approx(0.47)
    plt.close(fig)


def test_curves_figure_draws_every_panel_from_the_metrics():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = load_script()
    runs = []
    for i, label in enumerate(["GRPO, seed 0", "POPO, seed 0"]):
        rows = [{"step": s, "reward/mean": 0.1 * i + s / 100, "eval/accuracy": s / 50, "entropy/mean": 1 - s / 40,
                 "pos/delta_logp": 0.01 * i, "implicit_neg/delta_logp": -0.01 * (i + 1)} for s in range(1, 21)]
        runs.append((label, rows))
    fig = plots.curves_figure(plt, runs, _style())
    assert len(fig.axes) == len(plots.PANELS)
    for ax, (key, _) in zip(fig.axes, plots.PANELS):
        smooth = 10 if key == "reward/mean" else 1
        data = [list(line.get_ydata()) for line in ax.lines if len(line.get_xdata()) > 2]  # not the zero line
        assert data == [list(plots.series(rows, key, smooth=smooth)[1]) for _, rows in runs], key
        assert ax.get_xlabel() == "rollout step"
    plt.close(fig)


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
