"""`popo ablate [PRESET] --drop COMPONENT [--drop ...] [--seeds S] [--baseline NAME ...] [key=value ...]`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from popo_cli.common import console, fail, setup_env, split_preset, user_errors

DROP_HELP = ("Component to remove from full POPO (METHOD.md, Ablations): siamese, momentum, similarity, bound, "
             "redistribution, positive-only, or all. Repeat for several; each is its own variant.")


def ablate(
    preset: Optional[str] = typer.Argument(None, help="Preset (default: tiny).", show_default=False),
    overrides: Optional[List[str]] = typer.Argument(None, help="Hydra overrides for every variant, e.g. trainer.max_steps=200"),
    drop: List[str] = typer.Option([], "--drop", "-d", help=DROP_HELP, show_default=False),
    seeds: int = typer.Option(3, "--seeds", "-s", help="Seeds 0..S-1, the same for every variant (paired)."),
    baseline: List[str] = typer.Option([], "--baseline", "-b", help="Add a registered method under the same budget "
                                       "(grpo, dr_grpo, rft, raft_pp, psr, nsr, w_reinforce). Repeat for several.",
                                       show_default=False),
    output_dir: Path = typer.Option(Path("ablations"), "--output-dir", "-o",
                                    help="Runs go to DIR/<preset>/<variant>-seed<s>-<hash>, the summary to DIR/<preset>/ablation-<key>."),
) -> None:
    """Ablate POPO: full POPO and each variant on the same seeds, a table of paired differences.

    Every run is a real `popo train` run, nested under one MLflow parent run.

    Rerunning the same command reuses the finished runs and resumes a killed one from its checkpoint.
    """
    setup_env()
    preset, overrides = split_preset(preset, overrides)
    with user_errors():
        from popo_core.ablate import plan, run_ablation

        ablation = plan(preset, drop, seeds, baseline, overrides, root=output_dir)
        from popo_core.trainer.update import TrainingAborted  # torch: only once the input is known to be good

        try:
            result = run_ablation(ablation, _ConsoleReporter())
        except TrainingAborted as err:
            fail(str(err), code=1)
    render(result)


class _ConsoleReporter:
    def on_plan(self, ablation, found):
        n, todo = len(ablation.runs), len(ablation.runs) - len(found)
        names = ", ".join(v.name for v in ablation.variants)
        console.print(f"[bold]popo ablate[/] {ablation.preset}: {names} x seeds 0..{ablation.seeds - 1} = {n} runs; "
                      f"{len(found)} finished in MLflow, {todo} to train")

    def run_callbacks(self, run, index, total):
        from popo_cli.train import make_progress_callbacks

        return make_progress_callbacks(f"[{index}/{total}] {run.name}")

    def on_run_done(self, run, outcome):
        if outcome.source == "reused":
            console.print(f"[dim]reused  {run.name}  (MLflow run {outcome.run_id}, {outcome.output_dir})[/]")


def _pm(stat, signed: bool = False) -> str:
    if stat is None:
        return ""
    if stat.mean is None:
        return "n/a"
    mean = f"{stat.mean:+.3f}" if signed else f"{stat.mean:.3f}"
    return mean if stat.std is None else f"{mean} ± {stat.std:.3f}"


def render(result) -> None:
    from rich.table import Table

    a = result.ablation
    budget = a.runs[0].cfg
    table = Table(title=f"popo ablate {a.preset}: {a.seeds} seed(s), {budget.trainer.max_steps} steps each",
                  title_justify="left")
    table.add_column("variant", style="bold")
    table.add_column("what changes")
    table.add_column("eval/accuracy", justify="right")
    table.add_column("Δ accuracy (paired)", justify="right")
    table.add_column("reward", justify="right")
    table.add_column("Δ reward (paired)", justify="right")
    for s in result.summaries:
        table.add_row(s.label, s.changes, _pm(s.accuracy), _pm(s.delta_accuracy, True), _pm(s.reward),
                      _pm(s.delta_reward, True))
    console.print(table)
    spread = ("mean ± sample std over seeds; Δ: variant − full POPO on the same seed, mean ± std of the per-seed "
              "differences") if a.seeds > 1 else "one seed, so no spread; Δ: variant − full POPO on seed 0"
    console.print(f"[dim]final eval/accuracy (greedy, on the preset's evaluation set) and last-step training reward/mean: {spread}[/]")
    reused = len(result.outcomes) - result.trained
    if result.trained == 0:
        console.print(f"nothing to train: all {reused} runs were already finished and are reused")
    else:
        console.print(f"trained {result.trained} run(s), reused {reused}")
    console.print(f"summary, runs.csv and figures in {a.output_dir}"
                  + (f"; MLflow parent run {result.parent_run_id}" if result.parent_run_id else ""))
