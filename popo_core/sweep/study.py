"""`popo sweep`: an Optuna study over POPO's knobs; each trial is one real training run.

The study lives in a database (SQLite by default, any Optuna RDB URL otherwise), so the same
command started again, or on other machines against the same storage, continues it until it holds
`trials` finished (complete or pruned) trials. Running trials send heartbeats: one whose worker
died (SIGKILL, lost machine) is marked failed once its heartbeat is older than the grace period
and queued again with the same params; the retry resumes the dead trial's training run from its
last checkpoint. Finished trials are never rerun.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from popo_core.config import Config, compose_unresolved, resolve
from popo_core.errors import ConfigError, first_line
from popo_core.store_lock import init_lock
from popo_core.sweep import compat
from popo_core.sweep.space import Param, SweepError, check_against, knob_label, knob_stem, load_space, set_key
from popo_core.sweep.storage import DEFAULT_STORAGE, open_storage
from popo_core.sweep.trials import TrialHooks, TrialRow, TrialTakenOver, rows, trials_csv

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "none")
DIRECTIONS = ("maximize", "minimize")
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

__all__ = ["Param", "Reporter", "Sweep", "SweepError", "SweepResult", "SweepSettings", "TrialRow", "TrialTakenOver",
           "rows", "trials_csv"]


class SurplusTrial(Exception):
    """Raised in a trial created after other workers already hold the target: it runs nothing."""


class TooManyFailures(RuntimeError):
    """Trials of this worker failed one after another (e.g. non-finite losses): stop, don't spin."""


@dataclass
class SweepSettings:
    knob: str  # a shipped space (experiments/sweep/<knob>.yaml) or a YAML file of the same format
    preset: str = "tiny"
    overrides: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)  # --param KEY=LOW:HIGH[:log] | KEY=a,b,c: added, or replacing
    trials: int = 20  # finished (complete or pruned) trials the study should hold, all workers together
    study: str | None = None  # default: <knob>-<preset> (a file: its name without .yaml)
    storage: str = DEFAULT_STORAGE
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int | None = None
    metric: str = "eval/accuracy"
    direction: str = "maximize"
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 60  # a RUNNING trial silent this long belongs to a dead worker
    max_retry: int = 3  # retries of one trial whose worker died


@dataclass
class SweepResult:
    study: str
    target: int
    rows: list[TrialRow]
    best: TrialRow | None
    ran: int  # trials this worker started
    plots: list[Path]
    notes: list[str]
    parent_run_id: str | None
    elapsed_s: float


class Reporter:
    """What a sweep tells its user; the CLI renders it. Every hook may be left as is."""

    def note(self, message: str) -> None: ...

    def trial_started(self, number: int, params: dict[str, Any], output_dir: str, resumed: bool) -> None: ...

    def trial_finished(self, row: TrialRow) -> None: ...

    def training(self, number: int):  # a popo_core.trainer.lifecycle.Callbacks progress display, or None
        return None


def _sampler(name: str, space: list[Param], seed: int | None):
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler({p.name: list(p.grid) for p in space}, seed=seed)
    # constant_liar: workers running side by side don't all propose the same point.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=len(space) > 1)


def check_metric(metric: str, base: Config) -> None:
    """Refuse a metric no trial of this config logs, when that is known up front: the sampled
    pass@1 without samples, or an "@" (MLflow names cannot hold one: pass@1 is logged as pass_at_1)."""
    if "@" in metric:
        raise SweepError(f"--metric {metric}: metric names hold no '@' (MLflow forbids it): "
                         f"did you mean {metric.replace('@', '_at_')}?")
    if metric == "eval/pass_at_1" and not base.trainer.eval_samples:
        raise SweepError("--metric eval/pass_at_1 needs trainer.eval_samples > 0 (samples per held-out prompt; "
                         "e.g. trainer.eval_samples=16)")


class Sweep:
    """A prepared sweep: input checked, base config composed, study opened. `run()` works on it."""

    def __init__(self, s: SweepSettings):
        self.s = s
        if s.trials < 1:
            raise SweepError(f"--trials {s.trials}: must be >= 1 (the finished trials the study should hold)")
        for flag, value, choices in (("--sampler", s.sampler, SAMPLERS), ("--pruner", s.pruner, PRUNERS),
                                     ("--direction", s.direction, DIRECTIONS)):
            if value not in choices:
                raise SweepError(f"{flag} {value}: choose from {', '.join(choices)}")
        if s.heartbeat_interval < 1 or s.grace_period <= s.heartbeat_interval:
            raise SweepError("--heartbeat-interval must be >= 1 s and --grace-period longer than it")
        self.space = load_space(s.knob, s.params)
        # Trials start from the unresolved config: a swept rollout.max_new_tokens or rollout.max_staleness
        # moves the algo.max_length or algo.rollout_correction it derives, as in `popo train`.
        self.unresolved = compose_unresolved(s.preset, s.overrides)
        self.base = resolve(copy.deepcopy(self.unresolved))
        check_against(self.space, self.unresolved, compat.space_source(s.knob, s.params))
        check_metric(s.metric, self.base)
        self.name = s.study or f"{knob_stem(s.knob)}-{s.preset}"
        if not self.name or not set(self.name) <= _NAME_OK:
            raise SweepError(f"--study {self.name!r}: use letters, digits, '.', '_' and '-'")
        self.root = Path(self.base.trainer.output_dir or Path("sweeps") / self.name)
        from popo_core import preflight  # before the study or any MLflow run exists

        preflight.output_dir(self.root)
        preflight.device(self.base.trainer.device)
        if self.base.tracking.enabled:
            preflight.tracking(self.base.tracking.uri)
        self.notes: list[str] = []
        a = self.base.algo
        if any(p.name == "algo.clip_eps" for p in self.space) and a.epochs * a.mini_batches == 1:
            self.notes.append("warning: algo.epochs * algo.mini_batches == 1, so the clip bound never acts (rho = 1); "
                              "sweep it with several optimizer steps per batch, e.g. algo.epochs=2")
        self.target = s.trials
        if s.sampler == "grid":
            missing = [p.name for p in self.space if not p.grid]
            if missing:
                raise SweepError(f"--sampler grid: {missing[0]} has no grid points in {compat.space_source(s.knob, [])} "
                                 f"(give it as --param {missing[0]}=a,b,c)")
            size = math.prod(len(p.grid) for p in self.space)
            if size < s.trials:
                self.notes.append(f"the grid has {size} points: the study stops at {size} trials")
                self.target = size
        self.storage = open_storage(s.storage, s.heartbeat_interval, s.grace_period, s.max_retry)
        self.study = self._open_study()
        self.runs = None  # StudyRuns once run() starts, when tracking is enabled
        self.ran = 0
        self._failures = 0

    def _open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)  # the reporter tells the user instead
        s = self.s
        # The first quarter of a run is too early to judge it; the first 5 trials are never pruned.
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, self.base.trainer.max_steps // 4))
                  if s.pruner == "median" else optuna.pruners.NopPruner())
        mine = compat.record(s.knob, s.preset, s.overrides, s.metric, s.direction, self.space, self.base, s.params)
        # One command at a time opens, checks and records, so two first commands cannot both record theirs.
        with init_lock(s.storage):
            try:
                study = optuna.create_study(study_name=self.name, storage=self.storage, direction=s.direction,
                                            pruner=pruner, load_if_exists=True)
            except Exception as err:
                raise SweepError(f"study {self.name!r}: {first_line(err)}") from None
            self._check(study, mine)
        # A seeded sampler restarted on a partly done study would replay its first draws: offset the
        # seed by the trials the study holds, so a restart continues with new points.
        seed = None if s.seed is None else s.seed + len(study.get_trials(deepcopy=False))
        study.sampler = _sampler(s.sampler, self.space, seed)
        return study

    def _check(self, study, mine: dict[str, Any]) -> None:
        """Refuse a command whose trials would not be comparable with the study's (another budget,
        override, preset, metric, direction or search space), before anything is written; record
        what the study lacks (a new one, or one started before popo recorded all of it)."""
        attrs = study.user_attrs
        held = {**attrs, "popo.direction": study.direction.name.lower()}  # Optuna keeps the direction itself
        note = None
        if "popo.config" not in attrs and (attrs or study.get_trials(deepcopy=False)):  # started by an older popo
            config = compat.legacy_config(attrs, self.space)
            if config is None:
                note = (f"study {self.name} holds no record of its trials' config: this command's is recorded, "
                        "and later commands must match it (trials run before may differ)")
            else:
                held["popo.config"] = config
                note = (f"study {self.name} predates popo's record of a study's config: checked against its first "
                        f"command's overrides [{attrs['popo.overrides']}] and recorded (trials run before may differ)")
        refusal = compat.mismatch(self.name, held, mine)
        if refusal:
            raise SweepError(refusal)
        if note:
            self.notes.append(note)
        for key, value in mine.items():
            if key not in attrs:
                study.set_user_attr(key, value)

    # ---------------------------------------------------------------------------------- the loop
    def run(self, reporter: Reporter | None = None) -> SweepResult:
        """Run trials until the study holds `target` finished ones (or the grid is done)."""
        import optuna
        from optuna.trial import TrialState

        from popo_core.trainer.update import TrainingAborted

        self.reporter = reporter or Reporter()
        start = time.time()
        self.runs = self._open_runs()
        self.parent_id = self.runs.parent.run_id if self.runs else None
        self._requeue_interrupted()
        said_wait = False
        try:
            while True:
                optuna.storages.fail_stale_trials(self.study)  # dead workers' trials -> FAIL + queued retry
                counts = {state: 0 for state in TrialState}
                for t in self.study.get_trials(deepcopy=False):
                    counts[t.state] += 1
                finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
                if finished >= self.target or self._grid_done():
                    break
                if not counts[TrialState.WAITING] and finished + counts[TrialState.RUNNING] >= self.target:
                    if not said_wait:  # the rest is running elsewhere: wait to see it finish or die
                        self.reporter.note(f"{counts[TrialState.RUNNING]} trial(s) running elsewhere: waiting for them "
                                           f"(a dead worker's trial is retried {self.s.grace_period} s after its last heartbeat)")
                        said_wait = True
                    time.sleep(min(self.s.heartbeat_interval, 5))
                    continue
                said_wait = False
                self._current = None
                try:
                    self.study.optimize(self._objective, n_trials=1, catch=(TrainingAborted,),
                                        callbacks=[self._after_trial], gc_after_trial=False)
                except SurplusTrial:
                    continue
                except (ValueError, AssertionError) as err:
                    # Another worker failed our trial: Optuna refuses its result ("Cannot tell a FAIL
                    # trial"; Optuna 5 re-raises that as AssertionError "Should not reach.").
                    if not str(err).startswith(("Cannot tell a", "Should not reach")) or not self._taken_over():
                        raise
                if self._failures >= 3:
                    raise TooManyFailures(f"{self._failures} trials in a row failed (see `popo sweep` on study {self.name!r})")
        except BaseException as err:
            if self.runs:
                self.runs.parent.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
        return self._finish(time.time() - start)

    def _grid_done(self) -> bool:
        return self.s.sampler == "grid" and self.study.sampler.is_exhausted(self.study)

    def _taken_over(self) -> bool:
        """This worker's trial was marked failed by another (its heartbeat lapsed, e.g. a stalled
        disk); Optuna then refuses its result. Say so and go on."""
        from optuna.trial import TrialState

        if self._current is None:
            return False
        trial = next(t for t in self.study.get_trials(deepcopy=False) if t.number == self._current)
        if trial.state != TrialState.FAIL:
            return False
        self.reporter.note(f"trial {trial.number} was marked failed by another worker (heartbeat lapsed); "
                           "its retry takes over")
        return True

    def _requeue_interrupted(self) -> None:
        """Trials stopped with Ctrl-C failed without a lapsed heartbeat: queue them like dead ones."""
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        trials = self.study.get_trials(deepcopy=False)
        retried = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
        for t in trials:
            if t.state.name == "FAIL" and t.user_attrs.get("popo.interrupted") and t.number not in retried:
                self.storage.get_heartbeat_stale_trial_callback()(self.study, copy.deepcopy(t))

    # --------------------------------------------------------------------------------- one trial
    def _objective(self, trial) -> float:
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        from optuna.trial import TrialState

        from popo_core.trainer import checkpoint
        from popo_core.trainer.lifecycle import TrainingRun
        from popo_core.trainer.loop import train

        self._current = trial.number
        trials = self.study.get_trials(deepcopy=False)
        me = next(t for t in trials if t.number == trial.number)
        # Two workers can both see room for one more trial; the later-numbered one steps back.
        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        if sum(t.number < trial.number and t.state in live for t in trials) >= self.target:
            trial.set_user_attr("popo.surplus", True)
            raise SurplusTrial(f"trial {trial.number}: the study already holds {self.target} trials")
        values = {p.name: p.suggest(trial) for p in self.space}
        history = RetryHeartbeatStaleTrialCallback.retry_history(me)
        retry_of = history[-1] if history else None
        # A retry resumes the dead trial's run: Optuna copied the failed trial's user attrs.
        previous = me.user_attrs.get("popo.output_dir") if retry_of is not None else None
        resume = bool(previous) and checkpoint.exists(Path(previous))
        hooks = TrialHooks(self, trial, retry_of, reported=set(me.intermediate_values))
        cfg = self._trial_config(trial.number, values, previous if resume else None)
        try:
            training_run = TrainingRun(cfg, hooks)  # refuses a dir holding another config's run
        except ConfigError as err:
            if not resume:
                raise SweepError(f"{err} (left by an earlier study named {self.name!r}? remove {self.root} "
                                 "or pass --study NAME)") from None
            resume = False  # the dead trial's dir holds another config (the overrides changed): start afresh
            training_run = TrainingRun(self._trial_config(trial.number, values, None), hooks)
        hooks.training_run = training_run
        trial.set_user_attr("popo.output_dir", str(training_run.output_dir))
        trial.set_user_attr("popo.worker", f"{socket.gethostname()}:{os.getpid()}")
        if not resume:
            trial.set_user_attr("popo.mlflow_run_id", "")
        self.reporter.trial_started(trial.number, values, str(training_run.output_dir), resume)
        self.ran += 1
        try:
            result = train(training_run.cfg, run=training_run)
        except (optuna.TrialPruned, TrialTakenOver):
            raise  # a taken-over trial is finished: nothing more may be written to it
        except KeyboardInterrupt:
            trial.set_user_attr("popo.interrupted", True)
            raise
        except Exception as err:
            trial.set_user_attr("popo.error", f"{type(err).__name__}: {first_line(err)}"[:500])
            raise
        finally:
            hooks.close()
        value = result.final_accuracy if self.s.metric == "eval/accuracy" else result.metrics.get(self.s.metric)
        if value is None or not math.isfinite(float(value)):
            logged = ", ".join(sorted(k for k in result.metrics if not k.startswith("time/"))[:12])
            raise SweepError(f"--metric {self.s.metric}: no finite value at the last step (logged there: {logged})")
        return float(value)

    def _trial_config(self, number: int, values: dict[str, Any], output_dir: str | None) -> Config:
        cfg = copy.deepcopy(self.unresolved)
        for key, value in values.items():
            set_key(cfg, key, value)
        cfg.trainer.output_dir = output_dir or str(self.root / f"trial-{number}")
        cfg.tracking.run_name = f"{self.name}/trial-{number}"
        cfg.tracking.parent_run_id = self.parent_id
        return resolve(cfg)

    def _after_trial(self, study, frozen) -> None:
        self._failures = self._failures + 1 if frozen.state.name == "FAIL" else 0
        if self.runs:
            self.runs.trial_finished(frozen)
            self.runs.log_best(self._best_trial(), self._finished())
        self.reporter.trial_finished(rows(study.get_trials(deepcopy=False), only=frozen.number)[0])

    def _best_trial(self):
        try:
            return self.study.best_trial
        except ValueError:  # no complete trial yet
            return None

    def _finished(self) -> int:
        from optuna.trial import TrialState

        return len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))

    # ----------------------------------------------------------------------------------- MLflow
    def _open_runs(self):
        t = self.base.tracking
        if not t.enabled:
            return None
        from popo_core.sweep.mlflow_layout import StudyRuns
        from popo_core.tracking import redact, update_run

        runs = StudyRuns(t.uri, t.experiment, self.name)
        s = self.s
        tags = {"popo.sweep.knob": knob_label(s.knob), "popo.preset": s.preset, "popo.sweep.storage": redact({"u": s.storage})["u"]}
        params = {"sweep.knob": knob_label(s.knob), "sweep.preset": s.preset, "sweep.trials": s.trials, "sweep.sampler": s.sampler,
                  "sweep.pruner": s.pruner, "sweep.metric": s.metric, "sweep.direction": s.direction,
                  "sweep.overrides": " ".join(s.overrides), "sweep.params": " ".join(s.params), "sweep.space": "; ".join(p.describe() for p in self.space)}
        runs.open_parent(tags, params)
        # Params are immutable and hold the first command's --trials; a rerun may extend the study.
        update_run(t.uri, runs.parent.run_id, tags={"sweep.target": self.target})
        return runs

    def _finish(self, elapsed: float) -> SweepResult:
        from popo_core.plots import sweep_plots

        trials = self.study.get_trials(deepcopy=False)
        table = rows(trials)
        best = self._best_trial()
        best_row = next((r for r in table if best is not None and r.number == best.number), None)
        plots, notes = sweep_plots(self.study, self.root / "plots", [p.name for p in self.space], self.s.metric,
                                   preset=self.s.preset, max_steps=self.base.trainer.max_steps)
        if self.runs:
            self.runs.log_best(best, self._finished())
            self.runs.end_orphans(trials)
            self.runs.finish(plots, trials_csv(table))
        return SweepResult(self.name, self.target, table, best_row, self.ran, plots, notes, self.parent_id, elapsed)
