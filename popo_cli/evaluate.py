"""`popo eval --bench B [--model M | --responses FILE] ...`: the benchmark table."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from popo_cli.common import console, err_console, progress_bar, setup_env, user_errors

BENCH_HELP = ("aime24, aime25, amc23, math500, gsm8k, minerva_math, olympiadbench, or all (those seven); or a "
              "synthetic task's held-out prompts: arith (named explicitly, with --model). Repeat for several.")


def eval_cmd(
    bench: List[str] = typer.Option(..., "--bench", "-b", help=BENCH_HELP, show_default=False),
    data: Optional[str] = typer.Option(None, "--data", help="JSONL/JSON/Parquet file with id, problem, answer, replacing "
                                       "the benchmark's problems (default: the copy packaged with popo, else the Hub)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model preset (tiny, qwen-math-1.5b, qwen-math-7b), "
                                        "a checkpoint directory written by `popo train`, or a Hub id."),
    responses: Optional[Path] = typer.Option(None, "--responses", help='Grade existing generations instead: JSONL lines '
                                             '{"id": ..., "response": ...} (several per id for K samples; add "bench" '
                                             'to grade several benchmarks; --list-ids prints the ids). A problem '
                                             'without a response is graded wrong.'),
    answered_only: bool = typer.Option(False, "--answered-only", help="With --responses: the metrics over the "
                                       "answered problems only (default: every problem, an unanswered one wrong)."),
    list_ids: bool = typer.Option(False, "--list-ids", help="Print each problem's id and the start of its text (tab-"
                                  "separated; the bench first when several) and exit: no model is loaded, no grading."),
    template: Optional[str] = typer.Option(None, "--template", help="Prompt template (default: the model's)."),
    samples: int = typer.Option(1, "--samples", "-k", help="Responses per problem (K)."),
    temperature: Optional[float] = typer.Option(
        None, "--temperature", help="0 is greedy. Default: greedy for one sample, 1.0 with --samples > 1.",
        show_default=False),
    top_p: float = typer.Option(1.0, "--top-p"),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", help="Length limit. Default: the model preset's (3000; tiny: 32).", show_default=False),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="GPUs per vLLM engine (--engine vllm)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for summary.json and samples.jsonl."),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="Log as a child of this MLflow (training) run."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems of each benchmark."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Grading processes (default min(4, CPUs); 0: in-process)."),
    timeout: int = typer.Option(5, "--timeout", help="Seconds per answer before it is graded wrong (whole number)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    batch_prompts: int = typer.Option(64, "--batch-prompts", help="Prompts per generate call."),
    tracking: bool = typer.Option(True, "--tracking/--no-tracking", help="Log to MLflow."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."),
    experiment: str = typer.Option("popo", "--experiment", help="MLflow experiment (with --run-id: the parent's)."),
) -> None:
    """Evaluate on math benchmarks (graded by math-verify) or a synthetic task (arith, graded exactly):
    accuracy with a 95% CI, pass@k, maj@K."""
    setup_env()
    with user_errors():
        from popo_core.evaluation import runner

        settings = runner.EvalSettings(
            benches=list(bench), data=data, model=model, responses=str(responses) if responses else None,
            template=template, engine=engine, tensor_parallel_size=tensor_parallel_size, samples=samples,
            temperature=temperature, top_p=top_p,
            eval_max_new_tokens=max_new_tokens, limit=limit, answered_only=answered_only, workers=workers,
            timeout=timeout, seed=seed, device=device, threads=threads, batch_prompts=batch_prompts,
            output=str(output) if output else None, run_id=run_id, tracking=tracking, tracking_uri=tracking_uri,
            experiment=experiment,
        )
        if list_ids:
            print_ids(runner.list_ids(settings))
            return
        with _progress() as progress:
            result = runner.run_eval(settings, progress)
    render(result)


def print_ids(rows) -> None:
    """`id<TAB>problem start`, or `bench<TAB>id<TAB>problem start` for several benchmarks: plain text for a pipe."""
    import os
    import sys

    several = len({bench for bench, _ in rows}) > 1
    lines = []
    for bench, problem in rows:
        text = " ".join(problem.problem.split())
        text = text if len(text) <= 60 else text[:57] + "..."
        lines.append("\t".join([bench, problem.id, text] if several else [problem.id, text]))
    try:
        sys.stdout.write("".join(line + "\n" for line in lines))
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextmanager
def _progress() -> Iterator:
    bars = progress_bar(transient=True)

    def factory(description: str, total: int):
        task = bars.add_task(description, total=total)
        return lambda n: bars.advance(task, n)

    with bars:
        yield factory


def render(result) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    ks = sorted({k for r in result.results for k in r.summary.pass_at_k})
    table = Table(title="popo eval (accuracy and pass@k in %)", title_justify="left")
    for name in ("bench", "n", "missing", "K", "accuracy", "95% CI"):
        table.add_column(name, justify="left" if name == "bench" else "right")
    for k in ks:
        table.add_column(f"pass@{k}", justify="right")
    for name in ("maj@K", "unparsed", "timeouts"):
        table.add_column(name, justify="right")
    for r in result.results:
        s = r.summary
        row = [s.bench, str(s.n), str(s.missing), str(s.samples), f"{100 * s.accuracy:.2f}",
               f"{100 * s.accuracy_ci[0]:.1f}–{100 * s.accuracy_ci[1]:.1f}"]
        row += [f"{100 * s.pass_at_k[k]:.2f}" if k in s.pass_at_k else "" for k in ks]
        row += [f"{100 * s.maj_at_k:.2f}", str(s.unparsed), str(s.timeouts)]
        table.add_row(*row)
    # Piped output has no terminal width; print the table whole rather than squeezed to 80 columns.
    out = console if console.is_terminal else Console(width=max(console.width, 200), highlight=False)
    out.print(table)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning: {escape(warning)}[/]", soft_wrap=True)
    errors = sum(r.summary.errors for r in result.results)
    if errors:
        console.print(f"[yellow]{errors} answer(s) raised an error in the grader and were graded wrong[/]")
    for line in result.protocol.lines():
        console.print(f"[dim]{line}[/]", soft_wrap=True)
    if result.output:
        console.print(f"wrote {result.output / 'summary.json'} and {result.output / 'samples.jsonl'}")
    if result.run_id:
        console.print(f"MLflow run {result.run_id}")
