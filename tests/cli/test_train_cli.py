"""`popo train` through the real entry point: bad input, help, and end-to-end runs."""

import json
import time

import pytest

from conftest import assert_one_line_error, run_popo, tiny_overrides


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["tiny", "algo.momentum=1.5"], ["algo.momentum"]),
        (["tiny", "algo.clip_eps=-1"], ["algo.clip_eps"]),
        (["nope"], ["unknown preset", "nope"]),
        (["tiny", "algo.nope=1"], ["algo.nope"]),
        (["tiny", "data=math", "data.path=missing.jsonl"], ["data.path", "not found"]),
        (["tiny", "data=math", "data.path=math_l3to6"], ["data.path=math_l3to6", "nor a packaged data set", "math_l3to5"]),
        (["tiny", "model.name_or_path=./no/such/dir"], ["model.name_or_path"]),
        (["tiny", "trainer.max_steps=abc"], ["trainer.max_steps"]),
        (["tiny", "momentum"], ["momentum", "key=value"]),
        (["tiny", "algo=ppo"], ["algo", "ppo"]),
        (["tiny", "algo=grpo", "rollout.group_size=1"], ["rollout.group_size=1"]),
        (["tiny", "algo=psr", "algo.use_negatives=true"], ["algo.use_negatives"]),
        (["tiny", "trainer.save_every=0"], ["trainer.save_every=0", "must be >= 1"]),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, args, fragments):
    assert_one_line_error(run_popo("train", *args, cwd=tmp_path, timeout=120), *fragments)


def test_malformed_training_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\nnot json\n')
    proc = run_popo("train", "tiny", "data=math", f"data.path={bad}", "data.eval_path=null",
                    f"trainer.output_dir={tmp_path}/run", "tracking.enabled=false", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "line 2")


def test_help_is_fast_and_lists_presets(tmp_path):
    start = time.perf_counter()
    proc = run_popo("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "train" in proc.stdout
    assert time.perf_counter() - start < 10  # generous: the import budget is checked by the stop hook
    proc = run_popo("train", "--help", cwd=tmp_path)
    assert all(p in proc.stdout for p in ("tiny", "qwen-math-7b", "qwen-math-1.5b"))


def test_short_train_through_the_cli(tmp_path):
    proc = run_popo("train", "tiny", *tiny_overrides(tmp_path, **{"tracking.enabled": "true"}), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "final eval/accuracy" in proc.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["step"] == 6
    again = run_popo("train", "tiny", *tiny_overrides(tmp_path, **{"tracking.enabled": "true"}), cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_tiny_model_trains_on_real_math_data(tmp_path):
    """The math path end to end: packaged training and held-out sets named as a preset names
    them, math-verify rewards, from a working directory with nothing in it."""
    proc = run_popo(
        "train", "tiny", "data=math", "data.path=gsm8k", "data.eval_path=aime25",
        "data.eval_size=4", "rollout.max_new_tokens=8", "rollout.prompts_per_step=3", "rollout.group_size=2",
        "trainer.max_steps=2", "trainer.eval_every=0", f"trainer.output_dir={tmp_path}/run", "tracking.enabled=false",
        cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2 and "eval/accuracy" in rows[-1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_popo_train_tiny_learns(tmp_path, seed):
    """The acceptance run: the default tiny preset, from near chance to >= 0.9 held-out accuracy."""
    start = time.perf_counter()
    proc = run_popo("train", "tiny", f"trainer.seed={seed}", f"trainer.output_dir={tmp_path}/run", cwd=tmp_path, timeout=900)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert evals[0] <= 0.15 and evals[-1] >= 0.9, evals
    assert any(r.get("clip/fraction", 0) > 0 for r in rows)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("popo").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["eval/accuracy"] >= 0.9
    assert runs[0].data.params["trainer.seed"] == str(seed)
    print(f"seed {seed}: {evals} in {elapsed:.0f}s")


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["popo", "grpo", "dr_grpo", "rft", "raft_pp", "psr", "nsr", "w_reinforce"])
def test_every_registered_method_trains_through_the_cli(tmp_path, algo):
    # Enough completions that every step has a positive and a negative (the untrained model is near chance).
    knobs = {"trainer.diagnostics_every": 1, "rollout.prompts_per_step": 16, "rollout.group_size": 8}
    proc = run_popo("train", "tiny", f"algo={algo}", *tiny_overrides(tmp_path, **knobs), cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and "eval/accuracy" in rows[-1]
    seen = set().union(*rows)
    # Every method logs the same names.
    assert {"loss/policy", "grad/norm", "clip/fraction", "ratio/mean", "entropy/mean", "train/forward_tokens"} <= seen


@pytest.mark.slow
def test_grpo_runs_to_the_end(tmp_path):
    proc = run_popo("train", "tiny", "algo=grpo", "trainer.max_steps=60", f"trainer.output_dir={tmp_path}/run",
                    cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "run" / "result.json").read_text())["step"] == 60
