"""A study's trials stay comparable: a command with another budget, override, preset, metric,
direction or search space is refused before it writes anything; another --trials is allowed."""

import os
import subprocess
import sys

import pytest

from conftest import assert_one_line_error
from helpers import load_study

TINY = ["trainer.max_steps=1", "trainer.eval_every=1", "rollout.prompts_per_step=6", "rollout.group_size=4"]


def settings(tmp, **kw):
    from popo_core.sweep.study import SweepSettings

    return SweepSettings(knob=kw.pop("knob", "momentum"), storage=f"sqlite:///{tmp}/optuna.db",
                         overrides=kw.pop("overrides", TINY), **kw)


def refusal(tmp, **kw) -> str:
    from popo_core.sweep.study import Sweep, SweepError

    with pytest.raises(SweepError) as err:
        Sweep(settings(tmp, **kw))
    return str(err.value)


def add_finished_trial(study, momentum=0.95, value=0.5):
    import optuna

    study.add_trial(optuna.trial.create_trial(
        params={"algo.momentum": momentum}, value=value,
        distributions={"algo.momentum": optuna.distributions.FloatDistribution(0.9, 0.999)}))


def popen_popo(*args, cwd):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "popo_cli.main", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_another_budget_or_search_space_is_refused_on_one_line_and_writes_nothing(workdir):
    """Through the real entry point: the study keeps its trials, nothing reaches MLflow or sweeps/."""
    from popo_core.sweep.study import Sweep

    for name in ("budget", "space"):
        job = Sweep(settings(workdir, study=name))
        add_finished_trial(job.study)
    # The search space the study was run with, as if experiments/sweep/momentum.yaml changed since.
    load_study(workdir, "space").set_user_attr(
        "popo.space", [{"name": "algo.momentum", "low": 0.5, "high": 0.999, "log": False, "choices": None}])
    args = ["sweep", "momentum", "tiny", "--trials", "3"]
    cases = [
        (["--study", "budget", *TINY[1:], "trainer.max_steps=2"],
         ["study budget was run with trainer.max_steps=1; this command has trainer.max_steps=2: "
          "rerun with the same overrides, or pick another --study"]),
        (["--study", "space", *TINY],
         ["study space was run with algo.momentum in [0.5, 0.999]; this command has algo.momentum in [0.9, 0.999]",
          "search space", "--study"]),
    ]
    procs = [(popen_popo(*args, *extra, cwd=workdir), fragments) for extra, fragments in cases]
    for proc, fragments in procs:
        out, err = proc.communicate(timeout=180)
        assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), *fragments)
    for name in ("budget", "space"):
        assert len(load_study(workdir, name).get_trials()) == 1
    # Refused before MLflow is opened: no store, so no run (test_study.py checks this beside a parent run).
    assert not (workdir / "mlflow.db").exists() and not (workdir / "sweeps").exists()


def test_every_key_that_fixes_a_trial_is_checked(workdir):
    from popo_core.sweep.study import Sweep

    Sweep(settings(workdir, overrides=TINY + ["optim.lr=0.01"]))
    assert "trainer.max_steps=150 (and 1 more)" in refusal(workdir, overrides=["optim.lr=0.01"])  # the preset's
    message = refusal(workdir, overrides=["rollout.group_size=2", "algo.epochs=1", "optim.lr=0.1", "trainer.max_steps=3",
                                          "trainer.eval_every=1", "rollout.prompts_per_step=6"])
    assert message.startswith("study momentum-tiny was run with algo.epochs=2 rollout.group_size=4 optim.lr=0.01; "
                              "this command has algo.epochs=1 rollout.group_size=2 optim.lr=0.1 (and 1 more): ")
    assert "\n" not in message
    assert "metric=eval/accuracy; this command has metric=reward/mean" in refusal(workdir, metric="reward/mean")
    assert "direction=maximize; this command has direction=minimize" in refusal(workdir, direction="minimize")
    assert "preset=tiny; this command has preset=arith" in refusal(workdir, preset="arith", study="momentum-tiny")
    assert "knob=momentum; this command has knob=clip" in refusal(workdir, knob="clip", study="momentum-tiny")


def test_the_target_and_where_a_worker_runs_may_change(workdir):
    from popo_core.sweep.study import Sweep

    first = Sweep(settings(workdir, trials=1, overrides=TINY + ["optim.lr=0.01"]))
    add_finished_trial(first.study)
    # Another order, another --trials, sampler and seed; the machine's threads, device, memory and
    # tracking store; the swept key itself (the trial's value replaces it).
    again = Sweep(settings(workdir, trials=5, sampler="random", seed=3,
                           overrides=["optim.lr=0.01", *reversed(TINY), "trainer.threads=2", "trainer.device=cpu",
                                      "trainer.micro_batch_size=8", "tracking.enabled=false", "algo.momentum=0.5"]))
    assert again.target == 5 and not again.notes
    assert again.study.user_attrs["popo.overrides"] == " ".join(TINY + ["optim.lr=0.01"])  # the first command's


def test_a_study_of_an_older_popo_is_checked_against_what_it_kept_then_recorded(workdir):
    import optuna

    from popo_core.sweep.study import Sweep

    storage = f"sqlite:///{workdir}/optuna.db"
    old = optuna.create_study(study_name="old", storage=storage, direction="maximize")
    for key, value in {"popo.knob": "momentum", "popo.preset": "tiny", "popo.metric": "eval/accuracy",
                       "popo.overrides": " ".join(TINY)}.items():  # all an older popo recorded
        old.set_user_attr(key, value)
    add_finished_trial(old)
    assert "was run with trainer.max_steps=1; this command has trainer.max_steps=2" in refusal(
        workdir, study="old", overrides=TINY[1:] + ["trainer.max_steps=2"])
    job = Sweep(settings(workdir, study="old"))
    (note,) = job.notes
    assert note.startswith("study old predates popo's record of a study's config: checked against")
    assert {"popo.config", "popo.space"} <= set(job.study.user_attrs)
    assert not Sweep(settings(workdir, study="old")).notes  # recorded once

    # A study with trials but no record at all (made by hand with Optuna): this command's is recorded.
    bare = optuna.create_study(study_name="bare", storage=storage, direction="maximize")
    add_finished_trial(bare)
    (note,) = Sweep(settings(workdir, study="bare")).notes
    assert "holds no record of its trials' config: this command's is recorded" in note
    assert "trainer.max_steps=1; this command has trainer.max_steps=2" in refusal(
        workdir, study="bare", overrides=TINY[1:] + ["trainer.max_steps=2"])
