"""`popo train PRESET [key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from popo_cli.common import console, fail, preset_help, progress_bar, setup_env, split_preset, user_errors


def make_progress_callbacks(label: str = "train"):
    """A rich progress bar showing step, reward and held-out accuracy live."""
    from rich.progress import TextColumn

    from popo_core.train import Callbacks

    class ProgressCallbacks(Callbacks):
        def __init__(self):
            self.progress = progress_bar(TextColumn("{task.fields[info]}"))
            self.task = None
            self.accuracy = float("nan")

        def on_start(self, start_step, total_steps, output_dir):
            self.progress.start()
            self.task = self.progress.add_task(label, total=total_steps, completed=start_step, info="")

        def on_step(self, step, metrics):
            self.accuracy = metrics.get("eval/accuracy", self.accuracy)
            reward = metrics.get("reward/mean")
            info = f"reward {reward:.3f}  " if reward is not None else ""
            info += f"eval/accuracy {self.accuracy:.3f}"
            self.progress.update(self.task, completed=step, info=info)

        def close(self):
            self.progress.stop()

    return ProgressCallbacks()


def ensure_warm_start(cfg):
    """Build (or find in the cache) the warm start a `model.name_or_path=warmstart` config asks for,
    with a progress bar while it trains; return the config pointing at it."""
    if cfg.model.name_or_path != "warmstart":
        return cfg
    from rich.progress import TextColumn

    from popo_core import warmstart

    bar = progress_bar(TextColumn("{task.fields[info]}"))
    task = None

    def on_build(path):
        nonlocal task
        console.print(f"[bold]warm start[/] not cached: building it ({cfg.warmstart.steps} supervised steps) -> {path}")
        bar.start()
        task = bar.add_task("warm start", total=cfg.warmstart.steps, info="")

    def progress(step, total, loss):
        bar.update(task, completed=step, info=f"loss {loss:.3f}")

    try:
        resolved = warmstart.ensure(cfg, progress, on_build=on_build)
    finally:
        bar.stop()
    info = warmstart.read_info(resolved.model.name_or_path) or {}
    acc = info.get("heldout_greedy_accuracy")
    note = f" (held-out greedy accuracy {acc:.3f})" if acc is not None else ""
    console.print(f"[bold]warm start[/] {resolved.model.name_or_path}{note}")
    return resolved


def train(
    preset: Optional[str] = typer.Argument(None, help="Preset; see below. Default: tiny.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help="Hydra overrides, e.g. algo=grpo algo.momentum=0.95"),
) -> None:
    """Train with POPO (or GRPO: algo=grpo) on a preset, logging to MLflow."""
    setup_env()
    preset, overrides = split_preset(preset, overrides)
    with user_errors():
        from popo_core.config import compose

        cfg = compose(preset, overrides)
        cfg = ensure_warm_start(cfg)
        from popo_core.train import Trainer, TrainingAborted

        bar = make_progress_callbacks(f"{preset}/{cfg.algo.name}")
        trainer = Trainer(cfg, bar)
        console.print(f"[bold]popo train[/] {preset} ({cfg.algo.name}) -> {trainer.output_dir}"
                      f"  [dim](rerun with trainer.output_dir={trainer.output_dir} to resume)[/]")
        try:
            result = trainer.run()
        except TrainingAborted as err:
            fail(str(err), code=1)
        finally:
            bar.close()
    if result.resumed_complete:
        console.print(f"already complete at step {result.step}: nothing to train")
    acc = "n/a" if result.final_accuracy is None else f"{result.final_accuracy:.3f}"
    console.print(f"final eval/accuracy {acc} at step {result.step}; policy saved to {result.output_dir}"
                  f"; MLflow run {result.run_id}")


def _doc() -> str:
    try:
        return (train.__doc__ or "") + "\n\n" + preset_help()
    except Exception:  # config dir missing: still show help
        return train.__doc__ or ""
