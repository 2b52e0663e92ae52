"""`popo train PRESET --dry-run`: the resolved config and the memory/FLOPs plan, rendered with rich."""

from __future__ import annotations

from typing import Optional

from popo_cli.common import console, fail

DEFAULT_GPU_GIB = 80.0


def detected_gpu_gib(device: str = "auto") -> Optional[float]:
    """Memory of the GPU the run would use, when torch sees one (None on a CPU machine)."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    from popo_core.trainer.sizing import GIB

    return torch.cuda.get_device_properties(index).total_memory / GIB


def _gib(x: float) -> str:
    from popo_core.trainer.sizing import GIB

    return f"{x / GIB:,.2f}"


def _flops(x: float) -> str:
    return f"{x:.3g}" if x else "0"


def render(cfg, *, gpu_memory: Optional[float], world_size: int, prompt_tokens: Optional[int]) -> None:
    """Print the resolved config, the plan per GPU (this config and its full/LoRA twin) and FLOPs."""
    from rich.table import Table

    from popo_core.config import to_yaml
    from popo_core.trainer.sizing import LORA_HINT_RANK, arch_of, compute_bytes, min_gpus, plan, with_lora

    console.rule(f"[bold]{cfg.preset}[/]: resolved config")
    console.print(to_yaml(cfg), markup=False, end="")
    if gpu_memory is None:
        detected = detected_gpu_gib(cfg.trainer.device)
        gib, source = (detected, "the detected GPU") if detected else (DEFAULT_GPU_GIB, "given size (no GPU detected; --gpu-memory to change)")
    else:
        gib, source = gpu_memory, "--gpu-memory"
    arch = arch_of(cfg)
    rank = cfg.model.lora.rank
    twin_rank = 0 if rank else LORA_HINT_RANK
    this = plan(cfg, world_size, gpu_memory_gib=gib, prompt_tokens=prompt_tokens)
    twin = plan(with_lora(cfg, twin_rank), world_size, gpu_memory_gib=gib, prompt_tokens=prompt_tokens)
    label = lambda r: f"LoRA r={r}" if r else "full fine-tuning"  # noqa: E731

    console.rule(f"[bold]plan per GPU[/]: {world_size} x {gib:.1f} GiB ({source})")
    console.print(
        f"{'Qwen2' if arch.qkv_bias else 'Llama'} {arch.layers} layers, hidden {arch.hidden}, MLP {arch.intermediate}, {arch.heads} heads / "
        f"{arch.kv_heads} KV heads, vocab {arch.vocab}, {'tied' if arch.tied else 'untied'} embeddings. "
        f"Micro-batch {_micro(this)} of {this.prompt_tokens} prompt + {this.completion_tokens} "
        f"completion tokens{' (prompt length assumed; --prompt-tokens)' if cfg.data.task != 'tiny' else ''}; "
        f"{'16-bit' if compute_bytes(cfg) == 2 else 'fp32'} weights and activations; "
        f"sharded FSDP-style over {world_size} GPU(s). Formulas: docs/scaling.md.",
        markup=False,
    )
    table = Table(show_edge=False)
    table.add_column("GiB per GPU")
    table.add_column(f"this config ({label(rank)})", justify="right")
    table.add_column(label(twin_rank), justify="right")
    table.add_row("parameters", f"{this.params:,}", f"{twin.params:,}")
    table.add_row("trainable", f"{this.trainable:,}", f"{twin.trainable:,}")
    for key in this.memory:
        table.add_row(key, _gib(this.memory[key]), _gib(twin.memory[key]))
    ck = "with" if this.checkpointing else "without"
    other = "without" if this.checkpointing else "with"
    table.add_row(f"  (activations {other} checkpointing)", _gib(this.activations_other), _gib(twin.activations_other))
    table.add_row("peak: training phase", _gib(this.train_peak), _gib(twin.train_peak))
    table.add_row("peak: generation phase", _gib(this.generate_peak), _gib(twin.generate_peak))
    table.add_row("[bold]fits[/]", "yes" if this.fits else "[red]no[/]", "yes" if twin.fits else "[red]no[/]")
    console.print(table)
    console.print(f"activations are {ck} gradient checkpointing (model.gradient_checkpointing={this.checkpointing}).",
                  markup=False)

    flops = Table(show_edge=False, title="FLOPs per rollout step, all GPUs (full length; every completion forwarded)")
    flops.add_column("phase")
    flops.add_column(label(rank), justify="right")
    flops.add_column(label(twin_rank), justify="right")
    for key in this.flops:
        flops.add_row(key, _flops(this.flops[key]), _flops(twin.flops[key]))
    console.print(flops)

    full_cfg, lora_cfg = (cfg, with_lora(cfg, twin_rank)) if not rank else (with_lora(cfg, 0), cfg)
    n_full = min_gpus(full_cfg, gib, prompt_tokens=prompt_tokens)
    n_lora = min_gpus(lora_cfg, gib, prompt_tokens=prompt_tokens)
    say = lambda n: f"{n}" if n else "none up to 512"  # noqa: E731
    console.print(f"smallest number of {gib:.0f} GiB GPUs that fits: full fine-tuning {say(n_full)}, "
                  f"{label(lora_cfg.model.lora.rank)} {say(n_lora)} (more than 1: torchrun, FSDP2)",
                  markup=False)
    for note in this.notes:
        console.print(f"note: {note}", markup=False)
    from popo_core.trainer.sizing import recommended_commands

    for line in recommended_commands(cfg, gib, prompt_tokens=prompt_tokens):
        console.print(f"recommended ({'not yet run on a GPU' if cfg.model.name_or_path != 'tiny' else 'tiny'}): {line}",
                      markup=False)


def preflight(cfg, gpu_memory: Optional[float], world_size: int = 1) -> None:
    """Before loading anything: stop with one line when the run cannot fit its GPU (not on CPU)."""
    from popo_core.trainer.sizing import check_fit, has_arch

    device = cfg.trainer.device
    if device == "cpu" or not has_arch(cfg):
        return
    detected = detected_gpu_gib(device)
    if device == "auto" and detected is None:  # no GPU: the run goes to the CPU
        return
    gib = gpu_memory if gpu_memory is not None else detected
    if gib is None:  # trainer.device=cuda without a GPU: the trainer says so
        return
    fit = check_fit(cfg, gib, world_size)
    if not fit.fits:
        fail(fit.message(cfg.preset, gib))


def _micro(plan) -> str:
    if plan.micro_tokens is None:
        return f"{plan.micro_batch:g} completions"
    return f"{plan.micro_tokens:,} tokens (trainer.max_tokens_per_micro_batch: {plan.micro_batch:.2f} completions)"
