"""Data that ships inside the popo package: the seven benchmarks and the MATH levels 3-5 training set.

The files in `bench/` are copied unchanged from the sources in bench/PROVENANCE.md (terms in
bench/NOTICE). Each has a *packaged name*: the benchmark names, and `math_l3to5` for the training
set. A packaged name is accepted wherever popo takes a data set (`data.path`, `data.eval_path`), so
presets work from any working directory; a local file of the same name is written `./NAME`.

Standard library only: config validation imports this and must stay torch-free.
"""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent / "bench"

# packaged name -> file in bench/ (the benchmark names match popo_core.evaluation.suite.BENCHMARKS)
PACKAGED: dict[str, str] = {
    "aime24": "aime24.jsonl",
    "aime25": "aime25.jsonl",
    "amc23": "amc23.jsonl",
    "math500": "math500.jsonl",
    "gsm8k": "gsm8k.jsonl",
    "minerva_math": "minerva_math.jsonl",
    "olympiadbench": "olympiadbench.jsonl",
    "math_l3to5": "train_math_l3to5.jsonl",  # MATH levels 3-5, 8,521 training problems
}


def is_packaged_name(value: object) -> bool:
    return isinstance(value, str) and value in PACKAGED


def packaged_path(name: str) -> Path | None:
    """The installed file of a packaged data set; None if `name` is not one or its file is absent
    (an installation without package data)."""
    if name not in PACKAGED:
        return None
    path = BENCH_DIR / PACKAGED[name]
    return path if path.is_file() else None


def missing_message(name: str) -> str:
    return (f"{name}: the packaged copy {BENCH_DIR / PACKAGED[name]} is missing from this installation "
            "(reinstall popo, or give a file path or a Hugging Face dataset id)")


def name_hint(value: str) -> str:
    """For a 'file not found' error: the packaged names, when `value` looks like a mistyped one."""
    if "/" in value or "\\" in value or Path(value).suffix:
        return ""
    return f" (nor a packaged data set: {', '.join(PACKAGED)})"
