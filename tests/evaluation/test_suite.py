"""The benchmark registry, the packaged copies and the Hub schemas, and response files."""

import json

import pytest

from popo_core.evaluation import suite as bm
from popo_core.data.datasets import Problem
from popo_core.errors import DataError
from popo_core.grading.math_grader import NORMALIZERS

ROWS = {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "gsm8k": 1319, "minerva_math": 272, "olympiadbench": 675}


def test_registry_names_and_resolve():
    assert list(bm.BENCHMARKS) == list(ROWS)
    assert [b.name for b in bm.resolve(["all"])] == list(ROWS)
    assert [b.name for b in bm.resolve(["gsm8k", "aime24,gsm8k"])] == ["gsm8k", "aime24"]
    for b in bm.BENCHMARKS.values():
        assert b.normalize in NORMALIZERS and "/" in b.hub_id
    with pytest.raises(DataError, match="unknown benchmark 'aime26'"):
        bm.resolve(["aime26"])
    with pytest.raises(DataError):
        bm.resolve([])


def test_packaged_copies_load_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing here: the data comes from the package
    for name, rows in ROWS.items():
        bench = bm.BENCHMARKS[name]
        assert bm.source(bench) == f"packaged:{name}"
        problems = bm.load(bench)
        assert len(problems) == rows and all(p.answer for p in problems)
        assert len({p.id for p in problems}) == rows


def test_data_file_first_then_packaged_then_hub(tmp_path, monkeypatch):
    """The resolution order: --data FILE, else the packaged copy, else the Hub dataset."""
    from popo_core import resources

    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"id": "1", "problem": "p", "answer": "007"}) + "\n")
    bench = bm.BENCHMARKS["aime24"]
    assert bm.source(bench, str(own)) == str(own) and bm.load(bench, str(own)) == [Problem("1", "p", "007")]
    assert bm.source(bench) == "packaged:aime24" and len(bm.load(bench)) == 30
    # an installation without package data falls back to the Hub (offline here: a one-line error)
    monkeypatch.setattr(resources, "BENCH_DIR", tmp_path / "absent")
    assert bm.source(bench) == "hub:HuggingFaceH4/aime_2024"
    assert bm.source(bm.BENCHMARKS["gsm8k"]) == "hub:openai/gsm8k/main"
    with pytest.raises(DataError, match="aime24: no packaged copy at .*absent/aime24.jsonl and cannot load HuggingFaceH4/aime_2024"):
        bm.load(bench)


def test_hub_rows_follow_each_dataset_schema():
    """Rows shaped like each Hub dataset's columns (see the comment above BENCHMARKS)."""
    samples = {
        "aime24": {"id": 60, "problem": "p", "solution": "s", "answer": "204", "url": "u", "year": "2024"},
        "aime25": {"problem": "p", "answer": "70", "id": "0"},
        "amc23": {"question": "p", "answer": 27.0},
        "math500": {"problem": "p", "solution": "s", "answer": "\\frac{1}{2}", "subject": "x", "level": 1, "unique_id": "test/a/1.json"},
        "gsm8k": {"question": "p", "answer": "He pays 2,000 + 125 = 2,125.\n#### 2,125"},
        "minerva_math": {"question": "p", "answer": "3.83e35"},
        "olympiadbench": {"id": 1606, "question": "p", "final_answer": ["$69$,$84$"], "is_multiple_answer": True},
    }
    expected = {"aime24": ("60", "204"), "aime25": ("0", "70"), "amc23": ("0", "27"), "math500": ("test/a/1.json", "\\frac{1}{2}"),
                "gsm8k": ("0", "2,125"), "minerva_math": ("0", "3.83e35"), "olympiadbench": ("1606", "$69$,$84$")}
    for name, row in samples.items():
        (problem,) = bm.rows_to_problems(bm.BENCHMARKS[name], [row])
        assert (problem.id, problem.answer) == expected[name], name
    with pytest.raises(DataError, match="no column 'question'"):
        bm.rows_to_problems(bm.BENCHMARKS["gsm8k"], [{"problem": "p", "answer": "1"}])


def test_read_responses(tmp_path):
    good = tmp_path / "r.jsonl"
    good.write_text('{"id": 1, "response": "a"}\n\n{"id": "1", "response": "b", "bench": "aime24"}\n')
    assert bm.read_responses(good) == [bm.Response(None, "1", "a"), bm.Response("aime24", "1", "b")]
    cases = {
        '{"id": 1, "response": "a"\n': "line 1 is not valid JSON",
        '["id", "response"]\n': "line 1 is not a JSON object",
        '{"id": 1}\n': "no 'response' key",
        '{"id": 1, "response": 3}\n': "'response' must be a string",
        '{"id": [1], "response": "a"}\n': "'id' must be",
        "\n": "no responses",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(DataError, match=message):
            bm.read_responses(bad)
    with pytest.raises(DataError, match="cannot read"):
        bm.read_responses(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="cannot read"):
        bm.read_responses(tmp_path / "bin.jsonl")


def test_match_responses():
    bench = bm.BENCHMARKS["aime24"]
    every = [Problem(str(i), "p", str(i)) for i in range(5)]
    responses = [bm.Response(None, "0", "a"), bm.Response(None, "0", "b"), bm.Response(None, "4", "c"),
                 bm.Response("gsm8k", "99", "other benchmark")]
    kept, texts, missing = bm.match_responses(bench, every[:3], responses, several=False, all_ids={p.id for p in every}, path="f")
    assert [p.id for p in kept] == ["0"] and texts == [["a", "b"]] and missing == 2  # id 4 is past --limit
    with pytest.raises(DataError, match="not in aime24, e.g. '7'"):
        bm.match_responses(bench, every, [bm.Response(None, "7", "x")], several=False, all_ids={p.id for p in every}, path="f")
    with pytest.raises(DataError, match="needs a 'bench' key"):
        bm.match_responses(bench, every, [bm.Response(None, "1", "x")], several=True, all_ids={p.id for p in every}, path="f")


def test_coverage_warnings():
    texts = [["a"], ["b"], ["c"]]
    (line,) = bm.coverage_warnings("aime25", texts, 27, total=30, limit=None, answered_only=False)
    assert line == "aime25: 27 of 30 problems have no response; they are graded wrong (--answered-only grades only the answered ones)"
    (line,) = bm.coverage_warnings("aime25", texts, 7, total=30, limit=10, answered_only=True)
    assert line.startswith("aime25: 7 of the first 10 problems have no response; --answered-only leaves them out")
    assert "over the 3 answered" in line
    assert bm.coverage_warnings("aime25", texts, 0, total=3, limit=None, answered_only=False) == []
    uneven = [["a", "b"], ["c"], ["d", "e"]]
    assert bm.coverage_warnings("b", uneven, 0, total=3, limit=None, answered_only=False) == [
        "b: 1 problem(s) have fewer than K = 2 responses; their absent samples are graded wrong"]
    assert bm.coverage_warnings("b", uneven, 0, total=3, limit=None, answered_only=True) == []
