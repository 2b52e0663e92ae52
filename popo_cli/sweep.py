"""`popo sweep momentum|clip|penalty|lr|all|FILE.yaml [PRESET] [--param KEY=SPEC ...] [options] [key=value ...]`."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.markup import escape

from popo_cli.common import console, err_console, fail, setup_env, split_preset, user_errors

STORAGE_HELP = ("Optuna storage URL. Workers started anywhere with the same --storage and --study share "
                "one study, e.g. postgresql://user:pass@db-host/optuna.")


def sweep(
    knob: str = typer.Argument(..., help="What to sweep: momentum, clip, penalty, lr, all (the first three jointly), "
                               "or a YAML file of your own in the format of experiments/sweep/*.yaml.",
                               show_default=False),
    preset: Optional[str] = typer.Argument(None, help="Preset; default tiny.", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help="Overrides fixing the rest of every trial's config; "
                                                    "every command on one study must give the same.",
                                                    show_default=False),
    params: Optional[List[str]] = typer.Option(None, "--param", help="Another parameter, or one replacing the "
                                               "space's: KEY=LOW:HIGH[:log] (a range) or KEY=a,b,c (choices); repeatable.",
                                               show_default=False),
    trials: int = typer.Option(20, "--trials", "-n", help="Finished (complete or pruned) trials the study should "
                               "hold, all workers together; rerunning continues up to it."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name. Default: <knob>-<preset>.",
                                        show_default=False),
    storage: str = typer.Option("sqlite:///optuna.db", "--storage", help=STORAGE_HELP),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe, random or grid (grid points from the search space)."),
    pruner: str = typer.Option("median", "--pruner", help="median (stop trials below the median at the same step) "
                               "or none."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Sampler seed (workers running side by side should "
                                       "not share one).", show_default=False),
    metric: str = typer.Option("eval/accuracy", "--metric", help="Objective: this metric at the last step; "
                               "reported at each step it is logged, for the pruner. eval/pass_at_1 (sampled) needs "
                               "trainer.eval_samples=N."),
    direction: str = typer.Option("maximize", "--direction", help="maximize or minimize."),
    heartbeat_interval: int = typer.Option(10, "--heartbeat-interval", help="Seconds between a trial's heartbeats."),
    grace_period: int = typer.Option(60, "--grace-period", help="A trial silent this long (s) belongs to a dead "
                                     "worker: it is marked failed and retried."),
) -> None:
    """Optuna study over POPO's knobs or any config key; each trial is a real training run, nested in MLflow.

    Resumable (rerun the same command) and shareable (several workers, one --storage/--study).
    """
    setup_env()
    preset, overrides = split_preset(preset, overrides)
    with user_errors():
        from popo_core.sweep.study import Sweep, SweepSettings, TooManyFailures

        settings = SweepSettings(knob=knob, preset=preset, overrides=overrides, params=list(params or []),
                                 trials=trials, study=study, storage=storage, sampler=sampler, pruner=pruner, seed=seed, metric=metric,
                                 direction=direction, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
        job = Sweep(settings)
        space = "; ".join(p.describe() for p in job.space)
        console.print(f"[bold]popo sweep[/] {knob} on {preset}: study [bold]{job.name}[/] in {_shown(storage)}, "
                      f"up to {job.target} finished trials, {sampler} sampler, {pruner} pruner; {escape(space)}")
        for note in job.notes:
            err_console.print(f"[yellow]{escape(note)}[/]" if note.startswith("warning") else escape(note))
        from popo_core.trainer.update import TrainingAborted

        try:
            result = job.run(_Reporter())
        except (TrainingAborted, TooManyFailures) as err:
            fail(str(err), code=1)
    _render(result, metric)


def _shown(url: str) -> str:
    from popo_core.tracking import redact

    return redact({"u": url})["u"]


class _Reporter:
    def note(self, message: str) -> None:
        console.print(f"[dim]{escape(message)}[/]")

    def trial_started(self, number, params, output_dir, resumed) -> None:
        values = "  ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        console.print(escape(f"trial {number}: {values} -> {output_dir}") + ("  (resuming)" if resumed else ""))

    def trial_finished(self, row) -> None:
        value = "" if row.value is None else f" {_fmt(row.value)}"
        extra = f"  [dim]{escape(row.note)}[/]" if row.note else ""
        took = "" if row.duration_s is None else f" in {row.duration_s:.1f} s"
        console.print(f"trial {row.number}: [bold]{row.state.lower()}[/]{value}{took}{extra}")

    def training(self, number: int):
        from popo_cli.train import make_progress_callbacks

        return make_progress_callbacks(f"trial {number}")


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _render(result, metric: str) -> None:
    from rich.table import Table

    names = list(dict.fromkeys(k for r in result.rows for k in r.params))
    table = Table(title=f"study {result.study}: {sum(r.state in ('COMPLETE', 'PRUNED') for r in result.rows)}"
                        f"/{result.target} finished", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("state")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column(metric, justify="right")
    table.add_column("time (s)", justify="right")
    table.add_column("note", style="dim")
    best = result.best.number if result.best else None
    for r in result.rows:
        style = "bold green" if r.number == best else None
        table.add_row(str(r.number), r.state.lower(), *(_fmt(r.params[n]) if n in r.params else "" for n in names),
                      "" if r.value is None else _fmt(r.value),
                      "" if r.duration_s is None else f"{r.duration_s:.1f}", escape(r.note), style=style)
    console.print(table)
    if result.best:
        params = "  ".join(f"{k}={_fmt(v)}" for k, v in result.best.params.items())
        console.print(f"[bold]best[/]: trial {result.best.number}  {metric}={_fmt(result.best.value)}  {params}")
    else:
        console.print("no complete trial yet")
    for note in result.notes:
        console.print(f"[dim]{escape(note)}[/]")
    if result.plots:
        console.print("plots: " + ", ".join(str(p) for p in result.plots))
    parent = f"; MLflow parent run {result.parent_run_id}" if result.parent_run_id else ""
    console.print(f"this worker ran {result.ran} trial(s) in {result.elapsed_s:.0f} s{parent}")
