"""MLflow layout of `popo sweep`: one parent run per study, every trial's training run nested in it.

The parent is found by its `popo.sweep.study` tag, so a restarted sweep and every other worker
logging to the same tracking store reuse it. Trial runs carry the Optuna trial as tags
(`optuna.trial_number`, `optuna.param.<key>`, `optuna.state`, `optuna.value`); their params and
metrics are the training run's own. All writes go through popo_core.tracking, which retries when a
shared SQLite store answers "database is locked".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from popo_core import tracking


class StudyRuns:
    def __init__(self, uri: str | None, experiment: str, study: str):
        self.uri, self.experiment, self.study = uri, experiment, study
        self.parent: tracking.MlflowRun | None = None

    def _parents(self) -> list:
        runs = tracking.find_runs(self.uri, self.experiment, f"tags.`popo.sweep.study` = '{self.study}'")
        runs = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    def open_parent(self, tags: Mapping[str, Any], params: Mapping[str, Any]) -> str:
        """Find the study's parent run or create it; of two created at once, both workers keep the older."""
        tracking.ready_client(self.uri)
        found = self._parents()
        if not found:
            run = tracking.MlflowRun(uri=self.uri, experiment=self.experiment, run_name=f"sweep-{self.study}",
                               tags={"popo.sweep.study": self.study, **{k: str(v) for k, v in tags.items()}})
            oldest = self._parents()[0].info.run_id
            if oldest == run.run_id:
                run.log_params(params)
                self.parent = run
                return run.run_id
            tracking.delete_run(self.uri, run.run_id)
            found = self._parents()
        self.parent = tracking.MlflowRun(uri=self.uri, run_id=found[0].info.run_id)  # marks it RUNNING again
        return self.parent.run_id

    def tag_trial_run(self, run_id: str, tags: Mapping[str, Any], model=None) -> None:
        """Tag a trial's training run with its Optuna trial; log the model's summary beside it."""
        tracking.update_run(self.uri, run_id, tags=tags)
        if model is not None:
            total = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            text = f"{type(model).__name__}: {total:,} parameters ({trainable:,} trainable)\n\n{model}\n"
            tracking.MlflowRun(uri=self.uri, run_id=run_id).log_text(text, "model_summary.txt")

    def trial_finished(self, frozen) -> None:
        run_id = frozen.user_attrs.get("popo.mlflow_run_id")
        if run_id:
            tags = {"optuna.state": frozen.state.name}
            if frozen.value is not None:
                tags["optuna.value"] = frozen.value
            # A pruned run was stopped on purpose: FINISHED, not the FAILED the trainer set on its way out.
            tracking.update_run(self.uri, run_id, tags=tags, status="FINISHED" if frozen.state.name == "PRUNED" else None)
        if self.parent is not None and frozen.value is not None:
            self.parent.log_metrics({"trial/value": frozen.value}, frozen.number)

    def log_best(self, best, finished: int) -> None:
        """The study's best value and params on the parent: metrics (their history) and tags (now)."""
        if self.parent is None or best is None:
            return
        metrics = {"best/value": best.value, "best/trial": best.number}
        metrics.update({f"best/{k}": v for k, v in best.params.items() if isinstance(v, (int, float))})
        self.parent.log_metrics(metrics, finished)
        tags = {"best.trial": best.number, "best.value": best.value, **{f"best.{k}": v for k, v in best.params.items()}}
        tracking.update_run(self.uri, self.parent.run_id, tags=tags)

    def end_orphans(self, trials: Sequence) -> None:
        """Training runs of dead trials that no retry resumed stay RUNNING: end them FAILED."""
        used = {t.user_attrs.get("popo.mlflow_run_id") for t in trials if t.state.name != "FAIL"}
        for t in trials:
            rid = t.user_attrs.get("popo.mlflow_run_id")
            if t.state.name == "FAIL" and rid and rid not in used and tracking.run_status(self.uri, rid) == "RUNNING":
                tracking.update_run(self.uri, rid, tags={"optuna.state": "FAIL"}, status="FAILED")

    def finish(self, plots: Sequence[Path], trials_csv: str, status: str = "FINISHED") -> None:
        if self.parent is None:
            return
        for path in plots:
            self.parent.log_artifact(path, "plots")
        self.parent.log_text(trials_csv, "trials.csv")
        self.parent.finish(status)
