"""Whole runs with rollout.max_staleness=1 (a sampler process one update behind): the same seed
gives the same completions and weights, and a run killed with SIGKILL after a checkpoint resumes
to exactly the uninterrupted run (the checkpoint holds the in-flight batch). The sampler's own
schedule and its death: tests/rollout/test_sampler.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import tiny_overrides
from popo_core.config import compose
from popo_core.trainer.loop import train

OFF_POLICY = {"rollout.max_staleness": 1, "rollout.threads": 1, "trainer.max_steps": 30, "trainer.save_every": 5,
              "trainer.eval_every": 10, "rollout.prompts_per_step": 24, "rollout.group_size": 8}
STEADY = ("time/", "throughput/")  # wall-clock numbers differ between runs


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def without_times(row):
    return {k: v for k, v in row.items() if not k.startswith(STEADY)}


@pytest.mark.slow
def test_a_killed_off_policy_run_resumes_to_the_uninterrupted_one(workdir):
    straight = workdir / "straight"
    train(compose("tiny", tiny_overrides(straight, **OFF_POLICY)))
    first = rows(straight / "run")
    assert [r["rollout/staleness"] for r in first[1:]] == [0.0] + [1.0] * 29
    assert "tis" in (straight / "run" / "config.yaml").read_text()  # the correction that was used
    assert first[-1]["train/updates"] > first[-1]["train/skipped_updates"]  # positives: the weights moved

    killed = workdir / "killed"
    args = tiny_overrides(killed, **OFF_POLICY)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir}/mlflow.db"}
    proc = subprocess.Popen([sys.executable, "-m", "popo_cli.main", "train", "tiny", *args], cwd=workdir, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics, state = killed / "run" / "metrics.jsonl", killed / "run" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.exists() else []
        if done and max(done) >= 6 and state.exists():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its sampler at once
    proc.wait()
    assert (killed / "run" / "checkpoint" / "rollouts.json").exists()  # the batch after the checkpoint's, from older weights
    assert not (killed / "run" / "result.json").exists()

    train(compose("tiny", args))
    again = rows(killed / "run")
    assert [r["step"] for r in again] == list(range(31))  # each step logged once
    # The same completions (completion/crc32), rewards, losses and gradients at every step.
    assert [without_times(r) for r in again] == [without_times(r) for r in first]
    a, b = weights(straight / "run"), weights(killed / "run")
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_sweep_trials_and_ablation_runs_train_off_policy(workdir):
    """`popo sweep` and `popo ablate` pass rollout.max_staleness to every run, and each run resolves
    its own correction (tis when stale) and logs the staleness it trained at."""
    import yaml

    from conftest import run_popo

    budget = ["rollout.max_staleness=1", "rollout.threads=1", "trainer.max_steps=4", "trainer.eval_every=2",
              "trainer.save_every=2", "rollout.prompts_per_step=6", "rollout.group_size=4"]
    sweep = run_popo("sweep", "momentum", "tiny", "--trials", "2", *budget, cwd=workdir, timeout=600)
    assert sweep.returncode == 0, sweep.stderr + sweep.stdout
    ablate = run_popo("ablate", "tiny", "--drop", "siamese", "--seeds", "1", *budget, cwd=workdir, timeout=600)
    assert ablate.returncode == 0, ablate.stderr + ablate.stdout
    runs = sorted(p.parent for p in workdir.rglob("result.json"))
    assert len([r for r in runs if "sweeps" in r.parts]) == 2 and len([r for r in runs if "ablations" in r.parts]) == 2
    for run in runs:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["rollout"]["max_staleness"] == 1 and cfg["algo"]["rollout_correction"] == "tis", run
        assert [r["rollout/staleness"] for r in rows(run)[1:]] == [0.0, 1.0, 1.0, 1.0], run
