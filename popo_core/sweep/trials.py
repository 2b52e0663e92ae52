"""One trial of `popo sweep` as it runs and as it is shown: the trainer callbacks that report the
metric to Optuna (and stop a pruned or taken-over run), and the table rows of a study's trials."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popo_core.sweep.space import knob_label


class TrialTakenOver(Exception):
    """This worker's running trial was marked failed by another worker (its heartbeat lapsed, e.g.
    on an overloaded machine) and queued for a retry: stop training so two processes never write
    one trial directory."""


@dataclass
class TrialRow:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL | RUNNING | WAITING
    params: dict[str, Any]
    value: float | None
    duration_s: float | None
    output_dir: str | None
    note: str = ""


class TrialHooks:
    """Trainer callbacks of one trial: report the metric to Optuna each time it is logged (so the
    pruner can stop the run), tag the training run with the trial, forward to a progress display."""

    def __init__(self, sweep, trial, retry_of: int | None, reported: set[int]):
        self.sweep, self.trial, self.retry_of = sweep, trial, retry_of
        self.reported = reported  # steps a resumed trial inherited: Optuna refuses them twice
        self.inner = sweep.reporter.training(trial.number)
        self.training_run = None
        self.total_steps = None
        self._checked = time.monotonic()

    def on_start(self, start_step: int, total_steps: int, output_dir: Path) -> None:
        self.total_steps = total_steps
        run_id = self.training_run.state.get("run_id") if self.training_run is not None else None
        if run_id and self.sweep.runs:
            self.trial.set_user_attr("popo.mlflow_run_id", run_id)
            tags = {"optuna.study": self.sweep.name, "optuna.trial_number": self.trial.number, "optuna.state": "RUNNING",
                    "popo.sweep.knob": knob_label(self.sweep.s.knob),
                    **{f"optuna.param.{k}": v for k, v in self.trial.params.items()}}
            if self.retry_of is not None:
                tags["optuna.retry_of"] = self.retry_of
            self.sweep.runs.tag_trial_run(run_id, tags, model=self.training_run.learner.model)
        if self.inner:
            self.inner.on_start(start_step, total_steps, output_dir)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.inner:
            self.inner.on_step(step, metrics)
        self._check_still_ours()
        value = metrics.get(self.sweep.s.metric)
        if value is None or not math.isfinite(float(value)) or step in self.reported:
            return
        self.trial.report(float(value), step)
        self.reported.add(step)
        # At the last step the run is done: its value is the trial's, nothing is left to save by stopping.
        if step != self.total_steps and self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"{self.sweep.s.metric}={value:.4g} at step {step}")

    def _check_still_ours(self) -> None:
        """Once a heartbeat interval: stop (before this step's checkpoint) if another worker took
        the trial over, so its retry alone writes the trial's directory."""
        now = time.monotonic()
        if now - self._checked < self.sweep.s.heartbeat_interval:
            return
        self._checked = now
        if self.sweep.storage.get_trial(self.trial._trial_id).state.name == "FAIL":
            raise TrialTakenOver(f"trial {self.trial.number} was marked failed by another worker")

    def on_eval(self, step: int, accuracy: float) -> None:
        if self.inner:
            self.inner.on_eval(step, accuracy)

    def on_resume(self, step: int, redone: range, last: dict[str, float]) -> None:
        if self.inner and hasattr(self.inner, "on_resume"):
            self.inner.on_resume(step, redone, last)

    def close(self) -> None:
        if self.inner is not None and hasattr(self.inner, "close"):
            self.inner.close()


def rows(trials, only: int | None = None) -> list[TrialRow]:
    """Table rows of a study's trials, each with a note on retries, surplus and failures."""
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials if t.system_attrs.get("retry_history")}
    out = []
    for t in trials:
        if only is not None and t.number != only:
            continue
        note = ""
        if t.user_attrs.get("popo.surplus"):
            note = "not run: the study was full"
        elif t.state.name == "FAIL":
            cause = t.user_attrs.get("popo.error") or ("interrupted" if t.user_attrs.get("popo.interrupted")
                                                       else "worker lost (heartbeat lapsed)")
            note = cause + (f"; retried as trial {retried_as[t.number]}" if t.number in retried_as else "")
        elif t.system_attrs.get("failed_trial") is not None:
            note = f"retry of trial {t.system_attrs['retry_history'][-1]}"
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        out.append(TrialRow(t.number, t.state.name, dict(t.params), t.value, duration, t.user_attrs.get("popo.output_dir"), note))
    return out


def trials_csv(table: list[TrialRow]) -> str:
    import csv
    import io

    names = list(dict.fromkeys(k for r in table for k in r.params))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["number", "state", *names, "value", "duration_s", "output_dir", "note"])
    for r in table:
        writer.writerow([r.number, r.state, *(r.params.get(k, "") for k in names), "" if r.value is None else r.value,
                         "" if r.duration_s is None else round(r.duration_s, 2), r.output_dir or "", r.note])
    return buf.getvalue()


