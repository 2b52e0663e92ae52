"""benchmarks/tuned_vs_grpo.py: the whole experiment at its smoke size, end to end and resumed, and its
report redrawn from the committed records alone."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "tuned_vs_grpo.py"


def script(*args, cwd, env=None):
    import os

    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})


def test_dry_run_states_the_cost_and_runs_nothing(tmp_path):
    proc = script("--dry-run", "--out", str(tmp_path / "out"), "--results", str(tmp_path / "res"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("estimated CPU-hours"))
    total = float(line.rsplit("total ", 1)[1])
    assert 10 < total < 30  # 16 trials x 250 steps per method, 3 x 250-step confirmations, pass@64
    fewer = script("--dry-run", "--steps", "100", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert float(fewer.stdout.rsplit("total ", 1)[1]) < total
    assert not (tmp_path / "out").exists() and not (tmp_path / "res").exists()


@pytest.mark.slow
def test_smoke_runs_both_studies_and_confirmations_then_resumes_without_rerunning(tmp_path):
    out, res, img = tmp_path / "out", tmp_path / "res", tmp_path / "img"
    args = ("--smoke", "--untuned", "--out", str(out), "--results", str(res), "--img", str(img))
    proc = script(*args, cwd=tmp_path, env={"POPO_CACHE": str(tmp_path / "c")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "estimated CPU-hours" in proc.stdout.splitlines()[1]
    for method, params in (("popo", {"algo.momentum", "algo.clip_eps", "algo.penalty_weight", "optim.lr"}),
                           ("grpo", {"optim.lr", "algo.clip_eps"})):
        rows = list(csv.DictReader((res / f"arith-study-{method}.csv").open()))
        assert [r["number"] for r in rows] == ["0", "1"] and {r["state"] for r in rows} == {"COMPLETE"}
        assert set(rows[0]) == {"number", "state", "value", *params}
        assert all(1e-5 <= float(r["optim.lr"]) <= 3e-4 for r in rows)
        record = json.loads((res / f"arith-confirm-{method}.json").read_text())
        (seed,) = record["seeds"]
        assert seed == "1" and set(record["seeds"]["1"]["pass@k"]) == {"1", "2", "4"}
        assert isinstance(record["seeds"]["1"]["greedy"], float) and len(record["seeds"]["1"]["correct"]) == 24
        assert record["best"]["params"] == {k: float(v) for k, v in rows[int(record["best"]["trial"])].items() if k in params}
        run_cfg = (out / "confirm" / f"{method}-s1" / "config.yaml").read_text()
        assert f"name: {method}" in run_cfg and "seed: 1" in run_cfg
        lr = float(record["best"]["params"]["optim.lr"])
        assert f"lr: {lr!r}" in run_cfg or f"lr: {lr}" in run_cfg  # the best trial's, not the preset's
        preset = json.loads((res / f"arith-confirm-{method}-preset.json").read_text())
        assert preset["best"] is None and set(preset["seeds"]) == {"1"}
        assert "lr: 0.0001" in (out / "confirm" / f"{method}-preset-s1" / "config.yaml").read_text()  # the preset's
        # the figures, redrawn from the committed table
        assert {p.name for p in (img / f"arith-study-{method}").iterdir()} >= {"history.png", "slice.png"}
        metrics = (out / "sweeps" / f"arith-{method}" / "trial-0" / "metrics.jsonl").read_text()
        assert metrics.count("eval/pass_at_1") == 3  # the objective at steps 0, 1 and 2

    start = json.loads((res / "arith-warmstart.json").read_text())
    assert start["samples"] == 4 and len(start["correct"]) == 24 and set(start["pass@k"]) == {"1", "2", "4"}
    assert (img / "arith-tuned-passk.png").stat().st_size > 10_000
    table = proc.stdout[proc.stdout.index("| method |"):]
    assert table.count("| tuned POPO |") == table.count("| tuned GRPO |") == table.count("| warm start |") == 1
    assert "| POPO preset |" in table and "| GRPO preset |" in table
    for method in ("popo", "grpo"):  # what tuning bought, against the records: mean over prompts of c/n, tuned minus preset
        tuned, preset = (json.loads((res / f"arith-confirm-{method}{v}.json").read_text())["seeds"]["1"] for v in ("", "-preset"))
        diff = sum(c - preset["correct"][i] for i, c in tuned["correct"].items()) / tuned["samples"] / len(tuned["correct"])
        shown = re.search(rf"tuned {method.upper()} minus {method.upper()} preset: pass@1 ([-+][0-9.]+) \[", proc.stdout)
        assert shown and float(shown.group(1)) == pytest.approx(diff, abs=6e-4)
    assert "POPO study: 2 finished trials (2 complete, 0 pruned) of 2 steps" in proc.stdout

    stamps = {p: p.stat().st_mtime for p in out.rglob("result.json")}
    again = script(*args, cwd=tmp_path, env={"POPO_CACHE": str(tmp_path / "c")})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "popo_cli.main train" not in again.stdout and "popo_cli.main eval" not in again.stdout
    assert {p: p.stat().st_mtime for p in out.rglob("result.json")} == stamps  # nothing trained again
    assert len(list(csv.DictReader((res / "arith-study-grpo.csv").open()))) == 2
    redrawn = script("--report", "--results", str(res), "--img", str(tmp_path / "img2"), cwd=tmp_path)
    assert redrawn.returncode == 0, redrawn.stderr[-3000:]
    assert report_text(redrawn.stdout) == report_text(again.stdout) == report_text(proc.stdout)
    assert (tmp_path / "img2" / "arith-study-popo" / "importances.png").exists()


def report_text(stdout: str) -> str:
    return stdout[stdout.index("- POPO study"):stdout.index("figures in")]
