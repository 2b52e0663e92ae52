"""The grader audit: labelled responses built from every benchmark's gold answers, graded by popo
(its extraction, per-benchmark normaliser and integer fast path) and by math-verify alone (its own
extraction of the whole response, no normaliser), so that every disagreement can be looked at.

A case's label is what a careful human grader would say, decided by how the case was built: the
gold answer in another form is right, a changed number or bracket is wrong. The audit reports, per
benchmark and kind of case, how often each grader agrees with the label and where the two graders
disagree. docs/eval.md has the table; tests/grading/test_audit.py runs it.

    .venv/bin/python -m popo_core.grading.audit [--bench NAME ...] [--show N]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from popo_core.data.datasets import Problem


@dataclass(frozen=True)
class Case:
    bench: str
    id: str
    kind: str
    response: str
    gold: str
    label: bool  # the right verdict


# ------------------------------------------------------------------------------------ the forms
_NUMBER = re.compile(r"\d+")
_PLAIN_INT = re.compile(r"-?\d+")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_FRAC = re.compile(r"(-?)\\d?frac\{(\d+)\}\{(\d+)\}")
_E_NUMBER = re.compile(r"(\d+(?:\.\d+)?)[eE]([+-]?\d+)")
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+")
# an interval with two endpoints, at least one side open or closed the other way round from a tuple
_INTERVAL = re.compile(r"(?:\\left)?([(\[])([^()\[\],]+),([^()\[\],]+?)(?:\\right)?([)\]])")


def off_by_one(answer: str) -> str:
    """Every integer in the answer plus one: a wrong answer of the same shape."""
    return _NUMBER.sub(lambda m: str(int(m.group()) + 1), answer)


def _terminating_decimal(num: int, den: int) -> str | None:
    d = den
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1 or den == 0:
        return None
    text = f"{num / den:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 8 else None


def right_forms(gold: str, lists: bool = False) -> Iterator[tuple[str, str]]:
    """(kind, answer) pairs equal to `gold` written another way. `lists`: the benchmark has
    comma-separated list answers, where `2,125` may be two items, so no thousands separator."""
    g = gold.strip()
    if _PLAIN_INT.fullmatch(g):
        value = int(g)
        if 0 <= value < 100 and not g.startswith("0"):
            yield "zero-padded", f"{value:03d}"  # AIME-style 025
        if abs(value) >= 1000 and not lists:
            yield "thousands-comma", f"{value:,}"
        yield "decimal-point", f"{value}.0"
    if _THOUSANDS.fullmatch(g) and not lists:
        yield "no-separator", g.replace(",", "")
    if re.fullmatch(r"0\d+", g):
        yield "no-leading-zero", str(int(g))
    m = _FRAC.fullmatch(g)
    if m:
        sign, num, den = m.group(1), int(m.group(2)), int(m.group(3))
        yield "slash-fraction", f"{sign}{num}/{den}"
        dec = _terminating_decimal(num, den)
        if dec is not None:
            yield "decimal", sign + dec
    m = _E_NUMBER.fullmatch(g)
    if m:
        yield "times-ten", f"{m.group(1)} \\times 10^{{{m.group(2).lstrip('+')}}}"
    if g.endswith("%") and not g.endswith("\\%"):
        yield "escaped-percent", g[:-1] + "\\%"
    if "\\left" not in g and (_INTERVAL.fullmatch(g) or (g.startswith("(") and g.endswith(")") and "," in g and g.count("(") == 1)):
        yield "left-right", f"\\left{g[0]}{g[1:-1]}\\right{g[-1]}"
    items = _top_level_items(g, lists) if lists else []  # elsewhere a comma may be a separator (`10,\\!080`)
    if len(items) >= 2:
        yield "list-spaced", ", ".join(items)
        yield "list-unspaced", ",".join(items)


def wrong_forms(gold: str, lists: bool = False) -> Iterator[tuple[str, str]]:
    """(kind, answer) pairs that are not equal to `gold` (`lists`: as for right_forms)."""
    g = gold.strip()
    if _NUMBER.search(g):
        yield "off-by-one", off_by_one(g)
    if _PLAIN_NUMBER.fullmatch(g) and float(g) != 0:
        yield "negated", g[1:] if g.startswith("-") else "-" + g
    m = _INTERVAL.search(g)
    if m and (m.group(1) + m.group(4) != "()" or "\\infty" in g or "\\cup" in g):
        # open <-> closed at each finite end (an infinite end stays open)
        flip = {"(": "[", "[": "(", ")": "]", "]": ")"}
        left = m.group(1) if "infty" in m.group(2) else flip[m.group(1)]
        right = m.group(4) if "infty" in m.group(3) else flip[m.group(4)]
        yield "interval-flipped", g[: m.start(1)] + left + g[m.end(1): m.start(4)] + right + g[m.end(4):]
        if _NUMBER.search(m.group(2)):
            yield "interval-moved", g[: m.start(2)] + off_by_one(m.group(2)) + g[m.end(2):]
    items = _top_level_items(g, lists)
    if len(items) >= 2:
        yield "first-item-only", items[0]
        yield "extra-item", g + ", 1000003"
        if lists and all(_PLAIN_INT.fullmatch(x) for x in items):
            yield "items-merged", "".join(items)  # 2,125 as two answers is not 2125


def _top_level_items(g: str, lists: bool = False) -> list[str]:
    """Comma-separated items outside any brackets (a list answer such as `69,84`)."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(g):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(g[start:i].strip())
            start = i + 1
    items.append(g[start:].strip())
    # 2,125 is a number with a separator (gsm8k), unless the benchmark has list answers
    return [] if _THOUSANDS.fullmatch(g) and not lists else [x for x in items if x]


PATHOLOGICAL = (  # (kind, response with GOLD and WRONG standing for the answers, label)
    ("empty-box", "The answer is \\boxed{}.", False),
    ("no-answer", "I cannot solve this problem.", False),
    ("huge-power", "\\boxed{9^{9^{9^{9}}}}", False),
    ("truncated-after-right", "So \\boxed{GOLD}. Checking: \\boxed{\\frac{1}{", True),
    ("many-wrong-boxes-then-right", "\\boxed{WRONG} " * 2000 + "\\boxed{GOLD}", True),
    ("long-text-then-right", "Let x be large. " * 5000 + "\\boxed{GOLD}", True),
    ("deep-braces", "\\boxed{" + "{" * 200 + "GOLD" + "}" * 200 + "}", True),
)


def cases_for(bench: str, problems: Iterable[Problem], pathological: bool = True) -> list[Case]:
    """Every labelled case for one benchmark's problems."""
    out: list[Case] = []
    problems = list(problems)
    lists = bench == "olympiadbench"  # comma-separated answers are lists there (is_multiple_answer)
    for p in problems:
        g = p.answer.strip()
        wrong = off_by_one(g) if _NUMBER.search(g) else None

        def add(kind: str, response: str, label: bool) -> None:
            out.append(Case(bench, p.id, kind, response, p.answer, label))

        add("gold", f"So the answer is \\boxed{{{g}}}.", True)
        if "$" not in g:  # a gold holding `$` cannot be put between dollars
            add("gold-unboxed", f"So the answer is ${g}$.", True)
        for kind, form in right_forms(g, lists):
            if form != g:
                add(kind, f"So the answer is \\boxed{{{form}}}.", True)
        for kind, form in wrong_forms(g, lists):
            if form is not None and form != g:
                add(kind, f"So the answer is \\boxed{{{form}}}.", False)
        if wrong is not None:
            add("right-then-wrong", f"First \\boxed{{{g}}}. Wait, that is wrong: \\boxed{{{wrong}}}.", False)
            add("wrong-then-right", f"First \\boxed{{{wrong}}}. Wait, that is wrong: \\boxed{{{g}}}.", True)
    if pathological and problems:
        first = next((p for p in problems if _NUMBER.search(p.answer)), problems[0])
        g = first.answer.strip()
        for kind, template, label in PATHOLOGICAL:
            response = template.replace("WRONG", off_by_one(g)).replace("GOLD", g)
            out.append(Case(bench, first.id, kind, response, first.answer, label))
    return out


def audit_sample(problems: Iterable[Problem], integers: int | None = None, others: int | None = None) -> list[Problem]:
    """The first `integers` problems whose gold answer is a plain integer and the first `others`
    whose answer is not (None: all). The integer cases of a benchmark differ only in their digits."""
    out, counts = [], {True: 0, False: 0}
    for p in problems:
        integer = bool(_PLAIN_INT.fullmatch(p.answer.strip()))
        counts[integer] += 1
        cap = integers if integer else others
        if cap is None or counts[integer] <= cap:
            out.append(p)
    return out


# ------------------------------------------------------------------------------------- the audit
@dataclass(frozen=True)
class Verdicts:
    case: Case
    popo: bool
    math_verify: bool
    popo_status: str = "ok"
    math_verify_status: str = "ok"


_PATHOLOGICAL_KINDS = {kind for kind, _, _ in PATHOLOGICAL}


def _grade(cases: list[Case], workers: int | None, timeout: int, alone: bool) -> list:
    """Grades of `cases` by popo (each benchmark's normaliser) or by math-verify alone."""
    from popo_core.evaluation.suite import BENCHMARKS
    from popo_core.grading.math_grader import MathVerifier

    grades: list = [None] * len(cases)
    options = dict(extraction="math_verify", fast_path=False) if alone else {}
    with MathVerifier(workers=workers, timeout=timeout, **options) as grader:
        by_norm: dict[str, list[int]] = {}
        for i, c in enumerate(cases):
            by_norm.setdefault("none" if alone else BENCHMARKS[c.bench].normalize, []).append(i)
        for norm, idx in by_norm.items():
            for i, g in zip(idx, grader([cases[i].response for i in idx], [cases[i].gold for i in idx], normalize=norm)):
                grades[i] = g
    return grades


def grade_cases(cases: list[Case], *, workers: int | None = None, timeout: int = 5, retry_timeout: int = 60) -> list[Verdicts]:
    """Each case graded by popo and by math-verify alone. An ordinary case that times out (a long
    expression on a busy machine) is graded again with `retry_timeout`, so that the verdicts do not
    depend on the machine's load; the pathological cases are not."""
    graded = {}
    for alone in (False, True):
        grades = _grade(cases, workers, timeout, alone)
        again = [i for i, g in enumerate(grades) if g.status == "timeout" and cases[i].kind not in _PATHOLOGICAL_KINDS]
        if again:
            for i, g in zip(again, _grade([cases[i] for i in again], workers, retry_timeout, alone)):
                grades[i] = g
        graded[alone] = grades
    return [Verdicts(c, p.correct, a.correct, p.status, a.status) for c, p, a in zip(cases, graded[False], graded[True])]


@dataclass
class Row:
    bench: str
    n: int = 0
    popo_right: int = 0
    alone_right: int = 0
    disagree: int = 0


def table(verdicts: list[Verdicts]) -> list[Row]:
    """Per benchmark: cases, verdicts equal to the label for each grader, grader disagreements."""
    rows: dict[str, Row] = {}
    for v in verdicts:
        r = rows.setdefault(v.case.bench, Row(v.case.bench))
        r.n += 1
        r.popo_right += v.popo == v.case.label
        r.alone_right += v.math_verify == v.case.label
        r.disagree += v.popo != v.math_verify
    return list(rows.values())


def by_kind(verdicts: list[Verdicts]) -> dict[tuple[str, bool], tuple[int, int, int]]:
    """(kind, label) -> (cases, popo right, math-verify alone right), over all benchmarks."""
    out: dict[tuple[str, bool], list[int]] = {}
    for v in verdicts:
        acc = out.setdefault((v.case.kind, v.case.label), [0, 0, 0])
        acc[0] += 1
        acc[1] += v.popo == v.case.label
        acc[2] += v.math_verify == v.case.label
    return {k: tuple(a) for k, a in out.items()}  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    import argparse

    from popo_core.evaluation import suite as bm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="append", default=None, help="benchmark (default: all)")
    parser.add_argument("--show", type=int, default=20, help="disagreements to print per benchmark")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--integers", type=int, default=None,
                        help="only the first N plain-integer gold answers of each benchmark (default: all)")
    args = parser.parse_args(argv)
    cases: list[Case] = []
    for bench in bm.resolve(args.bench or ["all"]):
        cases += cases_for(bench.name, audit_sample(bm.load(bench), args.integers))
    verdicts = grade_cases(cases, workers=args.workers)
    print("| bench | cases | popo = label | math-verify alone = label | popo != math-verify alone |")
    print("|---|---|---|---|---|")
    for r in table(verdicts):
        print(f"| {r.bench} | {r.n} | {r.popo_right} ({100 * r.popo_right / r.n:.1f}%) | "
              f"{r.alone_right} ({100 * r.alone_right / r.n:.1f}%) | {r.disagree} |")
    print("\n| kind | label | cases | popo = label | math-verify alone = label |\n|---|---|---|---|---|")
    for (kind, label), (n, p, a) in sorted(by_kind(verdicts).items(), key=lambda kv: (not kv[0][1], kv[0][0])):
        print(f"| {kind} | {'right' if label else 'wrong'} | {n} | {p} | {a} |")
    shown: dict[str, int] = {}
    print("\ndisagreements (popo vs math-verify alone), and cases where popo differs from the label:")
    for v in verdicts:
        if v.popo != v.math_verify or v.popo != v.case.label:
            key = v.case.bench
            shown[key] = shown.get(key, 0) + 1
            if shown[key] <= args.show:
                c = v.case
                print(f"{c.bench} {c.id} {c.kind} label={c.label} popo={v.popo} alone={v.math_verify} "
                      f"gold={c.gold!r} response={c.response[:120]!r}")


if __name__ == "__main__":
    main()
