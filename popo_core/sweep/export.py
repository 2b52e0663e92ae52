"""A study read back from its storage, for scripts and committed records (Optuna stays in popo_core.sweep):
one row per trial (number, state, value, each parameter) and the best trial's parameters as the
overrides that set them."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from popo_core.sweep.space import SweepError


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


def override_value(v: Any) -> str:
    """A value as a Hydra override spells it, floats to the last digit."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    return repr(v) if isinstance(v, float) else str(v)


def _cell(v: Any) -> str:
    return override_value(v)
