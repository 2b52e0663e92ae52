"""A study read back from its storage, for scripts and committed records (Optuna stays in popo_core.sweep):
one row per trial (number, state, value, each parameter), the best trial's parameters as the
overrides that set them, and a study rebuilt in memory from that table (its figures redrawn without
the storage)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from popo_core.sweep.space import Param, SweepError


def load(storage: str, study: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        return optuna.load_study(study_name=study, storage=storage)
    except KeyError:
        raise SweepError(f"study {study!r}: not in {storage}") from None


def study_csv(storage: str, study: str) -> str:
    """`number,state,value,<param>...`: every trial of the study, a parameter it lacks left empty."""
    trials = load(storage, study).get_trials(deepcopy=False)
    names = list(dict.fromkeys(k for t in trials for k in t.params))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["number", "state", "value", *names])
    for t in trials:
        writer.writerow([t.number, t.state.name, "" if t.value is None else repr(float(t.value)),
                         *(_cell(t.params[k]) if k in t.params else "" for k in names)])
    return buf.getvalue()


def finished(storage: str, study: str) -> int:
    """Complete and pruned trials the study holds."""
    return sum(t.state.name in ("COMPLETE", "PRUNED") for t in load(storage, study).get_trials(deepcopy=False))


def best(storage: str, study: str) -> dict[str, Any]:
    """{"trial", "value", "params", "overrides"} of the best complete trial."""
    s = load(storage, study)
    try:
        t = s.best_trial
    except ValueError:
        raise SweepError(f"study {study!r}: no complete trial yet") from None
    return {"trial": t.number, "value": t.value, "params": dict(t.params),
            "overrides": [f"{k}={override_value(v)}" for k, v in t.params.items()]}


def study_from_csv(text: str, space: list[Param], name: str, direction: str = "maximize"):
    """An in-memory study of study_csv's finished trials (complete and pruned, with their values and
    parameters) over `space`, numbered in the table's order. Running and failed trials are left out."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    dists = {p.name: p.distribution() for p in space}
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and (unknown := [k for k in rows[0] if k not in ("number", "state", "value", *dists)]):
        raise SweepError(f"study {name!r}: column {unknown[0]!r} is not a parameter of the space ({', '.join(dists)})")
    study = optuna.create_study(study_name=name, direction=direction)
    for row in rows:
        state = TrialState[row["state"]]
        if state not in (TrialState.COMPLETE, TrialState.PRUNED):
            continue
        params = {k: _parse(row[k], dists[k]) for k in dists if row.get(k, "") != ""}
        value = float(row["value"]) if row["value"] else None
        study.add_trial(create_trial(state=state, value=value, params=params,
                                     distributions={k: dists[k] for k in params},
                                     intermediate_values={} if value is None else {0: value}))
    return study


def importances(study) -> dict[str, float] | None:
    """Seeded fANOVA importances of the study's parameters, as its importances figure draws them;
    None where they are undefined (fewer than 2 complete trials of different values, or 1 parameter)."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = {k for t in complete for k in t.params}
    if len({t.value for t in complete}) < 2 or len(names) < 2:
        return None
    return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))


def _parse(cell: str, dist) -> Any:
    """A cell of study_csv back to its value: the choice it spells, or a number."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return next(c for c in dist.choices if override_value(c) == cell)
    return int(cell) if isinstance(dist, IntDistribution) else float(cell)


def override_value(v: Any) -> str:
    """A value as a Hydra override spells it, floats to the last digit."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    return repr(v) if isinstance(v, float) else str(v)


def _cell(v: Any) -> str:
    return override_value(v)
