import pytest

from popo_core.algo import losses

from popo_core.algo import siamese
from popo_core.config import (
    AGGREGATIONS,
    MOMENTUM_SCHEDULES,
    REDISTRIBUTIONS,
    REPRESENTATIONS,
    ConfigError,
    compose,
    presets,
    to_flat_dict,
)

METHOD_NAMES = """algo.name algo.clip_eps algo.redistribution algo.aggregation algo.momentum
algo.momentum_schedule algo.penalty_weight algo.representation algo.predictor algo.siamese
algo.penalty algo.use_negatives algo.epochs algo.mini_batches algo.scale_std algo.adv_eps
algo.kl_beta algo.max_length algo.positive_weight algo.rollout_correction algo.rollout_is_cap rollout.group_size rollout.prompts_per_step rollout.max_new_tokens rollout.temperature
optim.lr trainer.max_steps trainer.seed trainer.eval_every trainer.diagnostics_every
trainer.output_dir""".split()


def test_every_knob_named_in_method_exists():
    flat = to_flat_dict(compose("tiny"))
    missing = [k for k in METHOD_NAMES if k not in flat]
    assert not missing


def test_one_registry_of_methods_and_choices():
    """The losses register exactly the methods of the torch-free table, with its metadata; the
    penalties and choices the math modules accept are the table's; composing a config needs no torch."""
    import subprocess
    import sys

    from popo_core.algo.choices import PENALTIES, SPECS

    assert set(losses.METHODS) == set(SPECS)
    for name, spec in SPECS.items():
        m = losses.METHODS[name]
        assert (m.forwards, m.knobs, m.penalty_rows, m.summary) == (spec.forwards, spec.knobs, spec.penalty_rows,
                                                                     spec.summary), name
    assert set(siamese.PENALTIES) == set(PENALTIES)
    assert MOMENTUM_SCHEDULES is siamese.MOMENTUM_SCHEDULES and REPRESENTATIONS is siamese.REPRESENTATIONS
    assert REDISTRIBUTIONS is losses.REDISTRIBUTIONS and AGGREGATIONS is losses.AGGREGATIONS
    code = "import sys, popo_core.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_presets_and_defaults():
    assert {"tiny", "qwen-math-7b", "qwen-math-1.5b"} <= set(presets())
    cfg = compose("tiny")
    assert cfg.algo.name == "popo" and cfg.algo.momentum == 0.99 and cfg.algo.clip_eps == 0.2
    assert cfg.algo.penalty_weight == 0.1 and cfg.algo.redistribution == "uniform"
    # The tiny preset feeds each rollout batch to more than one optimizer step (METHOD.md).
    assert cfg.algo.epochs * cfg.algo.mini_batches >= 2


def test_algo_group_switches_method_and_keeps_preset_budget():
    cfg = compose("tiny", ["algo=grpo"])
    assert cfg.algo.name == "grpo" and not cfg.algo.siamese
    assert cfg.algo.epochs == compose("tiny").algo.epochs


def test_overrides_are_typed():
    cfg = compose("tiny", ["algo.clip_eps=inf", "algo.momentum=0.9", "trainer.max_steps=7"])
    assert cfg.algo.clip_eps == float("inf") and cfg.algo.momentum == 0.9 and cfg.trainer.max_steps == 7


@pytest.mark.parametrize(
    "override, key",
    [
        ("algo.momentum=1.5", "algo.momentum"),
        ("algo.clip_eps=-1", "algo.clip_eps"),
        ("algo.clip_eps=0", "algo.clip_eps"),
        ("algo.penalty_weight=-0.1", "algo.penalty_weight"),
        ("algo.redistribution=foo", "algo.redistribution"),
        ("algo.foo=1", "algo.foo"),
        ("algo.momentum=abc", "algo.momentum"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("algo=ppo", "algo"),
        ("data.path=missing.jsonl", "data.path"),
        ("+algo.new=1", "algo.new"),
    ],
)
def test_bad_settings_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        compose("tiny", [override])
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        compose("nope")


def test_math_task_needs_an_existing_file(tmp_path):
    with pytest.raises(ConfigError, match="data.path=.*not found"):
        compose("tiny", ["data=math", f"data.path={tmp_path}/none.jsonl", "data.eval_path=null"])
    f = tmp_path / "train.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n')
    cfg = compose("tiny", ["data=math", f"data.path={f}", "data.eval_path=null"])
    assert cfg.data.task == "math"


def test_group_size_is_checked_by_the_method_not_here():
    # Method-specific checks need the registry (popo_core.algo.objective.build_objective, tested in
    # tests/algo/test_objective.py); composing stays torch-free.
    assert compose("tiny", ["algo=grpo", "rollout.group_size=1"]).rollout.group_size == 1


@pytest.mark.parametrize("override, key", [
    ("algo.name=ppo", "algo.name"),
    ("algo.rollout_correction=foo", "algo.rollout_correction"),
    ("algo.rollout_is_cap=0.5", "algo.rollout_is_cap"),
    ("algo.max_length=0", "algo.max_length"),
    ("algo.positive_weight=-1", "algo.positive_weight"),
])
def test_new_knobs_are_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        compose("tiny", [override])


# ------------------------------------------------------------------ rollout.max_staleness (issue 21)
@pytest.mark.parametrize("staleness, explicit, used", [
    (0, None, "none"), (1, None, "tis"), (2, None, "tis"), (1, "mis", "mis"), (0, "tis", "tis"),
])
def test_the_rollout_correction_is_resolved_at_compose_time(staleness, explicit, used):
    """null: tis (cap 2) when the sampler lags (max_staleness > 0), none otherwise; so MLflow logs the value used."""
    extra = [f"algo.rollout_correction={explicit}"] if explicit else []
    cfg = compose("tiny", [f"rollout.max_staleness={staleness}", *extra])
    assert cfg.algo.rollout_correction == used and cfg.algo.rollout_is_cap == 2.0


def test_no_correction_with_a_lagging_sampler_is_allowed_and_warned_about():
    with pytest.warns(UserWarning, match="rollout.max_staleness=1 with algo.rollout_correction=none"):
        cfg = compose("tiny", ["rollout.max_staleness=1", "algo.rollout_correction=none"])
    assert cfg.algo.rollout_correction == "none"


def test_a_lagging_sampler_is_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=1: with 2 processes \(torchrun\)"):
        compose("tiny", ["rollout.max_staleness=1"])
    assert compose("tiny", ["rollout.max_staleness=0"]).rollout.max_staleness == 0
