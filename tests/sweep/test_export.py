"""popo_core.sweep.export: a study's trials table, its best trial, and the study rebuilt from the table
(the committed records of benchmarks/tuned_vs_grpo.py, whose figures are redrawn from them)."""

import csv
import io

import pytest

from popo_core.sweep import export
from popo_core.sweep.space import Param, SweepError, load_space

optuna = pytest.importorskip("optuna")
SPACE = [Param("algo.momentum", 0.9, 0.999), Param("optim.lr", 1e-5, 3e-4, log=True),
         Param("algo.penalty", choices=("similarity", "kl")), Param("algo.epochs", 1, 4, integer=True)]


@pytest.fixture
def storage(tmp_path):
    """A stored study with complete, pruned, failed and running trials, drawn from SPACE."""
    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url, direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    for i in range(6):
        trial = study.ask()
        values = [p.suggest(trial) for p in SPACE]
        if i == 4:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif i == 5:
            continue  # left running
        elif i == 2:
            trial.report(0.1 * i, step=10)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, 0.5 + 0.01 * i + 0.001 * values[3])
    return url


def test_the_table_holds_every_trial_and_the_best_as_overrides(storage):
    rows = list(csv.DictReader(io.StringIO(export.study_csv(storage, "s"))))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "PRUNED", "COMPLETE", "FAIL", "RUNNING"]
    assert rows[2]["value"] == repr(0.2) and rows[4]["value"] == rows[5]["value"] == ""
    assert export.finished(storage, "s") == 4
    study = optuna.load_study(study_name="s", storage=storage)
    best = export.best(storage, "s")
    assert best["trial"] == study.best_trial.number == 3 and best["params"] == study.best_trial.params
    assert best["overrides"] == [f"{k}={export.override_value(v)}" for k, v in study.best_trial.params.items()]
    with pytest.raises(SweepError, match="not in"):
        export.best(storage, "nope")


def test_the_study_rebuilt_from_its_table_has_the_same_trials(storage):
    stored = optuna.load_study(study_name="s", storage=storage)
    rebuilt = export.study_from_csv(export.study_csv(storage, "s"), SPACE, "s")
    kept = [t for t in stored.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert [(t.state, t.value, t.params) for t in rebuilt.trials] == [(t.state, t.value, t.params) for t in kept]
    assert all(type(t.params["algo.epochs"]) is int and t.params["algo.penalty"] in ("similarity", "kl")
               for t in rebuilt.trials)  # each value typed as its distribution draws it
    assert rebuilt.best_trial.params == stored.best_trial.params and rebuilt.direction == stored.direction
    # the importances of the rebuilt study are those of the stored one (the same seeded fANOVA)
    fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
    assert (optuna.importance.get_param_importances(rebuilt, evaluator=fanova)
            == pytest.approx(optuna.importance.get_param_importances(stored, evaluator=fanova)))


def test_a_table_with_a_column_outside_the_space_is_refused(storage):
    narrower = [p for p in SPACE if p.name != "optim.lr"]
    with pytest.raises(SweepError, match="'optim.lr' is not a parameter of the space"):
        export.study_from_csv(export.study_csv(storage, "s"), narrower, "s")


def test_the_shipped_spaces_give_the_distributions_they_suggest_from():
    (lr,) = load_space("lr")
    assert lr.distribution() == optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    for p in SPACE:
        p.suggest(trial)
    study.tell(trial, 0.0)
    assert study.trials[0].distributions == {p.name: p.distribution() for p in SPACE}


def test_importances_are_seeded_and_undefined_without_two_different_values(storage):
    study = optuna.load_study(study_name="s", storage=storage)
    first = export.importances(study)
    assert set(first) == {p.name for p in SPACE} and sum(first.values()) == pytest.approx(1.0)
    assert export.importances(study) == first  # seeded: the same numbers each time
    flat = optuna.create_study()
    for v in (0.5, 0.5):
        flat.add_trial(optuna.trial.create_trial(value=v, params={"a": 0.1 * v, "b": v},
                                                 distributions={"a": optuna.distributions.FloatDistribution(0, 1),
                                                                "b": optuna.distributions.FloatDistribution(0, 1)}))
    assert export.importances(flat) is None
