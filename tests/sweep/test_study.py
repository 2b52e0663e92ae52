"""`popo sweep`: search spaces, bad input, and end-to-end studies (resume after SIGKILL, two workers)."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_popo
from helpers import load_study, states

# A short training budget: 8 steps, evaluations at 0, 4 and 8, checkpoints every 4 steps.
SHORT = ["trainer.max_steps=8", "trainer.eval_every=4", "rollout.prompts_per_step=6", "rollout.group_size=4",
         "trainer.save_every=4", "trainer.diagnostics_every=4"]
FAST_HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "6"]


def settings(tmp, knob="momentum", **kw):
    from popo_core.sweep.study import SweepSettings

    return SweepSettings(knob=knob, storage=f"sqlite:///{tmp}/optuna.db", overrides=kw.pop("overrides", SHORT), **kw)


def mlflow_runs(tmp):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("popo")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "popo.sweep.study" in r.data.tags]
    return client, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


def popen_popo(*args, cwd):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "popo_cli.main", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished_runs(root: Path) -> list[Path]:
    """Trial output dirs whose training run reached its end."""
    return sorted(p.parent for p in root.glob("trial-*/result.json"))


# ----------------------------------------------------------------------------------- fast tests
def test_search_spaces_are_named_by_their_knobs():
    from popo_core.sweep.space import knobs, load_space

    assert knobs() == ["all", "clip", "lr", "momentum", "penalty"]
    (lr,) = load_space("lr")
    assert (lr.name, lr.low, lr.high, lr.log) == ("optim.lr", 1e-5, 1e-3, True)
    (m,) = load_space("momentum")
    assert (m.name, m.low, m.high, m.log) == ("algo.momentum", 0.9, 0.999, False)
    (c,) = load_space("clip")
    assert (c.name, c.low, c.high) == ("algo.clip_eps", 0.05, 0.5)
    (p,) = load_space("penalty")
    assert (p.name, p.low, p.high, p.log) == ("algo.penalty_weight", 1e-3, 1.0, True)
    joint = load_space("all")
    assert {q.name for q in joint} == {"algo.momentum", "algo.clip_eps", "algo.penalty_weight"}
    for q in joint:
        assert q.grid and all(q.low <= g <= q.high for g in q.grid)


def test_clip_sweep_with_one_step_per_batch_warns(workdir):
    from popo_core.sweep.study import Sweep

    one = Sweep(settings(workdir, "clip", overrides=SHORT + ["algo.epochs=1", "algo.mini_batches=1"]))
    assert len([n for n in one.notes if n.startswith("warning") and "algo.mini_batches" in n]) == 1
    assert not Sweep(settings(workdir, "clip", study="other")).notes  # the tiny preset takes 2 x 2 steps per batch


def test_grid_caps_the_target_and_a_study_keeps_its_knob(workdir):
    from popo_core.sweep.study import Sweep, SweepError

    grid = Sweep(settings(workdir, sampler="grid", trials=10))
    assert grid.target == 4 and any("4 points" in n for n in grid.notes)
    with pytest.raises(SweepError, match="knob=momentum"):
        Sweep(settings(workdir, "clip", study="momentum-tiny"))


def test_a_trial_beyond_the_target_runs_nothing(workdir):
    """Two workers may both see room for the last trial; the later-numbered one steps back."""
    from popo_core.sweep.study import Reporter, SurplusTrial, Sweep

    job = Sweep(settings(workdir, trials=1))
    job.reporter, job.runs, job.parent_id = Reporter(), None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna: heartbeats are meant for optimize(); this trial has none
        job.study.ask()  # another worker's trial, running
    with pytest.raises(SurplusTrial):
        job.study.optimize(job._objective, n_trials=1)
    surplus = job.study.get_trials(deepcopy=False)[-1]
    assert surplus.state.name == "FAIL" and surplus.user_attrs["popo.surplus"] and not surplus.params
    assert not (workdir / "sweeps").exists()


def test_bad_input_is_a_one_line_error(tmp_path):
    cases = [
        (["nope"], ["unknown knob", "momentum"]),
        (["momentum", "--trials", "0"], ["--trials 0"]),
        (["momentum", "--storage", "nosuchdb://host/x"], ["--storage"]),
        (["momentum", "--storage", f"sqlite:///{tmp_path}/no/such/dir/optuna.db"], ["--storage", "unable to open"]),
        (["momentum", "--storage", "postgresql://user:secret@127.0.0.1:1/optuna"], ["--storage", "user:***@"]),
        (["momentum", "--storage", "optuna.db"], ["not a database URL"]),
        (["momentum", "--sampler", "annealing"], ["--sampler annealing", "tpe"]),
        (["momentum", "tiny", "algo.nope=1"], ["algo.nope"]),
    ]
    procs = [(popen_popo("sweep", *args, cwd=tmp_path), fragments) for args, fragments in cases]
    for proc, fragments in procs:
        out, err = proc.communicate(timeout=180)
        assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err), *fragments)
        assert "secret" not in out + err
    assert not (tmp_path / "sweeps").exists()


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_momentum_sweep_on_tiny(workdir):
    proc = run_popo("sweep", "momentum", "tiny", "--trials", "4", *SHORT, cwd=workdir, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "best" in proc.stdout and "algo.momentum" in proc.stdout
    study = load_study(workdir, "momentum-tiny")
    assert states(study) == {"COMPLETE": 4}
    trials = study.get_trials()
    for t in trials:
        assert 0.9 <= t.params["algo.momentum"] <= 0.999
        assert sorted(t.intermediate_values) == [0, 4, 8]  # every evaluation reported for the pruner
        assert t.value == t.intermediate_values[8]
    assert len({t.user_attrs["popo.output_dir"] for t in trials}) == 4
    assert len(finished_runs(workdir / "sweeps" / "momentum-tiny")) == 4

    client, parents, nested = mlflow_runs(workdir)
    assert len(parents) == 1 and len(nested) == 4
    parent = parents[0]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in nested)
    by_number = {int(r.data.tags["optuna.trial_number"]): r for r in nested}
    for t in trials:
        run = by_number[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert float(run.data.params["algo.momentum"]) == pytest.approx(t.params["algo.momentum"])
        assert "eval/accuracy" in run.data.metrics and "model.parameters" in run.data.params
    assert parent.data.metrics["best/value"] == study.best_value
    assert parent.data.metrics["best/algo.momentum"] == pytest.approx(study.best_params["algo.momentum"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/history.png", "plots/slice.png"} <= artifacts
    assert "importances skipped" in proc.stdout  # one parameter: importance undefined

    # The same command on a finished study runs nothing.
    from popo_core.sweep.study import Sweep

    again = Sweep(settings(workdir, trials=4)).run()
    assert again.ran == 0 and len(again.rows) == 4
    assert len(mlflow_runs(workdir)[2]) == 4


@pytest.mark.slow
def test_a_rerun_may_extend_the_study_but_not_change_its_budget(workdir):
    """The issue's case: a study rerun with another trainer.max_steps would put trials of two budgets
    side by side. Refused (no trial, no MLflow run); the same command with a higher --trials continues."""
    budget = ["trainer.eval_every=1", "rollout.prompts_per_step=6", "rollout.group_size=4"]
    first = run_popo("sweep", "momentum", "tiny", "--trials", "1", "trainer.max_steps=1", *budget, cwd=workdir)
    assert first.returncode == 0, first.stderr + first.stdout
    _, parents, nested = mlflow_runs(workdir)
    assert len(parents) == 1 and len(nested) == 1 and parents[0].data.tags["sweep.target"] == "1"

    other = run_popo("sweep", "momentum", "tiny", "--trials", "2", "trainer.max_steps=2", *budget, cwd=workdir)
    assert_one_line_error(other, "study momentum-tiny was run with trainer.max_steps=1; "
                                 "this command has trainer.max_steps=2: rerun with the same overrides")
    assert states(load_study(workdir, "momentum-tiny")) == {"COMPLETE": 1}
    _, parents_after, nested_after = mlflow_runs(workdir)
    assert {r.info.run_id for r in parents_after + nested_after} == {r.info.run_id for r in parents + nested}

    more = run_popo("sweep", "momentum", "tiny", "--trials", "2", "trainer.max_steps=1", *budget, cwd=workdir)
    assert more.returncode == 0, more.stderr + more.stdout
    assert "this worker ran 1 trial(s)" in more.stdout
    study = load_study(workdir, "momentum-tiny")
    assert states(study) == {"COMPLETE": 2}
    assert all(sorted(t.intermediate_values) == [0, 1] for t in study.get_trials())  # one budget
    _, (parent,), nested = mlflow_runs(workdir)
    assert len(nested) == 2
    assert parent.data.tags["sweep.target"] == "2" and parent.data.params["sweep.trials"] == "1"  # params stay


@pytest.mark.slow
def test_pruned_trial_ends_cleanly(workdir):
    import optuna

    from popo_core.sweep.study import Sweep

    job = Sweep(settings(workdir, trials=1))
    job.study.pruner = optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=4)  # accuracy < 2: always
    result = job.run()
    (row,) = result.rows
    assert row.state == "PRUNED" and row.value is not None
    assert sorted(job.study.trials[0].intermediate_values) == [0, 4]  # stopped at the first judged step
    _, parents, (run,) = mlflow_runs(workdir)
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"

    # Judged only at the last step: the run is done by then, so it completes rather than being pruned.
    late = Sweep(settings(workdir, trials=1, study="late"))
    late.study.pruner = optuna.pruners.ThresholdPruner(lower=2.0, n_warmup_steps=8)
    assert [r.state for r in late.run().rows] == ["COMPLETE"]


@pytest.mark.slow
def test_sweep_killed_mid_trial_resumes_without_rerunning(tmp_path):
    args = ["sweep", "momentum", "tiny", "--trials", "3", "--study", "kill", *FAST_HEARTBEAT,
            "trainer.max_steps=24", "trainer.eval_every=8", "trainer.save_every=4",
            "rollout.prompts_per_step=6", "rollout.group_size=4"]
    root = tmp_path / "sweeps" / "kill"
    proc = popen_popo(*args, cwd=tmp_path)
    log = root / "trial-1" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 7):  # past the step-4 checkpoint
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    first = (root / "trial-0" / "metrics.jsonl").read_text()
    assert not (root / "trial-1" / "result.json").exists()

    again = run_popo(*args, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr + again.stdout
    study = load_study(tmp_path, "kill")
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    dirs = [t.user_attrs["popo.output_dir"] for t in complete]
    assert len(set(dirs)) == 3
    assert finished_runs(root) == sorted(Path(d) if Path(d).is_absolute() else tmp_path / d for d in dirs)
    assert (root / "trial-0" / "metrics.jsonl").read_text() == first  # finished trial 0 never reran
    (dead,) = [t for t in study.get_trials() if t.state.name == "FAIL"]
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == dead.number]
    assert retry.params == dead.params
    assert retry.user_attrs["popo.output_dir"] == dead.user_attrs["popo.output_dir"]  # resumed, not restarted
    assert "resuming" in again.stdout

    _, parents, nested = mlflow_runs(tmp_path)
    assert len(parents) == 1
    assert sorted(r.data.tags["optuna.state"] for r in nested if r.info.status == "FINISHED") == ["COMPLETE"] * 3
    assert not [r for r in nested if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_two_workers_share_one_study(tmp_path):
    args = ["sweep", "momentum", "tiny", "--trials", "4", "--study", "shared", *FAST_HEARTBEAT,
            "trainer.max_steps=16", "trainer.eval_every=8", "trainer.save_every=8",
            "rollout.prompts_per_step=6", "rollout.group_size=4"]
    workers = [popen_popo(*args, cwd=tmp_path) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    for w, (out, err) in zip(workers, outputs):
        assert w.returncode == 0, err + out
    study = load_study(tmp_path, "shared")
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert all(t.user_attrs.get("popo.surplus") for t in study.get_trials() if t.state.name != "COMPLETE")
    assert len({t.user_attrs["popo.output_dir"] for t in complete}) == 4
    assert len(finished_runs(tmp_path / "sweeps" / "shared")) == 4  # no training run twice
    ran = [int(out.rsplit("this worker ran ", 1)[1].split()[0]) for out, _ in outputs]
    assert sum(ran) == 4 and min(ran) >= 1, ran  # both took part, nothing done twice
    assert len({t.user_attrs["popo.worker"] for t in complete}) == 2

    _, parents, nested = mlflow_runs(tmp_path)
    assert len(parents) == 1 and len(nested) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in nested} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in nested)


@pytest.mark.parametrize("url,module,hint", [
    ("postgresql+psycopg://popo:pw-x1@127.0.0.1:1/optuna", "psycopg", "popo[postgres]"),
    ("mysql+pymysql://popo:pw-x1@127.0.0.1:1/optuna", "pymysql", "pip install pymysql"),
])
def test_a_missing_database_driver_is_named_with_its_install_command(monkeypatch, url, module, hint):
    from popo_core.sweep.storage import open_storage
    from popo_core.sweep.study import SweepError

    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now fails as if not installed
    with pytest.raises(SweepError) as err:
        open_storage(url, 10, 60, 3)
    message = str(err.value)
    assert f"no database driver {module!r}" in message and hint in message
    assert "pw-x1" not in message and "popo:***@" in message


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid-run", "after-last-report"])
def test_a_trial_taken_over_by_another_worker_stops_and_its_retry_finishes_it(workdir, when):
    """Another worker marks this worker's running trial failed (its heartbeat lapsed on a loaded
    machine) and queues the retry. Mid-run (step 2 of 8, no evaluation there) the training stops at
    the sweep's next check, before writing anything more; after the last report the run completes
    but Optuna refuses its result. Either way the sweep goes on: here this worker runs the retry."""
    import optuna

    from popo_core.sweep.study import Reporter, Sweep

    job = Sweep(settings(workdir, trials=1, heartbeat_interval=1, grace_period=5))

    def take_over():  # what fail_stale_trials does in the other worker
        frozen = job.study.get_trials(deepcopy=False)[0]
        job.storage.set_trial_state_values(frozen._trial_id, optuna.trial.TrialState.FAIL)
        job.storage.get_heartbeat_stale_trial_callback()(job.study, job.storage.get_trial(frozen._trial_id))

    class Steps:
        def __init__(self, number):
            self.number = number

        def on_start(self, *a): ...

        def on_step(self, step, metrics):
            if self.number == 0 and when == "mid-run" and step == 2:
                take_over()
                time.sleep(1.1)  # one heartbeat interval: the sweep's check runs in this step

        def on_eval(self, step, accuracy):  # after the step's report to Optuna
            if self.number == 0 and when == "after-last-report" and step == 8:
                take_over()

    notes = []

    class R(Reporter):
        def training(self, number):
            return Steps(number)

        def note(self, message):
            notes.append(message)

    result = job.run(R())
    assert [r.state for r in result.rows] == ["FAIL", "COMPLETE"]
    assert any("marked failed by another worker" in n for n in notes)
    dead, retry = job.study.get_trials()
    assert retry.system_attrs["failed_trial"] == 0 and retry.params == dead.params
    root = workdir / "sweeps" / "momentum-tiny"
    steps = [json.loads(ln)["step"] for ln in (root / "trial-0" / "metrics.jsonl").read_text().splitlines()]
    if when == "mid-run":
        # Stopped in step 2, before the first checkpoint (step 4): the retry started afresh in its
        # own directory and nothing wrote trial-0 after the takeover.
        assert steps == [0, 1, 2] and not (root / "trial-0" / "checkpoint").exists()
        assert [p.name for p in finished_runs(root)] == ["trial-1"]
    else:  # the run was done: the retry found its finished checkpoint and trained nothing more
        assert steps == list(range(9)) and [p.name for p in finished_runs(root)] == ["trial-0"]
        assert retry.value == dead.intermediate_values[8]
