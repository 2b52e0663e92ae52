"""The off-policy sampler process (popo_core/rollout/sampler.py) through the RolloutSource seam: each
step's batch is sampled from exactly the weights after step t - 1 - s (the ones a test pushed, read
back by the completions themselves), a batch the checkpoint must hold is handed over, and a dead
sampler is an error within seconds. (Whole runs: tests/trainer/test_off_policy.py.)"""

import os
import signal
import time

import pytest
import torch

from popo_core.config import ModelConfig
from popo_core.model.loading import load_model_and_tokenizer
from popo_core.rollout.hf import HFEngine
from popo_core.rollout.sampler import SamplerError, SamplerProcess
from popo_core.rollout.sampling import prompt_keys
from popo_core.rollout.source import Request, Sampling, policy_version

SAMPLING = Sampling(n=8, temperature=1.0, top_p=1.0, max_new_tokens=12)


def request(step: int) -> Request:
    return Request([[3, 4, 5], [6, 7], [8, 9, 10, 11]], prompt_keys(0, step, 0, 3))


def perturbed(model, version: int) -> None:
    """The weights 'after update `version`': far enough apart that each version samples its own completions."""
    torch.manual_seed(1000 + version)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)


@pytest.fixture
def tiny():
    torch.set_num_threads(1)
    return load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"), seed=0)


@pytest.mark.parametrize("staleness", [1, 2])
def test_each_batch_comes_from_exactly_the_weights_after_step_t_minus_1_minus_s(tiny, staleness):
    """The trainer here updates at once, so the sampler lags behind the pushes: with s = 2 the
    latest weights at the start of a batch are newer than the schedule's, and a sampler that took
    them would sample other completions. (With s = 1 the latest weights when a batch starts are
    the schedule's anyway: the next push waits for the batch before it.)"""
    model, tokenizer = tiny
    snapshots = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    source = SamplerProcess(model, tokenizer, request, SAMPLING, staleness=staleness, threads=1,
                            compute_dtype=torch.float32)
    outs, held = {}, None
    try:
        source.start(0, model, {})
        for step in range(1, 9):
            outs[step] = source.next(step)
            perturbed(model, step)  # "the update"
            snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
            source.push(step, model)
            if step == 4:  # a checkpoint now holds the batches sampled from weights older than step 4's
                held = source.held()
    finally:
        source.close()
    assert not source.process.is_alive()
    assert sorted(held) == list(range(5, 5 + staleness)) and all(held[b].meta["policy_version"] < 4 for b in held)
    reference = HFEngine(load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"))[0], tokenizer)
    for step, out in outs.items():
        version = policy_version(step, staleness)
        assert version == max(0, step - 1 - staleness)
        assert out.meta["policy_version"] == version, step  # the version the sampler read beside the weights
        reference.model.load_state_dict(snapshots[version])  # ... and the completions are those weights'
        again = reference.generate(request(step).prompt_ids, seeds=request(step).seeds, **SAMPLING.kwargs())
        assert out.completion_ids == again.completion_ids, step
        torch.testing.assert_close(torch.tensor(sum(out.logprobs, [])), torch.tensor(sum(again.logprobs, [])))


def test_a_dead_sampler_is_an_error_within_seconds(tiny):
    model, tokenizer = tiny
    source = SamplerProcess(model, tokenizer, request, SAMPLING, staleness=1, threads=1, compute_dtype=torch.float32,
                            poll_s=0.2)
    try:
        source.start(0, model, {})
        os.kill(source.process.pid, signal.SIGKILL)  # out of memory, say
        source.process.join(timeout=10)
        begin = time.perf_counter()
        with pytest.raises(SamplerError, match=r"the sampler process died \(exit code -9\)"):
            source.next(1)
        assert time.perf_counter() - begin < 5
    finally:
        source.close()


@pytest.mark.slow
def test_a_failing_sampler_names_its_error(tiny):
    model, tokenizer = tiny
    bad = lambda step: Request([[3, 10**9]], [1])  # noqa: E731 - a token id outside the vocabulary
    source = SamplerProcess(model, tokenizer, bad, SAMPLING, staleness=1, threads=1, compute_dtype=torch.float32)
    try:
        source.start(0, model, {})
        with pytest.raises(SamplerError, match="the sampler failed on the batch of step 1: "):
            source.next(1)
    finally:
        source.close()


TRAINER = """
import sys, time, torch
from popo_core.config import ModelConfig
from popo_core.model.loading import load_model_and_tokenizer
from popo_core.rollout.sampler import SamplerProcess
from popo_core.rollout.sampling import prompt_keys
from popo_core.rollout.source import Request, Sampling

def request(step):  # a batch far larger than a pipe's 64 KiB buffer
    return Request([[3, 4, 5, 6]] * 64, prompt_keys(0, step, 0, 64))

if __name__ == "__main__":
    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"), seed=0)
    source = SamplerProcess(model, tokenizer, request, Sampling(n=8, temperature=1.0, top_p=1.0, max_new_tokens=16),
                            staleness=2, threads=1, compute_dtype=torch.float32)
    source.start(0, model, {})
    print(source.process.pid, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
def test_a_sampler_whose_trainer_is_killed_exits_with_its_batches_unread(tmp_path):
    """The trainer SIGKILLed alone (not its process group) while its sampler holds unread batches: the
    sampler exits once its current batch is done, instead of waiting on its queue's feeder thread
    forever (it did: state S, no CPU, for good)."""
    import subprocess
    import sys

    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        sampler = int(trainer.stdout.readline())
        time.sleep(15)  # the sampler generates the s + 1 = 3 batches nobody reads
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 60  # the batch it is generating is finished first
        while time.monotonic() < deadline and _alive(sampler):
            time.sleep(0.2)
        assert not _alive(sampler), "the orphaned sampler did not exit"
    finally:
        trainer.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited (its new parent reaps it)
    except FileNotFoundError:
        return False
