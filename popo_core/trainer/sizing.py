"""What a run needs per GPU, before it loads anything: parameters, memory and FLOPs.

Pure arithmetic on the config (no torch, no download): the presets carry their architecture
numbers (model.arch.*). Formulas and their sources are in docs/scaling.md; the parts the tiny
model can show on CPU (parameter count, bytes of weights, AdamW state, momentum copy, activations
saved for backward) are checked against the real model in tests/trainer/test_sizing.py.

Memory is in bytes; GiB = 2**30 bytes, the unit torch and nvidia-smi report.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from popo_core.algo.choices import SPECS, method_name, needs_of
from popo_core.config import Config, ConfigError
from popo_core.trainer.packing import MICRO_BATCH_SIZE

GIB = 2**30
# Mirrors of the tiny builder (popo_core.model.loading, tested equal there), so planning needs no torch:
TINY_VOCAB_SIZE = 101  # 4 special tokens + 97 characters
TINY_INTERMEDIATE_FACTOR = 4  # intermediate_size = 4 * hidden_size, one KV head per head
TINY_MAX_POSITIONS = 4096
HF_GENERATE_BATCH = 512  # HFEngine's batch_size: sequences per `generate` call
# Assumptions (docs/scaling.md says why):
MATH_PROMPT_TOKENS = 512  # prompt length cap for data.task=math (Tina's max_prompt_length)
OVERHEAD_BYTES = 1 * GIB  # CUDA context, cuBLAS/NCCL workspaces, allocator slack per GPU
LORA_HINT_RANK = 32  # the rank the "with LoRA" plan uses when the config has none (Tina's)


@dataclass(frozen=True)
class Arch:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    max_positions: Optional[int] = None
    qkv_bias: bool = True  # Qwen2's; Llama has none

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one decoder layer."""
        h, f, kv = self.hidden, self.intermediate, self.kv_dim
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}

    def layer_params(self) -> int:
        # Qwen2: biases on q, k and v only (Llama: none); two RMSNorm weight vectors per layer.
        linear = sum(i * o for i, o in self.module_shapes().values())
        bias = self.hidden + 2 * self.kv_dim if self.qkv_bias else 0
        return linear + bias + 2 * self.hidden

    def linear_params(self) -> int:
        """Weights that multiply activations in the decoder stack (for FLOPs): no biases or norms."""
        return self.layers * sum(i * o for i, o in self.module_shapes().values())

    def params(self) -> int:
        embed = self.vocab * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return embed + head + self.layers * self.layer_params() + self.hidden  # + final norm

    def lora_params(self, rank: int, targets, modules_to_save=()) -> int:
        shapes = self.module_shapes()
        whole = {"norm": self.hidden, "embed_tokens": self.vocab * self.hidden, "lm_head": self.vocab * self.hidden}
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets) + sum(whole[m] for m in modules_to_save)


def arch_of(cfg: Config) -> Arch:
    """The model's architecture: the tiny builder's, or model.arch.* (ConfigError if incomplete)."""
    m = cfg.model
    if m.name_or_path == "tiny":
        return Arch(m.hidden_size, TINY_INTERMEDIATE_FACTOR * m.hidden_size, m.num_layers, m.num_heads, m.num_heads,
                    TINY_VOCAB_SIZE, m.tie_embeddings, TINY_MAX_POSITIONS)
    a = m.arch
    fields = {"hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size, "num_layers": a.num_layers,
              "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads, "vocab_size": a.vocab_size,
              "tie_embeddings": a.tie_embeddings}
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ConfigError(f"model.arch.{missing[0]} is not set: the plan needs the architecture numbers of "
                          f"{m.name_or_path} (its config.json) as model.arch.* overrides")
    return Arch(a.hidden_size, a.intermediate_size, a.num_layers, a.num_heads, a.num_kv_heads, a.vocab_size,
                a.tie_embeddings, a.max_position_embeddings, a.attention_bias)


def has_arch(cfg: Config) -> bool:
    try:
        arch_of(cfg)
    except ConfigError:
        return False
    return True


def compute_bytes(cfg: Config) -> int:
    """Bytes per element of the weights as loaded and of the forward/backward (auto: bf16 on GPU)."""
    dtype = cfg.model.dtype
    if dtype == "auto":
        return 4 if cfg.trainer.device == "cpu" else 2
    return 4 if dtype == "float32" else 2


def prompt_tokens_of(cfg: Config) -> int:
    """The tiny task's prompts are exact ("3+4=", one token a character); math prompts use a cap."""
    if cfg.data.task == "tiny":
        return 2 * cfg.data.operands
    return MATH_PROMPT_TOKENS


def saved_activation_bytes(arch: Arch, batch: float, prompt: int, completion: int, p: int,
                           checkpointing: bool) -> tuple[int, int]:
    """(bytes the decoder stack saves for backward, bytes the LM head path saves) for one micro-batch
    of `batch` full-length sequences (under a token budget, the budget over a sequence's tokens).

    Counted tensor by tensor for transformers' Qwen2 with SDPA attention (docs/scaling.md): per token
    and layer, p * (6h + 2kv + 4f) for the normed inputs, q, k, v, the attention output and the four
    MLP tensors, plus 8h + 8 + 4 heads bytes that RMSNorm (it upcasts to fp32) and the attention's
    log-sum-exp keep in fp32. With checkpointing only each layer's input (h * p) stays.
    """
    h, kv, f, L = arch.hidden, arch.kv_dim, arch.intermediate, arch.layers
    seq = prompt + completion - 1  # the last completion token predicts nothing: not forwarded
    tokens = batch * seq
    layer = p * (6 * h + 2 * kv + 4 * f) + 4 * (2 * h + 2 + arch.heads)
    stack = tokens * (L * (h * p if checkpointing else layer))
    # Input ids (int64), the final norm (fp32 input, rstd, output), RoPE cos/sin (shared by the batch).
    stack += tokens * (8 + 4 * h + 4 + h * p) + (0 if checkpointing else 2 * seq * arch.head_dim * p)
    # Completion positions only (distinct ones, popo_core/trainer/logprobs.py): the states' index, hidden states
    # into the head, log-softmax (fp32), the tokens' index into it and targets (int64), the mask.
    n = batch * completion
    head = n * (8 + h * p + 4 * arch.vocab + 8 + 8 + 1)
    return int(stack), int(head)


def recompute_layer_bytes(arch: Arch, batch: float, seq: int, p: int) -> int:
    """With checkpointing, backward re-runs one layer at a time and holds its saved tensors."""
    h, kv, f = arch.hidden, arch.kv_dim, arch.intermediate
    return int(batch * seq * (p * (6 * h + 2 * kv + 4 * f) + 4 * (2 * h + 2 + arch.heads)))


@dataclass
class Plan:
    """Memory per GPU (bytes) and FLOPs per rollout step of one config on `world_size` GPUs."""

    preset: str
    world_size: int
    gpu_bytes: int
    lora_rank: int
    params: int
    trainable: int
    prompt_tokens: int
    completion_tokens: int
    micro_batch: float  # full-length sequences a micro-batch holds (under a token budget, a fraction may count)
    checkpointing: bool
    micro_tokens: Optional[int] = None  # trainer.max_tokens_per_micro_batch, when micro-batches are counted in tokens
    memory: dict[str, int] = field(default_factory=dict)  # component -> bytes per GPU at the peak
    activations_other: int = 0  # activations with the other checkpointing setting (shown, not summed)
    train_peak: int = 0
    generate_peak: int = 0
    peak: int = 0
    vllm_kv_bytes: Optional[int] = None  # KV cache left in vLLM's share after its weights
    vllm_weight_bytes: Optional[int] = None  # the engine's own weights on this GPU (1/k with tensor parallel k)
    kv_bytes_per_token: int = 0
    kv_needed_bytes: int = 0  # KV cache for the whole rollout batch at full length at once
    flops: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_bytes and (self.vllm_kv_bytes is None or self.vllm_kv_bytes > 0)

    @property
    def model_flops(self) -> float:
        """FLOPs of the step's useful work (no recomputation): what MFU divides by."""
        return sum(v for k, v in self.flops.items() if k not in ("recompute", "total"))


def uses_reference(algo) -> bool:
    """A frozen reference model, when the method's registered needs ask for one (GRPO with kl_beta > 0)."""
    return method_name(algo) in SPECS and needs_of(algo).reference


def with_lora(cfg: Config, rank: int) -> Config:
    """A copy of cfg with model.lora.rank set (0: full fine-tuning)."""
    lora = dataclasses.replace(cfg.model.lora, rank=rank)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=lora))


def plan(cfg: Config, world_size: int = 1, *, gpu_memory_gib: float = 80.0,
         prompt_tokens: Optional[int] = None) -> Plan:
    """Memory per GPU and FLOPs per step, FSDP-style over `world_size` GPUs: weights, master
    weights, gradients, optimizer states, the momentum copy and a frozen reference are divided by
    world_size; activations, logits, generation and vLLM's share are per GPU as they are."""
    if world_size < 1:
        raise ConfigError(f"world size {world_size}: must be >= 1")
    arch = arch_of(cfg)
    a, r, t, lora = cfg.algo, cfg.rollout, cfg.trainer, cfg.model.lora
    p = compute_bytes(cfg)
    n_params = arch.params()
    n_lora = arch.lora_params(lora.rank, lora.targets, lora.modules_to_save) if lora.rank else 0
    predictor = (4 * arch.hidden**2 + 3 * arch.hidden) if a.siamese and a.predictor else 0  # Linear(h,2h), Linear(2h,h)
    policy_trainable = n_lora if lora.rank else n_params
    trainable = policy_trainable + predictor
    prompt = prompt_tokens if prompt_tokens is not None else prompt_tokens_of(cfg)
    completion, seq = r.max_new_tokens, prompt + r.max_new_tokens
    completions = r.prompts_per_step * r.group_size
    if t.max_tokens_per_micro_batch is not None:
        # By tokens: the budget holds this many full-length sequences (prompt + completion - 1 each),
        # activations scale with the tokens, and the LM head's share is at most that of full ones.
        micro = min(t.max_tokens_per_micro_batch / (seq - 1), completions)
    else:
        micro = min(t.micro_batch_size or MICRO_BATCH_SIZE, completions)
    ckpt = cfg.model.gradient_checkpointing
    N = world_size
    out = Plan(cfg.preset, N, int(gpu_memory_gib * GIB), lora.rank, n_params, trainable, prompt, completion, micro, ckpt,
               micro_tokens=t.max_tokens_per_micro_batch)

    # Model state (sharded). Trainable parameters are kept in fp32 (master weights) when the
    # weights are 16-bit; LoRA adapters are fp32 (peft's default for a 16-bit base).
    mem = out.memory
    mem["weights"] = n_params * p // N
    mem["master weights (fp32)"] = (trainable * 4 if (lora.rank or p == 2) else predictor * 4) // N
    mem["gradients (fp32)"] = trainable * 4 // N
    mem["AdamW states (fp32)"] = trainable * 8 // N
    # Section 2: the momentum copy of what is trained (the adapter only, with LoRA), in fp32.
    mem["momentum network (fp32)"] = (policy_trainable * 4 if a.siamese else 0) // N
    # GRPO's frozen reference; with LoRA it is the base with adapters disabled (no memory).
    needs_reference = uses_reference(a)
    mem["reference"] = (n_params * p if needs_reference and not lora.rank else 0) // N

    # Training phase, per GPU.
    stack, head = saved_activation_bytes(arch, micro, prompt, completion, p, ckpt)
    other, _ = saved_activation_bytes(arch, micro, prompt, completion, p, not ckpt)
    recompute = recompute_layer_bytes(arch, micro, seq, p) if ckpt else 0
    mem["activations"] = stack + recompute
    out.activations_other = other + (0 if ckpt else recompute_layer_bytes(arch, micro, seq, p))
    # The head's fp32 logits: log-softmax saved (in `head`), plus at the backward peak the fp32
    # gradients of the logits and of the log-softmax (8 bytes a logit).
    n_logits = int(micro * completion * arch.vocab)
    mem["LM-head logits"] = head + 8 * n_logits
    largest_unit = max(arch.layer_params(), arch.vocab * arch.hidden)
    mem["FSDP all-gather buffer"] = 2 * largest_unit * p if N > 1 else 0  # the unit in use and the next

    # Rollouts.
    out.kv_bytes_per_token = 2 * arch.layers * arch.kv_dim * p  # K and V of every layer
    out.kv_needed_bytes = completions * seq * out.kv_bytes_per_token
    if r.engine == "vllm":
        # Colocated: one engine per GPU (per k GPUs with rollout.tensor_parallel_size=k), inside its
        # share: its weights (1/k of them) first, the KV cache in what is left.
        share = int(r.gpu_memory_utilization * out.gpu_bytes)
        mem["vLLM (gpu_memory_utilization share)"] = share
        out.vllm_weight_bytes = n_params * p // r.tensor_parallel_size
        out.vllm_kv_bytes = share - out.vllm_weight_bytes
        # A push gathers one layer at a time from the fp32 shards while vLLM loads it (rollout/colocate.py).
        mem["vLLM weight push (one layer, fp32)"] = 4 * largest_unit if N > 1 else 0
        mem["HF generate KV cache"] = 0
    else:
        batch = min(completions, HF_GENERATE_BATCH)
        # KV cache of one generate call at full length, plus the fp32 scores and log-softmax of a step.
        mem["HF generate KV cache"] = batch * seq * out.kv_bytes_per_token + 2 * batch * arch.vocab * 4
    mem["CUDA context and workspace"] = OVERHEAD_BYTES

    push = mem.get("vLLM weight push (one layer, fp32)", 0)
    persistent = sum(v for k, v in mem.items() if k not in
                     ("gradients (fp32)", "activations", "LM-head logits", "FSDP all-gather buffer", "HF generate KV cache",
                      "vLLM weight push (one layer, fp32)"))
    out.train_peak = persistent + mem["gradients (fp32)"] + mem["activations"] + mem["LM-head logits"] \
        + mem["FSDP all-gather buffer"]
    out.generate_peak = persistent + mem["HF generate KV cache"] + max(mem["FSDP all-gather buffer"], push)
    out.peak = max(out.train_peak, out.generate_peak)
    out.flops = step_flops(cfg, arch, prompt)
    _add_notes(out, cfg, arch, seq)
    return out


def step_flops(cfg: Config, arch: Arch, prompt: int) -> dict[str, float]:
    """FLOPs of one rollout step over the whole batch (all GPUs together), at full length.

    2 FLOPs per multiply-add: a forward costs 2 * linear params per token, causal attention
    2 * layers * hidden * S^2 per sequence (QK^T and AV, half the square), and the LM head
    2 * vocab * hidden per completion token only. Backward is 2x forward with full fine-tuning
    and ~1x with LoRA (input gradients only; the adapters' own weight gradients are counted).
    """
    a, r, lora = cfg.algo, cfg.rollout, cfg.model.lora
    h, L, V = arch.hidden, arch.layers, arch.vocab
    lin = arch.linear_params()
    P, T = prompt, r.max_new_tokens
    S = P + T
    C = r.prompts_per_step * r.group_size
    n_lora = arch.lora_params(lora.rank, lora.targets, lora.modules_to_save) if lora.rank else 0

    def stack(tokens_in: int, context: float) -> float:
        # The sampler gets merged weights, so generation does not pay for the adapters.
        return 2 * lin * tokens_in + 4 * L * h * tokens_in * context

    head = 2 * V * h * T
    seq_stack = 2 * (lin + n_lora) * S + 2 * L * h * S * S
    seq_forward = seq_stack + head
    # Generation: prefill of the prompt, then T decode steps attending to P + t positions.
    gen = C * (stack(P, P / 2) + stack(T, P + T / 2) + head)
    # Forward/backward over every completion (an upper bound: POPO forwards only the positives).
    forwarded = C * a.epochs
    backward_factor = 1.0 if lora.rank else 2.0
    train = forwarded * seq_forward * (1 + backward_factor)
    if lora.rank:
        train += forwarded * 2 * 2 * n_lora * S  # the adapters' weight gradients
    flops = {"generation": gen, "train forward+backward": train}
    flops["recompute"] = forwarded * seq_stack if cfg.model.gradient_checkpointing else 0.0
    # pi_old is recomputed when a batch feeds more than one optimizer step.
    flops["pi_old log-probs"] = C * seq_forward if a.epochs * a.mini_batches > 1 else 0.0
    # Section 3: the momentum network's forward for the penalty (hidden states; logits for KL).
    penalty = a.siamese and a.penalty_weight > 0
    flops["momentum forward"] = forwarded * (seq_stack + (head if a.penalty == "kl" else 0)) if penalty else 0.0
    flops["reference forward"] = C * seq_forward if uses_reference(a) else 0.0
    flops["total"] = sum(flops.values())
    return flops


def _add_notes(out: Plan, cfg: Config, arch: Arch, seq: int) -> None:
    if arch.max_positions and seq > arch.max_positions:
        out.notes.append(f"prompt + rollout.max_new_tokens = {seq} exceeds the model's context of {arch.max_positions}")
    if out.vllm_kv_bytes is not None and out.vllm_kv_bytes <= 0:
        out.notes.append("rollout.gpu_memory_utilization leaves vLLM no room for its KV cache after its weights")
    elif out.vllm_kv_bytes is not None:
        seqs = out.vllm_kv_bytes // (seq * out.kv_bytes_per_token)
        k = cfg.rollout.tensor_parallel_size
        engines = max(out.world_size // k, 1)
        where = f"each of the {engines} engines (one per {'GPU' if k == 1 else f'{k} GPUs'})" if out.world_size > 1 \
            else "vLLM"
        out.notes.append(f"{where}: weights {out.vllm_weight_bytes / GIB:.2f} GiB and KV cache "
                         f"{out.vllm_kv_bytes / GIB:.2f} GiB per GPU, about {seqs * k} full-length sequences at once "
                         f"(the rollout batch is {cfg.rollout.prompts_per_step * cfg.rollout.group_size}, "
                         f"{-(-cfg.rollout.prompts_per_step * cfg.rollout.group_size // engines)} per engine; vLLM queues the rest)")


def recommended_commands(cfg: Config, gpu_memory_gib: float, *, prompt_tokens: Optional[int] = None) -> list[str]:
    """The commands the plan recommends: full fine-tuning on the smallest power of two of GPUs that
    fits (torchrun, FSDP2, one colocated vLLM engine per GPU), and LoRA on one GPU when it fits
    there (LoRA is not supported under FSDP). Not yet run on a GPU (docs/scaling.md)."""
    lines = []
    full = min_gpus(with_lora(cfg, 0), gpu_memory_gib, prompt_tokens=prompt_tokens)
    if full:
        n = 1 << (full - 1).bit_length()
        launch = f"torchrun --nproc-per-node {n} -m popo_cli train" if n > 1 else "popo train"
        lines.append(f"full fine-tuning on {n} x {gpu_memory_gib:.0f} GiB GPU{'s' if n > 1 else ''}: {launch} {cfg.preset}")
    rank = cfg.model.lora.rank or LORA_HINT_RANK
    if plan(with_lora(cfg, rank), 1, gpu_memory_gib=gpu_memory_gib, prompt_tokens=prompt_tokens).fits:
        lines.append(f"LoRA on 1 x {gpu_memory_gib:.0f} GiB GPU: popo train {cfg.preset} model.lora.rank={rank}")
    return lines


def min_gpus(cfg: Config, gpu_memory_gib: float, *, max_gpus: int = 512, prompt_tokens: Optional[int] = None) -> Optional[int]:
    """The smallest world size whose plan fits GPUs of this memory (None: none up to max_gpus)."""
    for n in range(1, max_gpus + 1):
        if plan(cfg, n, gpu_memory_gib=gpu_memory_gib, prompt_tokens=prompt_tokens).fits:
            return n
    return None


@dataclass
class Fit:
    """One line's worth: does the config fit, and if not what would."""

    fits: bool
    needed_gib: float
    gpus_full: Optional[int]
    gpus_lora: Optional[int]
    lora_rank: int

    def message(self, preset: str, gpu_memory_gib: float) -> str:
        what = f"{preset} needs {self.needed_gib:.0f} GiB per GPU and does not fit {gpu_memory_gib:.0f} GiB GPUs"
        hints = []
        if self.gpus_full:
            hints.append(f"it fits {self.gpus_full} GPUs sharded (torchrun --nproc-per-node {self.gpus_full} -m popo_cli train ...)")
        if self.gpus_lora == 1:
            hints.append(f"or one GPU with model.lora.rank={self.lora_rank}")
        elif self.gpus_lora:
            hints.append(f"or {self.gpus_lora} GPUs with model.lora.rank={self.lora_rank}")
        if not hints:
            hints.append("lower trainer.micro_batch_size (or trainer.max_tokens_per_micro_batch) or rollout.max_new_tokens, "
                         "or set model.gradient_checkpointing=true")
        return f"{what}: {', '.join(hints)} (details: --dry-run)"


def check_fit(cfg: Config, gpu_memory_gib: float, world_size: int = 1) -> Fit:
    """The pre-flight check of `popo train`: the plan on `world_size` GPUs and what would fit."""
    current = plan(cfg, world_size, gpu_memory_gib=gpu_memory_gib)
    rank = cfg.model.lora.rank or LORA_HINT_RANK
    full_cfg, lora_cfg = with_lora(cfg, 0), with_lora(cfg, rank)
    return Fit(current.fits, current.peak / GIB, min_gpus(full_cfg, gpu_memory_gib), min_gpus(lora_cfg, gpu_memory_gib),
               rank)
