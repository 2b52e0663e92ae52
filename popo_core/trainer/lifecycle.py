"""A training run's life, apart from the update: its output directory, resume, the MLflow run,
`metrics.jsonl`, checkpoints and the result files.

Metrics are logged exactly once across a resume: a run killed after its last checkpoint redoes
the steps since then (bit for bit), so on resume `metrics.jsonl` is cut back to the checkpoint's
step and MLflow is sent only the steps it does not hold yet.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from popo_core.trainer import checkpoint
from popo_core.config import Config, ConfigError, to_flat_dict, to_yaml

# Settings a resumed run may change: budget, cadence and where things are logged.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.eval_every", "trainer.save_every", "trainer.diagnostics_every",
                     "trainer.threads", "trainer.device", "trainer.resume", "trainer.output_dir", "rollout.threads")
HISTORY_KEYS = ("reward/mean", "eval/accuracy")  # kept in the checkpoint for curves and summaries


@dataclass
class TrainResult:
    output_dir: str
    run_id: str | None
    step: int
    final_accuracy: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_complete: bool = False  # True when the run was already finished and nothing trained


class Callbacks:
    """Hooks for a progress display or an Optuna trial; `on_eval` may raise to stop the run."""

    def on_start(self, start_step: int, total_steps: int, output_dir: Path) -> None: ...

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_eval(self, step: int, accuracy: float) -> None: ...

    def on_resume(self, step: int, redone: range, last: dict[str, float]) -> None:
        """A resumed run restored its step-`step` checkpoint; the steps in `redone` had been logged
        before the interruption and are trained again; `last` holds the latest logged values."""


def default_output_dir(cfg: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.preset}-{cfg.algo.name}-seed{cfg.trainer.seed}-{stamp}"


class TrainingRun:
    """`TrainingRun(cfg)` checks the output directory at once (resume it, or refuse one holding
    another run); `open` starts logging, `log` records a step, `save` checkpoints, `finish` writes
    the result."""

    def __init__(self, cfg: Config, callbacks: Callbacks | None = None, ranks=None):
        from popo_core.trainer.distributed import from_env

        self.cfg = cfg
        self.ranks = ranks or from_env(cfg.trainer.device)[0]  # under torchrun: joins the process group
        self.main = self.ranks.main  # rank 0 alone logs, prints and writes the run's files
        self.callbacks = (callbacks if self.main else None) or Callbacks()
        # One name for every rank (the default one holds the time).
        self.output_dir = Path(self.ranks.broadcast(cfg.trainer.output_dir or str(default_output_dir(cfg))))
        self.redone = range(0)  # steps logged after the checkpoint a resume starts from
        self.saved_step = 0  # the step of the last checkpoint on disk
        self.resuming = self._check_output_dir()
        self.ranks.barrier()  # every rank has looked before rank 0 writes anything
        self.state: dict[str, Any] = {"step": 0, "run_id": None, "history": [], "counters": {}}
        self._mlflow = None
        self.held: dict = {}  # the restored checkpoint's in-flight batches (RolloutSource.held)
        self._mlflow_has = -1  # the last step MLflow already holds (-1: none)
        self._log = None

    def _check_output_dir(self) -> bool:
        out, t = self.output_dir, self.cfg.trainer
        if checkpoint.exists(out):
            if not t.resume:
                raise ConfigError(f"trainer.output_dir={out}: holds a run; resume it (trainer.resume=true) or pick another dir")
            held = checkpoint.load_state(out)
            saved, step = held["config"], held["step"]
            current = to_flat_dict(self.cfg)
            diff = [k for k in current if not k.startswith("tracking.") and k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
            if diff:
                k = diff[0]
                raise ConfigError(f"trainer.output_dir={out}: holds a run with {k}={saved.get(k)}, not {current[k]}; pick another dir")
            if step > t.max_steps:
                raise ConfigError(f"trainer.max_steps={t.max_steps}: trainer.output_dir={out} holds a run already at step "
                                  f"{step}; give trainer.max_steps>={step} to resume it, or pick another dir")
            self.redone = range(step + 1, min(self._last_logged_step(), t.max_steps) + 1)
            self.saved_step = step
            return True
        # A run killed before its first checkpoint leaves only these: start it afresh.
        if out.exists() and {p.name for p in out.iterdir()} - {"config.yaml", "metrics.jsonl", f"{checkpoint.CHECKPOINT}.tmp"}:
            raise ConfigError(f"trainer.output_dir={out}: not empty and holds no checkpoint; pick another dir")
        return False

    def _last_logged_step(self) -> int:
        path = self.output_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return max((json.loads(ln)["step"] for ln in lines if ln.strip()), default=0)

    def finished_result(self) -> TrainResult | None:
        """The saved result of a run that already reached trainer.max_steps (nothing to train)."""
        result_file = self.output_dir / "result.json"
        if self.resuming and result_file.exists():
            saved = json.loads(result_file.read_text())
            if saved["step"] >= self.cfg.trainer.max_steps:
                return TrainResult(**{**saved, "resumed_complete": True})
        return None

    # ------------------------------------------------------------------------------ life cycle
    def open(self, learner, tokenizer) -> "TrainingRun":
        """Restore a resumed run into `learner`, open the MLflow run and metrics.jsonl."""
        from popo_core.tracking import MlflowRun

        cfg, out = self.cfg, self.output_dir
        self.learner, self.tokenizer = learner, tokenizer
        if self.resuming:
            kwargs = dict(model=learner.model, optimizer=learner.optimizer, scheduler=learner.scheduler,
                          momentum=learner.momentum, predictor=learner.predictor)
            restored = checkpoint.restore_sharded(out, ranks=self.ranks, **kwargs) if self.ranks.distributed \
                else checkpoint.restore(out, **kwargs)
            self.state.update(restored)
            from popo_core.rollout.source import from_json

            self.held = from_json(checkpoint.load_rollouts(out))
            for k, v in self.state.get("counters", {}).items():
                setattr(learner.counters, k, v)
        self.state["config"] = to_flat_dict(cfg)
        if not self.main:
            self.ranks.barrier()  # rank 0 creates the directory and the MLflow run
            return self
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        t = cfg.tracking
        tags = {"popo.preset": cfg.preset, "popo.algo": cfg.algo.name, "popo.output_dir": str(out.resolve())}
        self._mlflow = MlflowRun(uri=t.uri, experiment=t.experiment, enabled=t.enabled, run_id=self.state["run_id"],
                           run_name=t.run_name or out.name, parent_run_id=t.parent_run_id, tags=tags,
                           flush_every_s=t.flush_every_s)
        if self.state["run_id"] is None:
            params = to_flat_dict(cfg) | {"model.parameters": sum(p.numel() for p in learner.model.parameters())}
            self._mlflow.log_params(params)
            self._mlflow.log_text(to_yaml(cfg), "config.yaml")
        else:
            self._mlflow_has = self._mlflow.last_step("reward/mean")
        self.state["run_id"] = self._mlflow.run_id
        self._log = open(self._truncated_metrics(), "a")
        self.callbacks.on_start(self.state["step"], cfg.trainer.max_steps, out)
        if self.resuming:
            last = {k: h[k] for h in self.state["history"] for k in HISTORY_KEYS if k in h}
            self.callbacks.on_resume(self.state["step"], self.redone, last)
        self.ranks.barrier()
        return self

    def _truncated_metrics(self) -> Path:
        """metrics.jsonl holding only the steps up to the restored checkpoint's (none when starting)."""
        path = self.output_dir / "metrics.jsonl"
        if path.exists() and not self.resuming:
            path.unlink()
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.state["step"]]
            path.write_text("".join(ln + "\n" for ln in keep))
        return path

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._log is not None:
            self._log.close()
        if exc_type is not None and self._mlflow is not None:
            self._mlflow.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def steps(self) -> range:
        return range(self.state["step"] + 1, self.cfg.trainer.max_steps + 1)

    def eval_due(self, step: int) -> bool:
        every = self.cfg.trainer.eval_every
        return step == self.cfg.trainer.max_steps or bool(every and step % every == 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.state["step"] = step
        self.state["history"].append({"step": step, **{k: metrics[k] for k in HISTORY_KEYS if k in metrics}})
        if not self.main:
            return
        if step > self._mlflow_has:
            self._mlflow.log_metrics(metrics, step)
        self._log.write(json.dumps({"step": step, **metrics}) + "\n")
        self._log.flush()
        self.callbacks.on_step(step, metrics)
        if "eval/accuracy" in metrics:
            self.callbacks.on_eval(step, metrics["eval/accuracy"])

    def save_due(self, step: int) -> bool:
        return step % self.cfg.trainer.save_every == 0 or step == self.cfg.trainer.max_steps

    def save(self, held: dict | None = None) -> None:
        """Checkpoint; `held`: the rollout source's batches sampled from older weights (RolloutSource.held)."""
        from popo_core.rollout.source import to_json

        learner = self.learner
        if self._mlflow is not None:  # MLflow holds every step up to the checkpoint a resume starts from
            self._mlflow.flush()
        self.state["counters"] = asdict(learner.counters)
        if self.ranks.distributed:
            checkpoint.save_sharded(self.output_dir, ranks=self.ranks, model=learner.model, optimizer=learner.optimizer,
                                    scheduler=learner.scheduler, state=self.state, momentum=learner.momentum,
                                    predictor=learner.predictor)
            self.saved_step = self.state["step"]
            return
        checkpoint.save(self.output_dir, model=learner.model, tokenizer=self.tokenizer, optimizer=learner.optimizer,
                        scheduler=learner.scheduler, state=self.state, momentum=learner.momentum,
                        predictor=learner.predictor, base_name=self.cfg.model.name_or_path,
                        rollouts=to_json(held or {}))
        self.saved_step = self.state["step"]

    def finish(self, metrics: dict[str, float]) -> TrainResult:
        from popo_core.model.loading import save_policy
        from popo_core.plots import training_curves

        out = self.output_dir
        policy = self.learner.export()  # under FSDP: a whole copy, gathered from the shards (every rank)
        history = self.state["history"]
        evals = [h["eval/accuracy"] for h in history if "eval/accuracy" in h]
        if not self.main:
            self.ranks.barrier()
            return TrainResult(str(out), None, self.state["step"], evals[-1] if evals else None, metrics, history)
        save_policy(policy, self.tokenizer, out, base_name=self.cfg.model.name_or_path,
                    merged=self.cfg.trainer.save_merged)
        result = TrainResult(str(out), self._mlflow.run_id, self.state["step"], evals[-1] if evals else None, metrics, history)
        (out / "result.json").write_text(json.dumps(asdict(result), indent=1))
        png = training_curves(history, out / "curves.png", title=f"{self.cfg.preset} / {self.cfg.algo.name}",
                              max_steps=self.cfg.trainer.max_steps)
        self._mlflow.log_artifact(png)
        self._mlflow.log_artifact(out / "metrics.jsonl")
        if result.final_accuracy is not None:
            self._mlflow.log_metrics({"final/accuracy": result.final_accuracy}, self.state["step"])
        self._mlflow.finish("FINISHED")
        self.ranks.barrier()
        return result
