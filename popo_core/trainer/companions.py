"""The policy's companions and its precision: the momentum network, the frozen reference, LoRA
adapters through peft, and fp32 master weights under bf16 compute.

Each companion is used the same way whatever holds it: `with net.active() as module:` yields a
module to run forward (no gradient), `update_(policy, m)` averages it toward the policy (METHOD.md
section 2), `state_dict()`/`load_state_dict()` checkpoint it. A full copy holds its own weights; with
LoRA the momentum network is a second adapter on the policy's frozen base (its A and B each
averaged), and the reference is the base with the adapters disabled, so POPO's extra memory over
LoRA GRPO is the adapter's size.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor, nn

from popo_core.algo.siamese import momentum_update_

POLICY, MOMENTUM = "default", "momentum"  # peft adapter names


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# ---------------------------------------------------------------------------------- precision
def autocast(device: torch.device, compute_dtype: torch.dtype):
    """bf16/fp16 forward (and its backward) over fp32 master weights; a no-op for fp32."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


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


# ------------------------------------------------------------------------------- companions
class FullCopy:
    """A frozen copy of the policy's weights (the momentum network, or GRPO's reference)."""

    def __init__(self, model, dtype: torch.dtype | None = None):
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.module.eval()
        if dtype is not None:
            self.module.to(dtype)

    @contextlib.contextmanager
    def active(self):
        yield self.module

    def update_(self, policy, m: float) -> None:
        from popo_core.trainer.distributed import local

        # Section 2: xi <- m * xi + (1 - m) * theta, parameter by parameter (shard by shard under FSDP).
        momentum_update_([local(p) for p in self.module.parameters()], [local(p) for p in policy.parameters()], m)

    def state_dict(self) -> dict[str, Tensor]:
        # Tied weights share storage; safetensors wants each tensor once, so clone.
        return {k: v.detach().clone().contiguous().cpu() for k, v in self.module.state_dict().items()}

    def sharded_state_dict(self) -> dict[str, Tensor]:
        """The state as DTensors, for torch.distributed.checkpoint."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)

    def held(self) -> int:
        """Elements of the tensors this companion adds to memory."""
        return sum(t.numel() for t in self.module.state_dict().values())


class MomentumAdapter:
    """The momentum network as a second LoRA adapter on the policy's frozen base (METHOD.md
    section 2: with LoRA only the adapter parameters are averaged, A and B each)."""

    def __init__(self, model):
        from peft import LoraConfig

        config = copy.deepcopy(model.peft_config[POLICY])
        assert isinstance(config, LoraConfig)
        model.add_adapter(MOMENTUM, config)
        model.set_adapter(POLICY)
        self.model = model
        self.pairs = list(zip([p for _, p in adapter_params(model, MOMENTUM)], [p for _, p in adapter_params(model, POLICY)]))
        with torch.no_grad():
            for xi, theta in self.pairs:
                xi.copy_(theta)
                xi.requires_grad_(False)

    def active(self):
        return adapter(self.model, MOMENTUM)

    def update_(self, policy, m: float) -> None:
        momentum_update_([xi for xi, _ in self.pairs], [theta for _, theta in self.pairs], m)

    def state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach().clone().cpu() for n, p in adapter_params(self.model, MOMENTUM)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        own = dict(adapter_params(self.model, MOMENTUM))
        if set(own) != set(state):
            raise RuntimeError("checkpoint does not match the momentum adapter")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n])

    def held(self) -> int:
        return sum(xi.numel() for xi, _ in self.pairs)


class AdaptersDisabled:
    """GRPO's frozen reference under LoRA: the base model with every adapter switched off."""

    def __init__(self, model):
        self.model = model

    @contextlib.contextmanager
    def active(self):
        with self.model.disable_adapter():
            yield self.model

    def update_(self, policy, m: float) -> None:  # a reference never moves
        raise TypeError("the reference model is frozen")

    def state_dict(self) -> dict[str, Tensor]:
        return {}

    def load_state_dict(self, state) -> None:
        pass

    def held(self) -> int:
        return 0


def momentum_network(model):
    return MomentumAdapter(model) if is_peft(model) else FullCopy(model)


def reference_network(model, compute_dtype: torch.dtype):
    # Frozen weights may stay in the compute dtype (METHOD.md: only masters and the momentum need fp32).
    return AdaptersDisabled(model) if is_peft(model) else FullCopy(model, dtype=compute_dtype)
