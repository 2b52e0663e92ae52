"""`popo train PRESET [key=value ...]`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from popo_cli.common import console, err_console, fail, preset_help, progress_bar, setup_env, split_preset, user_errors


def make_progress_callbacks(label: str = "train"):
    """A rich progress bar showing step, reward and held-out accuracy live."""
    from rich.progress import TextColumn

    from popo_core.trainer.lifecycle import Callbacks

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

        def on_resume(self, step, redone, last):
            self.accuracy = last.get("eval/accuracy", self.accuracy)
            again = f"; steps {redone.start}..{redone.stop - 1} logged before the interruption are redone" if redone else ""
            self.progress.console.print(f"resuming from step {step} (checkpoint){again}", soft_wrap=True)
            self.on_step(step, last)

        def close(self):
            self.progress.stop()

    return ProgressCallbacks()


def ensure_warm_start(cfg):
    """Build (or find in the cache) the warm start a `model.name_or_path=warmstart` config asks for,
    with a progress bar while it trains; return the config pointing at it. The shipped one (`popo:`) is said."""
    from popo_core.model import packaged, warmstart

    if packaged.is_shipped(cfg.model.name_or_path):
        info = warmstart.read_info(packaged.shipped_dir(cfg.model.name_or_path)) or {}
        acc = info.get("heldout_greedy_accuracy")
        console.print(f"[bold]warm start[/] {cfg.model.name_or_path} (shipped with popo"
                      + (f"; held-out greedy accuracy {acc:.3f})" if acc is not None else ")"))
        return cfg
    if cfg.model.name_or_path != "warmstart":
        return cfg
    from rich.progress import TextColumn

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
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and the memory/FLOPs plan per GPU; load nothing."),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GPU memory in GiB for the plan and the fit check (default: the detected GPU; 80 for --dry-run without one)."),
    gpus: int = typer.Option(1, "--gpus", help="--dry-run: plan sharded FSDP-style over this many GPUs."),
    prompt_tokens: Optional[int] = typer.Option(None, "--prompt-tokens", help="--dry-run: prompt length to plan for (default: exact for tiny, 512 for math)."),
    no_fit_check: bool = typer.Option(False, "--no-fit-check", help="Skip the check that the run fits its GPU."),
) -> None:
    """Train with POPO (or GRPO: algo=grpo) on a preset, logging to MLflow."""
    setup_env()
    preset, overrides = split_preset(preset, overrides)
    with user_errors():
        from popo_core.config import compose

        cfg = compose(preset, overrides)
        from popo_cli import plan_view

        if gpu_memory is not None and not gpu_memory > 0:
            fail(f"--gpu-memory {gpu_memory}: must be > 0 (GiB)")
        if gpus < 1 or (prompt_tokens is not None and prompt_tokens < 1):
            fail(f"--gpus {gpus} / --prompt-tokens {prompt_tokens}: must be >= 1")
        if dry_run:
            plan_view.render(cfg, gpu_memory=gpu_memory, world_size=gpus, prompt_tokens=prompt_tokens)
            return
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if not no_fit_check:  # does the run fit the stated (or detected) GPU: the config's own verdict first
            plan_view.preflight(cfg, gpu_memory, world_size=world)
        from popo_core import preflight

        preflight.training(cfg)  # output directory, device, tracking store, engine: before anything is built
        cfg = ensure_warm_start(cfg)  # arith: build (or reuse) the warm-started model
        from popo_core.trainer.lifecycle import TrainingRun
        from popo_core.trainer.loop import train
        from popo_core.trainer.update import TrainingAborted

        main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone prints
        bar = make_progress_callbacks(f"{preset}/{cfg.algo.name}") if main else None
        training_run = TrainingRun(cfg, bar)  # checks the output directory at once
        if main:
            ranks = f" on {world} processes" if world > 1 else ""
            out = escape(str(training_run.output_dir))
            hint = "" if cfg.trainer.output_dir else f"  [dim](rerun with trainer.output_dir={out} to resume)[/]"
            console.print(f"[bold]popo train[/] {preset} ({cfg.algo.name}){ranks} -> {out}{hint}")
        try:
            result = train(cfg, run=training_run)
        except TrainingAborted as err:
            fail(str(err), code=1)
        except KeyboardInterrupt:
            result = None
        finally:
            if bar is not None:
                bar.close()
        if result is None:  # Ctrl-C: say where the run stopped (the bar is gone) and how to go on
            if main:
                err_console.print(f"[yellow]{escape(interrupted_note(cfg, training_run))}[/]", soft_wrap=True)
            raise typer.Exit(130)
        if not main:
            return
    if result.resumed_complete:
        console.print(f"already complete at step {result.step}: nothing to train")
    acc = "n/a" if result.final_accuracy is None else f"{result.final_accuracy:.3f}"
    console.print(f"final eval/accuracy {acc} at step {result.step}; policy saved to {result.output_dir}"
                  f"; MLflow run {result.run_id}")


def interrupted_note(cfg, training_run) -> str:
    """What Ctrl-C left behind and how to go on."""
    step, saved = training_run.state["step"], training_run.saved_step
    if not saved:
        return f"interrupted at step {step}; no checkpoint yet (trainer.save_every={cfg.trainer.save_every}): a rerun starts afresh"
    rerun = "rerun the same command" if cfg.trainer.output_dir else f"rerun with trainer.output_dir={training_run.output_dir}"
    return f"interrupted at step {step}; last checkpoint at step {saved}; {rerun} to resume"


def _doc() -> str:
    try:
        return (train.__doc__ or "") + "\n\n" + preset_help()
    except Exception:  # config dir missing: still show help
        return train.__doc__ or ""
