"""Math answers graded with math-verify in worker processes that are killed past a deadline.

Extraction: the last brace-balanced `\\boxed{...}` of a response; without one, math-verify's own
extraction (the last LaTeX or plain expression). Both the gold answer and the extracted answer pass
through the benchmark's normaliser (NORMALIZERS) and are then compared with math-verify's
`parse`/`verify`.

Why processes: math-verify's timeouts use `signal.alarm`, which works only on a main thread and
cannot interrupt one long C-level operation (`\\boxed{9^{9^{9^{9}}}}` is a big-integer power).
Each answer therefore runs in a pebble ProcessPool worker with an integer per-answer timeout: a soft
SIGALRM deadline inside the worker stops slow Python code, and past the timeout pebble kills the
worker and starts another. Either way the answer is graded wrong with status "timeout"; a run never
hangs or crashes on one answer.
"""

from __future__ import annotations

import logging
import os
import re
import weakref
from decimal import Decimal
from typing import Callable, Sequence

from popo_core.grading.verifiers import Grade

DEFAULT_TIMEOUT = 5  # seconds per answer; math-verify's own default
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
MEMORY_LIMIT_MB = 4096  # per worker: a memory bomb raises MemoryError there instead of exhausting the machine

EXTRACTION = "last \\boxed{} (brace-balanced), else math-verify's extraction"
EXTRACTIONS = ("last_boxed", "math_verify")  # popo's (EXTRACTION) | math-verify's own on the whole response
_BOXED_OR_BRACE = re.compile(r"\\(?:boxed|fbox)\s*\{|\{|\}")


# ------------------------------------------------------------------------------------ extraction
def last_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if none.

    One left-to-right pass with a stack, so a megabyte of braces costs linear time. An unclosed box
    at the end (a truncated response) is skipped in favour of the last closed one.
    """
    stack: list[tuple[int, bool]] = []  # (content start, opened by \boxed)
    best: tuple[int, int] | None = None
    for m in _BOXED_OR_BRACE.finditer(text):
        token = m.group()
        if token == "}":
            if stack:
                start, is_box = stack.pop()
                if is_box and (best is None or start > best[0]):
                    best = (start, m.start())
        else:
            stack.append((m.end(), token != "{"))
    return None if best is None else text[best[0] : best[1]].strip()


# ---------------------------------------------------------------------------------- normalisers
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def strip_thousands(s: str) -> str:
    """gsm8k: `2,125` -> `2125` (a comma followed by exactly three digits)."""
    return _THOUSANDS.sub("", s.strip())


def strip_leading_zeros(s: str) -> str:
    """aime: `025` -> `25`, for integer answers only."""
    s = s.strip()
    m = re.fullmatch(r"([+-]?)0+(\d+)", s)
    return m.group(1) + m.group(2) if m else s


def olympiad_list(s: str) -> str:
    """olympiadbench: drop unescaped `$` delimiters (`$69$,$84$` -> `69, 84`) and put a space after
    each comma between digits outside brackets, so a two-item list such as `2,125` is never read as
    one number. Commas inside brackets stay as they are: math-verify reads `(2,125)` as a pair
    already, and a space there changed what it parsed (`t(0, 4]` became the number 4, so every
    `t(a,4]` graded equal to the gold `t(0,4]`; the grader audit in docs/eval.md found it)."""
    s = _UNESCAPED_DOLLAR.sub("", s).strip()
    out, depth = [], 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0 and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit():
            ch = ", "
        out.append(ch)
    return "".join(out)


_E_NOTATION = re.compile(r"(?<![\w.])(\d+(?:\.\d*)?)[eE]([+-]?\d+)(?![\w.])")
_BARE_POINT = re.compile(r"(?<=\d)\.(?!\d)")


def program_numbers(s: str) -> str:
    """minerva_math: numbers written as in a program. `3.83e35` -> `3.83\\times 10^{35}` (math-verify
    reads `e` as Euler's number, so `3.83e35` would be 3.83*e*35) and `-1./3` -> `-1/3`."""
    s = _E_NOTATION.sub(lambda m: f"{m.group(1).rstrip('.')}\\times 10^{{{m.group(2).lstrip('+')}}}", s.strip())
    return _BARE_POINT.sub("", s)


NORMALIZERS: dict[str, Callable[[str], str]] = {
    "none": lambda s: s.strip(),
    "thousands": strip_thousands,
    "leading_zeros": strip_leading_zeros,
    "olympiad": olympiad_list,
    "program_numbers": program_numbers,
}


def normalizer(name: str | None) -> Callable[[str], str]:
    if (name or "none") not in NORMALIZERS:
        raise ValueError(f"unknown answer normaliser {name!r} ({' | '.join(NORMALIZERS)})")
    return NORMALIZERS[name or "none"]


_INTEGER = re.compile(r"[+-]?\d{1,64}")


# a plain number, optionally times a power of ten (program_numbers writes `3.83e35` this way)
_SCIENTIFIC = re.compile(r"([+-]?\d+(?:\.\d+)?)(?:\s*\\(?:times|cdot)\s*10\s*\^\s*(?:\{\s*([+-]?\d{1,4})\s*\}|(\d)))?")


def _scientific_verdict(gold: str, pred: str) -> bool | None:
    """Two plain numbers, at least one written with a power of ten: equal to 6 significant digits.

    math-verify rounds to 6 decimal places, so every constant below 5e-7 equals 0 and every other
    such constant (`2.88\\times 10^{-19}` = `3.89\\times 10^{-20}`: minerva_math's electron
    charges, Planck constants). Scientific notation says the scale matters; compare relatively.
    """
    g, p = _SCIENTIFIC.fullmatch(gold.strip()), _SCIENTIFIC.fullmatch(pred.strip())
    if not (g and p) or not any(m.group(2) or m.group(3) for m in (g, p)):
        return None
    x, y = (Decimal(m.group(1)).scaleb(int(m.group(2) or m.group(3) or 0)) for m in (g, p))
    return abs(x - y) <= Decimal("1e-6") * max(abs(x), abs(y))


def _trivial_verdict(gold: str, pred: str) -> bool | None:
    """Both plain integers: compare them here (math-verify would agree); two plain numbers in
    scientific notation: as grade_text compares them; otherwise None."""
    if _INTEGER.fullmatch(gold) and _INTEGER.fullmatch(pred):
        return int(gold) == int(pred)
    return _scientific_verdict(gold, pred)


_BARE_PERCENT = re.compile(r"(?<!\\)%")
_TRAILING_PERIOD = re.compile(r"(?<!\\)\.\s*$")


def strip_outer_braces(s: str) -> str:
    """`{{{204}}}` -> `204`: braces around the whole answer group nothing, and math-verify's parser
    takes time exponential in their depth (30 levels ran for minutes). One pass, linear time."""
    s = s.strip()
    if not s.startswith("{"):
        return s
    match, stack = {}, []
    for i, ch in enumerate(s):
        if ch == "{" and (i == 0 or s[i - 1] != "\\"):
            stack.append(i)
        elif ch == "}" and (i == 0 or s[i - 1] != "\\") and stack:
            match[stack.pop()] = i
    i, j = 0, len(s) - 1
    while i < j and s[i] == "{" and match.get(i) == j:
        i, j = i + 1, j - 1
        while i <= j and s[i].isspace():
            i += 1
        while j >= i and s[j].isspace():
            j -= 1
    return s[i : j + 1]


def _boxed(answer: str) -> str:
    """The answer inside `\\boxed{}` for math-verify, cleaned of what breaks its parser (each found by
    the grader audit, docs/eval.md): a bare `%` (`62.5%`, as some gold answers are written) would
    start a LaTeX comment and swallow the closing brace, so it is escaped; a sentence's final period
    (`(-\\infty, 0) \\cup\\{1\\}.` parsed as the number 0) is dropped; so are braces around the whole answer."""
    answer = strip_outer_braces(_TRAILING_PERIOD.sub("", answer.strip()))
    return "\\boxed{" + _BARE_PERCENT.sub(r"\\%", answer) + "}"


# ---------------------------------------------------------------------- grading one answer
_quiet = False


def _quiet_math_verify() -> None:
    # Timeouts are ours (deadline + pool), so math-verify's "timeout is disabled" warning is noise.
    global _quiet
    if not _quiet:
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.ERROR)
        _quiet = True


def grade_text(gold: str, text: str, boxed: bool, normalize: str = "none") -> tuple[bool, str | None, str]:
    """(correct, extracted, status) for one answer, with no timeout of its own.

    `boxed`: `text` is already the content of the response's last box; otherwise it is the whole
    response and math-verify extracts the answer.
    """
    from math_verify import parse, verify

    _quiet_math_verify()
    norm = NORMALIZERS[normalize]
    if boxed:
        extracted, found = text, None
    else:
        found = parse(text, parsing_timeout=None)
        if not found:
            return False, None, "unparsed"
        extracted = found[-1] if isinstance(found[-1], str) else str(found[0])
    verdict = _scientific_verdict(norm(gold), norm(extracted))
    if verdict is not None:
        return verdict, extracted, "ok"
    gold_parsed = parse(_boxed(norm(gold)), parsing_timeout=None)
    if boxed or normalize != "none":
        pred = parse(_boxed(norm(extracted)), parsing_timeout=None)
    else:
        pred = found
    if not pred:
        return False, extracted, "unparsed"
    return bool(verify(gold_parsed, pred, timeout_seconds=None)), extracted, "ok"


class _Deadline(BaseException):
    """Raised by SIGALRM in a worker. A BaseException, so math-verify's `except Exception` blocks
    (which turn errors into "not equal") let it through."""


def _on_alarm(signum, frame):
    raise _Deadline()


def grade_with_deadline(gold: str, text: str, boxed: bool, normalize: str, seconds: float) -> tuple[bool, str | None, str]:
    """grade_text under a SIGALRM deadline (main thread only): slow Python code stops at `seconds`."""
    import signal

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            return grade_text(gold, text, boxed, normalize)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # an alarm due just now still lands below
    except _Deadline:
        return False, text if boxed else None, "timeout"
    except RecursionError:  # deeply nested braces
        return False, text if boxed else None, "error"
    finally:
        signal.signal(signal.SIGALRM, previous)


_WARM_UP = [("\\frac{1}{2}", "0.5"), ("(1,2)", "\\left(1, 2\\right)"), ("[0, \\infty)", "x \\ge 0"),
            ("x^2+1", "1+x^{2}"), ("\\sqrt{2}", "\\frac{2}{\\sqrt2}"), ("\\text{(B)}", "B"), ("\\{1, 2\\}", "2,1"),
            ("y = 2x", "2x"), ("\\pi/3", "60^\\circ"), ("3.5\\%", "0.035")]


def warm_up() -> None:
    """Grade a few answers of each kind, so math-verify's parsers are built and sympy's lazily
    imported modules loaded. Run in the pool's forkserver: every worker forked from it starts warm."""
    for gold, pred in _WARM_UP:
        grade_text(gold, pred, True)


def _init_worker(memory_mb: int | None) -> None:
    if memory_mb:
        import resource

        limit = memory_mb * 1024 * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard == resource.RLIM_INFINITY or hard > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit if hard == resource.RLIM_INFINITY else hard))


# --------------------------------------------------------------------------------- the verifier
class MathVerifier:
    """Verifier (popo_core.grading.verifiers.Verifier): `(responses, golds) -> list[Grade]`.

    workers >= 1: grade in a pebble ProcessPool (started on first use, reused across calls) where a
    worker past `timeout` seconds on one answer is killed and replaced. workers = 0: grade one by one
    in this process (a SIGALRM deadline on the main thread; nothing can stop a C-level hang), for
    comparisons and debugging. `fast_path` settles two plain integers in this process.
    `extraction="math_verify"` hands the whole response to math-verify (no `\\boxed{}` extraction of
    popo's), which with `normalize="none"` and no fast path is math-verify alone (the grader audit).
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        timeout: int = DEFAULT_TIMEOUT,
        normalize: str = "none",
        fast_path: bool = True,
        memory_mb: int | None = MEMORY_LIMIT_MB,
        max_tasks_per_worker: int = 2000,
        extraction: str = "last_boxed",
    ):
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
            raise ValueError(f"timeout must be a whole number of seconds >= 1, not {timeout!r}")
        self.workers = DEFAULT_WORKERS if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, not {self.workers}")
        self.timeout = timeout
        normalizer(normalize)  # fail early on an unknown name
        self.normalize = normalize
        self.fast_path = fast_path
        if extraction not in EXTRACTIONS:
            raise ValueError(f"unknown extraction {extraction!r} ({' | '.join(EXTRACTIONS)})")
        self.extraction = extraction
        self.memory_mb = memory_mb
        self.max_tasks_per_worker = max_tasks_per_worker
        self._pool = None
        self._finalizer = None

    # The soft deadline fires first so that most slow answers end without killing a worker.
    @property
    def soft_deadline(self) -> float:
        return max(0.5, 0.8 * self.timeout)

    def describe(self) -> str:
        from importlib.metadata import version

        where = f"{self.workers} worker processes" if self.workers else "in-process (no hard kill)"
        return f"math-verify {version('math-verify')}, {self.timeout} s per answer, {where}"

    def __call__(
        self,
        responses: Sequence[str],
        golds: Sequence[str],
        *,
        normalize: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Grade]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        name = normalize or self.normalize
        norm = normalizer(name)
        grades: list[Grade | None] = [None] * len(responses)
        jobs: list[tuple[int, str, str, bool]] = []  # (index, gold, text, boxed)
        for i, (response, gold) in enumerate(zip(responses, golds)):
            box = last_boxed(response) if self.extraction == "last_boxed" else None
            if box is not None and self.fast_path:
                verdict = _trivial_verdict(norm(gold), norm(box))
                if verdict is not None:
                    grades[i] = Grade(verdict, box, "ok")
                    continue
            jobs.append((i, gold, box if box is not None else response, box is not None))
        if progress and len(jobs) < len(responses):
            progress(len(responses) - len(jobs))
        if self.workers == 0:
            self._grade_inline(jobs, name, grades, progress)
        else:
            self._grade_pool(jobs, name, grades, progress)
        return grades  # type: ignore[return-value]

    def _grade_inline(self, jobs, name, grades, progress) -> None:
        import threading

        on_main = threading.current_thread() is threading.main_thread()
        for i, gold, text, boxed in jobs:
            try:
                if on_main:
                    result = grade_with_deadline(gold, text, boxed, name, self.timeout)
                else:
                    result = grade_text(gold, text, boxed, name)
                grades[i] = Grade(*result)
            except Exception:
                grades[i] = Grade(False, text if boxed else None, "error")
            if progress:
                progress(1)

    def _grade_pool(self, jobs, name, grades, progress) -> None:
        from concurrent.futures import TimeoutError as FutureTimeout
        from concurrent.futures import as_completed

        from pebble import ProcessExpired

        pool = self._ensure_pool()
        futures = {}
        for i, gold, text, boxed in jobs:
            future = pool.schedule(
                grade_with_deadline, args=(gold, text, boxed, name, self.soft_deadline), timeout=self.timeout
            )
            futures[future] = (i, text if boxed else None)
        for future in as_completed(futures):
            i, extracted = futures[future]
            try:
                grades[i] = Grade(*future.result())
            except FutureTimeout:  # past the deadline: pebble killed the worker and started another
                grades[i] = Grade(False, extracted, "timeout")
            except (ProcessExpired, Exception):  # the worker died (e.g. out of memory) or raised
                grades[i] = Grade(False, extracted, "error")
            if progress:
                progress(1)

    def start(self) -> None:
        """Start the workers now, in the background (the forkserver's warm-up takes a second or
        two), e.g. while a model loads. Grading without it starts them on first use."""
        if self.workers:
            import threading

            pool = self._ensure_pool()
            threading.Thread(target=lambda: pool.active, name="grader-start", daemon=True).start()

    def _ensure_pool(self):
        if self._pool is None:
            import multiprocessing

            from pebble import ProcessPool

            # forkserver: workers fork from a small clean server process (math-verify preloaded and
            # warmed up), not from this one, which may hold torch threads, CUDA and an open MLflow
            # store. `__main__` is not preloaded: a script that fails to import there would take the
            # server down; in a worker, that failure only marks its answers "error".
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["popo_core.grading.warm"])
            self._pool = ProcessPool(
                max_workers=self.workers,
                max_tasks=self.max_tasks_per_worker,  # sympy's caches grow; recycle workers now and then
                initializer=_init_worker,
                initargs=(self.memory_mb,),
                context=context,
            )
            self._finalizer = weakref.finalize(self, _stop_pool, self._pool)
        return self._pool

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._pool, self._finalizer = None, None

    def __enter__(self) -> "MathVerifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_pool(pool) -> None:
    pool.stop()
    pool.join(timeout=10)
