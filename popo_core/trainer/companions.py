"""The policy's companions and its precision: the momentum network, the frozen reference (as full
copies or as LoRA adapters, popo_core.model.lora), and fp32 master weights under bf16 compute.

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

import torch
from torch import Tensor

from popo_core.algo.siamese import momentum_update_
from popo_core.model.lora import MOMENTUM, POLICY, adapter, adapter_params, is_peft


# ---------------------------------------------------------------------------------- precision
def autocast(device: torch.device, compute_dtype: torch.dtype):
    """bf16/fp16 forward (and its backward) over fp32 master weights; a no-op for fp32."""
    if compute_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


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
        """Elements of the tensors this companion adds to memory (tied weights counted once)."""
        unique = {t.data_ptr(): t.numel() for t in self.module.state_dict().values()}
        return sum(unique.values())


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
