"""vLLM's sampled log-probs against the trainer's recomputation, and the engine's start time.

Tiny model, float32, prompts of 1 to 3 KV blocks, 16-token completions at temperature 0.8, four
weight pushes. Prints the max |difference| with the prefix-cache reset, with it removed, and with
the trainer's special-token suppression removed. Needs the vLLM environment (make setup-vllm):

    .venv-vllm/bin/python benchmarks/vllm_agreement.py
"""

from __future__ import annotations

import time

import torch

from popo_core.config import ModelConfig
from popo_core.model.loading import load_model_and_tokenizer
from popo_core.trainer.logprobs import collate, completion_forward

TEMPERATURE = 0.8


def gap(model, out, suppress) -> float:
    seqs = collate(out.prompt_ids, out.completion_ids, 0, "cpu")
    with torch.no_grad():
        lp, _ = completion_forward(model, seqs, temperature=TEMPERATURE, suppress_ids=suppress)
    return max(abs(float(lp[i, j]) - out.logprobs[i][j]) for i in range(len(out)) for j in range(len(out.completion_ids[i])))


def run(reset: bool) -> tuple[list[float], list[float], float]:
    from popo_core.rollout.vllm import VLLMEngine

    model, tok = load_model_and_tokenizer(ModelConfig(), device=torch.device("cpu"))
    start = time.perf_counter()
    engine = VLLMEngine(model, tok)
    started = time.perf_counter() - start
    if not reset:
        engine.llm.reset_prefix_cache = lambda *a, **k: True
    prompts = [tok("12+7=19; " * 40).input_ids, tok("3+4=7\n" * 50).input_ids, tok("9+9=").input_ids]
    gaps, unsuppressed = [], []
    gen = torch.Generator().manual_seed(0)
    for round_ in range(4):
        if round_:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
            engine.sync_weights(model)
        out = engine.generate(prompts, n=4, temperature=TEMPERATURE, max_new_tokens=16)
        gaps.append(gap(model, out, engine.suppress))
        unsuppressed.append(gap(model, out, []))
    return gaps, unsuppressed, started


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    import vllm  # noqa: F401

    imported = time.perf_counter() - t0
    gaps, unsuppressed, first = run(reset=True)
    stale, _, second = run(reset=False)
    fmt = lambda xs: ", ".join(f"{x:.1e}" for x in xs)  # noqa: E731
    print(f"import vllm {imported:.1f} s; engine start {first:.1f} s (first), {second:.1f} s (second in the process)")
    print(f"max |vLLM - trainer| per push (4 pushes): {fmt(gaps)}")
    print(f"  prefix-cache reset removed:             {fmt(stale)}")
    print(f"  trainer's suppression removed:          {fmt(unsuppressed)}")


if __name__ == "__main__":
    main()
