"""Any key can be swept: a shipped space, a user's YAML file, `--param` specs (typed, checked),
and the study's record of its space covers all three."""

import textwrap

import pytest

from helpers import load_study

TINY = ["trainer.max_steps=1", "trainer.eval_every=1", "rollout.prompts_per_step=6", "rollout.group_size=4"]


def settings(tmp, **kw):
    from popo_core.sweep.study import SweepSettings

    return SweepSettings(knob=kw.pop("knob", "lr"), storage=f"sqlite:///{tmp}/optuna.db",
                         overrides=kw.pop("overrides", TINY), **kw)


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_param_specs_are_typed_as_their_keys():
    from popo_core.sweep.space import Param, parse_param

    assert parse_param("optim.lr=1e-5:3e-4:log") == Param("optim.lr", 1e-5, 3e-4, True)
    assert parse_param("algo.clip_eps=0.1:0.3") == Param("algo.clip_eps", 0.1, 0.3, False)
    assert parse_param("algo.epochs=1:4") == Param("algo.epochs", 1.0, 4.0, integer=True)
    assert parse_param("algo.clip_eps=0.1,0.2,1").choices == (0.1, 0.2, 1.0)
    assert parse_param("algo.epochs=1,2").choices == (1, 2)
    assert parse_param("algo.siamese=true,False").choices == (True, False)
    assert parse_param("algo.name=popo,grpo").choices == ("popo", "grpo")
    assert parse_param("trainer.eval_samples=null,8").choices == (None, 8)
    assert [type(c) for c in parse_param("algo.clip_eps=1,2").choices] == [float, float]


@pytest.mark.parametrize("spec, message", [
    ("optim.lrr=1:2", "unknown key optim.lrr (did you mean optim.lr?)"),
    ("lr=1e-5:1e-3", "unknown key lr (did you mean optim.lr"),
    ("optim.lr=3e-4:1e-5", "need low < high, got 0.0003 >= 1e-05"),
    ("optim.lr=1e-4:1e-4", "need low < high"),
    ("optim.lr=-1:1:log", "a log range needs low > 0, got -1"),
    ("optim.lr=1:2:ln", "the third field may only be 'log'"),
    ("optim.lr=a:b", "low and high must be numbers"),
    ("algo.epochs=1.5:3", "low and high must be integers"),
    ("algo.epochs=1,2.5", "algo.epochs takes an int, not '2.5'"),
    ("algo.clip_eps=0.1,wide", "algo.clip_eps takes a float, not 'wide'"),
    ("algo.siamese=1,0", "algo.siamese takes a bool (true or false), not '1'"),
    ("optim.lr=null,1e-4", "optim.lr takes a float, not null"),
    ("algo.name=a:b", "algo.name is a string: give choices"),
    ("algo.epochs=1,1", "a choice is repeated"),
    ("model.lora.targets=q_proj,v_proj", "not a single value"),
    ("optim.lr", "expected KEY=LOW:HIGH[:log] or KEY=a,b,c"),
])
def test_a_bad_param_spec_is_named(spec, message):
    from popo_core.sweep.space import SweepError, parse_param

    with pytest.raises(SweepError) as err:
        parse_param(spec)
    assert str(err.value).startswith(f"--param {spec}: ") and message in str(err.value), str(err.value)


def test_param_adds_to_the_named_space_or_replaces_its_parameter():
    from popo_core.sweep.space import load_space

    joint = load_space("all", ["optim.lr=1e-5:3e-4:log", "algo.clip_eps=0.1,0.2"])
    assert [p.name for p in joint] == ["algo.momentum", "algo.clip_eps", "algo.penalty_weight", "optim.lr"]
    assert joint[1].choices == (0.1, 0.2) and joint[3].high == 3e-4
    (lr,) = load_space("lr", ["optim.lr=1e-4:1e-2:log"])
    assert (lr.low, lr.high, lr.grid) == (1e-4, 1e-2, None)


def test_a_users_space_file(tmp_path):
    from popo_core.sweep.space import SweepError, load_space

    own = write(tmp_path / "mine.yaml", """\
        defaults: [all]
        params:
          optim.lr: {low: 1.0e-5, high: 3.0e-4, log: true}
          algo.momentum: {choices: [0.9, 0.99]}
          algo.epochs: {low: 1, high: 3}
        """)
    space = {p.name: p for p in load_space(own)}
    assert list(space) == ["algo.clip_eps", "algo.penalty_weight", "optim.lr", "algo.momentum", "algo.epochs"]
    assert space["algo.momentum"].choices == (0.9, 0.99) and space["algo.epochs"].integer
    assert space["algo.penalty_weight"].log  # from experiments/sweep/penalty.yaml
    for text, message in [
        ("params: {optim.lrr: {low: 1, high: 2}}", "unknown key optim.lrr (did you mean optim.lr?)"),
        ("params: {optim.lr: {low: 2, high: 1}}", "need low < high"),
        ("params: {optim.lr: {low: 0, high: 1, log: true}}", "a log range needs low > 0"),
        ("params: {algo.epochs: {choices: [1, two]}}", "algo.epochs takes an int, not 'two'"),
        ("params: {algo.siamese: {choices: [1, 0]}}", "algo.siamese takes a bool (true or false), not 1"),
        ("params: {optim.lr: {low: 1.0e-5, hihg: 1}}", "unknown field 'hihg' (did you mean high?)"),
        ("prams: {}", "unknown field 'prams'"),
        ("defaults: [lrr]\n", "'lrr' is not a shipped space"),
        ("params: [optim.lr]", "params must map config keys"),
        ("params: {optim.lr: {low: 1e-5, high: 1e-3, grid: [1.0]}}", "grid points must lie in"),
        ("params: {a: [", "not readable YAML"),
    ]:
        with pytest.raises(SweepError) as err:
            load_space(write(tmp_path / "bad.yaml", text))
        assert str(err.value).startswith(f"{tmp_path}/bad.yaml: ") and message in str(err.value), (text, str(err.value))


def test_a_study_records_a_space_given_by_param_or_file_and_refuses_another(workdir):
    from popo_core.sweep.study import Sweep, SweepError

    first = Sweep(settings(workdir, params=["optim.lr=1e-4:1e-2:log", "algo.epochs=1,2"]))
    assert first.name == "lr-tiny" and first.study.user_attrs["popo.params"] == "optim.lr=1e-4:1e-2:log algo.epochs=1,2"
    assert {"name": "algo.epochs", "low": None, "high": None, "log": False, "choices": [1, 2]} in \
        first.study.user_attrs["popo.space"]
    Sweep(settings(workdir, params=["optim.lr=1e-4:1e-2:log", "algo.epochs=1,2"]))  # the same space: accepted
    cases = [
        ([], "was run with optim.lr in [0.0001, 0.01] log, algo.epochs in {1, 2}; this command has "
             "optim.lr in [1e-05, 0.001] log, no algo.epochs: rerun with the same search space "
             "(this command's is experiments/sweep/lr.yaml), or pick another --study"),
        (["optim.lr=1e-4:1e-2:log", "algo.epochs=1,3"], "algo.epochs in {1, 3}"),
        (["optim.lr=1e-4:1e-2:log", "algo.epochs=1:2"], "algo.epochs in [1, 2] int"),
    ]
    for params, fragment in cases:
        with pytest.raises(SweepError) as err:
            Sweep(settings(workdir, params=params))
        assert fragment in str(err.value) and "\n" not in str(err.value), str(err.value)

    own = write(workdir / "mine.yaml", "params:\n  optim.lr: {low: 1.0e-4, high: 1.0e-2, log: true}\n")
    job = Sweep(settings(workdir, knob=own))
    assert job.name == "mine-tiny" and load_study(workdir, "mine-tiny").user_attrs["popo.knob"] == "mine.yaml"
    write(workdir / "mine.yaml", "params:\n  optim.lr: {low: 1.0e-5, high: 1.0e-2, log: true}\n")  # edited since
    with pytest.raises(SweepError, match=r"\(this command's is .*mine.yaml\)"):
        Sweep(settings(workdir, knob=own))
    with pytest.raises(SweepError, match="knob=lr; this command has knob=mine.yaml"):
        Sweep(settings(workdir, knob=own, study="lr-tiny"))


def test_a_trial_resolves_the_keys_its_swept_values_derive(workdir):
    """algo.rollout_correction (null: tis when rollout.max_staleness > 0) and algo.max_length (null:
    rollout.max_new_tokens) follow a trial's own values, as `popo train` with them would; a key
    given explicitly stays as given."""
    from popo_core.sweep.study import Sweep

    job = Sweep(settings(workdir, knob="lr", overrides=TINY + ["tracking.enabled=false", "algo=dr_grpo"],
                         params=["rollout.max_staleness=0,1", "rollout.max_new_tokens=2,3"]))
    assert job.base.algo.rollout_correction == "none"
    job.parent_id = None  # set by run(), which opens MLflow
    stale = job._trial_config(0, {"rollout.max_staleness": 1, "rollout.max_new_tokens": 3}, None)
    assert stale.algo.rollout_correction == "tis" and stale.algo.max_length == 3
    synchronous = job._trial_config(1, {"rollout.max_staleness": 0, "rollout.max_new_tokens": 2}, None)
    assert synchronous.algo.rollout_correction == "none" and synchronous.algo.max_length == 2
    fixed = Sweep(settings(workdir, knob="lr", study="fixed", params=["rollout.max_new_tokens=2,3"],
                           overrides=TINY + ["tracking.enabled=false", "algo=dr_grpo", "algo.max_length=7"]))
    fixed.parent_id = None
    assert fixed._trial_config(0, {"rollout.max_new_tokens": 3}, None).algo.max_length == 7


def test_a_swept_int_and_bool_reach_the_trial_config(workdir):
    """Through a real (one-step) trial: the sampled values are set on the run's config, typed."""
    import yaml

    from popo_core.sweep.study import Sweep

    job = Sweep(settings(workdir, knob="momentum", trials=2, sampler="grid", overrides=TINY + ["tracking.enabled=false"],
                         params=["algo.momentum=0.9,0.99", "algo.epochs=1,2", "algo.siamese=true,false"]))
    result = job.run()
    assert [r.state for r in result.rows] == ["COMPLETE", "COMPLETE"]
    for row in result.rows:
        cfg = yaml.safe_load((workdir / row.output_dir / "config.yaml").read_text())
        assert cfg["algo"]["epochs"] == row.params["algo.epochs"] and type(row.params["algo.epochs"]) is int
        assert cfg["algo"]["momentum"] == row.params["algo.momentum"]
        assert cfg["algo"]["siamese"] is row.params["algo.siamese"]
