"""Datasets and prompt templates: the synthetic tiny task, packaged sets, JSONL/JSON/Parquet files, Hub datasets."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from popo_core import resources
from popo_core.errors import DataError, first_line

TEMPLATES = {
    "plain": "{problem}",
    # Qwen2.5-Math's chat template with the CoT system prompt, as used by SimpleRL-Zoo and
    # Dr. GRPO's Oat-Zero ("qwen_math" template) for R1-Zero-style training of the base models.
    "qwen-math": (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{{}}."
        "<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n"
    ),
}


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


# `chat`: the tokenizer's own chat template (its default system prompt, if it has one) around one
# user turn, the problem and this instruction, ending with the assistant's turn opened. (On
# SmolLM2-135M, "Please reason step by step, and put ..." made sampled answers ramble past the
# length limit more often.)
CHAT = "chat"
CHAT_INSTRUCTION = "Put the final answer in \\boxed{}."
TEMPLATE_NAMES = (*TEMPLATES, CHAT)


def render(template: str, problem: str, tokenizer=None) -> str:
    if template == CHAT:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("model.template=chat: the tokenizer has no chat template (use plain or qwen-math)")
        turn = [{"role": "user", "content": f"{problem}\n{CHAT_INSTRUCTION}"}]
        return tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
    if template not in TEMPLATES:
        raise DataError(f"unknown prompt template {template!r} (choose from: {', '.join(TEMPLATE_NAMES)})")
    return TEMPLATES[template].format(problem=problem)


def prompt_ids(tokenizer, template: str, problems: Sequence[Problem]) -> list[list[int]]:
    """Token ids of each problem's rendered prompt, in one batched tokenizer call."""
    texts = [render(template, p.problem, tokenizer) for p in problems]
    return tokenizer(texts, add_special_tokens=False).input_ids if texts else []


def tiny_problems(modulus: int = 10, operands: int = 2) -> list[Problem]:
    """Every prompt of the tiny task: "a+b=" -> str((a + b) % modulus), single-digit operands."""
    out = []
    for digits in itertools.product(range(10), repeat=operands):
        text = "+".join(map(str, digits)) + "="
        out.append(Problem(text, text, str(sum(digits) % modulus)))
    return out


def tiny_split(modulus: int = 10, operands: int = 2, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) for the tiny task. A space of at most 100 prompts is evaluated whole (it
    cannot be held out and still be learnt); larger spaces hold out a fixed 10%, disjoint."""
    every = tiny_problems(modulus, operands)
    if len(every) <= 100:
        return every, every
    shuffled = random.Random(seed).sample(every, len(every))
    held = min(len(every) // 10, 500)
    return shuffled[held:], shuffled[:held]


def load_problems(
    source: str,
    *,
    split: str = "train",
    problem_key: str = "problem",
    answer_key: str = "answer",
    id_key: str = "id",
    limit: int | None = None,
) -> list[Problem]:
    """Problems from a packaged data set (popo_core.resources.PACKAGED, e.g. `math_l3to5`), a local
    .jsonl/.json/.parquet file or a Hugging Face dataset id, tried in that order. A packaged name wins
    over a file of the same name in the working directory, so a preset means the same data wherever
    it runs (write `./math500` for such a file)."""
    if resources.is_packaged_name(source):
        path = resources.packaged_path(source)
        if path is None:
            raise DataError(resources.missing_message(source))
        rows = _read_local(str(path))
    elif Path(source).exists():
        rows = _read_local(source)
    elif looks_like_path(source):
        raise DataError(f"{source}: file not found{resources.name_hint(source)}")
    else:
        rows = _read_hub(source, split)
    problems = []
    for n, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{source}: row {n} is not an object")
        missing = [k for k in (problem_key, answer_key) if k not in row]
        if missing:
            raise DataError(f"{source}: row {n} has no key {missing[0]!r} (keys: {', '.join(map(str, row))})")
        answer = row[answer_key]
        if isinstance(answer, float) and answer.is_integer():
            answer = int(answer)
        problems.append(Problem(str(row.get(id_key, n - 1)), str(row[problem_key]), str(answer)))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{source}: no problems")
    return problems


def looks_like_path(value: str) -> bool:
    """A local path rather than a Hub id ("org/name"): has a file suffix, starts with . / ~, or
    has other than one slash."""
    return (
        value.startswith((".", "/", "~"))
        or Path(value).suffix in {".jsonl", ".json", ".parquet"}
        or value.count("/") != 1
    )


def _read_local(path: str) -> list:
    p = Path(path)
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(p).to_pylist()
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ImportError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    except Exception as err:  # pyarrow's errors for a broken parquet file
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        return data if isinstance(data, list) else data.get("data", data.get("rows", [data]))
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n} is not valid JSON ({err.msg})") from None
    return rows


def _read_hub(dataset_id: str, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset_id}: not a local file, and the `datasets` package to load it from the Hub is missing") from None
    try:
        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as err:  # the Hub raises many types (offline, missing, gated)
        first = first_line(err)
        raise DataError(f"cannot load dataset {dataset_id!r} split {split!r}: {first}") from None
