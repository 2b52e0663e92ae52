"""Packed against padded forwards (popo_core/trainer/packing.py): update time per step and peak memory.

For each method (GRPO, POPO) and seed, the trainer's own rollouts of each step are generated once
and the update (popo_core.trainer.update.update: pi_old and reference recomputation, forward and
backward, the momentum forward, the optimizer step) runs on them twice from the same weights, padded
(trainer.packing=false) and packed (trainer.packing=true), in alternating order; the run goes on
from the packed update's weights. Peak memory: on a GPU, torch.cuda.max_memory_allocated over the
update; on CPU, the peak bytes autograd holds saved for backward (activations, the attention mask
among them), counted storage by storage. Prints ratios packed / padded (< 1: packing cheaper).

    python benchmarks/packing.py [--preset arith] [--seeds 2] [--steps 3] [--methods grpo popo] [key=value ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time

import torch

from popo_core.config import compose
from popo_core.data.datasets import prompt_ids
from popo_core.data.tasks import load_task, make_verifier
from popo_core.rollout.sampling import prompt_keys
from popo_core.trainer import packing as P
from popo_core.trainer import update as U
from popo_core.trainer.loop import build, prompt_batch
from popo_core.trainer.update import Batch, update


class Tally:
    """Tokens and positions of every forward the update runs (policy, pi_old, reference, momentum)."""

    def __init__(self):
        self.tokens = self.positions = 0
        self._collate = U.collate
        U.collate = self

    def __call__(self, *args, **kwargs):
        seqs = self._collate(*args, **kwargs)
        self.tokens += seqs.input_tokens
        self.positions += seqs.input_ids.numel()
        return seqs


class SavedBytes:
    """Peak bytes of the tensors autograd saves for backward while active (each storage once)."""

    def __init__(self):
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in self.live:
            self.live[key] = t.untyped_storage().nbytes()
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
        return t, key

    def unpack(self, packed):
        return packed[0]

    def release(self) -> None:  # after each backward its saved tensors are gone
        self.live.clear()
        self.now = 0


@contextlib.contextmanager
def measured(device: torch.device):
    box = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        yield box
        torch.cuda.synchronize()
        box["s"] = time.perf_counter() - start
        box["bytes"] = torch.cuda.max_memory_allocated() - base
        return
    saved = SavedBytes()
    original = torch.Tensor.backward

    def backward(self, *a, **k):
        out = original(self, *a, **k)
        saved.release()
        return out

    torch.Tensor.backward = backward
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            start = time.perf_counter()
            yield box
            box["s"] = time.perf_counter() - start
    finally:
        torch.Tensor.backward = original
    box["bytes"] = saved.peak


def state(learner):
    return copy.deepcopy({"model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
                          "scheduler": learner.scheduler.state_dict(), "counters": learner.counters,
                          "momentum": learner.momentum.state_dict() if learner.momentum is not None else None})


def restore(learner, saved) -> None:
    learner.model.load_state_dict(saved["model"])
    learner.optimizer.load_state_dict(saved["optimizer"])
    learner.scheduler.load_state_dict(saved["scheduler"])
    learner.counters = copy.deepcopy(saved["counters"])
    if saved["momentum"] is not None:
        learner.momentum.load_state_dict(saved["momentum"])


def run(method: str, seed: int, args, packed: P.Packing) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(args.preset, [f"algo={method}", f"trainer.seed={seed}", f"trainer.output_dir={tmp}",
                                    "tracking.enabled=false", f"trainer.max_steps={args.steps}",
                                    "trainer.diagnostics_every=0", *args.overrides])
        learner, tokenizer, engine = build(cfg)
    train_set, _ = load_task(cfg)
    verifier = make_verifier(cfg.data.task)
    r = cfg.rollout
    out: dict[str, list[float]] = {k: [] for k in ("padded_s", "packed_s", "padded_b", "packed_b", "real", "padded",
                                                   "pad_padded", "pad_packed", "pos_padded", "pos_packed")}
    tally = U.collate if isinstance(U.collate, Tally) else Tally()
    for step in range(1, args.steps + 1):
        problems = prompt_batch(train_set, step, r.prompts_per_step, cfg.trainer.seed)
        with learner.autocast():
            rollouts = engine.generate(prompt_ids(tokenizer, cfg.model.template, problems), n=r.group_size,
                                       temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                       seeds=prompt_keys(cfg.trainer.seed, step, 0, len(problems)))
        grades = verifier(rollouts.texts, [problems[g].answer for g in rollouts.group_ids])
        batch = Batch.of(rollouts, torch.tensor([float(g.correct) for g in grades], device=learner.device))
        before = state(learner)
        order = ("padded", "packed") if step % 2 else ("packed", "padded")
        for k, mode in enumerate(order):
            if k:
                restore(learner, before)
            learner.packing = P.PADDED if mode == "padded" else packed
            tally.tokens = tally.positions = 0
            with measured(learner.device) as m:
                metrics = update(learner, batch, cfg, step)
            out[f"{mode}_s"].append(m["s"])
            out[f"{mode}_b"].append(m["bytes"])
            out[f"pad_{mode}"].append(metrics["train/padded_tokens"])
            out[f"pos_{mode}"].append(tally.positions)
            out["real"].append(tally.tokens) if mode == "padded" else None
        if order[-1] == "padded":  # go on from the packed update's weights
            restore(learner, before)
            learner.packing = packed
            update(learner, batch, cfg, step)
        engine.sync_weights(learner.model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="arith")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["grpo", "popo"])
    parser.add_argument("--max-tokens-per-row", type=int, default=None, help="trainer.max_tokens_per_row (null: longest)")
    parser.add_argument("--auto", action="store_true", help="pack as trainer.packing=null does (only where it wins)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    packed = P.Packing("mask", always=not args.auto, max_tokens_per_row=args.max_tokens_per_row)

    print(f"{args.preset} preset, {args.seeds} seed(s) x {args.steps} steps per method; each step's update run "
          f"padded and packed ({'trainer.packing=null' if args.auto else 'trainer.packing=true'}, mask layout, rows of "
          f"{args.max_tokens_per_row or 'the longest sequence'}) on the same "
          "rollouts from the same weights, alternating order. Ratios packed / padded (< 1: packing cheaper); "
          "medians over steps.")
    print(f"{'method':<8}{'update padded':>15}{'update packed':>15}{'time ratio':>12}{'memory ratio':>14}"
          f"{'real/padded tokens':>20}{'packed/padded positions':>25}")
    for method in args.methods:
        rows: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            for k, v in run(method, seed, args, packed).items():
                rows.setdefault(k, []).extend(v)
        ratio = statistics.median(a / b for a, b in zip(rows["packed_s"], rows["padded_s"]))
        mem = statistics.median(a / max(b, 1) for a, b in zip(rows["packed_b"], rows["padded_b"]))
        print(f"{method:<8}{statistics.median(rows['padded_s']):>14.3f}s{statistics.median(rows['packed_s']):>14.3f}s"
              f"{ratio:>11.2f}x{mem:>13.2f}x{sum(rows['real']) / sum(rows['pos_padded']):>19.2f}x"
              f"{sum(rows['pos_packed']) / sum(rows['pos_padded']):>24.2f}x")
    print("real/padded tokens: sequence tokens over the positions the padded forwards ran (all forwards of the "
          "update); the goal is GRPO's time ratio <= that + 0.1.")


if __name__ == "__main__":
    main()
