"""What every command shares: one-line errors with exit code 2, and the console."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """`error: message` on one line (printed literally: brackets in paths and extras survive)."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad input or config into `error: ...` on one line and exit code 2, no traceback."""
    from popo_core.errors import UserError, first_line

    try:
        yield
    except UserError as err:
        fail(first_line(err))
    except OSError as err:  # the file system or network refused something the input named
        where = f"{err.filename}: " if err.filename else ""
        fail(f"{where}{err.strerror or first_line(err)}")
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130)


def progress_bar(*extra_columns, transient: bool = False):
    """The one rich progress bar popo shows: description, bar, n/total, elapsed, remaining, extras."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), *extra_columns, console=console, transient=transient,
                    disable=transient and not console.is_terminal)


def split_preset(preset: str | None, overrides: list[str] | None, default: str = "tiny") -> tuple[str, list[str]]:
    """`popo train algo=grpo` means the default preset with an override."""
    overrides = list(overrides or [])
    if preset and "=" in preset:
        return default, [preset, *overrides]
    return preset or default, overrides


def preset_help() -> str:
    from popo_core.config import presets

    return "Preset (a complete experiment): " + ", ".join(presets()) + "."


def setup_env() -> None:
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read by huggingface_hub's own logging set-up
    import logging

    # The Hub client logs every retry of an unreachable host; the one-line error says it once.
    for name in ("huggingface_hub", "datasets", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.warnoptions:
        import warnings

        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
