"""Several processes on CPU: FSDP2 over gloo under the real torchrun (popo_core/trainer/distributed.py).

The same seed gives the same run on 1 and 2 processes (weights and logged metrics within 1e-4), also
when a checkpoint comes before the first optimizer step, and a 2-rank run killed with SIGKILL
resumes from its sharded checkpoint to the weights of an uninterrupted 2-rank run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from popo_core.trainer.distributed import Ranks

SHORT = ["trainer.eval_every=2", "trainer.save_every=2", "trainer.diagnostics_every=2", "rollout.prompts_per_step=24",
         "rollout.group_size=8", "trainer.device=cpu", "tracking.enabled=false"]


def launch(out: Path, ranks: int, *overrides: str, background: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    given = {o.split("=")[0] for o in overrides}
    args = ["train", "tiny", f"trainer.output_dir={out}", *[s for s in SHORT if s.split("=")[0] not in given], *overrides]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(free_port()),
               "-m", "popo_cli", *args]
    else:
        cmd = [sys.executable, "-m", "popo_cli", *args]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_rank_gets_its_share_in_as_many_chunks():
    items = torch.arange(11)
    shares = [Ranks(r, 3).chunks(items, 2) for r in range(3)]
    assert {len(s) for s in shares} == {2}  # ceil(ceil(11 / 3) / 2): the same count on every rank
    got = torch.cat([c for s in shares for c in s])
    assert got.tolist() == list(range(11))  # each item exactly once, in order
    assert Ranks(0, 1).chunks(items, 4)[-1].tolist() == [8, 9, 10]
    assert Ranks(1, 2).chunks(torch.arange(0), 4) == []
    assert [len(c) for c in Ranks(1, 4).chunks(torch.arange(5), 1)] == [1, 0]  # a short share ends empty


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_run(tmp_path):
    launch(tmp_path / "one", 1, "trainer.max_steps=5")
    launch(tmp_path / "two", 2, "trainer.max_steps=5")
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)
    ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(6))
    compared = 0
    for x, y in zip(ma, mb):
        for key in ("loss/policy", "grad/norm", "reward/mean", "penalty/similarity", "train/forward_tokens"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key)
                compared += 1
    assert compared >= 10  # learning happened: positives, losses and gradients were compared
    assert not (tmp_path / "two" / "checkpoint" / "policy").exists()  # sharded: DCP, not one rank's copy
    assert (tmp_path / "two" / "checkpoint" / "dcp").is_dir()


@pytest.mark.slow
def test_token_budget_micro_batches_shared_by_tokens_give_the_same_run(tmp_path):
    """trainer.max_tokens_per_micro_batch: the rows shared among 2 ranks by tokens, as many
    micro-batches on each, give the 1-process run (popo_core/trainer/packing.py)."""
    budget = ["trainer.max_steps=3", "trainer.micro_batch_size=null", "trainer.max_tokens_per_micro_batch=40"]
    launch(tmp_path / "one", 1, *budget)
    launch(tmp_path / "two", 2, *budget)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)
    for x, y in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two")):
        for key in ("loss/policy", "grad/norm", "train/forward_tokens", "train/padded_tokens"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key)


@pytest.mark.slow
def test_a_checkpoint_before_the_first_optimizer_step_leaves_the_run_unchanged(tmp_path):
    """Seed 1 with 12 prompts: step 1 has no positive, so its checkpoint comes before any AdamW
    step. DCP's get_state_dict would take a zero-gradient step to initialise the optimizer's state
    (its step counter at 1 on 2 ranks, 0 on one): every later update's bias correction differed."""
    run = ["trainer.max_steps=3", "trainer.save_every=1", "trainer.seed=1", "rollout.prompts_per_step=12"]
    launch(tmp_path / "one", 1, *run)
    launch(tmp_path / "two", 2, *run)
    ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert "loss/policy" not in ma[1] and "loss/policy" in ma[2]  # the case: nothing learned at step 1, then learning
    for x, y in zip(ma[2:], mb[2:]):
        for key in ("loss/policy", "grad/norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_two_rank_run_killed_with_sigkill_resumes_exactly(tmp_path):
    launch(tmp_path / "straight", 2, "trainer.max_steps=6")
    out = tmp_path / "killed"
    proc = launch(out, 2, "trainer.max_steps=6", background=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] \
            if (out / "metrics.jsonl").exists() else []
        if done and max(done) >= 3 and (out / "checkpoint" / "state.json").exists():
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    assert not (out / "result.json").exists()
    launch(out, 2, "trainer.max_steps=6")
    a, b = weights(tmp_path / "straight"), weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["step"] for r in metrics(out)] == list(range(7))  # each step logged once
