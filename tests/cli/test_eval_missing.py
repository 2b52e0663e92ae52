"""`popo eval --responses` with problems left unanswered, and `--list-ids`, through the real entry point."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BENCH, REPO
from typer.testing import CliRunner

from popo_cli.main import app


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (BENCH / f"{name}.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def twelve_of_thirty(tmp_path, monkeypatch) -> tuple[Path, int]:
    """aime25 answered for its first 12 problems, 9 of them right: (file, right answers)."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "r.jsonl"
    with open(path, "w") as f:
        for i, row in enumerate(_rows("aime25")[:12]):
            answer = row["answer"] if i < 9 else str(int(row["answer"]) + 1)
            f.write(json.dumps({"id": row["id"], "response": f"so \\boxed{{{answer}}}"}) + "\n")
    return path, 9


def _eval(*args: str):
    return CliRunner().invoke(app, ["eval", "--no-tracking", "--workers", "0", *args])


def test_unanswered_problems_are_graded_wrong_by_default(twelve_of_thirty, tmp_path):
    path, right = twelve_of_thirty
    result = _eval("--bench", "aime25", "--responses", str(path), "--output", "out")
    assert result.exit_code == 0, result.output
    (s,) = json.loads((tmp_path / "out" / "summary.json").read_text())
    total = len(_rows("aime25"))
    assert s["accuracy"] == pytest.approx(right / total) and s["pass@k"]["1"] == pytest.approx(right / total)
    assert (s["n"], s["missing"], s["answered_only"], s["protocol"]["answered_only"]) == (total, 18, False, False)
    assert ("warning: aime25: 18 of 30 problems have no response; they are graded wrong "
            "(--answered-only grades only the answered ones)") in result.stderr
    assert "scoring: over every problem" in result.stdout


def test_answered_only_grades_the_answered_problems(twelve_of_thirty, tmp_path):
    path, right = twelve_of_thirty
    result = _eval("--bench", "aime25", "--responses", str(path), "--output", "out", "--answered-only")
    assert result.exit_code == 0, result.output
    (s,) = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["accuracy"] == pytest.approx(right / 12) and s["maj@1"] == pytest.approx(right / 12)
    assert (s["n"], s["missing"], s["answered_only"], s["protocol"]["answered_only"]) == (12, 18, True, True)
    assert "18 of 30 problems have no response; --answered-only leaves them out" in result.stderr
    assert "scoring: --answered-only" in result.stdout


def test_limit_bounds_the_problems_counted(twelve_of_thirty, tmp_path):
    path, _ = twelve_of_thirty
    result = _eval("--bench", "aime25", "--responses", str(path), "--output", "out", "--limit", "20")
    assert result.exit_code == 0, result.output
    (s,) = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert (s["n"], s["missing"]) == (20, 8) and s["accuracy"] == pytest.approx(9 / 20)
    assert "8 of the first 20 problems have no response" in result.stderr


def test_fewer_than_k_responses_count_the_absent_samples_wrong(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = _rows("aime24")
    with open("r.jsonl", "w") as f:
        for row in rows[:4]:  # 4 samples, 3 right
            for k in range(4):
                f.write(json.dumps({"id": row["id"], "response": f"\\boxed{{{int(row['answer']) + (k == 3)}}}"}) + "\n")
        f.write(json.dumps({"id": rows[4]["id"], "response": f"\\boxed{{{rows[4]['answer']}}}"}) + "\n")  # 1 of 4, right
    result = _eval("--bench", "aime24", "--responses", "r.jsonl", "--output", "out")
    assert result.exit_code == 0, result.output
    (s,) = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["samples"] == 4 and s["accuracy"] == pytest.approx((4 * 3 / 4 + 1 / 4) / len(rows))
    assert "1 problem(s) have fewer than K = 4 responses" in result.stderr


# ---------------------------------------------------------------------------------- --list-ids
@pytest.mark.parametrize("name", ["aime25", "math500", "amc23"])
def test_list_ids_prints_the_benchmarks_ids(name):
    result = CliRunner().invoke(app, ["eval", "--bench", name, "--list-ids"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [r["id"] for r in _rows(name)]
    first = " ".join(_rows(name)[0]["problem"].split())
    assert lines[0].split("\t")[1] == (first if len(first) <= 60 else first[:57] + "...")
    assert result.stderr == ""


def test_list_ids_respects_limit_data_and_several_benches(tmp_path):
    limited = CliRunner().invoke(app, ["eval", "--bench", "gsm8k", "--list-ids", "--limit", "3"])
    assert [line.split("\t")[0] for line in limited.stdout.splitlines()] == ["0", "1", "2"]
    several = CliRunner().invoke(app, ["eval", "--bench", "aime24,aime25", "--list-ids"])
    cols = [line.split("\t")[:2] for line in several.stdout.splitlines()]
    assert cols == [["aime24", r["id"]] for r in _rows("aime24")] + [["aime25", r["id"]] for r in _rows("aime25")]
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"id": "q-1", "problem": "What is\n1+1?", "answer": "2"}) + "\n")
    mine = CliRunner().invoke(app, ["eval", "--bench", "aime24", "--list-ids", "--data", str(data)])
    assert mine.stdout == "q-1\tWhat is 1+1?\n"


def test_list_ids_loads_no_model_and_no_torch():
    """In a fresh interpreter: --model is ignored, and neither torch nor the grader is imported."""
    code = ("import sys; from typer.testing import CliRunner; from popo_cli.main import app; "
            "r = CliRunner().invoke(app, ['eval', '--bench', 'olympiadbench', '--model', 'qwen-math-7b', '--list-ids']); "
            "heavy = [m for m in ('torch', 'transformers', 'math_verify', 'mlflow') if m in sys.modules]; "
            "print(r.exit_code, len(r.stdout.splitlines()), heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().split(maxsplit=2) == ["0", str(len(_rows("olympiadbench"))), "[]"], out.stderr


def test_list_ids_through_a_pipe(tmp_path):
    """`| head` closes the pipe early: no traceback, no error line."""
    cmd = f"{sys.executable} -m popo_cli.main eval --bench gsm8k --list-ids | head -n 2"
    out = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == ["0", "1"]
    assert out.stderr == ""
