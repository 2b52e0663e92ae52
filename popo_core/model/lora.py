"""LoRA adapters through peft: wrapping a model, one adapter's parameters, switching adapters, and
the policy's weights with its adapter merged (what a separate sampler loads)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

POLICY, MOMENTUM = "default", "momentum"  # peft adapter names


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# --------------------------------------------------------------------------------------- LoRA
def add_lora(model, lora_cfg):
    """Wrap `model` in a peft LoRA adapter (`model.lora.*`); the base is frozen, the adapter fp32."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.targets), modules_to_save=list(lora_cfg.modules_to_save) or None,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config, adapter_name=POLICY, autocast_adapter_dtype=True)


def adapter_params(model, adapter: str) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of one adapter's LoRA A and B matrices (and its copies of the
    modules_to_save), in a fixed order."""
    tag = f".{adapter}."
    return [(n, p) for n, p in model.named_parameters()
            if ("lora_A" in n or "lora_B" in n or ".modules_to_save." in n) and tag in n]


@contextlib.contextmanager
def adapter(model, name: str) -> Iterator:
    """Run `model` with adapter `name` active; the policy's adapter is active again on exit, so a
    checkpointed backward recomputes with the policy's weights."""
    model.set_adapter(name)
    try:
        yield model
    finally:
        model.set_adapter(POLICY)


def merged_state_dict(model) -> dict[str, Tensor]:
    """The policy's weights with its LoRA adapter merged (W + scale * B A), under the base model's
    own names: what a separate sampler (vLLM) loads. The model itself is left unmerged."""
    if not is_peft(model):
        return dict(model.state_dict())
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged: dict[str, Tensor] = {}
    lora_modules = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for name, module in lora_modules.items():
            w = module.get_base_layer().weight
            merged[f"{name}.weight"] = (w + module.get_delta_weight(POLICY).to(w.dtype)).detach()
        for key, value in base.state_dict().items():
            if "lora_" in key or ".original_module." in key:
                continue
            if ".modules_to_save." in key:  # trained whole: the policy's copy replaces the module
                if f".modules_to_save.{POLICY}." not in key:
                    continue
                key = key.replace(f".modules_to_save.{POLICY}.", ".")
                merged[key] = value
                continue
            clean = key.replace(".base_layer.", ".")
            merged.setdefault(clean, value)
    return merged
