"""The sampler in a process of its own (rollout.max_staleness = s >= 1): one-step (or s-step)
off-policy training, the next batches generated while the trainer updates.

A spawned process holds its own copy of the policy and an HF engine with its own torch threads
(rollout.threads). The trainer hands it weights through s + 1 shared-memory state dicts, a ring:
the weights after update v go to slot v % (s + 1), with v written beside them, and each job names
its batch's step and slot. The batch of step t is sampled from the weights after update
max(0, t - 1 - s) (popo_core.rollout.source.policy_version): fixed, whatever the timing, so two
runs with one seed agree. Overwriting slot v % (s + 1) is safe: its previous weights (v - s - 1)
sampled the batch of step v, which the trainer took before updating to v.

The sampler copies a slot into its model when a job names weights it does not hold, and reports
the version it read (meta["policy_version"]). A sampler that dies or fails is an error within
`poll_s` seconds; a sampler whose trainer died (SIGKILL) notices within a second and exits.
"""

from __future__ import annotations

import copy
import os
import queue
import time
import traceback
from typing import Callable

import torch

from popo_core.rollout import Rollouts
from popo_core.rollout.source import Request, Sampling, policy_version


class SamplerError(RuntimeError):
    """The sampler process died or failed: training cannot go on."""


class SamplerProcess:
    def __init__(self, model, tokenizer, requests: Callable[[int], Request], sampling: Sampling, *, staleness: int,
                 threads: int | None, compute_dtype: torch.dtype, poll_s: float = 0.5):
        import torch.multiprocessing as mp

        self.staleness, self.requests, self.poll_s = staleness, requests, poll_s
        with torch.no_grad():
            state = model.state_dict()
            self.slots = [{k: v.detach().clone().share_memory_() for k, v in state.items()} for _ in range(staleness + 1)]
        self.versions = torch.full((staleness + 1,), -1, dtype=torch.int64).share_memory_()
        ctx = mp.get_context("spawn")  # a fresh interpreter: no fork of the trainer's threads or locks
        self.jobs, self.results = ctx.Queue(), ctx.Queue()
        copy_ = copy.deepcopy(model).eval().requires_grad_(False)
        self.process = ctx.Process(target=serve, name="popo-sampler", daemon=True,
                                   args=(copy_, tokenizer, self.slots, self.versions, sampling.kwargs(), compute_dtype,
                                         threads, self.jobs, self.results, os.getpid()))
        self.process.start()
        del copy_
        self.ready: dict[int, Rollouts] = {}
        self.submitted = 0  # the last step whose batch was asked for
        self.step = 0  # the last update whose weights were pushed

    # ------------------------------------------------------------------------ RolloutSource
    def start(self, step: int, model, held: dict[int, Rollouts]) -> None:
        self.ready = dict(held)
        self.submitted = step + len(held)
        self._write(step, model)
        for b in range(self.submitted + 1, step + self.staleness + 2):  # from a fresh start: steps 1..s+1, weights 0
            self._submit(b)

    def next(self, step: int) -> Rollouts:
        begin = time.perf_counter()
        self._collect(step)
        out = self.ready.pop(step)
        out.meta["wait_s"] = time.perf_counter() - begin
        return out

    def push(self, step: int, model) -> None:
        self._write(step, model)
        self._submit(step + self.staleness + 1)

    def held(self) -> dict[int, Rollouts]:
        """The batches of the next s steps (their weights are older than the checkpoint's): waited for."""
        steps = [b for b in range(self.step + 1, self.submitted + 1) if policy_version(b, self.staleness) < self.step]
        for b in steps:
            self._collect(b)
        return {b: self.ready[b] for b in steps}

    def close(self) -> None:
        if self.process.is_alive():
            self.jobs.put(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        for q in (self.jobs, self.results):
            q.cancel_join_thread()
            q.close()

    # ---------------------------------------------------------------------------------- inside
    @torch.no_grad()
    def _write(self, version: int, model) -> None:
        slot = version % (self.staleness + 1)
        for k, v in model.state_dict().items():
            self.slots[slot][k].copy_(v)
        self.versions[slot] = version
        self.step = version

    def _submit(self, step: int) -> None:
        version = policy_version(step, self.staleness)
        slot = version % (self.staleness + 1)
        assert int(self.versions[slot]) == version, (step, version, self.versions.tolist())
        request = self.requests(step)
        self.jobs.put((step, slot, request.prompt_ids, request.seeds))
        self.submitted = step

    def _collect(self, step: int) -> None:
        """Take results (they come in step order) until the batch of `step` is in."""
        while step not in self.ready:
            got, out = self._get()
            if isinstance(out, str):
                raise SamplerError(f"the sampler failed on the batch of step {got}: {out.strip().splitlines()[-1]}")
            self.ready[got] = out

    def _get(self):
        while True:
            try:
                return self.results.get(timeout=self.poll_s)
            except queue.Empty:
                if not self.process.is_alive():
                    raise SamplerError(f"the sampler process died (exit code {self.process.exitcode}) before sending "
                                       "its batch: out of memory, or killed") from None


def serve(model, tokenizer, slots, versions, sampling: dict, compute_dtype, threads, jobs, results, parent: int) -> None:
    """The sampler's loop: a job (step, slot, prompts, seeds) in, (step, Rollouts) or (step, traceback) out."""
    from popo_core.rollout.hf import HFEngine
    from popo_core.trainer.companions import autocast

    if threads:
        torch.set_num_threads(threads)
    engine = HFEngine(model, tokenizer)
    device = next(model.parameters()).device
    loaded = -1
    while True:
        if os.getppid() != parent:  # the trainer is gone (killed): nobody will read the results
            # Without this, exit waits for the queue's feeder thread to flush batches into a pipe that
            # only this process still holds open, forever once they exceed the pipe's buffer.
            results.cancel_join_thread()
            return
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            continue
        if job is None:
            return
        step, slot, prompt_ids, seeds = job
        try:
            if int(versions[slot]) != loaded:
                with torch.no_grad():
                    model.load_state_dict(slots[slot])
                loaded = int(versions[slot])
            begin = time.perf_counter()
            with autocast(device, compute_dtype):
                out = engine.generate(prompt_ids, seeds=seeds, **sampling)
            out.meta = {"policy_version": loaded, "generate_s": time.perf_counter() - begin}
            results.put((step, out))
        except Exception:  # noqa: BLE001 - sent to the trainer, which raises it
            results.put((step, traceback.format_exc()))
            return
