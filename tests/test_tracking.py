"""What reaches MLflow: secrets never, every ordinary knob always."""

import pytest

from popo_core.tracking import redact


@pytest.mark.parametrize("key", ["hf_token", "model.hf_token", "auth.token", "token", "db.password", "openai_api_key",
                                 "tracking.apikey", "aws.secret_access_key", "credentials"])
def test_secret_looking_keys_are_dropped(key):
    assert redact({key: "s3cr3t"}) == {}


@pytest.mark.parametrize("key", ["rollout.max_new_tokens", "rollout.eval_max_new_tokens", "train/forward_tokens",
                                 "model.tokenizer", "algo.max_length", "data.token_budget_per_step"])
def test_ordinary_knobs_are_kept(key):
    assert redact({key: 16}) == {key: "16"}


def test_passwords_in_urls_are_masked():
    out = redact({"sweep.storage": "postgresql://popo:hunter2@db:5432/optuna"})
    assert out == {"sweep.storage": "postgresql://popo:***@db:5432/optuna"}


def test_batched_metrics_reach_the_store_on_flush_and_on_a_crash(tmp_path):
    from popo_core.tracking import MlflowRun, client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(RuntimeError):
        with MlflowRun(uri=uri, experiment="t", flush_every_s=3600) as run:
            for step in range(1, 4):
                run.log_metrics({"reward/mean": step / 10}, step)
            c = client(uri)
            assert c.get_metric_history(run.run_id, "reward/mean") == []  # held back, not yet sent
            run.flush()
            assert [m.step for m in c.get_metric_history(run.run_id, "reward/mean")] == [1, 2, 3]
            run.log_metrics({"reward/mean": 0.4}, 4)
            raise RuntimeError("crash")
    assert sorted(m.step for m in c.get_metric_history(run.run_id, "reward/mean")) == [1, 2, 3, 4]
    assert c.get_run(run.run_id).info.status == "FAILED"


def test_unbatched_metrics_are_sent_at_once(tmp_path):
    from popo_core.tracking import MlflowRun, client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = MlflowRun(uri=uri, experiment="t")
    run.log_metrics({"x": 1.0}, 0)
    assert [m.value for m in client(uri).get_metric_history(run.run_id, "x")] == [1.0]


def test_a_flush_sends_whole_steps_to_each_call(tmp_path):
    """The store commits one call at once: no step may straddle two calls (a kill between them would
    leave it half-written)."""
    from popo_core.tracking import MlflowRun

    run = MlflowRun(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t", flush_every_s=3600)
    calls = []
    send = run.client.log_batch
    run.client.log_batch = lambda run_id, metrics: (calls.append([m.step for m in metrics]), send(run_id, metrics=metrics))
    for step in range(40):
        run.log_metrics({f"m{k}": float(k) for k in range(30)}, step)  # 1,200 metrics: more than one call holds
    run.flush()
    assert len(calls) == 2 and all(len(c) <= 1000 for c in calls)
    assert sorted(s for c in calls for s in c) == sorted(s for s in range(40) for _ in range(30))
    assert not set(calls[0]) & set(calls[1])  # each step in one call only
