"""The benchmark suite: where each set comes from, how its answers are read, and response files.

Each benchmark reads, in order: `--data FILE`; the copy packaged with popo
(popo_core/resources/bench/<name>.jsonl; keys id, problem, answer; see its PROVENANCE.md);
else its Hugging Face dataset (only when the packaged copy is absent from an installation). The
packaged copies follow Qwen2.5-Math's evaluation data, so their ids and rows can differ slightly
from the Hub copies (olympiadbench: 675 packaged rows, 674 on the Hub).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from popo_core import resources
from popo_core.data.datasets import Problem, load_problems
from popo_core.errors import ConfigError, DataError, first_line


@dataclass(frozen=True)
class Benchmark:
    name: str
    hub_id: str
    split: str
    problem_key: str
    answer_key: str
    id_key: str | None  # None: the row index
    normalize: str  # popo_core.grading.math_grader.NORMALIZERS
    config: str | None = None  # Hub config (subset) name
    answer_format: str = "plain"  # plain | after_hashes (gsm8k: text after "####") | first (a list)

    def gold(self, value: Any) -> str:
        if self.answer_format == "after_hashes":
            value = str(value).split("####")[-1]
        elif self.answer_format == "first":
            value = value[0] if isinstance(value, (list, tuple)) and value else value
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # amc23 stores 27.0
        return str(value).strip()


# Hub ids and columns were checked against each dataset card or loader code (July 2026):
# - HuggingFaceH4/aime_2024: README dataset_info (id, problem, solution, answer, url, year; split train, 30 rows).
# - math-ai/aime25: test.jsonl (problem, answer, id; split test), as loaded by e.g. marin's AimeEnv eval set.
# - math-ai/amc23: split test, columns question, answer (the 40-problem AMC 2023 set; answers are floats).
# - HuggingFaceH4/MATH-500: split test, columns problem, solution, answer, subject, level, unique_id.
# - openai/gsm8k: config "main", split test, columns question, answer (solution, then "#### <answer>").
# - math-ai/minervamath: test.jsonl, columns question, answer (272 rows).
# - Hothan/OlympiadBench: config OE_TO_maths_en_COMP, split train (674 rows), columns id, question,
#   final_answer (a list; `$`-delimited items), is_multiple_answer.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", "id", "leading_zeros"),
        Benchmark("aime25", "math-ai/aime25", "test", "problem", "answer", "id", "leading_zeros"),
        Benchmark("amc23", "math-ai/amc23", "test", "question", "answer", None, "leading_zeros"),
        Benchmark("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", "unique_id", "none"),
        Benchmark("gsm8k", "openai/gsm8k", "test", "question", "answer", None, "thousands", config="main",
                  answer_format="after_hashes"),
        Benchmark("minerva_math", "math-ai/minervamath", "test", "question", "answer", None, "program_numbers"),
        Benchmark("olympiadbench", "Hothan/OlympiadBench", "train", "question", "final_answer", "id", "olympiad",
                  config="OE_TO_maths_en_COMP", answer_format="first"),
    )
}


def resolve(names: Iterable[str]) -> list[Benchmark]:
    """Benchmarks by name, in the order given; `all` is the whole suite. Duplicates are dropped."""
    out: list[Benchmark] = []
    for name in names:
        for part in str(name).split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                picked = list(BENCHMARKS.values())
            elif part in BENCHMARKS:
                picked = [BENCHMARKS[part]]
            else:
                raise DataError(f"unknown benchmark {part!r} (choose from: {', '.join(BENCHMARKS)}, all)")
            out += [b for b in picked if b not in out]
    if not out:
        raise DataError("no benchmark given (--bench NAME, or --bench all)")
    return out


def packaged_path(bench: Benchmark) -> Path | None:
    """The benchmark's packaged copy, None where an installation lacks it."""
    return resources.packaged_path(bench.name)


def source(bench: Benchmark, data: str | None = None) -> str:
    """Where `load` reads from: the --data file, `packaged:<name>` or `hub:<id>[/<config>]`."""
    if data:
        return data
    if packaged_path(bench):
        return f"packaged:{bench.name}"
    return f"hub:{bench.hub_id}" + (f"/{bench.config}" if bench.config else "")


def load(bench: Benchmark, data: str | None = None) -> list[Problem]:
    """The benchmark's problems, gold answers as stored (they are normalised at grading)."""
    packaged = packaged_path(bench)
    path = data or (str(packaged) if packaged else None)
    if path:
        if not Path(path).is_file():
            raise DataError(f"{path}: file not found")
        problems = load_problems(path)
    else:
        problems = rows_to_problems(bench, _hub_rows(bench))
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{path or bench.hub_id}: id {dup!r} appears more than once")
    return problems


def load_all(benches: list[Benchmark], data: str | None = None) -> dict[str, list[Problem]]:
    """Each benchmark's problems by name; `--data` replaces a single benchmark's."""
    if data and len(benches) > 1:
        raise ConfigError("--data FILE replaces one benchmark's problems; give a single --bench with it")
    return {b.name: load(b, data) for b in benches}


def rows_to_problems(bench: Benchmark, rows: Iterable[dict]) -> list[Problem]:
    problems = []
    for n, row in enumerate(rows):
        for key in (bench.problem_key, bench.answer_key):
            if key not in row:
                raise DataError(f"{bench.hub_id}: row {n} has no column {key!r} (columns: {', '.join(row)})")
        pid = str(row[bench.id_key]) if bench.id_key and bench.id_key in row else str(n)
        problems.append(Problem(pid, str(row[bench.problem_key]), bench.gold(row[bench.answer_key])))
    if not problems:
        raise DataError(f"{bench.hub_id}: no problems")
    return problems


def _hub_rows(bench: Benchmark) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{bench.name}: no packaged copy, and the `datasets` package to load {bench.hub_id} is missing") from None
    try:
        return list(datasets.load_dataset(bench.hub_id, bench.config, split=bench.split))
    except Exception as err:  # the Hub raises many types (offline, missing, gated)
        first = first_line(err)
        raise DataError(f"{bench.name}: no packaged copy at {resources.BENCH_DIR / resources.PACKAGED[bench.name]} "
                        f"and cannot load {bench.hub_id}: {first}") from None


# ------------------------------------------------------------------------------ response files
@dataclass(frozen=True)
class Response:
    bench: str | None
    id: str
    text: str


def read_responses(path: str | Path) -> list[Response]:
    """JSONL lines {"id": ..., "response": "..."} (optionally "bench"); several lines per id are samples."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n} is not a JSON object")
        missing = [k for k in ("id", "response") if k not in row]
        if missing:
            raise DataError(f"{path}: line {n} has no {missing[0]!r} key")
        if not isinstance(row["response"], str):
            raise DataError(f"{path}: line {n}: 'response' must be a string")
        if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
            raise DataError(f"{path}: line {n}: 'id' must be a string or an integer")
        bench = row.get("bench")
        out.append(Response(str(bench) if bench is not None else None, str(row["id"]), row["response"]))
    if not out:
        raise DataError(f"{path}: no responses")
    return out


def match_responses(
    bench: Benchmark, problems: list[Problem], responses: list[Response], *, several: bool, all_ids: set[str], path: str
) -> tuple[list[Problem], list[list[str]], int]:
    """(problems with responses, their responses, number of problems without) for one benchmark.

    `all_ids` are every id of the benchmark (before --limit): a response whose id is not among them
    is an error; one outside the limited problems is ignored.
    """
    mine = []
    for r in responses:
        if r.bench is None and several:
            raise DataError(f"{path}: grading several benchmarks needs a 'bench' key on every line")
        if r.bench is None or r.bench == bench.name:
            mine.append(r)
    unknown = sorted({r.id for r in mine} - all_ids)
    if unknown:
        raise DataError(f"{path}: {len(unknown)} id(s) not in {bench.name}, e.g. {unknown[0]!r}")
    by_id: dict[str, list[str]] = {}
    for r in mine:
        by_id.setdefault(r.id, []).append(r.text)
    kept = [p for p in problems if p.id in by_id]
    return kept, [by_id[p.id] for p in kept], len(problems) - len(kept)


def coverage_warnings(bench: str, texts: list[list[str]], missing: int, *, total: int, limit: int | None,
                      answered_only: bool) -> list[str]:
    """What a responses file leaves unanswered among the problems graded (the first `limit` of `total`),
    and how that is scored (popo_core.evaluation.metrics.summarize): one line each."""
    asked = min(total, limit) if limit else total
    of = f"of the first {asked}" if asked < total else f"of {asked}"
    out = []
    if missing and answered_only:
        out.append(f"{bench}: {missing} {of} problems have no response; --answered-only leaves them out "
                   f"(the metrics are over the {asked - missing} answered)")
    elif missing:
        out.append(f"{bench}: {missing} {of} problems have no response; they are graded wrong "
                   "(--answered-only grades only the answered ones)")
    most = max((len(t) for t in texts), default=0)
    short = sum(len(t) < most for t in texts)
    if short and not answered_only:
        out.append(f"{bench}: {short} problem(s) have fewer than K = {most} responses; their absent samples are graded wrong")
    return out
