"""The `popo` command: thin wrappers over popo_core (parse, compose config, call, render)."""

from __future__ import annotations

import typer

from popo_cli import ablate as ablate_cmd
from popo_cli import evaluate as eval_cmd
from popo_cli import sweep as sweep_cmd
from popo_cli import train as train_cmd

app = typer.Typer(
    name="popo",
    help="Positive-Only Policy Optimization: train, evaluate, sweep and ablate LLM reasoning with RLVR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main() -> None:
    """Positive-Only Policy Optimization: train, evaluate, sweep and ablate LLM reasoning with RLVR."""


app.command("train", help=train_cmd._doc())(train_cmd.train)
app.command("eval")(eval_cmd.eval_cmd)
app.command("ablate")(ablate_cmd.ablate)
app.command("sweep")(sweep_cmd.sweep)


if __name__ == "__main__":
    app()
