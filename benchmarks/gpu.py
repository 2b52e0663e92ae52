"""GPU benchmark: training-step model FLOPs utilisation (MFU) of POPO and GRPO, full and LoRA,
HF rollout tokens per second, and peak memory of POPO against GRPO at equal settings.

Random-init models from configs (no download); imports only torch, transformers, peft and popo
modules that need nothing else (no hydra, mlflow, optuna or vLLM), so it runs on a bare GPU machine.
Each variant runs the trainer's own optimizer step (popo_core.trainer.update.optimizer_step) on a
synthetic rollout batch, half of it positive. Prints absolute numbers and ratios, and appends them
with the exact command to benchmarks/RESULTS.md.

    python benchmarks/gpu.py                      # Qwen2.5-1.5B-sized, bf16, on the GPU (< 5 min on an H200)
    python benchmarks/gpu.py --size tiny          # the CPU smoke run CI keeps working
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from popo_core.config import AlgoConfig, Config, LoraConfig, resolve  # noqa: E402  (dataclasses only: no hydra)
from popo_core.model.lora import add_lora  # noqa: E402
from popo_core.trainer.companions import momentum_network, reference_network  # noqa: E402
from popo_core.algo.objective import build_objective  # noqa: E402
from popo_core.rollout import Rollouts  # noqa: E402
from popo_core.trainer.update import Batch, Learner, StepInputs, optimizer_step  # noqa: E402

SIZES = {
    # Qwen2.5-1.5B's config.json (hidden 1536, 28 layers, intermediate 8960, 12 heads, 2 KV heads,
    # vocab 151936, tied embeddings): see experiments/model/qwen-math-1.5b.yaml for the source.
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=256, num_attention_heads=2,
                 num_key_value_heads=2, vocab_size=101, tie_word_embeddings=True),
}
VARIANTS = [("popo", 0), ("grpo", 0), ("popo", 32), ("grpo", 32)]  # (method, LoRA rank)


def build_model(size: str, dtype: torch.dtype, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SIZES[size], max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        return Qwen2ForCausalLM(config).to(dtype)


def synthetic_batch(args, vocab: int, device: torch.device) -> Batch:
    gen = torch.Generator().manual_seed(0)
    n = args.prompts * args.group
    prompts = torch.randint(10, vocab, (args.prompts, args.prompt), generator=gen).tolist()
    completions = torch.randint(10, vocab, (n, args.completion), generator=gen).tolist()
    rewards = torch.tensor([float(i % 2) for i in range(n)], device=device)  # half positive, every group mixed
    rollouts = Rollouts([prompts[i // args.group] for i in range(n)], completions, [""] * n,
                        [i // args.group for i in range(n)], [True] * n)
    return Batch.of(rollouts, rewards)


def learner_for(method: str, rank: int, args, device, compute_dtype):
    cfg = Config()
    cfg.algo = AlgoConfig(name=method, siamese=method == "popo", kl_beta=0.0)
    cfg.trainer.micro_batch_size = args.micro_batch
    cfg.rollout.max_new_tokens = args.completion
    cfg = resolve(cfg)  # the keys compose fills in (algo.rollout_correction, algo.max_length)
    lora = rank > 0
    model = build_model(args.size, compute_dtype if lora else torch.float32, device)  # fp32 masters when full
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        model = add_lora(model, LoraConfig(rank=rank, alpha=2 * rank, dropout=0.0))
    model.train()
    objective = build_objective(cfg.algo, group_size=args.group)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    learner = Learner(model=model, optimizer=optimizer, scheduler=scheduler, params=params, objective=objective,
                      pad_id=0, suppress=[], temperature=1.0, total_updates=1000, compute_dtype=compute_dtype,
                      momentum=momentum_network(model) if objective.siamese else None,
                      reference=reference_network(model, compute_dtype) if objective.needs.reference else None)
    return cfg, learner


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(method, rank, args, device, compute_dtype) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg, learner = learner_for(method, rank, args, device, compute_dtype)
    batch = synthetic_batch(args, learner.model.config.vocab_size, device)
    n_base = sum(p.numel() for n, p in learner.model.named_parameters() if "lora_" not in n)
    n_trainable = sum(p.numel() for p in learner.params)
    inputs = StepInputs(torch.arange(len(batch), device=device), None, None)
    optimizer_step(learner, batch, inputs, cfg)  # warm-up (allocations, kernels)
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        optimizer_step(learner, batch, inputs, cfg)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
    forwarded = int(learner.objective.forwarded(batch.rewards).sum())
    tokens = forwarded * (args.prompt + args.completion)
    # Model FLOPs (Kaplan/PaLM): forward 2 N per token, backward 2 N (activation gradients) plus
    # 2 N_trainable (weight gradients); attention adds 4 L h S per token forward, twice that back.
    L, h = learner.model.config.num_hidden_layers, learner.model.config.hidden_size
    S = args.prompt + args.completion
    flops = tokens * (4 * n_base + 2 * n_trainable + 12 * L * h * S)
    if learner.momentum is not None:
        flops += forwarded * S * (2 * n_base + 4 * L * h * S)  # the momentum network's forward
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    out = {"method": method, "lora_rank": rank, "step_s": seconds, "tokens_through_backward": tokens,
           "model_tflops_per_s": flops / seconds / 1e12, "peak_gib": peak, "params": n_base,
           "trainable": n_trainable}
    del learner, batch
    gc.collect()
    return out


def rollout_speed(args, device, compute_dtype) -> dict:
    model = build_model(args.size, compute_dtype, device).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, model.config.vocab_size, (args.prompts * args.group, args.prompt), generator=gen).to(device)
    with torch.no_grad():
        model.generate(prompts[:2], max_new_tokens=4, min_new_tokens=4, do_sample=True)
        sync(device)
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.completion,
                             min_new_tokens=args.completion, do_sample=True, pad_token_id=0)
        sync(device)
    seconds = time.perf_counter() - start
    new = (out.shape[1] - prompts.shape[1]) * out.shape[0]
    del model
    gc.collect()
    return {"rollout_tokens_per_s": new / seconds, "rollout_s": seconds, "rollout_tokens": new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="1.5b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=512, help="completion tokens")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    if args.size == "tiny":
        args.prompt, args.completion, args.prompts, args.group, args.steps = min(args.prompt, 16), min(args.completion, 8), 4, 4, 2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = torch.bfloat16 if device.type == "cuda" or args.size == "tiny" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)
    rows = [time_steps(m, r, args, device, compute_dtype) for m, r in VARIANTS]
    rollout = rollout_speed(args, device, compute_dtype)

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    lines = [f"### gpu.py, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, torch {torch.__version__}",
             "", f"`{' '.join(shlex.quote(a) for a in ['python', 'benchmarks/gpu.py', *sys.argv[1:]])}`", "",
             f"size {args.size}, {args.prompts} prompts x {args.group}, prompt {args.prompt} + completion {args.completion} "
             f"tokens, micro-batch {args.micro_batch}, {compute_dtype} compute, checkpointing {args.checkpointing}", "",
             "| method | LoRA rank | step (s) | tokens through backward | model TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = r["model_tflops_per_s"] / args.peak_tflops if device.type == "cuda" else float("nan")
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {r['method']} | {r['lora_rank']} | {r['step_s']:.3f} | {r['tokens_through_backward']} | "
                     f"{r['model_tflops_per_s']:.3g} | {mfu:.1%} | {peak} |")
    by = {(r["method"], r["lora_rank"]): r for r in rows}
    lines.append("")
    for rank in (0, 32):
        p, g = by[("popo", rank)], by[("grpo", rank)]
        mem = (f", peak memory POPO/GRPO {p['peak_gib'] / g['peak_gib']:.2f}x" if p["peak_gib"] else "")
        lines.append(f"- {'LoRA' if rank else 'full'}: step time POPO/GRPO {p['step_s'] / g['step_s']:.2f}x"
                     f" (POPO forwards only the positives, half the batch, plus the momentum forward){mem}")
    lines.append(f"- HF rollout: {rollout['rollout_tokens_per_s']:.0f} tokens/s ({rollout['rollout_tokens']} tokens)")
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps({"rows": rows, "rollout": rollout}, indent=1))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(("" if results.stat().st_size else "# Benchmark results\n\n") + text + "\n")


if __name__ == "__main__":
    main()
