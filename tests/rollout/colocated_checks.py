"""Run by tests/rollout/test_colocated.py under `torchrun --nproc-per-node 2`: real vLLM engines
colocated with an FSDP2-sharded tiny policy, one per rank. Each rank writes report-RANK.json with
what it measured; the test asserts on them. The last rounds take one behaviour out each (the
per-tensor streaming of a push, the prefix-cache reset) and measure again: the counter-checks.
"""

import copy
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: conftest
from test_vllm_engine import TEMPERATURE, long_prompts, max_gap, perturb_, tiny_model  # noqa: E402

from popo_core.rollout import colocate  # noqa: E402
from popo_core.rollout.sharded import ShardedEngine  # noqa: E402
from popo_core.rollout.vllm import VLLMEngine, WeightPushError  # noqa: E402
from popo_core.trainer import distributed  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    ranks, _ = distributed.from_env("cpu")
    model, tok = tiny_model()
    ref = copy.deepcopy(model)  # the trainer's policy, whole: what the engine must sample from
    engine = ShardedEngine(VLLMEngine(model, tok, colocated=True), ranks)
    distributed.shard(model, torch.float32)
    report: dict = {"rank": ranks.rank}
    prompts = long_prompts(tok)  # multi-block prompts: prefix caching holds their blocks
    gaps = []
    for round_ in range(3):
        engine.sync_weights(model)
        stats = engine.inner.push_stats
        report.setdefault("peak_bytes", []).append(stats.peak_bytes)
        report["total_bytes"] = stats.total_bytes
        out = engine.generate(prompts, n=2, temperature=TEMPERATURE, max_new_tokens=8, seeds=[5, 6, 7])
        gaps.append(max_gap(ref, out, engine.suppress))
        perturb_(ref, round_ + 1)
        set_full_state(model, ref)
    report["gaps"] = gaps
    sizes = {k: t.numel() * t.element_size() for k, t in ref.state_dict().items()}
    layers = {}
    for k, size in sizes.items():
        unit = k.split(".")[2] if k.startswith("model.layers.") else k
        layers[unit] = layers.get(unit, 0) + size
    report["largest_layer_bytes"] = max(layers.values())  # a decoder layer, or a tensor outside them

    # Counter-check 1: every tensor gathered before the push (a whole copy at once).
    real, real_full = colocate.gathered, distributed.full

    def whole_first(named, stats):
        named = list(named)
        with torch.no_grad():
            held = {id(t): real_full(t) for _, t in named}  # gathered before vLLM loads the first
        distributed.full = lambda t: held[id(t)]
        try:
            yield from real(named, stats)
        finally:
            distributed.full = real_full

    colocate.gathered = whole_first
    engine.sync_weights(model)
    report["peak_bytes_stream_removed"] = engine.inner.push_stats.peak_bytes
    colocate.gathered = real
    # Counter-check 2: no prefix-cache reset (the prompts' blocks are cached from the last round).
    engine.generate(prompts, n=2, temperature=TEMPERATURE, max_new_tokens=8, seeds=[5, 6, 7])
    perturb_(ref, 9)
    set_full_state(model, ref)
    reset, engine.inner.llm.reset_prefix_cache = engine.inner.llm.reset_prefix_cache, lambda *a, **k: True
    engine.sync_weights(model)
    out = engine.generate(prompts, n=2, temperature=TEMPERATURE, max_new_tokens=8, seeds=[5, 6, 7])
    report["gap_reset_removed"] = max_gap(ref, out, engine.suppress)
    engine.inner.llm.reset_prefix_cache = reset

    # A push that fails on rank 1 only fails on both.
    if ranks.rank == 1:
        def broken(*a, **k):
            raise RuntimeError("worker died")
        engine.inner.llm.collective_rpc, kept = broken, engine.inner.llm.collective_rpc
    try:
        engine.sync_weights(model)
        report["failed_push"] = None
    except WeightPushError as err:
        report["failed_push"] = str(err)
    if ranks.rank == 1:
        engine.inner.llm.collective_rpc = kept
    # The next generation pushes again on every rank before sampling.
    out = engine.generate(prompts, n=2, temperature=TEMPERATURE, max_new_tokens=8, seeds=[5, 6, 7])
    report["gap_after_failure"] = max_gap(ref, out, engine.suppress)

    # Teardown: the engine goes, the trainer's group stays usable and is destroyed by its owner.
    engine.close()
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    report["after_close_sum"] = t.item()
    dist.destroy_process_group()
    report["destroyed"] = not dist.is_initialized()
    with open(f"report-{ranks.rank}.json", "w") as f:  # in the working directory (the test's tmp_path)
        json.dump(report, f)


def set_full_state(sharded, whole) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(sharded, whole.state_dict(), options=StateDictOptions(full_state_dict=True))


if __name__ == "__main__":
    main()
