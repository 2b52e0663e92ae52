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
