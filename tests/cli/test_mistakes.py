"""Every mistake a user can make at the command line is one `error:` line with exit code 2, no
traceback, and leaves nothing behind (no run directory, no MLflow store, no FAILED run)."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import HAVE_VLLM, run_popo, tiny_overrides

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
NO_VLLM = pytest.mark.skipif(HAVE_VLLM, reason="needs an environment without vLLM")

RUN = ["tiny", "trainer.max_steps=2", "tracking.enabled=true"]
MISTAKES = [
    # (args, fragments the one line must hold)
    pytest.param(["train", *RUN, "trainer.output_dir=afile"], ["trainer.output_dir=afile", "not a directory"], id="output-dir-is-a-file"),
    pytest.param(["train", *RUN, "trainer.output_dir=/proc/nope"], ["trainer.output_dir=/proc/nope", "cannot create"], id="output-dir-uncreatable"),
    pytest.param(["train", *RUN, "trainer.device=cuda"], ["trainer.device=cuda", "no CUDA device"], marks=NO_CUDA, id="no-cuda"),
    pytest.param(["train", *RUN, "trainer.device=tpu"], ["trainer.device=tpu", "cuda:N"], id="unknown-device"),
    pytest.param(["train", *RUN, "tracking.uri=http://127.0.0.1:1"], ["tracking.uri=http://127.0.0.1:1", "not reachable"], id="tracking-unreachable"),
    pytest.param(["train", *RUN, "tracking.uri=sqlite:///no/such/dir/m.db"], ["tracking.uri", "not a writable directory"], id="tracking-sqlite-dir"),
    pytest.param(["train", *RUN, "rollout.engine=vllm"], ["pip install 'popo[vllm]'"], marks=NO_VLLM, id="brackets-survive"),
    pytest.param(["train", *RUN, "algo.momentm=0.9"], ["unknown key algo.momentm", "did you mean algo.momentum?"], id="key-typo"),
    pytest.param(["train", *RUN, "max_steps=3"], ["unknown key max_steps", "did you mean trainer.max_steps?"], id="key-without-group"),
    pytest.param(["train", *RUN, "algo.name=grpoo"], ["algo.name=grpoo", "did you mean grpo?"], id="value-typo"),
    pytest.param(["train", "tiny", "algo=grpoo"], ["unknown algo 'grpoo'", "did you mean grpo?"], id="group-typo"),
    pytest.param(["train", "tinyy"], ["unknown preset 'tinyy'", "did you mean tiny?"], id="preset-typo"),
    pytest.param(["ablate", "tiny", "--drop", "siamese", "--seeds", "1", "--output-dir", "afile", "trainer.max_steps=1"],
                 ["--output-dir", "not a directory"], id="ablate-output-dir-is-a-file"),
    pytest.param(["ablate", "tiny", "--drop", "siamese", "--seeds", "1", "trainer.device=cuda"], ["no CUDA device"],
                 marks=NO_CUDA, id="ablate-no-cuda"),
    pytest.param(["ablate", "tiny", "--drop", "siamese", "--seeds", "1", "tracking.uri=http://127.0.0.1:1"],
                 ["not reachable"], id="ablate-tracking-unreachable"),
    pytest.param(["sweep", "momentum", "tiny", "--trials", "1", "tracking.uri=http://127.0.0.1:1"], ["not reachable"],
                 id="sweep-tracking-unreachable"),
    pytest.param(["sweep", "momentum", "tiny", "--trials", "1", "trainer.output_dir=afile"], ["afile", "not a directory"],
                 id="sweep-output-dir-is-a-file"),
    pytest.param(["sweep", "momentum", "tiny", "--trials", "1", "trainer.device=cuda"], ["no CUDA device"], marks=NO_CUDA,
                 id="sweep-no-cuda"),
    pytest.param(["sweep", "lr", "tiny", "--param", "optim.lrr=1e-5:1e-3:log"],
                 ["--param optim.lrr=1e-5:1e-3:log: unknown key optim.lrr", "did you mean optim.lr?"], id="sweep-param-key-typo"),
    pytest.param(["sweep", "lr", "tiny", "--param", "optim.lr=1e-3:1e-5"], ["optim.lr", "need low < high"],
                 id="sweep-param-low-above-high"),
    pytest.param(["sweep", "lr", "tiny", "--param", "optim.lr=0:1e-3:log"], ["a log range needs low > 0"],
                 id="sweep-param-log-from-zero"),
    pytest.param(["sweep", "lr", "tiny", "--param", "algo.epochs=1,two"], ["algo.epochs takes an int, not 'two'"],
                 id="sweep-param-wrong-type"),
    pytest.param(["sweep", "lr", "tiny", "--param", "algo.siamese=yes,no"], ["algo.siamese takes a bool"],
                 id="sweep-param-not-a-bool"),
    pytest.param(["sweep", "momentum", "tiny", "--param", "algo.momentum=0.5:1.5"],
                 ["algo.momentum=1.5: must be in [0, 1]"], id="sweep-param-outside-the-config-range"),
    pytest.param(["sweep", "lr", "tiny", "--param", "optim.lr=1e-4"], ["one value is an override"],
                 id="sweep-param-one-value"),
    pytest.param(["sweep", "lrr"], ["unknown knob 'lrr'", "did you mean lr?"], id="sweep-knob-typo"),
    pytest.param(["sweep", "my-space.yaml"], ["my-space.yaml: no such file"], id="sweep-space-file-missing"),
    pytest.param(["sweep", "lr", "--metric", "eval/pass@1"], ["did you mean eval/pass_at_1?"], id="sweep-metric-with-at"),
    pytest.param(["sweep", "lr", "--metric", "eval/pass_at_1"], ["needs trainer.eval_samples > 0"],
                 id="sweep-pass-at-1-without-samples"),
    pytest.param(["train", *RUN, "trainer.eval_samples=-1"], ["trainer.eval_samples=-1", "must be >= 0"],
                 id="eval-samples-negative"),
    pytest.param(["train", *RUN, "rollout.max_staleness=-1"], ["rollout.max_staleness=-1", "must be >= 0"],
                 id="staleness-negative"),
    pytest.param(["train", *RUN, "rollout.max_staleness=1", "rollout.engine=vllm", "rollout.sleep_level=1"],
                 ["rollout.sleep_level=1", "with rollout.max_staleness=1"], id="staleness-with-sleep"),
    pytest.param(["train", *RUN, "rollout.max_staleness=1", "rollout.engine=vllm"],
                 ["rollout.engine=vllm", "with rollout.max_staleness=1", "use rollout.max_staleness=0"], id="staleness-with-vllm"),
    pytest.param(["train", *RUN, "rollout.threads=0"], ["rollout.threads=0", "must be >= 1"], id="sampler-threads-zero"),
    pytest.param(["eval", "--bench", "aime25", "--responses", "answers[v2].jsonl"], ["answers[v2].jsonl"], id="eval-path-brackets"),
    pytest.param(["eval", "--bench", "aime25", "--model", "tiny", "--output", "afile"], ["--output=afile", "not a directory"],
                 id="eval-output-is-a-file"),
    pytest.param(["eval", "--bench", "aime25", "--model", "tiny", "--device", "cuda"], ["--device=cuda", "no CUDA device"],
                 marks=NO_CUDA, id="eval-no-cuda"),
    pytest.param(["eval", "--bench", "aime25", "--model", "tiny", "--tracking-uri", "http://127.0.0.1:1"],
                 ["--tracking-uri=http://127.0.0.1:1", "not reachable"], id="eval-tracking-unreachable"),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("args, fragments", MISTAKES)
def test_each_mistake_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, args, fragments):
    from typer.testing import CliRunner

    from popo_cli.main import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "afile").write_text("not a directory\n")
    built = []  # every Hugging Face model calls post_init when it is built: none may be before the refusal
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "post_init", lambda self: built.append(type(self).__name__))
    before = _tree(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert _tree(tmp_path) == before, "a refused start left files behind"
    assert built == [], f"{built} built before the refusal: the checks must run first"


def test_mistakes_through_the_installed_entry_point(tmp_path):
    """The same, as a user meets it: a subprocess, no traceback on any stream."""
    (tmp_path / "afile").write_text("x\n")
    proc = run_popo("train", *RUN, "trainer.output_dir=afile", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: trainer.output_dir=afile: exists and is not a directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_the_check_can_fail():
    """The tree comparison above sees a file a command leaves behind."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        before = _tree(Path(d))
        (Path(d) / "mlflow.db").write_text("")
        assert _tree(Path(d)) != before


def test_the_build_check_can_fail(monkeypatch):
    """Building the tiny model (what a run does first) is seen by the post_init check above."""
    from transformers import PreTrainedModel

    from popo_core.model.loading import build_tiny_model, build_tiny_tokenizer

    built = []
    monkeypatch.setattr(PreTrainedModel, "post_init", lambda self: built.append(type(self).__name__))
    build_tiny_model(build_tiny_tokenizer(), hidden_size=64, num_layers=1, num_heads=2, tie_embeddings=True, seed=0)
    assert "Qwen2ForCausalLM" in built


# ----------------------------------------------------------------------- interrupt and resume
def _interrupt_when(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(ln)["step"] >= step for ln in lines if ln.strip()):
            proc.send_signal(signal.SIGINT)
            return
        time.sleep(0.05)
    raise AssertionError("the run never reached the step to interrupt at")


def test_interrupt_then_resume_say_what_happens(tmp_path):
    """Ctrl-C names the step reached and the checkpoint; the rerun names the checkpoint it resumes
    from and the steps it redoes; a budget below the run's own step is refused."""
    args = tiny_overrides(tmp_path, **{"trainer.max_steps": 400, "trainer.save_every": 10, "trainer.eval_every": 4})
    cmd = [sys.executable, "-m", "popo_cli.main", "train", "tiny", *args]
    # Ctrl-C's default action even where this test runs with SIGINT ignored (a background job of a
    # shell without job control: Python then never raises KeyboardInterrupt, and the run completes).
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "COLUMNS": "200"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Two steps past the checkpoint at 10 and eight before the next: on a loaded machine the run goes
    # on for a step or two before it sees the signal, and it must not reach a checkpoint meanwhile.
    _interrupt_when(proc, tmp_path / "run" / "metrics.jsonl", 12)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    saved, reached = state["step"], max(logged)
    assert saved >= 10 and saved % 10 == 0 and reached > saved
    assert f"interrupted at step {reached}; last checkpoint at step {saved}; rerun the same command to resume" in err
    assert "Traceback" not in out + err

    refused = run_popo("train", "tiny", *tiny_overrides(tmp_path, **{"trainer.max_steps": saved - 1}), cwd=tmp_path)
    assert refused.returncode == 2 and f"already at step {saved}" in refused.stderr, refused.stderr

    budget = reached + 1
    again = run_popo("train", "tiny", *tiny_overrides(tmp_path, **{"trainer.max_steps": budget, "trainer.save_every": 10,
                                                                     "trainer.eval_every": 4}), cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from step {saved} (checkpoint); steps {saved + 1}..{reached} logged before the interruption are redone" \
        in again.stdout, again.stdout
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(0, budget + 1))  # each step exactly once


def test_progress_bar_shows_the_restored_accuracy():
    """On resume the bar shows the last evaluated accuracy at once, not nan until the next eval."""
    from popo_cli.train import make_progress_callbacks

    bar = make_progress_callbacks("t")
    bar.on_start(8, 20, Path("."))
    bar.on_resume(8, range(9, 11), {"reward/mean": 0.5, "eval/accuracy": 0.75})
    info = bar.progress.tasks[0].fields["info"]
    bar.close()
    assert "eval/accuracy 0.750" in info and "reward 0.500" in info
