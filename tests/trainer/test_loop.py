import json

import pytest
import torch

from conftest import tiny_overrides
from popo_core.config import ConfigError, compose
from popo_core.grading.verifiers import Grade
from popo_core.trainer.lifecycle import TrainingRun
from popo_core.trainer.lifecycle import Callbacks
from popo_core.trainer.update import TrainingAborted
from popo_core.trainer.loop import train
from helpers import StopAt

REQUIRED_METRICS = [
    "reward/mean", "positives/fraction", "groups/no_positive_fraction", "clip/fraction", "penalty/similarity",
    "implicit_neg/delta_logp", "pos/delta_logp", "entropy/mean", "completion/length", "throughput/tokens_per_s",
    "loss/policy", "grad/norm",
]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def policy_state(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_short_run_logs_everything_to_mlflow(workdir):
    cfg = compose("tiny", tiny_overrides(workdir, **{"tracking.enabled": "true", "trainer.max_steps": 4, "trainer.diagnostics_every": 1,
                                                 "rollout.prompts_per_step": 24, "rollout.group_size": 8}))
    result = train(cfg)
    out = workdir / "run"
    assert result.step == 4 and result.final_accuracy is not None
    for f in ("config.json", "model.safetensors", "tokenizer.json", "config.yaml", "curves.png", "result.json"):
        assert (out / f).exists(), f
    seen = set().union(*(r.keys() for r in read_metrics(out)))
    assert set(REQUIRED_METRICS) <= seen
    assert "eval/accuracy" in seen and "rollout/logprob_mismatch" in seen

    import mlflow

    # An explicit client: mlflow's module-level tracking URI is process-global and other tests set it.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("popo").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.params["algo.momentum"] == "0.99" and run.data.params["algo.name"] == "popo"
    assert {"reward/mean", "eval/accuracy", "clip/fraction"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "metrics.jsonl"} <= artifacts


def test_mlflow_holds_every_step_before_each_checkpoint(workdir, monkeypatch):
    """With an hour between batched flushes, each checkpoint still finds every step up to its own
    in the MLflow store: a resume from it skips exactly the steps MLflow has (TrainingRun.save)."""
    import mlflow

    from popo_core.trainer import checkpoint

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    held, save = {}, checkpoint.save

    def saving(output_dir, *, state, **kwargs):
        (run,) = client.search_runs([client.get_experiment_by_name("popo").experiment_id])
        held[state["step"]] = sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/mean"))
        return save(output_dir, state=state, **kwargs)

    monkeypatch.setattr(checkpoint, "save", saving)
    train(compose("tiny", tiny_overrides(workdir, **{"tracking.enabled": "true", "trainer.max_steps": 4,
                                                     "trainer.save_every": 2, "tracking.flush_every_s": 3600})))
    assert held == {2: [1, 2], 4: [1, 2, 3, 4]}


def test_final_policy_loads_with_transformers(workdir):
    from transformers import AutoModelForCausalLM

    from popo_core.model.loading import load_tokenizer

    train(compose("tiny", tiny_overrides(workdir, **{"trainer.max_steps": 2})))
    model = AutoModelForCausalLM.from_pretrained(workdir / "run")
    tok = load_tokenizer(str(workdir / "run"))
    assert model.config.vocab_size == len(tok)


def test_crash_and_resume_equals_uninterrupted_run(workdir):
    straight = compose("tiny", tiny_overrides(workdir / "a"))
    train(straight)
    crashing = compose("tiny", tiny_overrides(workdir / "b"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashing, StopAt(5))  # after the checkpoint at step 3
    resumed = train(compose("tiny", tiny_overrides(workdir / "b")))
    assert resumed.step == 6
    a, b = policy_state(workdir / "a" / "run"), policy_state(workdir / "b" / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # Step 4 was redone after the crash, and logged once: metrics.jsonl was cut back to the checkpoint.
    assert [r["step"] for r in read_metrics(workdir / "b" / "run")] == list(range(7))
    straight_rows = read_metrics(workdir / "a" / "run")
    for x, y in zip(straight_rows, read_metrics(workdir / "b" / "run")):
        assert {k: v for k, v in x.items() if not k.startswith(("time/", "throughput/"))} == \
               {k: v for k, v in y.items() if not k.startswith(("time/", "throughput/"))}
    again = train(compose("tiny", tiny_overrides(workdir / "b")))
    assert again.resumed_complete and again.step == 6


def test_resume_refuses_a_different_config(workdir):
    train(compose("tiny", tiny_overrides(workdir, **{"trainer.max_steps": 1})))
    with pytest.raises(ConfigError, match="algo.momentum"):
        TrainingRun(compose("tiny", tiny_overrides(workdir, **{"algo.momentum": 0.5})))


@pytest.mark.parametrize("algo", ["popo", "grpo"])
def test_micro_batches_do_not_change_the_update(workdir, algo):
    # micro-batches of 5 completions split the groups of 4
    common = {"trainer.max_steps": 2, "trainer.eval_every": 0, "algo.redistribution": "self_normalized"}
    if algo == "grpo":
        common = {"trainer.max_steps": 2, "trainer.eval_every": 0}
    train(compose("tiny", [f"algo={algo}", *tiny_overrides(workdir / "big", **common, **{"trainer.micro_batch_size": 1000})]))
    train(compose("tiny", [f"algo={algo}", *tiny_overrides(workdir / "small", **common, **{"trainer.micro_batch_size": 5})]))
    a, b = policy_state(workdir / "big" / "run"), policy_state(workdir / "small" / "run")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_popo_sends_only_positives_through_forward_and_backward(workdir):
    train(compose("tiny", tiny_overrides(workdir / "p", **{"trainer.max_steps": 3})))
    train(compose("tiny", ["algo=grpo", *tiny_overrides(workdir / "g", **{"trainer.max_steps": 3})]))
    cfg = compose("tiny")
    epochs, n = cfg.algo.epochs, 6 * 4
    for row in read_metrics(workdir / "p" / "run")[1:]:
        positives = round(row["positives/fraction"] * n)
        assert row["train/forward_tokens"] == epochs * positives * row["completion/length"]
    for row in read_metrics(workdir / "g" / "run")[1:]:
        assert row["train/forward_tokens"] == epochs * n * row["completion/length"]


def test_live_importance_ratio_with_several_updates_per_batch(workdir):
    train(compose("tiny", tiny_overrides(workdir, **{"trainer.max_steps": 20, "optim.lr": 3e-3})))
    rows = read_metrics(workdir / "run")[1:]
    assert any(abs(r.get("ratio/mean", 1.0) - 1.0) > 1e-4 for r in rows)


def test_batch_without_positives_is_skipped(workdir, monkeypatch):
    class Never:
        def __call__(self, responses, golds):
            return [Grade(False, r, "ok") for r in responses]

    monkeypatch.setattr("popo_core.trainer.loop.make_verifier", lambda task: Never())
    result = train(compose("tiny", tiny_overrides(workdir, **{"trainer.max_steps": 2, "trainer.eval_every": 0})))
    assert result.metrics["train/skipped_updates"] == result.metrics["train/updates"] > 0
    initial = compose("tiny").model
    from popo_core.model.loading import load_model_and_tokenizer

    fresh, _ = load_model_and_tokenizer(initial, device=torch.device("cpu"), seed=0)
    for k, v in policy_state(workdir / "run").items():
        torch.testing.assert_close(v, fresh.state_dict()[k])


def test_non_finite_losses_abort_after_k_in_a_row(workdir, monkeypatch):
    import dataclasses

    from popo_core.algo import objective as objective_module

    real = objective_module.build_objective

    def poisoned(algo, **kwargs):
        obj = real(algo, **kwargs)

        def nan_loss(*args, **kw):
            loss, m = obj.method.loss(*args, **kw)
            return loss * float("nan"), m

        return dataclasses.replace(obj, method=dataclasses.replace(obj.method, loss=nan_loss))

    monkeypatch.setattr("popo_core.trainer.loop.build_objective", poisoned)
    cfg = compose("tiny", tiny_overrides(workdir, **{"trainer.max_steps": 50, "trainer.max_nonfinite": 3, "optim.lr": 1e-2}))
    with pytest.raises(TrainingAborted, match="3 non-finite"):
        train(cfg)


def test_group_size_one_is_refused_for_group_normalised_methods(workdir):
    with pytest.raises(ConfigError, match="rollout.group_size=1"):
        train(compose("tiny", ["algo=grpo", *tiny_overrides(workdir, **{"rollout.group_size": 1})]))
    with pytest.raises(ConfigError, match="rollout.group_size=1"):
        train(compose("tiny", tiny_overrides(workdir, **{"rollout.group_size": 1, "algo.use_negatives": "true"})))
    assert not (workdir / "run").exists()  # refused before anything was written


def test_use_negatives_only_where_a_combination_is_registered(workdir):
    with pytest.raises(ConfigError, match="algo.use_negatives"):
        train(compose("tiny", ["algo=psr", *tiny_overrides(workdir, **{"algo.use_negatives": "true"})]))


@pytest.mark.slow
def test_killed_run_logs_each_step_once(workdir):
    """SIGKILL after the last checkpoint, then resume: metrics.jsonl and MLflow hold each step once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import mlflow

    # Every step straight to MLflow: at the kill it holds steps past the checkpoint, which the resume must not resend.
    over = tiny_overrides(workdir, **{"tracking.enabled": "true", "trainer.max_steps": 30, "trainer.save_every": 10,
                                      "trainer.eval_every": 10, "tracking.flush_every_s": 0})
    cmd = [sys.executable, "-m", "popo_cli.main", "train", "tiny", *over]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = workdir / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(x)["step"] >= 16 for x in metrics.read_text().splitlines() if x.strip()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
    assert max(logged) >= 16 and (workdir / "run" / "checkpoint").exists()
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in read_metrics(workdir / "run")]
    assert steps == list(range(31))
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("popo").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "reward/mean")) == list(range(1, 31))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/accuracy")) == [0, 10, 20, 30]
