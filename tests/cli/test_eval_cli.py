"""`popo eval` through the real entry point: the acceptance check on every benchmark, bad input,
and a tiny model end to end with MLflow."""

import json
import re
from pathlib import Path

import pytest
from conftest import BENCH, run_popo

from popo_core.evaluation.suite import BENCHMARKS

@pytest.fixture
def evaldir(tmp_path) -> Path:
    """An empty working directory: the benchmarks come from the package, as they do for a user."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with the `popo` experiment, made once (its migrations take seconds)
    and copied into each test's working directory."""
    from popo_core.tracking import client, experiment_id

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    experiment_id(client(f"sqlite:///{path}"), "popo")
    return path


def _bench_rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (BENCH / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def _off_by_one(answer: str) -> str:
    return re.sub(r"\d+", lambda m: str(int(m.group()) + 1), answer)


def _one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# --------------------------------------------------------------------------------- acceptance
@pytest.mark.slow
def test_gold_answers_score_100_and_off_by_one_about_0(evaldir):
    gold, off, numeric = evaldir / "gold.jsonl", evaldir / "off.jsonl", {}
    with open(gold, "w") as g, open(off, "w") as o:
        for name in BENCHMARKS:
            rows = _bench_rows(name)
            numeric[name] = sum(bool(re.search(r"\d", r["answer"])) for r in rows)
            for r in rows:
                g.write(json.dumps({"bench": name, "id": r["id"], "response": f"So the answer is \\boxed{{{r['answer']}}}."}) + "\n")
                if re.search(r"\d", r["answer"]):  # only answers with a number can be off by one
                    o.write(json.dumps({"bench": name, "id": r["id"], "response": f"\\boxed{{{_off_by_one(r['answer'])}}}"}) + "\n")

    for responses, out in ((gold, "out-gold"), (off, "out-off")):
        # --timeout 30: some minerva answers take 3-8 s to compare on a busy 2-core machine; the check
        # is about verdicts, not speed
        result = run_popo("eval", "--bench", "all", "--responses", str(responses), "--output", out, "--no-tracking",
                          "--timeout", "30", cwd=evaldir)
        assert result.returncode == 0, result.stderr
    by_bench = {kind: {s["bench"]: s for s in json.loads((evaldir / f"out-{kind}" / "summary.json").read_text())}
                for kind in ("gold", "off")}
    for name in BENCHMARKS:
        g, o = by_bench["gold"][name], by_bench["off"][name]
        assert (g["n"], g["missing"], g["timeouts"], g["unparsed"]) == (len(_bench_rows(name)), 0, 0, 0), g
        # minerva_math included: each raw gold answer, program text too, is graded equal to itself
        assert g["accuracy"] == 1.0, (name, g)
        # problems whose answer has no number have no line in the off file: missing, so graded wrong
        assert (o["n"], o["missing"], o["timeouts"]) == (len(_bench_rows(name)), len(_bench_rows(name)) - numeric[name], 0)
        # minerva_math included: its small constants (2.88e-19 vs 3.89e-20) compare to 6 significant
        # digits, not math-verify's 6 decimal places
        assert o["accuracy"] == 0.0, (name, o)
    line = (evaldir / "out-gold" / "samples.jsonl").read_text().splitlines()[0]
    assert set(json.loads(line)) >= {"id", "sample", "response", "extracted", "gold", "correct"}


# ---------------------------------------------------------------------------------- bad input
BAD_INPUT = {
    ("--bench", "aime26", "--responses", "ok.jsonl"): "unknown benchmark 'aime26'",
    ("--bench", "aime24", "--responses", "missing.jsonl"): "cannot read",
    ("--bench", "aime24", "--responses", "broken.jsonl"): "line 2 is not valid JSON",
    ("--bench", "aime24", "--responses", "unknown_id.jsonl"): "not in aime24",
    ("--bench", "aime24", "--responses", "other_bench.jsonl"): "unknown bench 'aime2024'",
    ("--bench", "aime24", "--bench", "gsm8k", "--responses", "ok.jsonl"): "needs a 'bench' key",
    ("--bench", "aime24", "--responses", "ok.jsonl", "--limit", "0"): "--limit 0",
    ("--bench", "aime24", "--model", "./no/such/dir"): "not a model preset",
    ("--bench", "aime24", "--model", "not_a_model"): "no config.json",
    ("--bench", "aime24", "--model", "tiny", "--samples", "0"): "--samples 0",
    ("--bench", "aime24", "--model", "tiny", "--samples", "4", "--temperature", "0"): "--temperature > 0",
    ("--bench", "aime24", "--model", "tiny", "--template", "chatml"): "--template chatml",
    ("--bench", "aime24"): "exactly one of --model",
    ("--bench", "all", "--data", "ok.jsonl", "--responses", "ok.jsonl"): "single --bench",
    ("--bench", "aime24", "--data", "nope.jsonl", "--responses", "ok.jsonl"): "file not found",
    ("--bench", "aime24", "--responses", "ok.jsonl", "--run-id", "abc", "--no-tracking"): "--no-tracking",
    ("--bench", "aime24", "--model", "tiny", "--answered-only"): "--answered-only leaves out",
    ("--bench", "aime26", "--list-ids"): "unknown benchmark 'aime26'",
    ("--bench", "arith", "--list-ids"): "synthetic task",
    ("--bench", "aime24", "--list-ids", "--limit", "0"): "--limit 0",
    ("--bench", "aime24", "--list-ids", "--data", "nope.jsonl"): "file not found",
}


def _bad_input_files(d: Path) -> None:
    (d / "ok.jsonl").write_text(json.dumps({"id": "60", "response": "\\boxed{204}"}) + "\n")
    (d / "broken.jsonl").write_text('{"id": "60", "response": "x"}\n{"id": 61, \n')
    (d / "unknown_id.jsonl").write_text(json.dumps({"id": "no-such-problem", "response": "1"}) + "\n")
    (d / "other_bench.jsonl").write_text(json.dumps({"bench": "aime2024", "id": "60", "response": "1"}) + "\n")
    (d / "not_a_model").mkdir()


def test_bad_input_gives_one_line_and_exit_2(evaldir, monkeypatch):
    from typer.testing import CliRunner

    from popo_cli.main import app

    _bad_input_files(evaldir)
    monkeypatch.chdir(evaldir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{evaldir}/mlflow.db")
    for args, message in BAD_INPUT.items():
        result = CliRunner().invoke(app, ["eval", *args])
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.stderr)


def test_bad_input_through_the_installed_entry_point(evaldir):
    _bad_input_files(evaldir)
    for args in [("--bench", "aime26", "--responses", "ok.jsonl"), ("--bench", "aime24", "--responses", "broken.jsonl")]:
        line = _one_error_line(run_popo("eval", *args, cwd=evaldir))
        assert BAD_INPUT[args] in line


# ----------------------------------------------------------------------- MLflow and nesting
def test_responses_run_logs_to_mlflow_nested_under_a_training_run(evaldir, monkeypatch, mlflow_store):
    """In-process through typer's CliRunner (MLflow is imported once, here)."""
    import shutil

    from typer.testing import CliRunner

    from popo_cli.main import app
    from popo_core.tracking import MlflowRun, client

    uri = f"sqlite:///{evaldir}/mlflow.db"
    shutil.copy(mlflow_store, evaldir / "mlflow.db")
    monkeypatch.chdir(evaldir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with MlflowRun(uri=uri, experiment="popo", run_name="train") as parent:
        pass
    rows = _bench_rows("aime24")
    with open(evaldir / "r.jsonl", "w") as f:
        for r in rows[:10]:
            for k in range(2):  # two samples: the first right, the second wrong
                f.write(json.dumps({"id": r["id"], "response": f"\\boxed{{{int(r['answer']) + k}}}"}) + "\n")
    result = CliRunner().invoke(app, ["eval", "--bench", "aime24", "--responses", "r.jsonl", "--run-id", parent.run_id,
                                      "--output", "out", "--answered-only"])
    assert result.exit_code == 0, result.output
    assert "pass@2" in result.stdout and "extraction:" in result.stdout and "grader:" in result.stdout
    (summary,) = json.loads((evaldir / "out" / "summary.json").read_text())
    assert (summary["n"], summary["missing"], summary["samples"]) == (10, 20, 2)
    assert summary["accuracy"] == 0.5 and summary["pass@k"] == {"1": 0.5, "2": 1.0} and summary["maj@2"] == 0.5
    assert summary["answered_only"] is True
    c = client(uri)
    (child,) = [r for r in c.search_runs([c.get_experiment_by_name("popo").experiment_id]) if r.info.run_id != parent.run_id]
    assert child.data.tags["mlflow.parentRunId"] == parent.run_id
    assert child.data.metrics["aime24/accuracy"] == 0.5 and child.data.metrics["aime24/pass_at_2"] == 1.0
    assert child.data.metrics["aime24/maj_at_2"] == 0.5 and child.data.metrics["aime24/missing"] == 20
    assert child.data.params["eval.answered_only"] == "True"
    assert [a.path for a in c.list_artifacts(child.info.run_id)] == ["summary.json"]

    # an unknown parent: one line, exit 2, before any grading
    bad = CliRunner().invoke(app, ["eval", "--bench", "aime24", "--responses", "r.jsonl", "--run-id", "0123456789abcdef"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == ["error: --run-id 0123456789abcdef: no such MLflow run in the tracking store"]


# ------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_model_end_to_end_on_cpu(evaldir, mlflow_store):
    import shutil

    shutil.copy(mlflow_store, evaldir / "mlflow.db")  # run_popo points MLFLOW_TRACKING_URI here
    result = run_popo("eval", "--bench", "math500", "--model", "tiny", "--samples", "4", "--temperature", "1.0",
                      "--limit", "8", "--max-new-tokens", "16", "--threads", "1", "--output", "out", cwd=evaldir)
    assert result.returncode == 0, result.stderr
    assert "template plain" in result.stdout and "max_new_tokens 16" in result.stdout
    (summary,) = json.loads((evaldir / "out" / "summary.json").read_text())
    assert (summary["bench"], summary["n"], summary["samples"]) == ("math500", 8, 4)
    assert set(summary["pass@k"]) == {"1", "2", "4"} and "maj@4" in summary
    assert summary["graded"] + summary["unparsed"] + summary["timeouts"] + summary["errors"] == 32
    assert len((evaldir / "out" / "samples.jsonl").read_text().splitlines()) == 32

    from popo_core.tracking import find_runs

    (run,) = find_runs(f"sqlite:///{evaldir}/mlflow.db", "popo")
    assert {"math500/accuracy", "math500/pass_at_1", "math500/pass_at_4", "math500/maj_at_4"} <= set(run.data.metrics)
    assert run.data.params["eval.samples"] == "4" and run.data.tags["popo.kind"] == "eval"
    # One name per knob: settings popo train has too are logged under their train names.
    params = run.data.params
    assert params["rollout.temperature"] == "1.0" and params["rollout.eval_max_new_tokens"] == "16"
    assert params["rollout.engine"] == "hf" and params["model.template"] == "plain" and "eval.max_new_tokens" not in params
