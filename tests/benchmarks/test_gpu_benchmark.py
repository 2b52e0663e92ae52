"""benchmarks/gpu.py keeps working: its CPU smoke size runs every variant and appends its table."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_benchmark_runs_at_tiny_size_on_cpu(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--size", "tiny", "--results", str(results)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert text.startswith("# Benchmark results") and "benchmarks/gpu.py --size tiny" in text
    for row in ("| popo | 0 |", "| grpo | 0 |", "| popo | 32 |", "| grpo | 32 |", "HF rollout"):
        assert row in text, row
