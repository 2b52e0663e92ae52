"""`popo eval --bench arith`: a synthetic task's held-out prompts, generated and graded exactly.

Synthetic tasks (popo_core.data.tasks.SYNTHETIC) are named explicitly; `--bench all` stays the math
suite. Their problems are the held-out prompts of the task's data settings, read from the run's
config.yaml next to `--model` (a `popo train` run directory or a built warm start), so a model is
scored on the very prompts the trainer held out; without one, the task's defaults
(experiments/data/<task>.yaml). Grading is the task's verifier (for arith: the exact final answer).
"""

from __future__ import annotations

from pathlib import Path

from popo_core.evaluation import suite as bm
from popo_core.data.tasks import ARITH_LIKE
from popo_core.errors import ConfigError, DataError, first_line


def split_names(names: list[str]) -> tuple[list[str], list[str]]:
    """(synthetic task names, the other --bench values), in the order given, duplicates dropped."""
    from popo_core.data.tasks import SYNTHETIC

    synthetic, rest = [], []
    for name in names:
        for part in (p.strip() for p in str(name).split(",")):
            if part in SYNTHETIC:
                if part not in synthetic:
                    synthetic.append(part)
            elif part:
                rest.append(part)
    return synthetic, rest


def run_config_file(model: str) -> Path | None:
    """The config.yaml that describes a saved model: in its directory, or one or two levels up."""
    here = Path(model)
    if not here.is_dir():
        return None
    return next((c for c in (here / "config.yaml", here.parent / "config.yaml", here.parent.parent / "config.yaml")
                 if c.is_file()), None)


def data_settings(task: str, model: str | None):
    """(DataConfig, where it came from) for the held-out prompts of `task`."""
    from omegaconf import OmegaConf

    from popo_core.config import DataConfig, validate_arith, config_dir

    file = run_config_file(model) if model else None
    saved = OmegaConf.load(file).get("data") if file else None
    if saved is not None:
        where = str(file)
        raw = saved
    else:
        where = str(config_dir() / "data" / f"{task}.yaml")
        raw = OmegaConf.load(where)
    try:
        d: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw))  # type: ignore[assignment]
    except Exception as err:  # omegaconf's errors for a hand-edited file
        raise DataError(f"{where}: cannot read its data settings ({first_line(err)})") from None
    if d.task != task:
        raise ConfigError(f"--model {model}: trained on data.task={d.task} ({where}); --bench {task} needs a model "
                          f"trained on {task}")
    if task in ARITH_LIKE:
        validate_arith(d)
    return d, where


def held_out(task: str, model: str | None) -> tuple[bm.Benchmark, list, str]:
    """(a Benchmark record for the tables and files, the held-out problems, their source line)."""
    from popo_core.data.tasks import TASKS

    d, where = data_settings(task, model)
    _, problems = TASKS[task](d)
    bench = bm.Benchmark(task, hub_id="synthetic", split="held-out", problem_key="problem", answer_key="answer",
                         id_key="id", normalize="none")
    extra = f", {d.min_terms}-{d.max_terms} terms, operands 0-{d.max_operand}" if task in ARITH_LIKE else ""
    return bench, problems, f"{len(problems)} held-out {task} prompts of data.seed={d.seed}{extra} (settings: {where})"


EXTRACTION = {"arith": "the text after the completion's last '=' (the worked trace's final answer)",
              "sums": "math-verify's (the last \\boxed{}, else the last number)"}
GRADER = {"arith": "exact match of the final answer (popo_core.grading.verifiers.FinalAnswer)",
          "sums": "math-verify (popo_core.grading.math_grader)"}
