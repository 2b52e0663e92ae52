"""The arith testbed end to end: `popo eval --bench arith` on a warm start, its bad input, and
`popo train arith` on a fresh cache (builds the warm start, then reuses it)."""

import json
import math
from pathlib import Path

import pytest
from conftest import run_popo

from popo_core.evaluation import suite as bm
from popo_core.evaluation import synthetic
from popo_core.model import warmstart
from popo_core.config import compose
from popo_core.data.tasks import load_task

SMALL = ["model.name_or_path=warmstart", "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "warmstart.steps=30",
         "warmstart.batch_size=16", "warmstart.warmup_steps=5", "warmstart.lr=1e-2", "data.train_size=60",
         "data.eval_size=6", "model.bench_max_new_tokens=40", "trainer.threads=1"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(config, warm start dir): a small warm start, built once for the module in its own cache."""
    import os

    import torch

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("POPO_CACHE")
    os.environ["POPO_CACHE"] = str(cache)
    threads = torch.get_num_threads()
    try:
        cfg = compose("arith", SMALL)
        path = warmstart.ensure(cfg).model.name_or_path
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("POPO_CACHE")
        else:
            os.environ["POPO_CACHE"] = old
    return cfg, Path(path)


def _invoke(*args, cwd):
    from typer.testing import CliRunner

    from popo_cli.main import app

    return CliRunner().invoke(app, ["eval", *map(str, args)], env={"COLUMNS": "200"}, catch_exceptions=False)


def test_eval_arith_prints_the_pass_at_k_curve_on_the_held_out_prompts(built, tmp_path, monkeypatch):
    cfg, path = built
    monkeypatch.chdir(tmp_path)
    result = _invoke("--bench", "arith", "--model", path, "--samples", "4", "--threads", "1", "--no-tracking",
                     "--output", "out", cwd=tmp_path)
    assert result.exit_code == 0, result.output
    for column in ("pass@1", "pass@2", "pass@4"):
        assert column in result.output
    assert "6 held-out arith prompts of data.seed=0" in result.output and "FinalAnswer" in result.output
    assert "sampling temperature 1.0" in result.output and "max_new_tokens 40" in result.output
    (summary,) = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (summary["bench"], summary["n"], summary["samples"]) == ("arith", 6, 4)
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    # The very prompts the trainer holds out, each graded on its final answer.
    held_out = load_task(cfg)[1]
    assert [r["id"] for r in rows[::4]] == [p.id for p in held_out]
    for r in rows:
        assert r["correct"] == (r["response"].rpartition("=")[2].strip() == r["gold"])
    # pass@k against the combinatorial definition, per prompt then averaged.
    for k in (1, 2, 4):
        expected = 0.0
        for i in range(6):
            c = sum(r["correct"] for r in rows[4 * i : 4 * i + 4])
            expected += 1 - math.comb(4 - c, k) / math.comb(4, k)
        assert summary["pass@k"][str(k)] == pytest.approx(expected / 6)


def test_bench_all_stays_the_math_suite():
    assert synthetic.split_names(["all"]) == ([], ["all"])
    assert synthetic.split_names(["arith,math500", "arith"]) == (["arith"], ["math500"])
    assert [b.name for b in bm.resolve(["all"])] == list(bm.BENCHMARKS) and "arith" not in bm.BENCHMARKS
    assert len(bm.BENCHMARKS) == 7


def test_eval_arith_bad_input_is_one_line(built, tmp_path, monkeypatch):
    _, path = built
    monkeypatch.chdir(tmp_path)
    tiny_run = tmp_path / "tiny_run"
    tiny_run.mkdir()
    (tiny_run / "config.json").write_text("{}")
    (tiny_run / "config.yaml").write_text("model:\n  template: plain\ndata:\n  task: tiny\n")
    (tmp_path / "r.jsonl").write_text('{"id": "1+2=", "response": "1+2=3"}\n')
    cases = {
        ("--bench", "arith", "--bench", "math500", "--model", path): "evaluate it on its own",
        ("--bench", "arith", "--responses", "r.jsonl"): "give --model",
        ("--bench", "arith", "--model", tiny_run): "data.task=tiny",
        ("--bench", "arith", "--model", "popo:arith-warmstrt"): "unknown shipped model",
    }
    for args, message in cases.items():
        result = _invoke(*args, "--no-tracking", cwd=tmp_path)
        assert result.exit_code == 2, (args, result.output)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)


@pytest.mark.slow
def test_popo_train_arith_builds_its_warm_start_then_reuses_it(workdir):
    env = {"POPO_CACHE": str(workdir / "cache")}
    budget = [*SMALL, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.save_every=2", "trainer.diagnostics_every=2",
              "rollout.prompts_per_step=6", "rollout.group_size=4", "rollout.max_new_tokens=40", "tracking.enabled=false"]
    first = run_popo("train", "arith", *budget, "trainer.output_dir=run1", cwd=workdir, env=env)
    assert first.returncode == 0, first.stderr + first.stdout
    assert "not cached: building it" in first.stdout
    ws = next((workdir / "cache" / "warmstart").glob("*/warmstart.json")).parent
    metrics = [json.loads(line) for line in (workdir / "run1" / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval/accuracy"] for m in metrics if "eval/accuracy" in m]
    assert [m["step"] for m in metrics if "eval/accuracy" in m] == [0, 2, 4] and all(0 <= a <= 1 for a in evals)
    # Completions have several tokens (trace + EOS) and some end before the limit.
    assert all(m["completion/length"] > 3 for m in metrics if "completion/length" in m)
    assert any(m["completion/truncated_fraction"] < 1 for m in metrics if "completion/truncated_fraction" in m)
    assert f"name_or_path: {ws}" in (workdir / "run1" / "config.yaml").read_text()

    second = run_popo("train", "arith", *budget, "algo=grpo", "trainer.output_dir=run2", cwd=workdir, env=env)
    assert second.returncode == 0, second.stderr + second.stdout
    assert "building" not in second.stdout and str(ws) in second.stdout
    assert len(list((workdir / "cache" / "warmstart").glob("*/warmstart.json"))) == 1

    ev = run_popo("eval", "--bench", "arith", "--model", "run1", "--samples", "4", "--threads", "1", "--no-tracking",
                  cwd=workdir, env=env)
    assert ev.returncode == 0, ev.stderr
    assert "pass@4" in ev.stdout and "6 held-out arith prompts" in ev.stdout
